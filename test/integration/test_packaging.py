"""One installable distribution: `pip install .` and the released wheel each give a working `moorage`.

The release is what ``hack/release.sh`` builds from a clean checkout (a git
repository holding a copy of the tracked files): the wheel, the sdist, the
zipapp and the node bundle.  Installs go into fresh virtual environments
(dependencies come from the package index, usually pip's cache).  The checks:
the distribution installs nothing at the top level of site-packages but
``moorage`` (no generic ``cri``/``runtime``/``test`` packages), it carries its
data files and ``py.typed``, the installed command serves the CRI on a socket,
the zipapp runs with an interpreter that has the dependencies, and
``hack/install-node.sh`` lays out a node under a staged root (never the real /etc).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import grpc
import pytest

from moorage.cri import config as configmod
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
            shutil.copy2(src, out)  # with its mode: the hack/ scripts run
    return dst


@pytest.fixture(scope="module")
def release(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``hack/release.sh`` run in a clean git checkout of the tracked files; its dist/ directory."""
    checkout = tmp_path_factory.mktemp("checkout") / "moorage"
    shutil.copytree(source, checkout, symlinks=True)
    git = ("git", "-C", checkout, "-c", "user.name=release", "-c", "user.email=release@localhost")
    _run(*git, "init", "-q")
    _run(*git, "add", "-A")
    _run(*git, "commit", "-q", "-m", "release")
    p = subprocess.run([str(checkout / "hack" / "release.sh")], cwd="/", capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHON": sys.executable}, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "uncommitted" not in p.stderr  # a clean checkout builds without a warning
    # the build wrote nothing into the checkout but dist/ (no build/, no *.egg-info)
    assert _run(*git, "status", "--porcelain", "--ignored").splitlines() == ["!! dist/"]
    return checkout / "dist"


@pytest.fixture(scope="module")
def wheel(release: Path) -> Path:
    (whl,) = release.glob("moorage-*.whl")
    return whl


def test_the_release_holds_wheel_sdist_zipapp_and_node_bundle(release: Path, wheel: Path, source: Path) -> None:
    version = wheel.name.split("-")[1]
    names = sorted(p.name for p in release.iterdir())
    assert names == sorted(["SHA256SUMS", wheel.name, f"moorage-{version}.tar.gz", "moorage.pyz",
                            f"moorage-{version}-node.tar.gz"]), names
    _run("sha256sum", "--strict", "-c", "SHA256SUMS", cwd=release)
    with tarfile.open(release / f"moorage-{version}.tar.gz") as t:
        sdist = t.getnames()
    for must in ("PKG-INFO", "pyproject.toml", "moorage/cri/api/api.proto", "moorage/runtime/seccomp_default.json",
                 "moorage/cri/notify.py"):
        assert f"moorage-{version}/{must}" in sdist, must
    with tarfile.open(release / f"moorage-{version}-node.tar.gz") as t:
        node = {m.name: m for m in t.getmembers() if m.isfile()}
        unit = t.extractfile(node[f"moorage-{version}-node/manifests/systemd/moorage.service"])
        assert unit is not None and unit.read() == (source / "manifests/systemd/moorage.service").read_bytes()
    assert sorted(n.split("/", 1)[1] for n in node) == sorted([
        "README.md", "docs/install.md", "hack/install-node.sh", f"dist/{wheel.name}", "manifests/crictl.yaml",
        "manifests/systemd/moorage.service", "manifests/cni/10-moorage-bridge.conflist"])
    assert node[f"moorage-{version}-node/hack/install-node.sh"].mode & 0o111


@pytest.fixture(scope="module")
def deps_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with moorage's dependencies but not moorage: what the zipapp is run with."""
    venv = _venv(tmp_path_factory.mktemp("deps") / "venv", wheel)
    _run(venv / "bin" / "python", "-m", "pip", "uninstall", "-q", "-y", "moorage")
    p = subprocess.run([venv / "bin" / "python", "-c", "import moorage"], cwd="/", capture_output=True, check=False)
    assert p.returncode != 0
    return venv


def test_the_zipapp_runs_with_an_interpreter_that_has_the_dependencies(release: Path, deps_venv: Path,
                                                                       source: Path) -> None:
    pyz = release / "moorage.pyz"
    python = deps_venv / "bin" / "python"
    assert _run(python, pyz, "version").startswith("moorage ")
    assert _run(python, pyz, "config", "default") == configmod.dumps(configmod.Config())
    # package data is read from inside the zip (the default seccomp profile, which every container uses)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from moorage.runtime import seccomp; "
             "assert seccomp.__file__.startswith(sys.argv[1]), seccomp.__file__; print(len(seccomp.default_profile([])['syscalls']))")
    assert int(_run(python, "-c", probe, pyz)) > 10
    # without the dependencies it says what is missing instead of a traceback
    p = subprocess.run([sys.executable, "-S", str(pyz), "version"], cwd="/", capture_output=True, text=True, check=False)
    assert p.returncode != 0 and "run it with a Python that has moorage's dependencies" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_install_node_lays_out_a_staged_root_and_keeps_existing_files(release: Path, wheel: Path, source: Path,
                                                                     tmp_path: Path) -> None:
    version = wheel.name.split("-")[1]
    with tarfile.open(release / f"moorage-{version}-node.tar.gz") as t:
        t.extractall(tmp_path, filter="tar")
    script = tmp_path / f"moorage-{version}-node" / "hack" / "install-node.sh"
    root = tmp_path / "root"
    real = ["/etc/moorage/config.toml", "/etc/systemd/system/moorage.service", "/srv/moorage"]
    real_before = {p: os.path.lexists(p) for p in real}

    def install(*extra: str) -> str:
        p = subprocess.run([str(script), "--root", str(root), "--venv", "/srv/moorage/venv", *extra], cwd="/",
                           capture_output=True, text=True, timeout=600, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stderr

    install()
    moorage = root / "srv/moorage/venv/bin/moorage"
    assert _run(moorage, "version").startswith(f"moorage {version} ")
    config = root / "etc/moorage/config.toml"
    assert config.read_text() == configmod.dumps(configmod.Config())  # `moorage config default`
    assert "ok" in _run(moorage, "config", "check", config)
    want_unit = (source / "manifests/systemd/moorage.service").read_text().replace(
        "ExecStart=/opt/moorage/venv/bin/moorage ", "ExecStart=/srv/moorage/venv/bin/moorage ")
    assert "ExecStart=/srv/moorage/venv/bin/moorage serve --config /etc/moorage/config.toml\n" in want_unit
    assert (root / "etc/systemd/system/moorage.service").read_text() == want_unit
    conflist = root / "etc/cni/net.d/10-moorage-bridge.conflist"
    assert conflist.read_bytes() == (source / "manifests/cni/10-moorage-bridge.conflist").read_bytes()
    assert (root / "etc/crictl.yaml").read_bytes() == (source / "manifests/crictl.yaml").read_bytes()
    assert (root / "usr/share/doc/moorage/install.md").is_file()
    assert {p: os.path.lexists(p) for p in real} == real_before  # the real node was not touched

    # again: the operator's edits stay
    config.write_text(config.read_text() + "# mine\n")
    out = install()
    assert config.read_text().endswith("# mine\n")
    assert f"kept {config}" in out
    # --force replaces them
    install("--force")
    assert config.read_text() == configmod.dumps(configmod.Config())

    # a node that has its own pod network keeps it alone
    conflist.unlink()
    other = conflist.with_name("05-calico.conflist")
    other.write_text('{"name": "k8s-pod-network"}')
    out = install()
    assert not conflist.exists() and other.read_text() == '{"name": "k8s-pod-network"}'
    assert "kept the node's CNI network (05-calico.conflist)" in out


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
