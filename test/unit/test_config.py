import subprocess
import sys

import pytest

from moorage.cri import config as c


def test_default_config_round_trips_through_toml():
    assert c.loads(c.dumps(c.Config())) == c.Config()


@pytest.mark.parametrize("text,needle", [
    ("bogus = 1", "unknown key 'bogus'"),
    ("[runtime]\nnope = true", "unknown key 'runtime.nope'"),
    ('log_level = "loud"', "key 'log_level': must be one of"),
    ('[images]\nmax_concurrent_downloads = "3"', "key 'images.max_concurrent_downloads': expected an integer"),
    ('[runtime]\ndefault_handler = "kata"', "key 'runtime.default_handler': names no handler"),
    ('[runtime.handlers.kata]\nbogus = "x"', "unknown key 'runtime.handlers.kata.bogus'"),
    ('[metrics]\naddress = "nowhere"', "key 'metrics.address'"),
    ('socket_mode = "rw"', "key 'socket_mode'"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_config_is_reported_by_file_and_key(text, needle):
    with pytest.raises(c.ConfigError) as e:
        c.loads(text, "/etc/x.toml")
    assert e.value.message.startswith("/etc/x.toml: ")
    assert needle in e.value.message


def test_partial_config_keeps_other_defaults():
    cfg = c.loads('[runtime]\ndefault_handler = "kata"\n[runtime.handlers.kata]\npath = "/usr/bin/kata"\n[cni]\nplugin_timeout = 5')
    assert set(cfg.runtime.handlers) == {"kata"}
    assert cfg.cni.plugin_timeout == 5.0 and cfg.cni.conf_dir == "/etc/cni/net.d"
    with pytest.raises(c.InvalidArgument, match="unknown runtime handler 'gvisor'"):
        cfg.handler("gvisor")


def test_cli_config_default_and_check(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "config", "default"], capture_output=True, text=True, check=True)
    good = tmp_path / "good.toml"
    good.write_text(out.stdout)
    r = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "config", "check", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[cni]\nplugin_timout = 3\n')
    r = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "config", "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{bad}: unknown key 'cni.plugin_timout'" in r.stderr
