"""`moorage check` says why checkpointing is unavailable, from what `criu check` prints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moorage.cri import cli


def _fake_criu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    exe = tmp_path / "criu"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_a_failing_criu_check_is_quoted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_criu(tmp_path, monkeypatch,
               'echo "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds" >&2\nexit 1\n')
    state = cli._criu_state()
    assert state.startswith("unavailable: not implemented")
    assert "vdso: Unexpected rt vDSO area bounds" in state


def test_a_passing_criu_check_still_says_not_implemented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_criu(tmp_path, monkeypatch, 'echo "Looks good."\n')
    assert "although `criu check` passes" in cli._criu_state()


def test_no_criu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "criu is not installed" in cli._criu_state()
