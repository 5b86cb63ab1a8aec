"""`moorage check` compares the cgroup driver with the init system (PID 1 faked)."""

from __future__ import annotations

import pytest

from moorage.cri import cli, cli_admin


@pytest.mark.parametrize("init,driver,warn", [
    ("systemd", "cgroupfs", True),
    ("systemd", "systemd", False),
    ("catatonit", "systemd", True),
    ("init", "cgroupfs", False),
    ("", "cgroupfs", False),
])
def test_driver_against_pid1(init: str, driver: str, warn: bool) -> None:
    label, ok, hint = cli_admin.cgroup_driver_item(driver, init)
    assert ok and label == "cgroup driver"
    assert hint.startswith(cli_admin.WARNING) == warn
    if warn:
        assert "cgroupDriver" in hint  # says what to set on the kubelet side too


def test_check_prints_warn(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli_admin, "pid1_name", lambda: "systemd")
    cfg = tmp_path / "config.toml"
    cfg.write_text('[runtime]\ncgroup_driver = "cgroupfs"\n')
    cli.main(["check", "--config", str(cfg)])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "cgroup driver" in ln)
    assert line.startswith("warn ") and "systemd is PID 1" in line and "warning:" not in line
    cfg.write_text('[runtime]\ncgroup_driver = "systemd"\n')
    cli.main(["check", "--config", str(cfg)])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "cgroup driver" in ln)
    assert line.startswith("ok ") and "systemd" in line


def test_pid1_name_reads_proc() -> None:
    assert cli_admin.pid1_name()  # this machine has a PID 1 with a name
