"""Daemon SIGKILLed with pods running, restarted on the same dirs: everything is found again."""

import json
import os
import uuid
from pathlib import Path

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config, wait_for
from moorage.testing.runtime_env import (
    RuntimeEnv,
    cgroup_dirs,
    make_daemon,
    memory_limit_file,
    proc_cgroups,
    remove_cgroup_tree,
)


def shared_pid_pod(**kw):
    """A pod whose containers share its PID namespace: it keeps an infra process (runtime.drop_infra)."""
    linux = kw.pop("linux", None) or pb.LinuxPodSandboxConfig()
    linux.security_context.namespace_options.pid = pb.POD
    return pod_config(name=f"p-{uuid.uuid4().hex[:8]}", linux=linux, **kw)


def sandbox_info(env, sid):
    return json.loads(env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True)).info["info"])


@pytest.fixture
def fresh_env(daemon_factory, registry):
    d, parent = make_daemon(daemon_factory)
    env = RuntimeEnv(d, registry, parent)
    env.pull("busybox")
    env.begin()
    try:
        yield env
    finally:
        if d.proc is not None and d.proc.poll() is None:
            env.cleanup()
        remove_cgroup_tree(parent)


def test_kill9_restart_finds_everything(fresh_env):
    env = fresh_env
    d = env.d
    s1, p1 = env.run_pod(shared_pid_pod())  # with an infra process
    s2, p2 = env.run_pod(pod_config(name=f"p-{uuid.uuid4().hex[:8]}", labels={"x": "y"}))  # pinned namespaces
    long1 = env.run(s1, p1, ["sleep", "1000"])
    long2 = env.run(s2, p2, ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"])
    # Exits (code 42) once /tmp/go exists: we let it go while the daemon is down.
    exits = env.run(s1, p1, ["sh", "-c", "while ! test -e /tmp/go; do sleep 0.05; done; exit 42"])
    created = env.create(s2, p2, ["true"])
    stopped_pod, sp = env.run_pod()
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=stopped_pod))
    before = {c: env.pid(c) for c in (long1, long2, exits)}
    infra_before = {s1: sandbox_info(env, s1)["pid"]}
    pins = sandbox_info(env, s2)["namespacePaths"]
    assert sandbox_info(env, s2)["pid"] == 0 and set(pins) == {"ipc", "uts"}

    d.kill9()
    # The container exits while nobody watches.
    exit_pid = before[exits]
    open(f"/proc/{exit_pid}/root/tmp/go", "w").close()
    wait_for(lambda: not os.path.exists(f"/proc/{exit_pid}") or Path(f"/proc/{exit_pid}/stat").read_text().split()[2] == "Z",
             what="the container to exit while the daemon is down")
    for c in (long1, long2):
        assert os.path.exists(f"/proc/{before[c]}")
    d.start()
    env.rt = d.runtime

    sb = {s.id: s for s in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items}
    assert sb[s1].state == sb[s2].state == pb.SANDBOX_READY
    assert sb[stopped_pod].state == pb.SANDBOX_NOTREADY
    assert sb[s2].labels == {"x": "y"}
    for s, pid in infra_before.items():
        info = sandbox_info(env, s)
        assert info["pid"] == pid and os.path.exists(f"/proc/{pid}")
    assert sandbox_info(env, s2)["namespacePaths"] == pins and all(os.path.exists(p) for p in pins.values())
    st = {c.id: c.state for c in env.rt.ListContainers(pb.ListContainersRequest()).containers}
    assert st == {long1: pb.CONTAINER_RUNNING, long2: pb.CONTAINER_RUNNING, exits: pb.CONTAINER_EXITED,
                  created: pb.CONTAINER_CREATED}
    e = env.status(exits).status
    assert e.exit_code == 42 and e.reason == "Error" and e.finished_at >= e.started_at
    for c in (long1, long2):
        assert env.pid(c) == before[c]
        assert env.sh(c, "echo alive") == "alive\n"
    # Exits are watched again after the restart.
    env.rt.StopContainer(pb.StopContainerRequest(container_id=long2, timeout=30))
    assert env.status(long2).status.exit_code == 0
    env.start(created)
    assert env.wait_exited(created).exit_code == 0
    # And everything stops and goes away cleanly.
    env.cleanup()
    assert not env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    env.check_no_leaks()


@pytest.mark.parametrize("infra", [True, False])
def test_cgroup_parent_honoured_cgroupfs(fresh_env, infra):
    env = fresh_env
    parent = f"/kubepods-test-{uuid.uuid4().hex[:8]}/pod{uuid.uuid4().hex[:8]}"
    try:
        linux = pb.LinuxPodSandboxConfig(cgroup_parent=parent)
        pcfg = shared_pid_pod(linux=linux) if infra else pod_config(name=f"p-{uuid.uuid4().hex[:8]}", linux=linux)
        sid, pcfg = env.run_pod(pcfg)
        if not infra:  # the pod cgroup is made without a process, before any container
            assert sandbox_info(env, sid)["pid"] == 0
            assert all(os.path.isdir(d) for d in cgroup_dirs(parent))
        cid = env.run(sid, pcfg, ["sleep", "1000"], linux=pb.LinuxContainerConfig(
            resources=pb.LinuxContainerResources(memory_limit_in_bytes=50 << 20)))
        cg = proc_cgroups(env.pid(cid))
        key = "" if "memory" not in cg else "memory"
        assert cg[key] == f"{parent}/{cid}", cg
        if infra:
            assert proc_cgroups(sandbox_info(env, sid)["pid"])[key] == f"{parent}/{sid}"
        assert int(Path(memory_limit_file(cg)).read_text()) == 50 << 20
        env.cleanup()
        for d in cgroup_dirs(parent):
            assert not os.path.exists(os.path.join(d, cid)) and not os.path.exists(os.path.join(d, sid))
    finally:
        env.cleanup()
        remove_cgroup_tree(parent.split("/")[1])


def test_systemd_cgroup_driver_selectable(daemon_factory):
    d, parent = make_daemon(daemon_factory, extra_config='cgroup_driver = "systemd"\n')
    try:
        r = d.runtime.RuntimeConfig(pb.RuntimeConfigRequest())
        assert r.linux.cgroup_driver == pb.SYSTEMD
        cfg = json.loads(d.runtime.Status(pb.StatusRequest(verbose=True)).info["config"])
        assert cfg["runtime"]["cgroup_driver"] == "systemd"
    finally:
        remove_cgroup_tree(parent)
    d2, parent2 = make_daemon(daemon_factory)
    assert d2.runtime.RuntimeConfig(pb.RuntimeConfigRequest()).linux.cgroup_driver == pb.CGROUPFS
    remove_cgroup_tree(parent2)


def _wipe_runtime_state(d, obj_id: str) -> None:
    """What a reboot does to one container: conmon and the runtime's state are gone, and so is
    conmon's persist dir and exit file (they live under the state dir, a tmpfs)."""
    import shutil
    import signal
    import subprocess

    oci = os.path.join(d.state, "oci")
    pdir = os.path.join(oci, "conmon", obj_id)
    with open(os.path.join(pdir, "conmon.pid")) as f:
        conmon = int(f.read().strip())
    os.kill(conmon, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{conmon}") or Path(f"/proc/{conmon}/stat").read_text().split()[2] == "Z",
             what="conmon to die")
    subprocess.run(["runc", "--root", os.path.join(oci, "runc"), "delete", "--force", obj_id], check=True,
                   capture_output=True)
    shutil.rmtree(pdir)
    try:
        os.unlink(os.path.join(oci, "exits", obj_id))
    except FileNotFoundError:
        pass


def test_lost_runtime_state_after_reboot_is_exited_and_pod_removable(fresh_env):
    env = fresh_env
    d = env.d
    sid, pcfg = env.run_pod(shared_pid_pod())  # an infra process whose state is lost too
    cid = env.run(sid, pcfg, ["sleep", "1000"])
    d.kill9()
    _wipe_runtime_state(d, cid)
    _wipe_runtime_state(d, sid)
    d.start()
    env.rt = d.runtime
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED, st
    assert st.exit_code == 255 and st.reason == "Error" and "state lost" in st.message, st
    sb = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert sb.state == pb.SANDBOX_NOTREADY
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=30))
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert not env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers
    env.check_no_leaks()


def test_runtime_state_lost_under_a_running_daemon_stop_returns(fresh_env):
    """The runtime forgets a running container while the daemon watches it: StopContainer and
    StopPodSandbox record the exit instead of waiting for one that never comes."""
    env = fresh_env
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sleep", "1000"])
    _wipe_runtime_state(env.d, cid)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=30))
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED and st.exit_code in (255, 137), st
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert not env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    env.check_no_leaks()
