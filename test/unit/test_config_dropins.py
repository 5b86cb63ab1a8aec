"""config.d drop-ins: merge order and rules, errors naming the drop-in and key, `config dump` and `check`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moorage.cri import config as c


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moorage.cri.cli", *args], capture_output=True, text=True)


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.toml").write_text(
        'log_level = "debug"\n'
        '[runtime]\ndefault_handler = "kata"\n'
        '[runtime.handlers.kata]\npath = "/usr/bin/kata"\n'
        '[runtime.rlimits]\nNOFILE = [10, 20]\n'
        '[images]\ninsecure_registries = ["a:5000", "b:5000"]\n'
        '[cni]\nbin_dirs = ["/main"]\nplugin_timeout = 5\n')
    return tmp_path


def _drop(etc: Path, name: str, text: str) -> Path:
    p = etc / "config.d" / name
    p.write_text(text)
    return p


def test_dropins_merge_key_by_key_in_lexical_order(etc: Path) -> None:
    _drop(etc, "20-b.toml", '[cni]\nbin_dirs = ["/twenty"]\n')
    _drop(etc, "10-a.toml", '[cni]\nbin_dirs = ["/ten"]\nconf_dir = "/ten/net.d"\n'
                            '[runtime.handlers.youki]\npath = "/usr/bin/youki"\n'
                            '[runtime.rlimits]\nCORE = [0, 0]\n'
                            '[images]\ninsecure_registries = ["c:5000"]\n')
    _drop(etc, "05-not-toml.conf", "this is ignored")
    _drop(etc, ".30-hidden.toml", "bogus = 1")
    loaded = c.load_layers(str(etc / "config.toml"))
    cfg = loaded.config
    assert loaded.files == [str(etc / "config.toml"), str(etc / "config.d/10-a.toml"), str(etc / "config.d/20-b.toml")]
    assert cfg.cni.bin_dirs == ["/twenty"]  # the later drop-in wins
    assert cfg.cni.conf_dir == "/ten/net.d" and cfg.cni.plugin_timeout == 5.0  # other keys of the table stay
    assert set(cfg.runtime.handlers) == {"kata", "youki"}  # tables merge
    assert cfg.runtime.rlimits == {"NOFILE": [10, 20], "CORE": [0, 0]}
    assert cfg.images.insecure_registries == ["c:5000"]  # a list replaces, never appends
    assert cfg.log_level == "debug" and cfg.runtime.default_handler == "kata"
    assert c.load(str(etc / "config.toml")) == cfg

    assert loaded.origin("cni.bin_dirs") == str(etc / "config.d/20-b.toml")
    assert loaded.origin("cni.conf_dir") == str(etc / "config.d/10-a.toml")
    assert loaded.origin("cni.plugin_timeout") == str(etc / "config.toml")
    assert loaded.origin("runtime.handlers.youki.path") == str(etc / "config.d/10-a.toml")
    assert loaded.origin("runtime.handlers.kata.root") == "default"
    assert loaded.origin("socket") == "default"


def test_without_dropins_the_main_file_alone_loads_as_before(etc: Path) -> None:
    (etc / "config.d").rmdir()
    text = (etc / "config.toml").read_text()
    assert c.load(str(etc / "config.toml")) == c.loads(text)


def test_dropins_apply_when_the_default_main_file_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c, "DEFAULT_CONFIG_PATH", str(tmp_path / "config.toml"))
    assert c.load_layers(None).files == [] and c.load(None) == c.Config()
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "50-level.toml").write_text('log_level = "warning"\n')
    loaded = c.load_layers(None)
    assert loaded.config.log_level == "warning" and loaded.files == [str(tmp_path / "config.d/50-level.toml")]
    # an explicitly named main file must exist
    with pytest.raises(c.ConfigError, match="cannot read"):
        c.load_layers(str(tmp_path / "config.toml"))


@pytest.mark.parametrize("text,needle", [
    ("[cni]\nplugin_timout = 3\n", "unknown key 'cni.plugin_timout'"),
    ('[cni]\nplugin_timeout = "3"\n', "key 'cni.plugin_timeout': expected a number"),
    ("[cni\n", "not valid TOML"),
    # needs the merged view: the key is set here, the handler list comes from the main file
    ('[runtime]\ndefault_handler = "gvisor"\n', "key 'runtime.default_handler': names no handler"),
    ('[runtime.handlers.youki]\nroot = "/run/youki"\n', "key 'runtime.handlers.youki.path': must name"),
    ('[runtime]\ndefault_capabilities = ["CHOWN", "NOPE"]\n', "key 'runtime.default_capabilities[1]'"),
    ('[runtime.rlimits]\nNOFILE = [20, 10]\n', "key 'runtime.rlimits.NOFILE'"),
])
def test_errors_name_the_dropin_and_the_key(etc: Path, text: str, needle: str) -> None:
    _drop(etc, "10-fine.toml", '[cni]\nconf_dir = "/x"\n')
    bad = _drop(etc, "50-bad.toml", text)
    with pytest.raises(c.ConfigError) as e:
        c.load_layers(str(etc / "config.toml"))
    assert e.value.message.startswith(f"{bad}: "), e.value.message
    assert needle in e.value.message


def test_an_error_about_a_key_no_file_set_names_the_file_that_set_its_table(etc: Path) -> None:
    # default_handler keeps its default ("runc"), which the handlers the main file sets no longer
    # include: the error names the file that set something in [runtime].
    (etc / "config.toml").write_text('[runtime.handlers.kata]\npath = "/usr/bin/kata"\n')
    with pytest.raises(c.ConfigError) as e:
        c.load_layers(str(etc / "config.toml"))
    assert e.value.message.startswith(f"{etc / 'config.toml'}: key 'runtime.default_handler'")


def test_dump_is_valid_toml_of_the_effective_config_with_each_keys_file(etc: Path) -> None:
    d10 = _drop(etc, "10-a.toml", '[cni]\nconf_dir = "/ten"\n[runtime.default_sysctls]\n"net.ipv4.ping_group_range" = "0 1"\n')
    r = _cli("config", "dump", "--config", str(etc / "config.toml"))
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)  # comments and all
    assert c.loads(r.stdout) == c.load(str(etc / "config.toml"))
    lines = r.stdout.splitlines()
    assert f'conf_dir = "/ten"  # {d10}' in lines
    assert f'"net.ipv4.ping_group_range" = "0 1"  # {d10}' in lines
    assert f'log_level = "debug"  # {etc / "config.toml"}' in lines
    assert 'socket = "/run/moorage/moorage.sock"  # default' in lines
    assert f"{etc / 'config.toml'}, {d10}" in lines[0]


def test_check_validates_the_dropins_too(etc: Path) -> None:
    d10 = _drop(etc, "10-a.toml", '[cni]\nconf_dir = "/ten"\n')
    r = _cli("config", "check", str(etc / "config.toml"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{etc / 'config.toml'}: ok", f"{d10}: ok"]
    bad = _drop(etc, "20-b.toml", '[images]\nmax_concurrent_downloads = 0\n')
    r = _cli("config", "check", str(etc / "config.toml"))
    assert r.returncode == 2
    assert f"{bad}: key 'images.max_concurrent_downloads': must be at least 1" in r.stderr
