"""Status, list filters, UpdateContainerResources, ReopenContainerLog, runtime handlers — over gRPC."""

import json
import os
import uuid
from pathlib import Path

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config, wait_for
from moorage.testing.runtime_env import memory_limit_file, proc_cgroups

SLEEP = ["sleep", "1000"]


def test_container_status_fields_and_verbose_info(env):
    logdir = env.log_dir()
    sid, pcfg = env.run_pod(log_dir=logdir)
    res = pb.LinuxContainerResources(memory_limit_in_bytes=64 << 20, cpu_shares=256)
    mnt = pb.Mount(container_path="/host-etc", host_path="/etc", readonly=True)
    cid = env.run(sid, pcfg, SLEEP, log_path="c.log", mounts=[mnt], labels={"app": "x"},
                  annotations={"note": "y"}, linux=pb.LinuxContainerConfig(resources=res))
    r = env.status(cid, verbose=True)
    st = r.status
    assert st.id == cid and st.state == pb.CONTAINER_RUNNING
    assert st.created_at > 0 and st.started_at >= st.created_at and st.finished_at == 0
    assert st.image.image == env.busybox
    assert st.image_ref.startswith(env.reg.images["busybox"].repository + "@sha256:") or st.image_ref.startswith("sha256:")
    assert st.image_id.startswith("sha256:")
    assert st.log_path == os.path.join(logdir, "c.log")
    assert [(m.container_path, m.host_path, m.readonly) for m in st.mounts] == [("/host-etc", "/etc", True)]
    assert st.resources.linux.memory_limit_in_bytes == 64 << 20 and st.resources.linux.cpu_shares == 256
    assert st.labels == {"app": "x"} and st.annotations == {"note": "y"}
    assert st.user.linux.uid == 0
    info = json.loads(r.info["info"])
    assert info["pid"] > 0 and os.path.exists(f"/proc/{info['pid']}")
    assert info["runtimeSpec"]["process"]["args"] == SLEEP
    assert info["sandboxID"] == sid
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED and st.finished_at >= st.started_at and st.exit_code == 137


def test_pod_sandbox_status_verbose_without_an_infra_process(env):
    sid, _ = env.run_pod(pod_config(name=f"p-{uuid.uuid4().hex[:8]}"))
    r = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    info = json.loads(r.info["info"])
    assert info["pid"] == 0 and info["infra"] is False and info["runtimeSpec"] is None
    assert set(info["namespacePaths"]) == {"ipc", "uts"} and all(os.path.exists(p) for p in info["namespacePaths"].values())
    assert info["netNamespacePath"] and os.path.exists(info["netNamespacePath"])


def test_pod_sandbox_status_verbose(env):
    # A shared PID namespace needs a PID 1: such a pod keeps its infra process.
    pcfg = pod_config(name=f"p-{uuid.uuid4().hex[:8]}", labels={"tier": "web"}, annotations={"a": "b"},
                      linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
                          namespace_options=pb.NamespaceOption(pid=pb.POD))))
    sid, pcfg = env.run_pod(pcfg)
    r = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    st = r.status
    assert st.id == sid and st.state == pb.SANDBOX_READY and st.metadata.name == pcfg.metadata.name
    assert st.labels == {"tier": "web"} and st.annotations == {"a": "b"} and st.runtime_handler == "runc"
    assert st.created_at > 0
    info = json.loads(r.info["info"])
    assert info["pid"] > 0
    # runc start returns once the exec fifo is released; the execve into catatonit may
    # still be under way for a moment (cmdline reads empty then).
    wait_for(lambda: "catatonit" in Path(f"/proc/{info['pid']}/cmdline").read_text(), 10, what="infra to exec catatonit")
    assert info["runtimeSpec"]["process"]["args"][-1] == "-P"
    assert info["netNamespacePath"] and os.path.exists(info["netNamespacePath"])
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    st = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert st.state == pb.SANDBOX_NOTREADY


def test_list_filters(env):
    s1, p1 = env.run_pod(pod_config(name=f"p-{uuid.uuid4().hex[:8]}", labels={"grp": "a"}))
    s2, p2 = env.run_pod(pod_config(name=f"p-{uuid.uuid4().hex[:8]}", labels={"grp": "b"}))
    c1 = env.run(s1, p1, SLEEP, labels={"k": "1"})
    c2 = env.create(s1, p1, SLEEP, labels={"k": "2"})
    c3 = env.run(s2, p2, ["true"], labels={"k": "1"})
    env.wait_exited(c3)

    def cids(**f):
        return {c.id for c in env.rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(**f))).containers}

    assert {c1, c2, c3} <= cids()
    assert cids(id=c1[:12]) == {c1}
    assert cids(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING)) == {c1}
    assert cids(state=pb.ContainerStateValue(state=pb.CONTAINER_CREATED)) == {c2}
    assert cids(state=pb.ContainerStateValue(state=pb.CONTAINER_EXITED)) == {c3}
    assert cids(pod_sandbox_id=s1) == {c1, c2}
    assert cids(label_selector={"k": "1"}) == {c1, c3}
    assert cids(label_selector={"k": "1"}, pod_sandbox_id=s2) == {c3}
    assert cids(id="ffffffff") == set()

    def sids(**f):
        return {s.id for s in env.rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(**f))).items}

    assert sids() == {s1, s2}
    assert sids(id=s2[:10]) == {s2}
    assert sids(label_selector={"grp": "a"}) == {s1}
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=s2))
    assert sids(state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY)) == {s1}
    assert sids(state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY)) == {s2}
    items = env.rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(id=c1))).containers
    assert items[0].image_ref and items[0].pod_sandbox_id == s1 and items[0].metadata.name


def test_update_container_resources_visible_in_cgroup(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, linux=pb.LinuxContainerConfig(
        resources=pb.LinuxContainerResources(memory_limit_in_bytes=128 << 20)))
    limit_file = memory_limit_file(proc_cgroups(env.pid(cid)))
    assert int(Path(limit_file).read_text()) == 128 << 20
    env.rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=96 << 20, cpu_shares=512)))
    assert int(Path(limit_file).read_text()) == 96 << 20
    st = env.status(cid).status
    assert st.resources.linux.memory_limit_in_bytes == 96 << 20 and st.resources.linux.cpu_shares == 512


def test_reopen_container_log(env):
    logdir = env.log_dir()
    sid, pcfg = env.run_pod(log_dir=logdir)
    cid = env.run(sid, pcfg, ["sh", "-c", "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.05; done"],
                  log_path="r.log")
    path = os.path.join(logdir, "r.log")
    wait_for(lambda: os.path.exists(path) and "line1" in Path(path).read_text())
    os.rename(path, path + ".1")
    env.rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    wait_for(lambda: os.path.exists(path) and "stdout F line" in Path(path).read_text(), what="the reopened log")
    old = Path(path + ".1").read_text()
    new = Path(path).read_text()
    last_old = int(old.strip().splitlines()[-1].rsplit("line", 1)[1])
    first_new = int(new.splitlines()[0].rsplit("line", 1)[1])
    assert first_new > last_old
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    with pytest.raises(grpc.RpcError) as e:
        env.rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_crun_runtime_handler(env):
    sid, pcfg = env.run_pod(handler="crun")
    st = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert st.runtime_handler == "crun" and st.state == pb.SANDBOX_READY
    cid = env.run(sid, pcfg, ["sh", "-c", "echo via-crun; exit 5"])
    assert env.wait_exited(cid).exit_code == 5
    c2 = env.run(sid, pcfg, SLEEP)
    assert env.sh(c2, "echo hi") == "hi\n"


def test_unknown_runtime_handler_is_invalid_argument(env):
    with pytest.raises(grpc.RpcError) as e:
        env.run_pod(handler="nosuch")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nosuch" in e.value.details()


def test_image_reported_as_repo_tag_when_created_by_image_id(env):
    """The kubelet creates containers with the image id; like containerd, status and list report the
    image's first repo tag, and keep what the user wrote in user_specified_image."""
    img = env.d.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=env.busybox))).image
    assert img.id.startswith("sha256:") and img.repo_tags
    sid, pcfg = env.run_pod()
    from moorage.testing.cri import container_config

    cfg = container_config(img.id, SLEEP)
    cfg.image.user_specified_image = "busybox:written-by-user"
    cid = env.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg,
                                                           sandbox_config=pcfg)).container_id
    st = env.status(cid).status
    assert st.image.image == img.repo_tags[0], st.image
    assert st.image.user_specified_image == "busybox:written-by-user"
    assert st.image_id == img.id
    (item,) = env.rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(id=cid))).containers
    assert item.image.image == img.repo_tags[0] and item.image.user_specified_image == "busybox:written-by-user"
    (ps,) = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).containers_statuses
    assert ps.image.image == img.repo_tags[0]
