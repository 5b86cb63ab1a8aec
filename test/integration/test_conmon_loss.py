"""A container's (or an infra's) conmon is killed: runc tells the truth, and Stop*/Remove* end the process.

Without its conmon nothing collects a container's output or exit, so moorage kills a process
runc still runs and reports it EXITED (137, saying why); until then it is reported RUNNING.
Either way no Stop* answers OK while the process lives.
"""

from __future__ import annotations

import json
import os
import signal

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config, wait_for, with_infra
from moorage.testing.runtime_env import CGROUP_ROOT, RuntimeEnv, cgroup_v2, proc_cgroups

SLEEP = ["sleep", "1000"]


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (the container's init loses its parent too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def conmon_pid(env: RuntimeEnv, obj_id: str) -> int:
    with open(os.path.join(env.d.state, "oci", "conmon", obj_id, "conmon.pid")) as f:
        return int(f.read().strip())


def kill_conmon(env: RuntimeEnv, obj_id: str) -> None:
    pid = conmon_pid(env, obj_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what=f"conmon {pid} to die")


def cgroup_procs(pid: int) -> str:
    """The cgroup.procs file of the pid's (pids or v2) cgroup."""
    cg = proc_cgroups(pid)
    if cgroup_v2():
        return os.path.join(CGROUP_ROOT, cg[""].lstrip("/"), "cgroup.procs")
    return os.path.join(CGROUP_ROOT, "pids", cg["pids"].lstrip("/"), "cgroup.procs")


def cgroup_empty(path: str) -> bool:
    try:
        with open(path) as f:
            return not f.read().split()
    except OSError:
        return True  # the cgroup itself is gone


def infra_pid(env: RuntimeEnv, sid: str) -> int:
    info = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True)).info["info"]
    return int(json.loads(info)["pid"])


def test_status_is_truthful_and_the_process_is_killed(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP)
    pid = env.pid(cid)
    procs = cgroup_procs(pid)
    kill_conmon(env, cid)
    # Right away: whatever the status says must be true of the process (the watcher may kill it
    # at any moment: RUNNING must have been true when asked, EXITED must be true from then on).
    was_alive = alive(pid)
    st = env.status(cid).status
    assert st.state in (pb.CONTAINER_RUNNING, pb.CONTAINER_EXITED), st
    assert was_alive if st.state == pb.CONTAINER_RUNNING else not alive(pid), (st, was_alive)
    # The exit watcher finds the conmon gone, asks runc, and kills what still runs.
    st = env.wait_exited(cid)
    assert not alive(pid) and cgroup_empty(procs)
    assert st.exit_code == 137 and st.reason == "Error" and "conmon" in st.message, st
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=5))
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    # A replacement runs alone.
    new = env.run(sid, pcfg, SLEEP)
    assert env.status(new).status.state == pb.CONTAINER_RUNNING and not alive(pid)


def test_stop_container_right_after_conmon_died_ends_the_process(env):
    sid, pcfg = env.run_pod()
    cids = [env.run(sid, pcfg, SLEEP) for _ in range(2)]
    pids = {c: env.pid(c) for c in cids}
    procs = {c: cgroup_procs(pids[c]) for c in cids}
    for c in cids:
        kill_conmon(env, c)
    # One with a grace period (SIGTERM first), one without.
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cids[0], timeout=2), timeout=60)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cids[1], timeout=0), timeout=60)
    for c in cids:
        assert not alive(pids[c]) and cgroup_empty(procs[c]), c
        st = env.status(c).status
        assert st.state == pb.CONTAINER_EXITED and st.exit_code in (137, 255) and "conmon" in st.message, st


def test_stop_pod_sandbox_ends_containers_and_infra_without_conmon(env):
    sid, pcfg = env.run_pod(pod_config(linux=with_infra()))
    cid = env.run(sid, pcfg, SLEEP)
    other = env.run(sid, pcfg, SLEEP)  # keeps its conmon: stopped as usual
    pids = {cid: env.pid(cid), other: env.pid(other), sid: infra_pid(env, sid)}
    procs = {k: cgroup_procs(p) for k, p in pids.items()}
    kill_conmon(env, cid)
    kill_conmon(env, sid)
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    for k, p in pids.items():
        assert not alive(p) and cgroup_empty(procs[k]), k
    sb = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert sb.state == pb.SANDBOX_NOTREADY
    states = {c.id: c.state for c in env.rt.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=sid))).containers}
    assert states == {cid: pb.CONTAINER_EXITED, other: pb.CONTAINER_EXITED}
    assert env.status(other).status.exit_code == 137  # SIGKILLed by the pod stop (timeout 0)
