"""One installable distribution: `pip install .` and the built wheel each give a working `moorage`.

Both go into fresh virtual environments (dependencies come from the package
index, usually pip's cache).  The checks: the distribution installs nothing at
the top level of site-packages but ``moorage`` (no generic ``cri``/``runtime``
/``test`` packages), it carries its data files and ``py.typed``, and the
installed command serves the CRI on a socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.testing.daemon import DaemonProcess

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _run(*argv: str | Path, cwd: Path | None = None) -> str:
    p = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, f"{argv} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean copy of the tracked files (symlinks kept), so building never writes into the checkout."""
    dst = tmp_path_factory.mktemp("src")
    files = _run("git", "-C", REPO, "ls-files", "-z").split("\0")
    for f in filter(None, files):
        src = REPO / f
        if not os.path.lexists(src):
            continue  # deleted in the work tree
        out = dst / f
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        elif src.is_file():
            out.write_bytes(src.read_bytes())
    return dst


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, source)
    (whl,) = out.glob("moorage-*.whl")
    return whl


def _venv(where: Path, *install: str | Path) -> Path:
    _run(sys.executable, "-m", "venv", where)
    _run(where / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", *install)
    return where


def _own_files(venv: Path) -> list[str]:
    """Paths that the moorage distribution installed, from its RECORD."""
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (record,) = site.glob("moorage-*.dist-info/RECORD")
    return [line.split(",", 1)[0] for line in record.read_text().splitlines() if line]


def test_the_wheel_holds_one_import_root_with_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"moorage", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    for must in ("moorage/py.typed", "moorage/cri/api/api.proto", "moorage/cri/api/api_pb2.py",
                 "moorage/runtime/seccomp_default.json", "moorage/core/store.py", "moorage/testing/daemon.py"):
        assert must in names, must
    assert not [n for n in names if "/test/" in n or n.startswith("test/") or "/hack/" in n]


@pytest.mark.parametrize("how", ["wheel", "source"])
def test_an_installed_moorage_serves_the_cri(how: str, wheel: Path, source: Path,
                                             tmp_path: Path) -> None:
    venv = _venv(tmp_path / "venv", wheel if how == "wheel" else source)
    own = _own_files(venv)
    tops = {p.split("/", 1)[0] for p in own if not p.startswith("..")}
    assert tops == {"moorage", next(t for t in tops if t.endswith(".dist-info"))}, tops
    moorage = venv / "bin" / "moorage"
    assert "moorage" in _run(moorage, "version")
    assert "[runtime]" in _run(moorage, "config", "default")
    where = _run(venv / "bin" / "python", "-c", "import moorage; print(moorage.__file__)", cwd=tmp_path)
    assert where.startswith(str(venv)), where

    # the installed command, from a directory that is not the checkout, serves Version
    d = DaemonProcess(tempfile.mkdtemp(prefix="mrgpk-"))
    d.write_config()
    log = open(os.path.join(d.base, "daemon.log"), "wb")
    proc = subprocess.Popen([str(moorage), "serve", "--config", d.config_path], cwd=d.base,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        with grpc.insecure_channel(f"unix://{d.socket}") as ch:
            rt = pbg.RuntimeServiceStub(ch)
            deadline = time.monotonic() + 30
            while True:
                try:
                    v = rt.Version(pb.VersionRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    assert proc.poll() is None, Path(d.base, "daemon.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "the installed daemon did not answer"
                    time.sleep(0.1)
            assert v.runtime_name == "moorage"
        # the daemon runs the venv's interpreter, which imports the installed package
        argv0 = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert argv0.startswith(str(venv)), argv0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(d.base, ignore_errors=True)
