"""The shipped systemd unit: what the daemon's notify support and the node install rely on."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _unit() -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=True, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read(REPO / "manifests" / "systemd" / "moorage.service")
    return p


def test_the_unit_waits_for_readiness_and_keeps_containers_on_restart() -> None:
    svc = _unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"  # conmon, runc and plugins never speak for us
    assert svc["KillMode"] == "process"
    assert svc["Delegate"] == "yes"
    assert svc["WatchdogSec"] == "2min"
    assert svc["Restart"] == "always"


def test_the_unit_runs_what_install_node_installs() -> None:
    svc = _unit()["Service"]
    assert svc["ExecStart"].split()[:2] == ["/opt/moorage/venv/bin/moorage", "serve"]
    script = (REPO / "hack" / "install-node.sh").read_text()
    assert 'VENV=${VENV:-/opt/moorage/venv}' in script or "/opt/moorage/venv" in script
