"""``moorage images …`` as a subprocess against a test daemon (and offline on its root)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config, run_container, wait_exited
from moorage.testing.daemon import REPO
from moorage.testing.imagesenv import (
    RegistryProxy,
    content_files,
    list_images,
    snapshot_entries,
    status,
)
from moorage.testing.layouts import tar_layout
from moorage.testing.registry import FakeResponse
from moorage.testing.testimages import read_layout_blob

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


def _daemon_pulls(d) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/debug/pulls", timeout=5) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return json.loads(resp.read())["pulls"]


def test_pull_progress_comes_from_the_daemon(daemon, registry):
    """The biggest layer of a multi-layer image stops half-way (the proxy holds the rest):
    the daemon's /debug/pulls shows that partial value, and so does the CLI's bar."""
    img = registry.images["multilayer"]
    manifest = json.loads(read_layout_blob(img.layout.path, img.layout.manifests[0].digest))
    sizes = {layer["digest"]: layer["size"] for layer in manifest["layers"]}
    big = max(sizes, key=lambda d: sizes[d])
    release = asyncio.Event()  # set on the proxy's loop, from this thread

    with RegistryProxy(registry.host) as proxy:
        async def hold_big_layer(req, n):
            if req.method == "GET" and req.route.endswith(big):
                up = await proxy._client.get(f"http://{registry.host}{req.path}")
                return FakeResponse(200, {"Content-Type": "application/octet-stream"}, up.content,
                                    send_only=len(up.content) // 2, then="wait", gate=release.wait)
            return None

        proxy.hook = hold_big_layer
        ref = f"{proxy.host}/test/multilayer:latest"
        cli = subprocess.Popen([sys.executable, "-m", "moorage.cri.cli", "images", "pull", "--config",
                                daemon.config_path, ref], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            partial = None
            while partial is None and time.monotonic() < deadline and cli.poll() is None:
                for p in _daemon_pulls(daemon):
                    layer = {x["digest"]: x for x in p["layers"]}.get(big)
                    if p["ref"] == ref and layer and 0 < layer["done"] < layer["size"]:
                        partial = p
                time.sleep(0.05)
            assert partial is not None, "never saw the held layer half done"
            assert partial["state"] == "pulling" and partial["total_bytes"] == sum(sizes.values())
            assert 0 < partial["done_bytes"] < partial["total_bytes"]
            assert {x["digest"]: x["size"] for x in partial["layers"]} == sizes
            time.sleep(2.5)  # the CLI (not a tty) draws a line a second: let it draw the partial state
        finally:
            proxy._loop.call_soon_threadsafe(release.set)
            out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err
    assert out.strip() == img.layout.manifests[0].config_digest
    percents = [int(m) for m in re.findall(r"\]\s+(\d+)%", err)]
    assert any(0 < pc < 100 for pc in percents), err  # the bar showed the daemon's partial value
    assert percents[-1] == 100, err
    done = [p for p in _daemon_pulls(daemon) if p["ref"] == ref]
    assert done[-1]["state"] == "done" and done[-1]["done_bytes"] == done[-1]["total_bytes"]


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
