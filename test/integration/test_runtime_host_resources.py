"""Resources exactly as the kubelet sends them, on this host, over the real socket; and what a
runtime refusal looks like to the caller (UNKNOWN with the runtime's words, no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.runtime import cgroups
from moorage.testing.cri import pod_config
from moorage.testing.runtime_env import (
    RuntimeEnv,
    make_daemon,
    memory_limit_file,
    proc_cgroups,
    remove_cgroup_tree,
)

SLEEP = ["sleep", "1000"]
HANDLERS = [h for h in ("runc", "crun") if shutil.which(h)]
DROPPED = "hugepage limits are dropped"


def daemon_log(env: RuntimeEnv) -> str:
    with open(env.d.log_file, errors="replace") as f:  # all of it (RuntimeEnv's log() keeps the tail)
        return f.read()


def kubelet_hugepage_limits() -> list[pb.HugepageLimit]:
    """What the kubelet sends for a container without hugepage requests: limit 0 for every page
    size the node has (/sys/kernel/mm/hugepages/hugepages-<n>kB), named like "2MB" or "1GB"."""
    out = []
    for entry in sorted(os.listdir("/sys/kernel/mm/hugepages")):
        kib = int(entry.removeprefix("hugepages-").removesuffix("kB"))
        size = next(f"{kib // d}{unit}" for d, unit in ((1 << 20, "GB"), (1 << 10, "MB"), (1, "KB"))
                    if kib % d == 0 and kib >= d)
        out.append(pb.HugepageLimit(page_size=size, limit=0))
    return out


def kubelet_resources() -> pb.LinuxContainerResources:
    # A BestEffort container as the kubelet on a cgroup v1 node describes it.
    return pb.LinuxContainerResources(cpu_period=100000, cpu_shares=2, oom_score_adj=1000,
                                      hugepage_limits=kubelet_hugepage_limits())


def kubelet_guaranteed_resources() -> pb.LinuxContainerResources:
    # A Guaranteed container (500m, 64Mi): on cgroup v1 the kubelet sets swap = memory (no swap)
    # and oom_score_adj -997, below what a daemon without CAP_SYS_RESOURCE may set.
    mem = 64 << 20
    return pb.LinuxContainerResources(cpu_period=100000, cpu_quota=50000, cpu_shares=512,
                                      memory_limit_in_bytes=mem, memory_swap_limit_in_bytes=mem,
                                      oom_score_adj=-997, hugepage_limits=kubelet_hugepage_limits())


def test_kubelet_page_sizes_from_the_host():
    limits = kubelet_hugepage_limits()
    assert limits and all(h.limit == 0 and h.page_size[-2:] in ("KB", "MB", "GB") for h in limits)


@pytest.mark.parametrize("handler", HANDLERS)
def test_kubelet_hugepage_limits_start_and_run(env, handler):
    sid, pcfg = env.run_pod(handler=handler)
    first = env.run(sid, pcfg, SLEEP, linux=pb.LinuxContainerConfig(resources=kubelet_resources()))
    second = env.run(sid, pcfg, SLEEP, linux=pb.LinuxContainerConfig(resources=kubelet_guaranteed_resources()))
    for cid in (first, second):
        assert env.status(cid).status.state == pb.CONTAINER_RUNNING
        assert env.sh(cid, "echo up").strip() == "up"
    limit = proc_cgroups(env.pid(second))
    with open(memory_limit_file(limit)) as f:
        assert int(f.read()) == 64 << 20
    if cgroups.hugetlb_missing(f"{env.cgroup_parent}/x") is not None:
        # Dropped, and said once for the daemon, not once per container.
        assert daemon_log(env).count(DROPPED) == 1


def test_runtime_refusal_is_unknown_with_its_message(env):
    # Passes moorage's checks; the kernel (through runc) refuses a CPU the node does not have.
    sid, pcfg = env.run_pod()
    res = pb.LinuxContainerResources(cpuset_cpus="1000000")
    cid = env.create(sid, pcfg, SLEEP, linux=pb.LinuxContainerConfig(resources=res))
    with pytest.raises(grpc.RpcError) as e:
        env.start(cid)
    assert e.value.code() == grpc.StatusCode.UNKNOWN, e.value.details()
    details = e.value.details()
    assert "cpuset.cpus" in details and "out of range" in details.lower()
    assert len(details) <= 4200 and "oom kill count" not in details  # runc's warning is not the error
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED and st.reason == "StartError"
    log = daemon_log(env)
    lines = [json.loads(line) for line in log.splitlines() if "/StartContainer" in line and "UNKNOWN" in line and line.startswith("{")]
    assert lines and all(rec["level"] == "warning" for rec in lines), lines  # a refusal, not a moorage bug
    assert "Traceback" not in log and "internal error" not in log


@pytest.fixture
def strict_env(daemon_factory, registry):
    d, parent = make_daemon(daemon_factory, extra_config="tolerate_missing_hugetlb_controller = false\n")
    env = RuntimeEnv(d, registry, parent)
    env.pull("busybox")
    env.begin()
    try:
        yield env
    finally:
        env.cleanup()
        remove_cgroup_tree(parent)


def test_missing_hugetlb_not_tolerated_is_refused(strict_env):
    env = strict_env
    sid, pcfg = env.run_pod(pod_config(name=f"p-{uuid.uuid4().hex[:8]}"))
    res = kubelet_resources()
    if cgroups.hugetlb_missing(f"{env.cgroup_parent}/x") is None:
        cid = env.run(sid, pcfg, SLEEP, linux=pb.LinuxContainerConfig(resources=res))
        assert env.status(cid).status.state == pb.CONTAINER_RUNNING
        return
    with pytest.raises(grpc.RpcError) as e:
        env.create(sid, pcfg, SLEEP, linux=pb.LinuxContainerConfig(resources=res))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "hugetlb" in e.value.details() and "tolerate_missing_hugetlb_controller" in e.value.details()
    # Without hugepage limits the same daemon runs containers.
    cid = env.run(sid, pcfg, SLEEP, linux=pb.LinuxContainerConfig(
        resources=pb.LinuxContainerResources(cpu_shares=2)))
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
