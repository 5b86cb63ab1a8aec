"""Bad input and faults over gRPC: each must fail cleanly with the right code and leave nothing behind."""

import concurrent.futures
import os
import threading
import uuid

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config

SLEEP = ["sleep", "1000"]
MISSING = "f" * 64


def code_of(fn, what: str = ""):
    with pytest.raises(grpc.RpcError) as e:
        r = fn()
        pytest.fail(f"{what or fn} succeeded: {r}")
    return e.value.code(), e.value.details()


def test_unknown_ids_are_not_found(env):
    rt = env.rt
    calls = [
        lambda: rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=MISSING)),
        lambda: rt.ContainerStatus(pb.ContainerStatusRequest(container_id=MISSING)),
        lambda: rt.StartContainer(pb.StartContainerRequest(container_id=MISSING)),
        lambda: rt.ExecSync(pb.ExecSyncRequest(container_id=MISSING, cmd=["true"])),
        lambda: rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=MISSING, linux=pb.LinuxContainerResources())),
        lambda: rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=MISSING)),
        lambda: env.create(MISSING, pod_config(), SLEEP),
    ]
    for i, call in enumerate(calls):
        code, details = code_of(call, f"call #{i}")
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert MISSING in details
    # Stopping what is not there succeeds (the CRI's idempotence rule; critest checks it).
    rt.StopContainer(pb.StopContainerRequest(container_id=MISSING))


def test_name_in_use_names_the_holder(env):
    sid, pcfg = env.run_pod()
    code, details = code_of(lambda: env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and sid in details, details
    cfg = container_config(env.busybox, SLEEP, name="dup")
    cid = env.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg)).container_id
    code, details = code_of(lambda: env.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and cid in details, details


def test_create_container_in_stopped_sandbox(env):
    sid, pcfg = env.run_pod()
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    code, details = code_of(lambda: env.create(sid, pcfg, SLEEP))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and sid in details
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers


def test_image_not_present_names_the_reference(env):
    sid, pcfg = env.run_pod()
    ref = env.reg.images["busybox"].repository + ":never-pulled"
    code, details = code_of(lambda: env.create(sid, pcfg, SLEEP, image=ref))
    assert code == grpc.StatusCode.NOT_FOUND and "never-pulled" in details
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers


def test_missing_host_path_mount_is_created_as_a_directory(env):
    """As containerd and CRI-O do (kubelet hostPath type ""): a missing source becomes a directory."""
    sid, pcfg = env.run_pod()
    top = os.path.join(env.d.base, f"hostpath-{uuid.uuid4().hex[:6]}")
    path = os.path.join(top, "a", "b")
    cid = env.run(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/x", host_path=path)])
    assert os.path.isdir(path)
    env.sh(cid, "echo hi > /x/f")
    with open(os.path.join(path, "f")) as f:
        assert f.read() == "hi\n"
    # A relative or empty host path is still refused, and nothing is made.
    for bad in ("", "relative/dir"):
        code, details = code_of(lambda: env.create(sid, pcfg, SLEEP, mounts=[pb.Mount(container_path="/y",
                                                                                      host_path=bad)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert not os.path.exists("relative")
    assert [c.id for c in env.rt.ListContainers(pb.ListContainersRequest()).containers] == [cid]


def test_missing_executable_fails_start_with_runtime_message(env):
    sid, pcfg = env.run_pod()
    cid = env.create(sid, pcfg, ["/bin/no-such-binary"])
    code, details = code_of(lambda: env.start(cid))
    assert "no-such-binary" in details and "no such file or directory" in details
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED and st.reason and "no-such-binary" in st.message
    assert st.exit_code != 0
    # It can be removed like any other exited container.
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_start_twice_is_failed_precondition(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP)
    code, details = code_of(lambda: env.start(cid))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "running" in details
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING


def test_container_ignoring_sigterm_killed_at_timeout(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sh", "-c", "trap '' TERM; touch /tmp/ready; while true; do sleep 0.1; done"])
    env.wait_file(cid, "/tmp/ready")
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 137


def test_memory_limit_exceeded_is_oomkilled(env):
    sid, pcfg = env.run_pod()
    res = pb.LinuxContainerResources(memory_limit_in_bytes=16 << 20, memory_swap_limit_in_bytes=16 << 20)
    # tail buffers its whole input when asked for the last lines of an endless line.
    cid = env.run(sid, pcfg, ["sh", "-c", "tail /dev/zero"], linux=pb.LinuxContainerConfig(resources=res))
    st = env.wait_exited(cid, timeout=120)
    assert st.reason == "OOMKilled" and st.exit_code == 137, st


def test_twenty_sandboxes_in_parallel(env):
    cfgs = [pod_config(name=f"par-{i}-{uuid.uuid4().hex[:6]}") for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        ids = list(ex.map(lambda c: env.run_pod(c)[0], cfgs))
    assert len(set(ids)) == 20
    items = env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert {i.id for i in items} == set(ids)
    assert len({i.metadata.name for i in items}) == 20
    assert all(i.state == pb.SANDBOX_READY for i in items)


def test_retried_run_pod_sandbox_in_flight_returns_same_id(env):
    pcfg = pod_config(name=f"retry-{uuid.uuid4().hex[:6]}")
    barrier = threading.Barrier(3)

    def call():
        barrier.wait()
        return env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg), timeout=120).pod_sandbox_id

    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        ids = list(ex.map(lambda _: call(), range(3)))
    env.pods.extend(ids)
    assert len(set(ids)) == 1
    assert len(env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items) == 1
    # A retried CreateContainer while the first is in flight: the same container.
    cfg = container_config(env.busybox, SLEEP, name="retried")
    barrier = threading.Barrier(3)

    def create():
        barrier.wait()
        return env.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=ids[0], config=cfg), timeout=120).container_id

    def create_or_code():
        try:
            return create()
        except grpc.RpcError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        results = list(ex.map(lambda _: create_or_code(), range(3)))
    # CreateContainer takes milliseconds, so a "retry" may land after the first call
    # has answered; then, as in CRI-O, the name is taken and the error names the holder.
    # Calls that overlap the first one get its id.  Either way: one container.
    cids = {r for r in results if isinstance(r, str)}
    assert len(cids) == 1, results
    (cid,) = cids
    for r in results:
        if not isinstance(r, str):
            assert r.code() == grpc.StatusCode.ALREADY_EXISTS and cid in r.details(), r
    listed = env.rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=ids[0])))
    assert [c.id for c in listed.containers] == [cid]


def test_kubelet_timeout_then_retry_gets_the_result(env):
    """The first call's deadline passes while the work goes on; the retry gets its result."""
    pcfg = pod_config(name=f"slow-{uuid.uuid4().hex[:6]}")
    with pytest.raises(grpc.RpcError) as e:
        env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg), timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    sid = env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg), timeout=120).pod_sandbox_id
    env.pods.append(sid)
    assert [i.id for i in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items] == [sid]


def test_log_path_cannot_leave_the_log_directory(env):
    logdir = env.log_dir()
    outside = os.path.join(os.path.dirname(logdir), f"escape-{uuid.uuid4().hex[:6]}")
    sid, pcfg = env.run_pod(log_dir=logdir)
    # An absolute path is taken relative to the log directory, as containerd does.
    cid = env.create(sid, pcfg, SLEEP, log_path=f"{outside}/x.log")
    assert env.status(cid).status.log_path == os.path.join(logdir, outside.lstrip("/"), "x.log")
    env.start(cid)
    assert os.path.exists(os.path.join(logdir, outside.lstrip("/"), "x.log"))
    assert not os.path.exists(outside)
    # No log directory: an absolute log path is refused.
    sid2, pcfg2 = env.run_pod()
    code, details = code_of(lambda: env.create(sid2, pcfg2, SLEEP, log_path=f"{outside}/y.log"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "log_directory" in details, details
    assert not os.path.exists(outside)
    # '..' that leaves the log directory is refused.
    for bad in (f"../{os.path.basename(outside)}/x.log", f"a/../../{os.path.basename(outside)}/x.log"):
        code, details = code_of(lambda: env.create(sid, pcfg, SLEEP, log_path=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "log directory" in details, details
    assert not os.path.exists(outside)
    assert [c.id for c in env.rt.ListContainers(pb.ListContainersRequest()).containers] == [cid]
