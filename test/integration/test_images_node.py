"""Images on the node, end to end with a real daemon: registry credentials held by the node
(auth file, credential helper) against the TLS + token registry, pinned images, and split
image/container filesystems for ImageFsInfo.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config, run_container, wait_exited, wait_for
from moorage.testing.daemon import REPO
from moorage.testing.imagesenv import pull, status
from moorage.testing.registry import TEST_IDENTITY_TOKEN, TEST_PASSWORD, TEST_USER

pytestmark = pytest.mark.integration

WRONG_PASSWORD = "wr0ng-pa55-zebra"


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _pull_error(d, ref: str, auth: pb.AuthConfig | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        pull(d, ref, auth)
    return ei.value


def _remove(d, ref: str) -> None:
    d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=60)


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)  # the daemon re-reads the file when it changes


@pytest.fixture
def node_daemon(daemon_factory, token_registry):
    """A daemon that trusts the test CA, reads <base>/auth.json and has <base>/bin on its PATH."""
    d = daemon_factory(start=False)
    auth_file = os.path.join(d.base, "auth.json")
    d.extra_config = f'auth_file = "{auth_file}"\ncredential_helper_timeout = 5.0\n'
    d.write_config()
    shutil.copytree(token_registry.hosts_dir, os.path.join(d.base, "certs.d"), dirs_exist_ok=True)
    bindir = os.path.join(d.base, "bin")
    os.makedirs(bindir)
    d.env["PATH"] = f"{bindir}:{os.environ.get('PATH', '')}"
    d.start()
    d.auth_file, d.bindir = auth_file, bindir  # type: ignore[attr-defined]
    return d


def _helper(d, name: str, body: str) -> str:
    path = os.path.join(d.bindir, f"docker-credential-{name}")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def _assert_no_secret_stored(d, *secrets: str) -> None:
    """Neither the daemon log nor the metadata store (db and WAL) holds any of ``secrets``."""
    files = [d.log_file] + [os.path.join(d.root, n) for n in os.listdir(d.root) if n.startswith("meta.db")]
    assert any(f.endswith("meta.db") for f in files)
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        for s in secrets:
            assert s.encode() not in data, f"{s!r} found in {path}"


def test_node_credentials_each_source_and_precedence(node_daemon, token_registry):
    d, reg = node_daemon, token_registry
    ref = reg.ref("busybox")
    want = reg.images["busybox"].layout.manifests[0].config_digest
    good = pb.AuthConfig(username=TEST_USER, password=TEST_PASSWORD)
    wrong = pb.AuthConfig(username=TEST_USER, password=WRONG_PASSWORD)

    # nothing on the node, nothing in the request: the token server refuses access
    e = _pull_error(d, ref)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and reg.host in e.details()

    # (a) the CRI AuthConfig
    assert pull(d, ref, good) == want
    _remove(d, want)
    # (d) wrong credentials: UNAUTHENTICATED, naming the registry and the user, never the password
    e = _pull_error(d, ref, wrong)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reg.host in e.details() and TEST_USER in e.details() and WRONG_PASSWORD not in e.details()

    # (b) the auth file, matched by a key with scheme and path; `moorage images pull` needs no --creds
    _write_json(d.auth_file, {"auths": {f"https://{reg.host}/test": {"auth": _b64(f"{TEST_USER}:{TEST_PASSWORD}")}}})
    assert pull(d, ref) == want
    _remove(d, want)
    r = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "images", "pull", "-q", ref, "--config",
                        d.config_path], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
    _remove(d, want)

    # wrong node credentials are UNAUTHENTICATED too; the request's own credentials come first
    _write_json(d.auth_file, {"auths": {reg.host: {"username": TEST_USER, "password": WRONG_PASSWORD}}})
    e = _pull_error(d, ref)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and WRONG_PASSWORD not in e.details()
    assert pull(d, ref, good) == want
    _remove(d, want)

    # (c) a credential helper for the host: before the file's auths, which are wrong here
    calls = os.path.join(d.base, "helper-calls")
    _helper(d, "testhelper", f'[ "$1" = get ] || exit 3\nread server\necho "$server" >> {calls}\n'
                             f'printf \'{{"ServerURL":"%s","Username":"<token>","Secret":"{TEST_IDENTITY_TOKEN}"}}\' '
                             '"$server"\n')
    _write_json(d.auth_file, {"auths": {reg.host: {"username": TEST_USER, "password": WRONG_PASSWORD}},
                              "credHelpers": {reg.host: "testhelper"}})
    assert pull(d, ref) == want
    with open(calls) as f:
        assert f.read().splitlines()[0] == reg.host
    _remove(d, want)

    # a failing helper is an error naming the helper and the host
    _helper(d, "broken", 'echo "vault sealed" >&2\nexit 4\n')
    _write_json(d.auth_file, {"credsStore": "broken"})
    e = _pull_error(d, ref)
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert "docker-credential-broken" in e.details() and reg.host in e.details() and "vault sealed" in e.details()

    _assert_no_secret_stored(d, TEST_PASSWORD, WRONG_PASSWORD, TEST_IDENTITY_TOKEN,
                             _b64(f"{TEST_USER}:{TEST_PASSWORD}"))


def test_pinned_images_are_reported_and_survive_gc(daemon_factory, registry):
    bb, nr = registry.images["busybox"], registry.images["nonroot"]
    d = daemon_factory(extra_config=f'pinned_images = ["{bb.repository}:latest"]\n')
    bid, nid = pull(d, bb.ref), pull(d, nr.ref)
    assert status(d, bid).image.pinned and not status(d, nid).image.pinned
    listed = {i.id: i.pinned for i in d.images.ListImages(pb.ListImagesRequest(), timeout=30).images}
    assert listed == {bid: True, nid: False}
    # removing the other image runs GC: every layer and blob of the pinned image stays usable
    _remove(d, nid)
    sb_cfg = pod_config()
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cid = run_container(d.runtime, sid, sb_cfg, container_config(bb.ref, ["true"]))
    assert wait_exited(d.runtime, cid).exit_code == 0
    assert status(d, bb.ref).image.pinned
    # RemoveImage of a pinned image is refused, naming what pins it; the image stays usable
    with pytest.raises(grpc.RpcError) as e:
        d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=bid)), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "images.pinned_images" in e.value.details()
    assert status(d, bid).image.pinned


@pytest.fixture
def container_tmpfs(tmp_path):
    """A tmpfs of its own for containers' writable layers (a second "disk")."""
    mp = str(tmp_path / "containers")
    os.makedirs(mp)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "moorage-test-ctr", mp], check=True)
    try:
        yield mp
    finally:
        subprocess.run(["umount", "-l", mp], check=False)


def test_split_image_and_container_filesystems(daemon_factory, registry, container_tmpfs):
    d = daemon_factory(extra_config=f'container_root = "{container_tmpfs}"\n')
    img = registry.images["busybox"]
    pull(d, img.ref)
    before = d.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30)
    (ifs,), (cfs,) = before.image_filesystems, before.container_filesystems
    assert ifs.fs_id.mountpoint.startswith(d.root) and cfs.fs_id.mountpoint == container_tmpfs
    assert os.stat(ifs.fs_id.mountpoint).st_dev != os.stat(cfs.fs_id.mountpoint).st_dev
    assert ifs.used_bytes.value > 500_000 and cfs.used_bytes.value == 0

    sb_cfg = pod_config()
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cid = run_container(d.runtime, sid, sb_cfg, container_config(
        img.ref, ["sh", "-c", "head -c 2000000 /dev/urandom > /big && mkdir /d1"]))
    assert wait_exited(d.runtime, cid).exit_code == 0
    after = d.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30)
    assert after.container_filesystems[0].used_bytes.value >= 2_000_000
    assert after.image_filesystems[0].used_bytes.value == ifs.used_bytes.value  # the image side did not move
    layers = os.listdir(os.path.join(container_tmpfs, "snapshots"))
    assert len(layers) == 1 and layers[0].startswith("c")
    assert os.path.getsize(os.path.join(container_tmpfs, "snapshots", layers[0], "fs", "big")) == 2_000_000
    d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    # the writable layer goes in RemoveContainer's background clean-up
    wait_for(lambda: os.listdir(os.path.join(container_tmpfs, "snapshots")) == [], what="the writable layer to go")
    assert d.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30).container_filesystems[0].used_bytes.value == 0
