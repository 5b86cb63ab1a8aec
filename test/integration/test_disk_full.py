"""The daemon's root filesystem fills up: RESOURCE_EXHAUSTED, nothing half-made, and back to work once
space is back, without a restart.

The root dir is a small tmpfs of the test's own, filled with a filler file; the state dir stays
where it is (a node's /run is another filesystem).
"""

from __future__ import annotations

import errno
import os
import subprocess

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, image_client, pod_config
from moorage.testing.runtime_env import RuntimeEnv, make_daemon, remove_cgroup_tree

TMPFS_SIZE = "48m"


def fill(path: str) -> None:
    """Write ``path`` until the filesystem says ENOSPC (then it is full to the last block)."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 512, 1):
            try:
                while True:
                    f.write(chunk[:size])
            except OSError as e:
                assert e.errno == errno.ENOSPC, e


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def tree(root: str) -> set[str]:
    """Every path under the root but the store's own files and the filler."""
    out: set[str] = set()
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.relpath(os.path.join(dirpath, n), root)
            if not p.startswith(("meta.db", "filler")):
                out.add(p)
    return out


@pytest.fixture
def full_env(daemon_factory, registry):
    d, parent = make_daemon(daemon_factory, start=False)
    os.makedirs(d.root, mode=0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0711", "crash-diskfull", d.root],
                   check=True)
    try:
        d.start()
        env = RuntimeEnv(d, registry, parent)
        yield env
        env.cleanup()
        d.stop()
    finally:
        subprocess.run(["umount", "-l", d.root], check=False)
        remove_cgroup_tree(parent)


def exhausted(call, what: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
        pytest.fail(f"{what} succeeded on a full disk")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (what, e.value.code(), e.value.details())
    details = e.value.details() or ""
    assert len(details) < 1024 and "Error:" not in details, details  # no Python exception name
    return details


def fill_leaving(filler: str, headroom: int) -> None:
    """Fill the filesystem, then give ``headroom`` bytes back."""
    if os.path.exists(filler):
        os.unlink(filler)
    fill(filler)
    if headroom:
        size = os.path.getsize(filler)
        os.truncate(filler, max(0, size - headroom))


def image_ids(img) -> set[str]:
    return {i.id for i in img.ListImages(pb.ListImagesRequest()).images}


def test_pull_on_a_full_disk_at_every_point(full_env):
    """The pull runs out of space at different points (first store write, blob download, layer
    unpack): each is RESOURCE_EXHAUSTED and leaves the root exactly as it was."""
    env = full_env
    d = env.d
    img = image_client(d)
    ref = env.reg.images["busybox"].ref
    filler = os.path.join(d.root, "filler")
    base_tree = tree(d.root)
    # What a whole pull needs, measured once (then removed again).
    free0 = free_bytes(d.root)
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
    need = free0 - free_bytes(d.root)
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=60)
    assert tree(d.root) == base_tree and not image_ids(img)
    print(f"disk full: a busybox pull needs {need >> 10} KiB")
    cases = [0, 64 << 10, need // 4, need // 2, need * 3 // 4, need - (256 << 10)]
    for headroom in cases:
        fill_leaving(filler, headroom)
        details = exhausted(lambda: img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120),
                            f"PullImage with {headroom} bytes free")
        print(f"disk full: PullImage with {headroom >> 10} KiB free -> RESOURCE_EXHAUSTED: {details}")
        assert tree(d.root) == base_tree, (headroom, tree(d.root) ^ base_tree)
        assert not image_ids(img)
    os.unlink(filler)
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
    assert len(image_ids(img)) == 1


def test_full_root_is_resource_exhausted_and_recovers(full_env):
    env = full_env
    d = env.d
    img = image_client(d)
    env.pull("busybox")
    sid, pcfg = env.run_pod()
    env.begin()
    multilayer = env.reg.images["multilayer"].ref
    filler = os.path.join(d.root, "filler")
    fill(filler)
    before = tree(d.root)
    pods_before = {p.id for p in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items}
    images_before = {i.id for i in img.ListImages(pb.ListImagesRequest()).images}

    new_pod = pod_config(name="full-pod")
    ccfg = container_config(env.busybox, ["sleep", "1000"], name="full-ctr")
    calls = {
        "PullImage": lambda: img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=multilayer)), timeout=120),
        "RunPodSandbox": lambda: env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=new_pod), timeout=120),
        "CreateContainer": lambda: env.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, config=ccfg, sandbox_config=pcfg), timeout=120),
    }
    for _ in range(2):  # a retry on a still-full disk fails the same way
        for what, call in calls.items():
            details = exhausted(call, what)
            print(f"disk full: {what} -> RESOURCE_EXHAUSTED: {details}")
            assert "space" in details or "full" in details, details
    # Nothing half-made: no files, records, mounts or processes; the disk is as full as before.
    assert tree(d.root) == before, tree(d.root) ^ before
    assert {p.id for p in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items} == pods_before
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    assert {i.id for i in img.ListImages(pb.ListImagesRequest()).images} == images_before
    assert not env.leaks(), env.leaks()
    assert env.rt.Version(pb.VersionRequest(), timeout=5).runtime_name

    # A little room: each call either succeeds whole (and is undone) or fails leaving nothing.
    for headroom in (4 << 10, 16 << 10, 64 << 10):
        fill_leaving(filler, headroom)
        before = tree(d.root)
        for what in ("RunPodSandbox", "CreateContainer"):
            try:
                r = calls[what]()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (what, headroom, e.code(), e.details())
                print(f"disk full: {what} with {headroom >> 10} KiB free -> RESOURCE_EXHAUSTED")
            else:
                print(f"disk full: {what} with {headroom >> 10} KiB free -> OK (then removed)")
                if what == "RunPodSandbox":
                    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=r.pod_sandbox_id))
                else:
                    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=r.container_id))
            assert tree(d.root) == before, (what, headroom, tree(d.root) ^ before)
            assert {p.id for p in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items} == pods_before
            assert not env.rt.ListContainers(pb.ListContainersRequest()).containers, d.log()[-3000:]
            assert not env.leaks(), env.leaks()

    # Space is back: the same calls succeed, no restart.
    os.unlink(filler)
    assert free_bytes(d.root) > 8 << 20
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=multilayer)), timeout=120)
    new_sid = calls["RunPodSandbox"]().pod_sandbox_id
    env.pods.append(new_sid)
    cid = calls["CreateContainer"]().container_id
    env.start(cid)
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    assert env.sh(cid, "echo ok") == "ok\n"
    env.cleanup()
    env.check_no_leaks()
