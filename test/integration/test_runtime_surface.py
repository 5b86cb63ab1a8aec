"""The CRI surface as a kubelet sees it, over gRPC against the real daemon: the features Status
advertises (and that they work), pod-level resources, stop_signal, mount_options,
selinux_relabel, and the pull's runtime_handler and sandbox_config (issue #11 items 2, 3, 6)."""

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing import testimages
from moorage.testing.cri import image_client, pod_config
from moorage.testing.registry import REPO_PREFIX, push_layout
from moorage.testing.runtime_env import cgroup_dirs, cgroup_v2, proc_cgroups, remove_cgroup_tree

SLEEP = ["sleep", "1000"]
HANDLERS = ["runc", "crun"]


def status(env, verbose: bool = False) -> pb.StatusResponse:
    r: pb.StatusResponse = env.rt.Status(pb.StatusRequest(verbose=verbose), timeout=30)
    return r


def sandbox_info(env, sid: str) -> dict:
    r = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True), timeout=30)
    return json.loads(r.info["info"])


def mountinfo_options(env, cid: str, dest: str) -> set[str]:
    """The per-mount options of the mount at ``dest`` inside the container."""
    for line in env.sh(cid, "cat /proc/self/mountinfo").splitlines():
        f = line.split()
        if f[4] == dest:
            return set(f[5].split(","))
    raise AssertionError(f"no mount at {dest} in the container")


# -- features --------------------------------------------------------------------------------


def test_status_advertises_features_per_handler_including_the_default(env):
    st = status(env)
    by_name = {h.name: h.features for h in st.runtime_handlers}
    assert set(by_name) == {"", "runc", "crun"}
    # runc 1.1 lists rro and this kernel has mount_setattr; crun 1.8 cannot say (no `crun features`).
    assert by_name["runc"].recursive_read_only_mounts
    assert by_name[""] == by_name["runc"]  # the default handler is runc
    assert not by_name["crun"].recursive_read_only_mounts
    # User-namespaced pods work with runc and crun (moorage id-maps the rootfs; test_runtime_userns.py).
    assert by_name["runc"].user_namespaces and by_name[""].user_namespaces and by_name["crun"].user_namespaces
    assert st.features.supplemental_groups_policy and st.features.mount_options
    assert not st.features.user_namespaces_host_network
    why = json.loads(status(env, verbose=True).info["features"])
    assert why["handlers"]["crun"]["recursive_read_only_mounts"].startswith("unavailable (")
    assert why["handlers"][""]["user_namespaces"].startswith("available (") and "id-mapped" in \
        why["handlers"][""]["user_namespaces"]
    assert why["handlers"]["crun"]["user_namespaces"].startswith("available (crun")
    assert why["runtime"]["mount_options"].startswith("available")


def test_check_lists_each_feature_with_its_state():
    cli = os.path.join(os.path.dirname(sys.executable), "moorage")
    out = subprocess.run([cli, "check"], capture_output=True, text=True, timeout=60).stdout
    lines = out.split("CRI features", 1)[1].splitlines()

    def state(label: str) -> str:
        return next(line for line in lines if line.strip().startswith(label)).split(None, len(label.split()))[-1]

    assert state('recursive_read_only_mounts [handler runc]').startswith("available (runc")
    assert state('recursive_read_only_mounts [handler crun]').startswith("unavailable (")
    assert state('user_namespaces [handler "" (default: runc)]').startswith("available (runc")
    assert state('user_namespaces [handler crun]').startswith("available (crun")
    assert state("user_namespaces_host_network").startswith("unavailable (")
    assert state("mount_options").startswith("available")


def test_recursive_read_only_mount_makes_nested_mounts_read_only(env, tmp_path):
    vol = tmp_path / "vol"
    (vol / "nested").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(vol / "nested")], check=True)
    try:
        sid, pcfg = env.run_pod()
        rro = env.run(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/vol", host_path=str(vol), readonly=True,
                                                         recursive_read_only=True)])
        ro = env.run(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/vol", host_path=str(vol), readonly=True)])
        # Plain read-only leaves the nested mount writable (the reason rro exists) ...
        assert env.exec(ro, ["touch", "/vol/nested/x"]).exit_code == 0
        # ... recursive read-only does not.
        r = env.exec(rro, ["touch", "/vol/nested/y"])
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr
        assert env.exec(rro, ["touch", "/vol/z"]).exit_code != 0
        assert "ro" in mountinfo_options(env, rro, "/vol/nested")
        st = env.status(rro).status
        assert st.mounts[0].recursive_read_only
        env.cleanup()
    finally:
        subprocess.run(["umount", str(vol / "nested")], check=False)


def test_recursive_read_only_mount_refused_where_unsupported_or_malformed(env, tmp_path):
    sid, pcfg = env.run_pod(handler="crun")
    with pytest.raises(grpc.RpcError) as e:
        env.create(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/vol", host_path=str(tmp_path), readonly=True,
                                                      recursive_read_only=True)])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'crun'" in e.value.details()
    sid2, pcfg2 = env.run_pod()
    for m, what in ((pb.Mount(container_path="/vol", host_path=str(tmp_path), recursive_read_only=True), "read-only"),
                    (pb.Mount(container_path="/vol", host_path=str(tmp_path), readonly=True, recursive_read_only=True,
                              propagation=pb.PROPAGATION_HOST_TO_CONTAINER), "private propagation")):
        with pytest.raises(grpc.RpcError) as e:
            env.create(sid2, pcfg2, SLEEP, mounts=[m])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in e.value.details()
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers


def _push_groups_image(env, tmp_path) -> str:
    """busybox whose /etc/group lists ``tester`` as a member of group 4321 (what Merge adds)."""
    b = testimages.Builder(str(tmp_path / "layouts"))
    group = testimages.GROUP + "extra:x:4321:tester\n"
    layers = [testimages._layer(b.busybox_tar(), "gzip"),
              testimages._layer(testimages.tar_bytes([testimages.Entry("etc/group", data=group.encode())]), "gzip")]
    info = b._single("groups", layers, ["latest"])
    repo = f"{env.reg.host}/{REPO_PREFIX}/groups-{uuid.uuid4().hex[:8]}"

    async def push() -> None:
        async with env.reg.client(retries=2, backoff=0.1) as c:
            await push_layout(c, repo, info, env.reg.credentials())

    asyncio.run(push())
    ref = f"{repo}:latest"
    image_client(env.d).PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
    return ref


def test_supplemental_groups_policy_strict_is_honoured(env, tmp_path):
    ref = _push_groups_image(env, tmp_path)
    sid, pcfg = env.run_pod()

    def groups(policy: int) -> set[str]:
        cid = env.run(sid, pcfg, SLEEP, image=ref, linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(run_as_user=pb.Int64Value(value=1234),
                                                              supplemental_groups=[3000],
                                                              supplemental_groups_policy=policy)))
        reported = set(env.status(cid).status.user.linux.supplemental_groups)
        inside = set(env.sh(cid, "id -G").split())
        assert {str(g) for g in reported} == inside
        return inside

    assert groups(pb.Merge) == {"1234", "3000", "4321"}
    assert groups(pb.Strict) == {"1234", "3000"}


# -- dropped fields: mount_options, selinux_relabel, stop_signal ---------------------------------


@pytest.mark.parametrize("handler", HANDLERS)
def test_mount_options_reach_the_mount(env, tmp_path, handler):
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tmp_path / "run.sh").chmod(0o755)
    sid, pcfg = env.run_pod(handler=handler)
    plain = env.run(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/vol", host_path=str(tmp_path))])
    cid = env.run(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/vol", host_path=str(tmp_path),
                                                     mount_options=["noexec", "nosuid", "nodev", "ro"])])
    assert env.sh(plain, "/vol/run.sh") == "ran\n"
    opts = mountinfo_options(env, cid, "/vol")
    assert {"noexec", "nosuid", "nodev", "ro"} <= opts, opts
    r = env.exec(cid, ["sh", "-c", "/vol/run.sh"])
    assert r.exit_code == 126 and b"Permission denied" in r.stderr, r
    assert env.exec(cid, ["touch", "/vol/new"]).exit_code != 0
    assert list(env.status(cid).status.mounts[0].mount_options) == ["noexec", "nosuid", "nodev", "ro"]


def test_unknown_or_contradicting_mount_options_are_invalid(env, tmp_path):
    sid, pcfg = env.run_pod()
    for opts, needle in ((["noexec", "bogus"], "'bogus'"), (["exec", "noexec"], "contradict"),
                         (["rw"], "'rw'")):
        with pytest.raises(grpc.RpcError) as e:
            env.create(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/vol", host_path=str(tmp_path),
                                                          readonly=True, mount_options=opts)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


def test_selinux_relabel_is_ignored_without_selinux(env, tmp_path):
    assert not os.path.exists("/sys/fs/selinux/enforce"), "this test is for hosts without SELinux"
    (tmp_path / "f").write_text("data")
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/vol", host_path=str(tmp_path),
                                                     selinux_relabel=True)])
    assert env.sh(cid, "cat /vol/f") == "data"


@pytest.mark.parametrize("handler", HANDLERS)
def test_stop_signal_overrides_the_image(env, handler):
    script = "trap 'exit 7' USR1; trap 'exit 8' USR2; while true; do sleep 0.1; done"
    ref = env.pull("stopsignal")  # the image says SIGUSR1
    sid, pcfg = env.run_pod(handler=handler)
    own = env.run(sid, pcfg, ["sh", "-c", script], image=ref, stop_signal=pb.SIGNAL_SIGUSR2)
    image = env.run(sid, pcfg, ["sh", "-c", script], image=ref)
    assert env.status(own).status.stop_signal == pb.SIGNAL_SIGUSR2
    assert env.status(image).status.stop_signal == pb.SIGNAL_SIGUSR1
    for cid in (own, image):
        env.wait_file(cid, "/proc/1/status")
    env.rt.StopContainer(pb.StopContainerRequest(container_id=own, timeout=20), timeout=60)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=image, timeout=20), timeout=60)
    assert env.wait_exited(own).exit_code == 8
    assert env.wait_exited(image).exit_code == 7


# -- the pull: runtime_handler and sandbox_config ------------------------------------------------


def test_pull_with_runtime_handler_and_sandbox_config(env):
    images = image_client(env.d)
    ref = env.reg.images["busybox"].ref
    with pytest.raises(grpc.RpcError) as e:
        images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref, runtime_handler="nosuch")), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nosuch" in e.value.details()
    r = images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref, runtime_handler="crun"),
                                             sandbox_config=pod_config(name="puller")), timeout=120)
    assert r.image_ref.startswith("sha256:")


# -- pod-level resources ------------------------------------------------------------------------


def _cg_file(path: str, v1_controller: str, v1_name: str, v2_name: str) -> Path:
    if cgroup_v2():
        return Path("/sys/fs/cgroup", path.lstrip("/"), v2_name)
    return Path("/sys/fs/cgroup", v1_controller, path.lstrip("/"), v1_name)


def test_pod_resources_recorded_and_passed_on_as_containerd_does(env):
    # The kubelet makes the pod's cgroup and writes its limits (pod resources + overhead) before
    # RunPodSandbox; do the same here, then check moorage leaves them to it.
    pod_cg = f"{env.cgroup_parent}/pod{uuid.uuid4().hex[:8]}"
    for d in cgroup_dirs(pod_cg):
        os.makedirs(d, exist_ok=True)
    mem = _cg_file(pod_cg, "memory", "memory.limit_in_bytes", "memory.max")
    mem.write_text(str(300 << 20))
    overhead = pb.LinuxContainerResources(cpu_shares=10, memory_limit_in_bytes=20 << 20)
    res = pb.LinuxContainerResources(cpu_period=100000, cpu_quota=50000, cpu_shares=512,
                                     memory_limit_in_bytes=256 << 20)
    # A shared PID namespace keeps the infra process, whose spec carries the sizing annotations.
    pcfg = pod_config(name=f"p-{uuid.uuid4().hex[:8]}", linux=pb.LinuxPodSandboxConfig(
        cgroup_parent=pod_cg, overhead=overhead, resources=res, security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(pid=pb.POD))))
    try:
        sid, pcfg = env.run_pod(pcfg)
        info = sandbox_info(env, sid)
        ann = info["runtimeSpec"]["annotations"]
        assert (ann["io.kubernetes.cri.sandbox-cpu-period"], ann["io.kubernetes.cri.sandbox-cpu-quota"],
                ann["io.kubernetes.cri.sandbox-cpu-shares"], ann["io.kubernetes.cri.sandbox-memory"]) \
            == ("100000", "50000", "512", str(256 << 20))
        assert info["resources"]["memory_limit_in_bytes"] == 256 << 20 and info["overhead"]["cpu_shares"] == 10
        # The infra sits in the pod's cgroup with its own small shares and no pod limit of its own.
        infra = proc_cgroups(info["pid"])
        infra_path = infra["" if cgroup_v2() else "cpu"]
        assert infra_path.startswith(pod_cg + "/")
        if not cgroup_v2():
            assert _cg_file(infra_path, "cpu", "cpu.shares", "").read_text().strip() == "2"
            assert int(_cg_file(infra["memory"], "memory", "memory.limit_in_bytes", "").read_text()) > 300 << 20
        assert int(mem.read_text()) == 300 << 20

        # The kubelet resizes the pod's cgroup, then tells the runtime: recorded, twice is once.
        mem.write_text(str(400 << 20))
        new = pb.LinuxContainerResources(cpu_shares=1024, memory_limit_in_bytes=384 << 20)
        for _ in range(2):
            env.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
                pod_sandbox_id=sid, overhead=overhead, resources=new), timeout=30)
        info = sandbox_info(env, sid)
        assert info["resources"]["memory_limit_in_bytes"] == 384 << 20 and info["resources"]["cpu_shares"] == 1024
        assert info["overhead"]["memory_limit_in_bytes"] == 20 << 20
        assert int(mem.read_text()) == 400 << 20  # the kubelet's value stands
        with pytest.raises(grpc.RpcError) as e:
            env.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
                pod_sandbox_id=sid, resources=pb.LinuxContainerResources(cpu_shares=-1)), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sandbox_info(env, sid)["resources"]["cpu_shares"] == 1024
        with pytest.raises(grpc.RpcError) as e:
            env.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id="nosuch"),
                                             timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # A stopped pod still takes the update (best effort), and the daemon keeps it.
        env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        env.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id=sid, resources=res),
                                         timeout=30)
        assert sandbox_info(env, sid)["resources"]["cpu_shares"] == 512
    finally:
        env.cleanup()
        remove_cgroup_tree(pod_cg)


def test_negative_pod_resources_refused_at_run(env):
    pcfg = pod_config(name=f"p-{uuid.uuid4().hex[:8]}", linux=pb.LinuxPodSandboxConfig(
        overhead=pb.LinuxContainerResources(memory_limit_in_bytes=-5)))
    with pytest.raises(grpc.RpcError) as e:
        env.run_pod(pcfg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "memory_limit_in_bytes" in e.value.details()
