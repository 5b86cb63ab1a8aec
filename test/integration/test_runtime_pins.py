"""Pods without an infra process (runtime.drop_infra): pinned IPC/UTS namespaces, and both paths.

A pod that shares no PID namespace (and has no user namespace of its own) runs no process of
its own: its IPC and UTS namespaces are nsfs files bind-mounted under its state dir, beside the
pinned network namespace, and its containers join them by path.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import grpc
import pytest

from moorage.core.procs import cmdlines
from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config
from moorage.testing.runtime_env import RuntimeEnv, cgroup_dirs, make_daemon, remove_cgroup_tree


def info(env: RuntimeEnv, sid: str) -> dict:
    r = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    return dict(json.loads(r.info["info"]))


def same_ns(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def processes_naming(text: str) -> list[int]:
    return [pid for pid, args in cmdlines() if text.encode() in b" ".join(args)]


def shared_pid_pod() -> pb.PodSandboxConfig:
    return pod_config(linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pb.NamespaceOption(pid=pb.POD))))


def test_a_pod_without_a_shared_pid_namespace_runs_no_process_and_its_containers_share_the_pins(
        env: RuntimeEnv) -> None:
    parent = f"{env.cgroup_parent}/pod-{uuid.uuid4().hex[:8]}"  # its own pod cgroup: stats read it
    sysctls = {"kernel.msgmax": "12345", "fs.mqueue.msg_max": "20", "net.ipv4.ip_unprivileged_port_start": "81"}
    cfg = pod_config(hostname="pinned-host", linux=pb.LinuxPodSandboxConfig(cgroup_parent=parent, sysctls=sysctls))
    sid, pcfg = env.run_pod(cfg)
    i = info(env, sid)
    assert i["infra"] is False and i["pid"] == 0
    pins = i["namespacePaths"]
    assert set(pins) == {"ipc", "uts"} and all(p.startswith(env.d.state) for p in pins.values())
    assert processes_naming(sid) == []  # no conmon, no catatonit
    assert all(os.path.isdir(d) for d in cgroup_dirs(parent))
    # zero containers: listed READY, no processes in its cgroup
    [item] = [s for s in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items if s.id == sid]
    assert item.state == pb.SANDBOX_READY
    ctrs = [env.run(sid, pcfg, ["sleep", "1000"]) for _ in range(2)]
    for c in ctrs:
        pid = env.pid(c)
        for kind, path in pins.items():
            assert same_ns(f"/proc/{pid}/ns/{kind}", path), kind
        assert same_ns(f"/proc/{pid}/ns/net", i["netNamespacePath"])
        assert not same_ns(f"/proc/{pid}/ns/ipc", "/proc/self/ns/ipc")
    a, b = ctrs
    assert env.sh(a, "hostname") == "pinned-host\n"
    assert env.sh(a, "cat /proc/sys/kernel/msgmax /proc/sys/fs/mqueue/msg_max") == "12345\n20\n"
    assert env.sh(b, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start") == "81\n"
    assert env.sh(b, "cat /etc/hostname") == "pinned-host\n"
    # the host's own values are untouched
    with open("/proc/sys/kernel/msgmax") as f:
        assert f.read() != "12345\n"
    stats = env.rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid)).stats
    assert stats.linux.process.process_count.value == 2  # the pod cgroup's, with no infra in it
    assert stats.linux.memory.working_set_bytes.value > 0

    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    st = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert st.state == pb.SANDBOX_NOTREADY
    assert not any(os.path.exists(p) for p in pins.values()) and not os.path.exists(i["netNamespacePath"])
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    remove_cgroup_tree(parent)


def test_host_namespaces_are_not_pinned(env: RuntimeEnv) -> None:
    cfg = pod_config(linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pb.NamespaceOption(network=pb.NODE, ipc=pb.NODE, pid=pb.CONTAINER))))
    sid, pcfg = env.run_pod(cfg)
    i = info(env, sid)
    assert i["infra"] is False and i["namespacePaths"] == {} and i["netNamespacePath"] == ""
    c = env.run(sid, pcfg, ["sleep", "1000"])
    pid = env.pid(c)
    for kind in ("net", "ipc", "uts"):
        assert same_ns(f"/proc/{pid}/ns/{kind}", f"/proc/self/ns/{kind}"), kind


def test_a_sysctl_the_kernel_refuses_fails_the_pod_and_leaves_nothing(env: RuntimeEnv) -> None:
    cfg = pod_config(linux=pb.LinuxPodSandboxConfig(sysctls={"kernel.msgmax": "not-a-number"}))
    with pytest.raises(grpc.RpcError) as e:
        env.run_pod(cfg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kernel.msgmax" in (e.value.details() or "")
    assert env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items == []


def test_a_shared_pid_namespace_keeps_the_infra_process(env: RuntimeEnv) -> None:
    sid, pcfg = env.run_pod(shared_pid_pod())
    i = info(env, sid)
    assert i["infra"] is True and i["pid"] > 0 and i["namespacePaths"] == {}
    c = env.run(sid, pcfg, ["sleep", "1000"], linux=pb.LinuxContainerConfig(
        security_context=pb.LinuxContainerSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.POD))))
    assert "catatonit" in env.sh(c, "cat /proc/1/cmdline")
    assert same_ns(f"/proc/{env.pid(c)}/ns/ipc", f"/proc/{i['pid']}/ns/ipc")


def test_drop_infra_false_runs_an_infra_process_for_every_pod(daemon_factory, registry) -> None:
    d, parent = make_daemon(daemon_factory, "drop_infra = false\n")
    env = RuntimeEnv(d, registry, parent)
    try:
        env.pull("busybox")
        env.begin()
        sid, pcfg = env.run_pod()
        i = info(env, sid)
        assert i["infra"] is True and i["pid"] > 0 and i["namespacePaths"] == {}
        c = env.run(sid, pcfg, ["sleep", "1000"])
        for kind in ("ipc", "uts", "net"):
            assert same_ns(f"/proc/{env.pid(c)}/ns/{kind}", f"/proc/{i['pid']}/ns/{kind}"), kind
        env.cleanup()
        env.check_no_leaks()
    finally:
        env.cleanup()
        remove_cgroup_tree(parent)


def test_restart_finds_pinned_pods_and_a_pod_whose_pins_are_gone_is_not_ready(daemon_factory, registry) -> None:
    d, parent = make_daemon(daemon_factory)
    env = RuntimeEnv(d, registry, parent)
    try:
        env.pull("busybox")
        env.begin()
        kept, kcfg = env.run_pod()
        lost, _ = env.run_pod()
        c = env.run(kept, kcfg, ["sleep", "1000"])
        lost_pins = info(env, lost)["namespacePaths"]
        d.kill9()
        # what a reboot (or an operator) does to one pod: its pinned namespaces are gone
        for p in lost_pins.values():
            subprocess.run(["umount", p], check=True)
        d.start()
        env.rt = d.runtime
        states = {s.id: s.state for s in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items}
        assert states == {kept: pb.SANDBOX_READY, lost: pb.SANDBOX_NOTREADY}
        assert env.status(c).status.state == pb.CONTAINER_RUNNING
        assert env.sh(c, "hostname") == kcfg.hostname + "\n"
        # a new container still joins the recovered pod's pins
        c2 = env.run(kept, kcfg, ["sleep", "1000"])
        assert same_ns(f"/proc/{env.pid(c2)}/ns/uts", info(env, kept)["namespacePaths"]["uts"])
        env.cleanup()
        assert not env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
        env.check_no_leaks()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            env.cleanup()
        remove_cgroup_tree(parent)


def test_hostnames_as_with_an_infra_process(env: RuntimeEnv) -> None:
    # no hostname asked for: the kernel keeps the node's (a long pod name is no hostname)
    long_name = "p-" + "x" * 80
    sid, pcfg = env.run_pod(pod_config(name=long_name, hostname=""))
    c = env.run(sid, pcfg, ["sleep", "1000"])
    assert env.sh(c, "hostname") == os.uname().nodename + "\n"
    # one the kernel cannot take is INVALID_ARGUMENT naming it, and leaves nothing behind
    with pytest.raises(grpc.RpcError) as e:
        env.run_pod(pod_config(hostname="h" * 65))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hostname" in (e.value.details() or "")
    assert [p.id for p in env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items] == [sid]
