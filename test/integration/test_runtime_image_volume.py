"""Image volumes (CRI ``Mount.image`` / ``Mount.image_sub_path``, KEP-4639) over gRPC.

A container mounts another image read-only at a path of its own: a read-only view
snapshot of the image's layers, mounted under the container's state dir and
bind-mounted in.  Each test ends with the leak check of ``RuntimeEnv`` (no mounts,
processes, cgroups left), and the view snapshots are checked to be gone.
"""

import os

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import wait_for

SLEEP = ["sleep", "1000"]
VOL = "/mnt/image-volume"

pytestmark = pytest.mark.integration


def image_mount(ref: str, path: str = VOL, sub_path: str = "", readonly: bool = True) -> pb.Mount:
    return pb.Mount(container_path=path, readonly=readonly, image=pb.ImageSpec(image=ref, user_specified_image=ref),
                    image_sub_path=sub_path)


def image_id(env, ref: str) -> str:
    return env.d.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=30).image.id


def view_snapshot_dirs(env) -> set[str]:
    """Snapshot dirs of the daemon (each image volume adds one while mounted)."""
    d = os.path.join(env.d.root, "images", "snapshotter", "snapshots")
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def create_error(env, sid, pcfg, mounts, command=SLEEP):
    with pytest.raises(grpc.RpcError) as e:
        env.create(sid, pcfg, command, mounts=mounts)
    return e.value.code(), e.value.details()


def test_image_volume_is_mounted_read_only_executable_and_reported(env):
    ml = env.pull("multilayer")
    before = view_snapshot_dirs(env)
    sid, pcfg = env.run_pod()
    cid = env.create(sid, pcfg, SLEEP, mounts=[image_mount(ml)])
    assert len(view_snapshot_dirs(env) - before) == 2  # the container's rootfs and the view

    # ContainerStatus reports the image and its resolved id (ImageSpec.image_ref).
    mounts = [m for m in env.status(cid).status.mounts if m.container_path == VOL]
    assert len(mounts) == 1 and mounts[0].readonly
    assert mounts[0].image.image == ml and mounts[0].image.image_ref == image_id(env, ml)

    env.start(cid)
    # All layers, upper ones winning, whiteouts applied.
    assert env.sh(cid, f"cat {VOL}/data/keep.txt {VOL}/layer2.txt {VOL}/layer3.txt") == "v3\nlayer2\nlayer3\n"
    assert env.exec(cid, ["test", "-e", f"{VOL}/data/delete-me.txt"]).exit_code != 0
    # Read-only, but not noexec.
    r = env.exec(cid, ["touch", f"{VOL}/new-file"])
    assert r.exit_code != 0 and b"Read-only" in r.stderr
    assert env.exec(cid, [f"{VOL}/bin/busybox", "true"]).exit_code == 0
    # The container's own rootfs is untouched by the volume.
    assert env.exec(cid, ["test", "-e", "/layer2.txt"]).exit_code != 0

    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)
    # the volume's view goes in RemoveContainer's background clean-up
    wait_for(lambda: view_snapshot_dirs(env) == before, what="the volume's view snapshot to go")


def test_image_sub_path_mounts_only_that_directory(env):
    sid, pcfg = env.run_pod()
    cid = env.create(sid, pcfg, SLEEP, mounts=[image_mount(env.busybox, sub_path="etc")])
    env.start(cid)
    assert env.exec(cid, ["test", "-f", f"{VOL}/passwd"]).exit_code == 0
    assert env.exec(cid, ["test", "-e", f"{VOL}/etc"]).exit_code != 0
    assert env.exec(cid, ["test", "-e", f"{VOL}/bin"]).exit_code != 0
    # A sub path that is a file is mounted as a file.
    cid2 = env.create(sid, pcfg, SLEEP, mounts=[image_mount(env.busybox, path="/srv/hostname",
                                                            sub_path="./etc//hostname")])
    env.start(cid2)
    assert env.sh(cid2, "cat /srv/hostname") == "busybox\n"


def test_two_image_volumes_in_one_container(env):
    sid, pcfg = env.run_pod()
    cid = env.create(sid, pcfg, SLEEP, mounts=[image_mount(env.busybox, path="/a"),
                                               image_mount(env.busybox, path="/b", sub_path="bin")])
    env.start(cid)
    assert env.exec(cid, ["test", "-x", "/a/bin/busybox"]).exit_code == 0
    assert env.exec(cid, ["test", "-x", "/b/busybox"]).exit_code == 0


@pytest.mark.parametrize("sub_path", ["..", "../etc", "etc/../..", "/etc", "etc/../../../.."])
def test_sub_path_escaping_the_image_is_invalid(env, sub_path):
    before = view_snapshot_dirs(env)
    sid, pcfg = env.run_pod()
    code, details = create_error(env, sid, pcfg, [image_mount(env.busybox, sub_path=sub_path)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "image_sub_path" in details
    assert view_snapshot_dirs(env) == before


def test_missing_sub_path_fails_and_leaves_nothing(env):
    before = view_snapshot_dirs(env)
    sid, pcfg = env.run_pod()
    code, details = create_error(env, sid, pcfg, [image_mount(env.busybox, sub_path="not-existing")])
    assert code == grpc.StatusCode.NOT_FOUND, details
    assert "not-existing" in details and "does not exist" in details
    # The view was mounted before the sub path was looked up: it is gone again.
    assert view_snapshot_dirs(env) == before
    listed = env.rt.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=sid)), timeout=30).containers
    assert not listed


def test_unknown_image_is_not_found_with_the_reference(env):
    sid, pcfg = env.run_pod()
    ref = "127.0.0.1:1/nothing/here:v1"
    code, details = create_error(env, sid, pcfg, [image_mount(ref)])
    assert code == grpc.StatusCode.NOT_FOUND, details
    assert ref in details


def test_writable_image_volume_is_refused(env):
    sid, pcfg = env.run_pod()
    code, details = create_error(env, sid, pcfg, [image_mount(env.busybox, readonly=False)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "read-only" in details


def test_sub_path_without_image_is_invalid(env):
    sid, pcfg = env.run_pod()
    m = pb.Mount(container_path=VOL, host_path="/tmp", image_sub_path="etc")
    code, details = create_error(env, sid, pcfg, [m])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def test_volume_survives_removal_of_its_image(env):
    """Removing the image of a mounted volume keeps the layers until the container goes."""
    ml = env.pull("multilayer")
    before = view_snapshot_dirs(env)
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, mounts=[image_mount(ml)])
    env.d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ml)), timeout=60)
    assert env.sh(cid, f"cat {VOL}/layer3.txt") == "layer3\n"
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)
    wait_for(lambda: len(view_snapshot_dirs(env)) <= len(before), what="the volume's layers to go")
