"""Drop-ins and SIGHUP against a running daemon: reloadable keys take effect, the rest is refused
by name, an invalid drop-in changes nothing."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import wait_for
from moorage.testing.daemon import DaemonProcess


def _network_ready(d: DaemonProcess) -> bool:
    st = d.runtime.Status(pb.StatusRequest())
    return {c.type: c for c in st.status.conditions}["NetworkReady"].status


def _running_config(d: DaemonProcess) -> dict:
    return json.loads(d.runtime.Status(pb.StatusRequest(verbose=True)).info["config"])


def _lines(d: DaemonProcess) -> list[dict]:
    with open(d.log_file, errors="replace") as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def _debug_version_calls(d: DaemonProcess) -> int:
    d.runtime.Version(pb.VersionRequest())
    return sum(1 for r in _lines(d) if r["level"] == "debug" and r.get("method") == "RuntimeService/Version")


def _hup(d: DaemonProcess, until: Callable[[dict], bool], what: str) -> dict:
    """SIGHUP, then the first new log line that ``until`` accepts."""
    seen = len(_lines(d))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    return wait_for(lambda: next((r for r in _lines(d)[seen:] if until(r)), None), 15, what=what)


def _reloaded(r: dict) -> bool:
    return r["msg"] == "config reloaded"


def test_sighup_applies_dropins_and_refuses_the_rest(daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory(start=False)
    d.write_config()  # its main file says log_level = "debug"; a drop-in says otherwise
    dropins = os.path.join(d.base, "config.d")
    os.makedirs(dropins)

    def drop(name: str, text: str) -> str:
        path = os.path.join(dropins, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    drop("10-level.toml", 'log_level = "info"\n')
    net = os.path.join(d.base, "net2")
    os.makedirs(net)
    with open(os.path.join(net, "10-test.conflist"), "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "reloaded",
                   "plugins": [{"type": "bridge", "bridge": "mrgrl0", "ipam": {"type": "host-local"}}]}, f)
    d.start()
    assert not any(r["level"] == "debug" for r in _lines(d))  # the drop-in won over the main file
    assert _debug_version_calls(d) == 0
    assert not _network_ready(d)  # the main file's conf dir is empty
    assert "config.d/10-level.toml" in json.dumps(next(r for r in _lines(d) if r["msg"] == "config loaded"))

    # reloadable: log level and CNI conf dir
    drop("20-reload.toml", f'log_level = "debug"\n[cni]\nconf_dir = "{net}"\n')
    line = _hup(d, _reloaded, "config reloaded")
    assert sorted(line["applied"]) == ["cni.conf_dir", "log_level"] and line["refused"] == []
    assert _debug_version_calls(d) >= 1
    assert _network_ready(d)
    assert _running_config(d)["cni"]["conf_dir"] == net

    # not reloadable: refused by name, the daemon keeps its running value
    root_drop = drop("30-root.toml", 'root_dir = "/var/lib/moorage-elsewhere"\n')
    line = _hup(d, lambda r: "restart to apply" in r["msg"], "the refusal")
    assert "'root_dir'" in line["msg"] and root_drop in line["msg"] and line["level"] == "warning"
    assert _running_config(d)["root_dir"] == d.root
    assert wait_for(lambda: next((r for r in _lines(d) if _reloaded(r) and r["refused"] == ["root_dir"]), None), 15)
    os.unlink(root_drop)

    # invalid: nothing changes, not even the valid edits made with it
    before = _running_config(d)
    drop("20-reload.toml", 'log_level = "info"\n')  # would turn debug off and the conf dir back
    bad = drop("40-bad.toml", '[cni]\nplugin_timeout = "soon"\n')
    line = _hup(d, lambda r: r["msg"].startswith("config reload failed"), "the reload error")
    assert f"{bad}: key 'cni.plugin_timeout'" in line["msg"] and line["level"] == "error"
    assert _running_config(d) == before
    assert _network_ready(d)
    calls = _debug_version_calls(d)
    assert _debug_version_calls(d) == calls + 1  # still at debug level

    # fixed: the pending edits apply
    os.unlink(bad)
    line = _hup(d, _reloaded, "config reloaded")
    assert sorted(line["applied"]) == ["cni.conf_dir", "log_level"]
    assert not _network_ready(d)
    calls = _debug_version_calls(d)
    assert _debug_version_calls(d) == calls
    assert d.proc is not None and d.proc.poll() is None
