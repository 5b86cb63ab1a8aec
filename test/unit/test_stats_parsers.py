"""runtime.stats: cgroup v1/v2 reads (with a fake filesystem), rates, sums, and the collector on fakes."""

from __future__ import annotations

import os

from moorage.cri import rpc_stats
from moorage.cri.api import api_pb2 as pb
from moorage.runtime import cgroups as cg
from moorage.runtime import stats as st
from moorage.runtime.records import ContainerState
from moorage.testing.statsfs import (
    V1_DIRS,
    Ctr,
    FakeRuntime,
    MiB,
    Sb,
    fake_fs,
    make_v2_host,
    v1_files,
)

V2_STAT = """anon 67108864
file 8388608
inactive_file 4194304
pgfault 30000
pgmajfault 3
"""


def test_read_cgroup_v1():
    s = st.read_cgroup(V1_DIRS, with_oom=True, reader=fake_fs(v1_files()))
    assert s.cpu_usage_ns == 123456789 and s.pids == 4 and s.oom_kills == 2
    assert s.memory["usage"] == 80 * MiB and s.memory["working_set"] == 76 * MiB
    assert s.memory["rss"] == 64 * MiB and s.memory["limit"] is None  # v1 "unlimited" is a huge number
    assert s.memory["pgfault"] == 20000 and s.memory["pgmajfault"] == 7 and s.cache_bytes == 8 * MiB
    m = st.memory_sample(s.timestamp_ns, s.memory, s.cache_bytes)
    assert m.available_bytes is None and m.working_set_bytes == 76 * MiB


def test_read_cgroup_v1_limited_gives_available_bytes():
    s = st.read_cgroup(V1_DIRS, reader=fake_fs(v1_files(limit=f"{100 * MiB}\n")))
    m = st.memory_sample(s.timestamp_ns, s.memory, s.cache_bytes)
    assert m.limit_bytes == 100 * MiB and m.available_bytes == 24 * MiB
    assert s.oom_kills is None  # not asked for: memory.oom_control not read


def test_read_cgroup_v2():
    files = {"/u/c/memory.current": f"{80 * MiB}\n", "/u/c/memory.max": "max\n", "/u/c/memory.stat": V2_STAT,
             "/u/c/memory.events": "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n",
             "/u/c/cpu.stat": "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
             "/u/c/pids.current": "3\n", "/u/c/cgroup.procs": "1\n"}
    s = st.read_cgroup({cg.UNIFIED: "/u/c"}, with_oom=True, reader=fake_fs(files))
    assert s.cpu_usage_ns == 2_500_000 and s.pids == 3 and s.oom_kills == 1
    assert s.memory["working_set"] == 76 * MiB and s.memory["rss"] == 64 * MiB and s.memory["limit"] is None
    assert s.memory["pgfault"] == 30000 and s.cache_bytes == 8 * MiB
    files["/u/c/memory.max"] = f"{128 * MiB}\n"
    s = st.read_cgroup({cg.UNIFIED: "/u/c"}, reader=fake_fs(files))
    assert st.memory_sample(0, s.memory, None).available_bytes == 52 * MiB


def test_read_cgroup_gone_is_none():
    assert st.read_cgroup(V1_DIRS, reader=fake_fs({})) is None
    assert st.read_cgroup({cg.UNIFIED: "/u/gone"}, reader=fake_fs({})) is None


def test_only_the_needed_files_are_read():
    seen = []
    files = v1_files()

    def reader(p):
        seen.append(os.path.basename(p))
        return files.get(p)

    st.read_cgroup(V1_DIRS, reader=reader)
    assert sorted(seen) == sorted(["memory.usage_in_bytes", "memory.stat", "memory.limit_in_bytes",
                                   "cpuacct.usage", "pids.current"])


def test_nano_cores():
    assert st.nano_cores(None, 10, 10) is None
    assert st.nano_cores((0, 0), 2_000_000_000, 1_000_000_000) == 500_000_000  # half a core
    assert st.nano_cores((0, 0), 1_000_000_000, 3_000_000_000) == 3_000_000_000  # three cores
    assert st.nano_cores((5, 100), 5, 200) is None  # no time passed
    assert st.nano_cores((0, 100), 10, 50) is None  # counter went back: a new cgroup


def test_sum_samples_adds_members_and_drops_limits():
    a = st.CgroupSample(1, cpu_usage_ns=10, memory={"usage": 5, "working_set": 4, "rss": 3, "limit": 100,
                                                    "pgfault": 1, "pgmajfault": 0}, pids=1)
    b = st.CgroupSample(2, cpu_usage_ns=20, memory={"usage": 7, "working_set": 6, "rss": None, "limit": 50,
                                                    "pgfault": 2, "pgmajfault": 1}, pids=2)
    s = st.sum_samples([a, b])
    assert s.timestamp_ns == 2 and s.cpu_usage_ns == 30 and s.pids == 3
    assert s.memory == {"usage": 12, "working_set": 10, "rss": 3, "limit": None, "pgfault": 3, "pgmajfault": 1}
    assert st.sum_samples([]) is None


# -- the collector on a fake runtime and a fake v2 host ----------------------------------------------


def test_collector_rates_pod_cgroup_and_protobuf(tmp_path, monkeypatch):
    mounts = [cg.CgroupMount(str(tmp_path), "/", 2, ())]
    sb = Sb("s1", pid=111)
    c = Ctr("c1", "s1", pid=222)
    rt = FakeRuntime([sb], [c])
    procs = {111: "0::/kubepods/podA/s1\n", 222: "0::/kubepods/podA/c1\n"}
    monkeypatch.setattr(cg, "cgroup_dirs_for_pid", lambda pid, m: cg.cgroup_dirs(cg.parse_proc_cgroup(procs[pid]), m))
    make_v2_host(tmp_path, "/kubepods/podA", 1000, 300)
    cdir = make_v2_host(tmp_path, "/kubepods/podA/c1", 1000, 200)
    col = st.StatsCollector(rt, min_window=0, mounts=mounts)

    [s1] = col.containers(rt.list_containers())
    assert s1.cpu.usage_core_ns == 1_000_000 and s1.cpu.usage_nano_cores is None
    (cdir / "cpu.stat").write_text("usage_usec 3000\n")
    [s2] = col.containers(rt.list_containers())
    assert s2.cpu.usage_core_ns == 3_000_000 and s2.cpu.usage_nano_cores > 0

    [p] = col.pods(col.plan_pods([sb]))
    assert p.memory.usage_bytes == 300  # the pod's own cgroup (parent of the infra's), not a sum
    assert [x.id for x in p.containers] == ["c1"]
    msg = rpc_stats.pod_stats_pb(p)
    assert msg.attributes.metadata.namespace == "ns" and msg.linux.memory.usage_bytes.value == 300
    assert msg.linux.process.process_count.value == 1
    cmsg = rpc_stats.container_stats_pb(s2)
    assert cmsg.attributes.metadata.attempt == 1 and cmsg.cpu.usage_nano_cores.value > 0

    # A shared (default) parent: the pod figure is the sum of its members.
    sb = rt.sandboxes["s1"] = Sb("s1", pid=111, cgroup_parent="")
    make_v2_host(tmp_path, "/kubepods/podA/s1", 0, 50)
    [p] = col.pods(col.plan_pods([sb]))
    assert p.memory.usage_bytes == 250

    # Gone containers are forgotten.
    rt.containers.clear()
    col.forget_gone()
    assert "c1" not in col._prev and "c1" not in col._dirs


def test_exited_container_has_attributes_only():
    rt = FakeRuntime([Sb("s1")], [Ctr("c1", "s1", state=ContainerState.EXITED)])
    col = st.StatsCollector(rt, mounts=[])
    [s] = col.containers(rt.list_containers())
    m = rpc_stats.container_stats_pb(s)
    assert m.attributes.id == "c1" and not m.HasField("cpu") and not m.HasField("memory")


def test_network_sample_leaves_out_loopback_and_picks_eth0():
    from moorage.core.netns import InterfaceStats

    def ifs(ns):
        mk = lambda n, rx: InterfaceStats(n, rx, 1, 0, 0, 2 * rx, 1, 0, 0)  # noqa: E731
        return {"lo": mk("lo", 5), "eth0": mk("eth0", 100), "net1": mk("net1", 7)}

    col = st.StatsCollector(FakeRuntime([], []), mounts=[], interface_stats=ifs)
    n = col.network(Sb("s1", netns_path="/run/netns/x"))
    assert [i.name for i in n.interfaces] == ["eth0", "net1"] and n.default.name == "eth0"
    assert n.default.tx_bytes == 200
    assert col.network(Sb("s2", netns_path="")) is None


def test_descriptors_and_metric_labels_line_up():
    descs = {d.name: list(d.label_keys) for d in rpc_stats.descriptors()}
    assert all(keys[:3] == ["id", "name", "image"] for keys in descs.values())
    s = st.ContainerSample(id="c1", record=Ctr("c1", "s1"),
                           cpu=st.CpuSample(1, 2_500_000_000, 5),
                           memory=st.MemorySample(1, 10, 8, 6, 2, 100, 1, None, None),
                           writable_layer=st.FsSample(1, "/var/lib/x", 4096, 3), processes=2, oom_kills=0)
    p = st.PodSample(id="s1", record=Sb("s1"), processes=3, containers=[s], network=st.NetworkSample(
        1, [st.InterfaceSample("eth0", 1, 2, 3, 4, 5, 6, 7, 8)], None))
    pm = rpc_stats.pod_metrics(p, {"c1": "busybox:latest"})
    allm = [*pm.metrics, *pm.container_metrics[0].metrics]
    for m in allm:
        assert len(m.label_values) == len(descs[m.name]), m.name
    by = {m.name: m for m in pm.container_metrics[0].metrics}
    assert by["container_cpu_usage_seconds_total"].value.value == 2  # whole seconds, as the CRI carries them
    assert by["container_cpu_usage_seconds_total"].label_values[-1] == "total"
    assert by["container_spec_memory_limit_bytes"].value.value == 0  # unlimited
    labels = dict(zip(descs["container_memory_rss"], by["container_memory_rss"].label_values))
    assert labels == {"id": "c1", "name": "c_pod_0", "image": "busybox:latest", "container": "c",
                      "pod": "pod", "namespace": "ns"}
    net = {m.name: m.value.value for m in pm.metrics if m.name.startswith("container_network")}
    assert net["container_network_receive_bytes_total"] == 1 and net["container_network_transmit_errors_total"] == 7
    assert pb.Metric  # protobuf types used throughout
