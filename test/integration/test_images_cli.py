"""``moorage images …`` as a subprocess against a test daemon (and offline on its root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config, run_container, wait_exited
from moorage.testing.daemon import REPO
from moorage.testing.imagesenv import (
    content_files,
    list_images,
    snapshot_entries,
    status,
)
from moorage.testing.layouts import tar_layout

pytestmark = pytest.mark.integration


def moorage(d, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "images", args[0], "--config", d.config_path, *args[1:]],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"moorage images {' '.join(args)} exited {r.returncode}:\n{r.stderr}")
    return r


def test_pull_ls_rm(daemon, registry):
    img = registry.images["busybox"]
    r = moorage(daemon, "pull", img.ref)
    iid = r.stdout.strip()
    assert iid == img.layout.manifests[0].config_digest
    assert "100%" in r.stderr and "[" in r.stderr and img.ref in r.stderr  # the progress bar, on stderr
    moorage(daemon, "pull", "-q", f"{img.repository}:1.0")
    ls = moorage(daemon, "ls").stdout.splitlines()
    assert ls[0].split()[:3] == ["IMAGE", "TAG", "IMAGE"]
    assert any(l.split()[:2] == [img.repository, "latest"] for l in ls)
    assert any(l.split()[:2] == [img.repository, "1.0"] for l in ls)
    assert moorage(daemon, "ls", "-q").stdout.split() == [iid]
    assert img.digest.removeprefix("sha256:")[:13] in moorage(daemon, "ls", "--digests").stdout
    moorage(daemon, "rm", f"{img.repository}:1.0")
    assert status(daemon, iid).image.repo_tags == [f"{img.repository}:latest"]
    moorage(daemon, "rm", iid)
    assert list_images(daemon) == []
    r = moorage(daemon, "rm", "nothere:latest", check=False)
    assert r.returncode == 1 and "no such image" in r.stderr


def test_pull_errors_are_reported(daemon, registry):
    r = moorage(daemon, "pull", "Bad:Ref", check=False)
    assert r.returncode == 2 and "lowercase" in r.stderr
    r = moorage(daemon, "pull", f"{registry.host}/test/busybox:missing", check=False)
    assert r.returncode == 2 and "missing" in r.stderr
    r = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "images", "ls", "--socket", "/nonexistent.sock"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no daemon socket" in r.stderr


def test_pull_with_creds(daemon_factory, auth_registry):
    d = daemon_factory(start=False)
    d.write_config()
    shutil.copytree(auth_registry.hosts_dir, os.path.join(d.base, "certs.d"), dirs_exist_ok=True)
    d.start()
    ref = auth_registry.ref("busybox")
    r = moorage(d, "pull", ref, "--creds", "moorage:wrong", check=False)
    assert r.returncode == 2 and "authentication" in r.stderr and auth_registry.host in r.stderr
    r = moorage(d, "pull", ref, "--creds", f"{auth_registry.username}:{auth_registry.password}")
    assert r.stdout.strip() == auth_registry.images["busybox"].layout.manifests[0].config_digest


def test_import_export_with_daemon_running(daemon, registry, test_image_layouts, tmp_path):
    info = test_image_layouts["multilayer"]
    arc = tar_layout(info.path, str(tmp_path / "ml.tar"))
    r = moorage(daemon, "import", arc, "--base-name", "example.com/air/gapped")
    iid = info.manifests[0].config_digest
    assert iid in r.stdout and "example.com/air/gapped:latest" in r.stdout
    # the daemon sees it at once and runs containers from it
    assert status(daemon, "example.com/air/gapped:latest").image.id == iid
    sb_cfg = pod_config()
    sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cid = run_container(daemon.runtime, sid, sb_cfg, container_config("example.com/air/gapped:latest",
                                                                      ["cat", "/data/keep.txt"]))
    assert wait_exited(daemon.runtime, cid).exit_code == 0
    daemon.cleanup_pods()
    # export, remove, import the export: the same image comes back
    out = str(tmp_path / "export.tar")
    moorage(daemon, "export", "example.com/air/gapped:latest", out)
    moorage(daemon, "rm", "example.com/air/gapped:latest")
    assert list_images(daemon) == [] and content_files(daemon) == [] and snapshot_entries(daemon) == []
    moorage(daemon, "import", out)
    st = status(daemon, "example.com/air/gapped:latest").image
    assert st.id == iid
    moorage(daemon, "rm", iid)
    assert content_files(daemon) == [] and snapshot_entries(daemon) == []


def test_import_before_the_daemon_starts(daemon_factory, test_image_layouts, tmp_path):
    d = daemon_factory(start=False)
    d.write_config()
    info = test_image_layouts["busybox"]
    moorage(d, "import", tar_layout(info.path, str(tmp_path / "bb.tar")), "--base-name", "docker.io/library/busybox")
    d.start()
    iid = info.manifests[0].config_digest
    assert status(d, "busybox").image.id == iid  # start-up GC keeps what is recorded
    assert sorted(status(d, "busybox").image.repo_tags) == sorted(
        f"docker.io/library/busybox:{t}" for t in info.tags)
    r = moorage(d, "export", "busybox", str(tmp_path / "out.tar"), "--also", "busybox:1.0")
    assert iid in r.stdout and os.path.getsize(tmp_path / "out.tar") > 500_000
