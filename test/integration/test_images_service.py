"""CRI ImageService end to end: a real daemon pulling from the real docker-registry.

Pull (busybox, multi-arch index, multi-layer, docker v2, digest-only), ImageStatus
(verbose), ListImages (filter), RemoveImage (id, tag, digest), ImageFsInfo, user
fields, pinned images, concurrent pulls, GC down to empty directories, and the
clean-up of interrupted pulls after SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import (
    container_config,
    pod_config,
    run_container,
    wait_exited,
    wait_for,
)
from moorage.testing.imagesenv import (
    RegistryProxy,
    content_files,
    list_images,
    pull,
    snapshot_entries,
    status,
)
from moorage.testing.registry import FakeResponse

pytestmark = pytest.mark.integration


# --- helpers ----------------------------------------------------------------------------------


def remove(d, ref: str) -> None:
    d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=60)


# --- pulls ---------------------------------------------------------------------------------------

def test_pull_busybox_status_list_and_run(daemon, registry):
    img = registry.images["busybox"]
    iid = pull(daemon, img.ref)
    assert iid == img.layout.manifests[0].config_digest
    st = status(daemon, img.ref).image
    assert st.id == iid
    assert f"{img.repository}:latest" in st.repo_tags
    assert st.repo_digests == [f"{img.repository}@{img.digest}"]
    assert st.size > 0 and not st.pinned
    assert st.uid.value == 0 or not st.HasField("uid")
    # by id, short id and digest reference
    assert status(daemon, iid).image.id == iid
    assert status(daemon, iid.removeprefix("sha256:")).image.id == iid
    assert status(daemon, iid.removeprefix("sha256:")[:12]).image.id == iid
    assert status(daemon, img.digest_ref).image.id == iid
    # a container runs from it
    sb_cfg = pod_config()
    sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cid = run_container(daemon.runtime, sid, sb_cfg, container_config(img.ref, ["sh", "-c", "cat /etc/passwd"]))
    assert wait_exited(daemon.runtime, cid).exit_code == 0


def test_verbose_status(daemon, registry):
    img = registry.images["multilayer"]
    pull(daemon, img.ref)
    resp = status(daemon, img.ref, verbose=True)
    info = json.loads(resp.info["info"])
    m = img.layout.manifests[0]
    assert info["manifestDigest"] == m.digest
    assert info["layers"] == m.layers
    assert info["chainID"].startswith("sha256:")
    assert info["imageSpec"]["rootfs"]["diff_ids"] and len(info["imageSpec"]["rootfs"]["diff_ids"]) == 3
    assert status(daemon, img.ref).info == {}


def test_multiarch_index_pulls_native_platform(daemon, registry):
    from moorage.images.platform import host_platform

    img = registry.images["multiarch"]
    iid = pull(daemon, img.ref)
    native = str(host_platform())
    want = next(m for m in img.layout.manifests if m.platform == native)
    assert iid == want.config_digest
    st = status(daemon, img.ref, verbose=True)
    assert st.image.repo_digests == [f"{img.repository}@{img.digest}"]  # the index digest
    info = json.loads(st.info["info"])
    assert info["manifestDigest"] == want.digest and info["rootDigest"] == img.digest
    arch = native.split("/", 1)[1]
    assert info["imageSpec"]["config"]["Labels"]["moorage.test.arch"] == arch


def test_user_fields_from_config(daemon, registry):
    nonroot = registry.images["nonroot"]
    pull(daemon, nonroot.ref)
    st = status(daemon, nonroot.ref).image
    assert st.username == "tester" and not st.HasField("uid")
    dv2 = registry.images["dockerv2"]
    pull(daemon, dv2.ref)
    assert status(daemon, dv2.ref).image.username == ""


def test_digest_only_image(daemon, registry):
    img = registry.images["digestonly"]
    iid = pull(daemon, img.digest_ref)
    st = status(daemon, img.digest_ref).image
    assert st.id == iid and list(st.repo_tags) == [] and list(st.repo_digests) == [img.digest_ref]


def test_list_images_and_filter(daemon, registry):
    bb, ml = registry.images["busybox"], registry.images["multilayer"]
    id1, id2 = pull(daemon, bb.ref), pull(daemon, ml.ref)
    assert {i.id for i in list_images(daemon)} == {id1, id2}
    assert [i.id for i in list_images(daemon, ml.ref)] == [id2]
    assert [i.id for i in list_images(daemon, id1)] == [id1]
    assert list_images(daemon, f"{bb.repository}:nope") == []


def test_tags_of_one_image_and_remove_by_tag(daemon, registry):
    img = registry.images["busybox"]
    ids = {pull(daemon, f"{img.repository}:{t}") for t in ("latest", "1.0", "alias")}
    assert len(ids) == 1
    iid = ids.pop()
    assert sorted(status(daemon, iid).image.repo_tags) == sorted(f"{img.repository}:{t}" for t in
                                                                   ("latest", "1.0", "alias"))
    # removing one of several tags removes just that tag
    remove(daemon, f"{img.repository}:1.0")
    st = status(daemon, iid).image
    assert sorted(st.repo_tags) == sorted([f"{img.repository}:latest", f"{img.repository}:alias"])
    assert status(daemon, f"{img.repository}:1.0").image.id == ""
    remove(daemon, f"{img.repository}:alias")
    remove(daemon, f"{img.repository}:latest")  # the last tag removes the image
    assert status(daemon, iid).image.id == ""
    assert list_images(daemon) == []


def test_remove_by_id_and_by_digest(daemon, registry):
    bb, ml = registry.images["busybox"], registry.images["multilayer"]
    id1, id2 = pull(daemon, bb.ref), pull(daemon, ml.ref)
    remove(daemon, id1)
    assert status(daemon, bb.ref).image.id == ""
    remove(daemon, f"{ml.repository}@{ml.digest}")
    assert status(daemon, id2).image.id == ""


def test_unknown_image_status_is_empty_and_remove_succeeds(daemon, registry):
    assert not status(daemon, f"{registry.host}/test/never:pulled").HasField("image")
    assert not status(daemon, "sha256:" + "0" * 64).HasField("image")
    remove(daemon, f"{registry.host}/test/never:pulled")
    remove(daemon, "sha256:" + "0" * 64)


def test_invalid_reference_is_invalid_argument_with_reason(daemon):
    for bad, reason in (("Busybox:latest", "lowercase"), ("busybox:bad tag", "whitespace"),
                        ("busybox@sha256:abc", "sha256"), ("a//b", "empty path component")):
        for call in (lambda: pull(daemon, bad), lambda: status(daemon, bad)):
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert reason in ei.value.details(), (bad, ei.value.details())
    with pytest.raises(grpc.RpcError) as ei:
        pull(daemon, "")
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_image_fs_info(daemon, registry):
    empty = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30)
    assert len(empty.image_filesystems) == 1 and len(empty.container_filesystems) == 1
    img = registry.images["busybox"]
    pull(daemon, img.ref)
    after = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30)
    fs = after.image_filesystems[0]
    assert fs.fs_id.mountpoint.startswith(daemon.root)
    assert fs.used_bytes.value > empty.image_filesystems[0].used_bytes.value + 500_000  # busybox is ~1 MB+
    assert fs.inodes_used.value > empty.image_filesystems[0].inodes_used.value + 100  # one per applet
    assert fs.timestamp > 0
    # a container's writable layer counts on the container filesystem
    sb_cfg = pod_config()
    sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cid = run_container(daemon.runtime, sid, sb_cfg, container_config(
        img.ref, ["sh", "-c", "head -c 300000 /dev/zero > /big && mkdir /d1 /d2"]))
    assert wait_exited(daemon.runtime, cid).exit_code == 0
    ctr = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30).container_filesystems[0]
    assert ctr.used_bytes.value >= 300_000 and ctr.inodes_used.value >= 3


def test_concurrent_pulls_download_each_blob_once(daemon, registry):
    img = registry.images["busybox"]

    async def slow_blobs(req, n):
        if "/blobs/" in req.route:
            await asyncio.sleep(0.2)  # widen the window in which the pulls overlap

    with RegistryProxy(registry.host, slow_blobs) as proxy:
        repo = f"{proxy.host}/test/busybox"
        refs = [f"{repo}:latest", f"{repo}:latest", f"{repo}:1.0", f"{repo}:alias"]
        futures = [daemon.images.PullImage.future(pb.PullImageRequest(image=pb.ImageSpec(image=r)), timeout=120)
                   for r in refs]
        ids = {f.result().image_ref for f in futures}
        assert len(ids) == 1
        gets = proxy.blob_gets()
    layer = img.layout.manifests[0].layers[0]
    assert gets.get(layer) == 1, gets
    assert all(n == 1 for n in gets.values()), gets
    st = status(daemon, f"{repo}:latest").image
    assert sorted(st.repo_tags) == sorted(refs[1:])


def test_shared_layers_are_unpacked_once_and_survive_partial_removal(daemon, registry):
    bb, nr = registry.images["busybox"], registry.images["nonroot"]
    id1, id2 = pull(daemon, bb.ref), pull(daemon, nr.ref)
    assert id1 != id2
    snaps = snapshot_entries(daemon)
    assert len(snaps) == 1  # both images stand on the same busybox layer snapshot
    remove(daemon, id1)
    assert snapshot_entries(daemon) == snaps  # still needed by nonroot
    sb_cfg = pod_config()
    sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cid = run_container(daemon.runtime, sid, sb_cfg, container_config(nr.ref, ["id", "-u"]))
    assert wait_exited(daemon.runtime, cid).exit_code == 0


def test_gc_after_removing_every_image_leaves_empty_dirs(daemon, registry):
    for name in ("busybox", "multilayer", "multiarch", "nonroot", "dockerv2"):
        pull(daemon, registry.images[name].ref)
    pull(daemon, registry.images["digestonly"].digest_ref)
    assert content_files(daemon) and snapshot_entries(daemon)
    for img in list_images(daemon):
        remove(daemon, img.id)
    assert list_images(daemon) == []
    assert content_files(daemon) == []
    assert snapshot_entries(daemon) == []
    info = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30)
    assert info.image_filesystems[0].used_bytes.value == 0


def test_remove_image_in_use_keeps_container_working(daemon, registry):
    img = registry.images["multilayer"]
    iid = pull(daemon, img.ref)
    sb_cfg = pod_config()
    sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cid = run_container(daemon.runtime, sid, sb_cfg, container_config(img.ref, ["sleep", "300"]))
    remove(daemon, iid)
    assert status(daemon, iid).image.id == ""
    r = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/layer3.txt"], timeout=30),
                                timeout=60)
    assert r.exit_code == 0 and r.stdout == b"layer3\n"
    daemon.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1), timeout=60)
    daemon.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    # the next GC (any removal) finds nothing needs the layers any more
    remove(daemon, "sha256:" + "0" * 64)
    pull(daemon, registry.images["busybox"].ref)
    remove(daemon, registry.images["busybox"].ref)
    assert content_files(daemon) == [] and snapshot_entries(daemon) == []


def test_pinned_sandbox_image(daemon_factory, registry):
    img = registry.images["busybox"]
    d = daemon_factory(extra_config=f'[runtime]\nsandbox_image = "{img.ref}"\n')
    pull(d, img.ref)
    assert status(d, img.ref).image.pinned
    pull(d, registry.images["nonroot"].ref)
    assert not status(d, registry.images["nonroot"].ref).image.pinned


def test_restart_after_sigkill_mid_pull_cleans_leftovers(daemon_factory, registry):
    d = daemon_factory()
    img = registry.images["multilayer"]
    big = img.layout.manifests[0].layers[0]
    stalled = threading.Event()

    def stall_first_layer(req, n):
        if req.method == "GET" and req.route.endswith(big) and n == 1:
            stalled.set()
            return FakeResponse(200, {"Content-Type": "application/octet-stream"},
                                b"\0" * 600_000, send_only=300_000, then="stall")
        return None

    with RegistryProxy(registry.host, stall_first_layer) as proxy:
        ref = f"{proxy.host}/test/multilayer:latest"
        fut = d.images.PullImage.future(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
        ingest = os.path.join(d.root, "images", "content", "ingest")
        wait_for(lambda: stalled.is_set() and os.listdir(ingest), what="a partial ingest")
        d.kill9()
        with pytest.raises(grpc.RpcError):
            fut.result()
        assert os.listdir(ingest)  # the interrupted download is still there ...
        d.start()
        assert os.listdir(ingest) == []  # ... until the restart cleans it
        assert list_images(d) == []
        assert snapshot_entries(d) == []
        assert content_files(d) == []  # manifest and config of the half pull are gone too
        iid = pull(d, ref)  # the proxy now forwards everything
    assert iid == img.layout.manifests[0].config_digest
    assert [i.id for i in list_images(d)] == [iid]


def test_native_snapshotter_pulls_multilayer_and_runs(daemon_factory, registry):
    d = daemon_factory(extra_config='snapshotter = "native"\n')  # lands in the fixture's [images] table
    img = registry.images["multilayer"]
    pull(d, img.ref)
    sb_cfg = pod_config()
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg), timeout=60).pod_sandbox_id
    cid = run_container(d.runtime, sid, sb_cfg, container_config(
        img.ref, ["sh", "-c", "cat /data/keep.txt /layer3.txt; ls /opaque; test ! -e /data/delete-me.txt"]))
    assert wait_exited(d.runtime, cid).exit_code == 0
    d.cleanup_pods()
    remove(d, img.ref)
    assert content_files(d) == [] and snapshot_entries(d) == []
