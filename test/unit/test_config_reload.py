"""The reload rules: reloadable keys reach the running parts, the rest is refused by name, a bad file changes nothing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from moorage.cni.manager import CNIManager
from moorage.cri import config as c
from moorage.cri.reload import RELOADABLE, Reloader, ReloadOutcome, ReloadTargets, changed_keys, leaves
from moorage.images.hosts import TLSSettings
from moorage.images.registry import RegistryClient


class FakeImages:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    async def reconfigure_registries(self, hosts_dir: str, insecure_registries: Sequence[str]) -> None:
        self.calls.append((hosts_dir, list(insecure_registries)))

    def set_pinned(self, refs: Sequence[str]) -> None:
        self.pinned = list(refs)


class FakeRuntime:
    def __init__(self) -> None:
        self.levels: list[str] = []

    def set_log_level(self, level: str) -> None:
        self.levels.append(level)


def _conflist(name: str) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": name,
                       "plugins": [{"type": "bridge", "bridge": "mrg0", "ipam": {"type": "host-local"}}]})


class Env:
    def __init__(self, tmp: Path) -> None:
        self.main = tmp / "config.toml"
        self.dropins = tmp / "config.d"
        self.dropins.mkdir()
        self.empty_net = tmp / "net-empty"
        self.net = tmp / "net"
        self.empty_net.mkdir()
        self.net.mkdir()
        (self.net / "10-a.conflist").write_text(_conflist("reloaded"))
        self.main.write_text(f'log_level = "info"\nroot_dir = "{tmp}/root"\n[cni]\nconf_dir = "{self.empty_net}"\n')
        self.cfg = c.load(str(self.main))
        self.images = FakeImages()
        self.runtime = FakeRuntime()
        self.network = CNIManager(self.cfg.cni.conf_dir, self.cfg.cni.bin_dirs, str(tmp / "cache"))
        self.logging: list[tuple[str, str]] = []
        self.reloader = Reloader(self.cfg, lambda: c.load_layers(str(self.main)),
                                 ReloadTargets(images=self.images, network=self.network, runtime=self.runtime),
                                 set_logging=lambda level, fmt: self.logging.append((level, fmt)))

    def drop(self, name: str, text: str) -> Path:
        p = self.dropins / name
        p.write_text(text)
        return p

    def reload(self) -> ReloadOutcome:
        return asyncio.run(self.reloader.reload())


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_reloadable_keys_reach_the_running_parts(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    assert env.network.status()[0] is False
    env.drop("50-reload.toml", f'log_level = "debug"\nlog_format = "logfmt"\n[cni]\nconf_dir = "{env.net}"\n'
                               f'bin_dirs = ["/opt/x"]\nplugin_timeout = 7\n'
                               '[images]\nregistry_config_path = "/etc/other/certs.d"\ninsecure_registries = ["r:5000"]\n'
                               'pinned_images = ["example.com/keep:1"]\n')
    with caplog.at_level(logging.INFO, logger="moorage.reload"):
        out = env.reload()
    assert not out.refused and not out.error
    assert set(out.applied) == {"log_level", "log_format", "cni.conf_dir", "cni.bin_dirs", "cni.plugin_timeout",
                                "images.registry_config_path", "images.insecure_registries", "images.pinned_images"}
    assert env.logging == [("debug", "logfmt")] and env.runtime.levels == ["debug"]
    assert env.images.calls == [("/etc/other/certs.d", ["r:5000"])]
    assert env.images.pinned[-1] == "example.com/keep:1"
    assert env.network.status()[0] is True and env.network.watcher.current().name == "reloaded"
    assert env.network.exec.bin_dirs == ["/opt/x"] and env.network.exec.timeout == 7.0
    # the running config object (what Status verbose shows) carries the new values
    assert env.cfg.log_level == "debug" and env.cfg.cni.conf_dir == str(env.net)
    assert "config reloaded" in caplog.text


def test_other_keys_are_refused_by_name_and_keep_their_running_value(env: Env,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    root = env.cfg.root_dir
    drop = env.drop("50-mixed.toml", 'root_dir = "/var/lib/elsewhere"\nlog_level = "debug"\n'
                                     '[runtime]\ncgroup_driver = "systemd"\n')
    with caplog.at_level(logging.INFO, logger="moorage.reload"):
        out = env.reload()
    assert out.applied == ["log_level"]
    assert sorted(out.refused) == ["root_dir", "runtime.cgroup_driver"]
    assert env.cfg.root_dir == root and env.cfg.runtime.cgroup_driver == "cgroupfs" and env.cfg.log_level == "debug"
    refusals = [r.getMessage() for r in caplog.records if "restart to apply" in r.getMessage()]
    assert len(refusals) == 2
    assert any("'root_dir'" in m and str(drop) in m for m in refusals)
    # a second reload refuses again (the running value still differs) and applies nothing new
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moorage.reload"):
        out = env.reload()
    assert out.applied == [] and sorted(out.refused) == ["root_dir", "runtime.cgroup_driver"]


def test_an_invalid_file_changes_nothing(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.drop("10-good.toml", f'log_level = "debug"\n[cni]\nconf_dir = "{env.net}"\n')
    bad = env.drop("20-bad.toml", '[images]\nmax_concurrent_downloads = 0\n')
    before = leaves(env.cfg)
    with caplog.at_level(logging.INFO, logger="moorage.reload"):
        out = env.reload()
    assert out.applied == [] and f"{bad}: key 'images.max_concurrent_downloads'" in out.error
    assert leaves(env.cfg) == before
    assert env.logging == [] and env.runtime.levels == [] and env.images.calls == []
    assert env.network.conf_dir == str(env.empty_net) and env.network.status()[0] is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"config reload failed, keeping the running config: {out.error}"]


def test_an_unchanged_reload_still_renews_the_registry_config(env: Env) -> None:
    out = env.reload()
    assert out.applied == [] and out.refused == [] and not out.error
    assert env.images.calls == [(env.cfg.images.registry_config_path, [])]


def test_changed_keys_compare_tables_of_entries_whole() -> None:
    a = c.Config()
    b = c.loads('[runtime.handlers.kata]\npath = "/k"\n[runtime]\ndefault_handler = "kata"\n')
    assert sorted(changed_keys(a, b)) == ["runtime.default_handler", "runtime.handlers"]


def test_every_reloadable_key_is_a_config_key() -> None:
    assert set(RELOADABLE) <= set(leaves(c.Config()))


def test_registry_client_reconfigure_renews_connections() -> None:
    async def go() -> None:
        client = RegistryClient(hosts_dir="/a", insecure_hosts=["x:1"])
        first = client._client(TLSSettings())
        await client.reconfigure("/b", ["y:2"], idle=False)
        assert client.hosts_dir == "/b" and client.insecure_hosts == ("y:2",)
        assert not first.is_closed  # a pull may still be reading from it
        second = client._client(TLSSettings())
        assert second is not first
        await client.reconfigure("/b", ["y:2"], idle=True)
        assert first.is_closed and second.is_closed
        await client.aclose()

    asyncio.run(go())
