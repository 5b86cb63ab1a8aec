"""runtime.stats detail figures for ListPodSandboxMetrics: cgroup v1/v2 parsers, /proc counts, net/dev,
the writable-layer cache, and the metrics critest requires."""

from __future__ import annotations

import os
import socket

from moorage.cri import rpc_stats
from moorage.runtime import cgroups as cg
from moorage.runtime import stats as st
from moorage.runtime.records import ContainerState
from moorage.testing.statsfs import V1_DIRS, Ctr, FakeRuntime, Sb, fake_fs, v1_files

MiB = 1024 * 1024
V1_UNLIMITED = "9223372036854771712\n"


def test_cpu_detail_v1_throttling_in_ns_and_ticks_to_ns():
    d = st.cpu_detail_v1("nr_periods 40\nnr_throttled 7\nthrottled_time 2500000000\nnr_bursts 0\n",
                         "user 250\nsystem 50\n", clk_tck=100)
    assert d == {"cfs_periods": 40, "cfs_throttled_periods": 7, "cfs_throttled_ns": 2_500_000_000,
                 "user_ns": 2_500_000_000, "system_ns": 500_000_000}
    assert st.cpu_detail_v1(None, None) == {}


def test_cpu_detail_v2_in_usec():
    d = st.cpu_detail_v2("usage_usec 9000\nuser_usec 6000\nsystem_usec 3000\nnr_periods 5\nnr_throttled 2\n"
                         "throttled_usec 1500\n")
    assert d == {"cfs_periods": 5, "cfs_throttled_periods": 2, "cfs_throttled_ns": 1_500_000,
                 "user_ns": 6_000_000, "system_ns": 3_000_000}
    # No cpu controller enabled: usage only; throttling reads as zero.
    assert st.cpu_detail_v2("usage_usec 1\nuser_usec 1\nsystem_usec 0\n")["cfs_periods"] == 0
    assert st.cpu_detail_v2(None) == {}


def test_memory_detail_v1():
    stat = "mapped_file 4096\ntotal_mapped_file 8192\ntotal_swap 12288\n"
    d = st.memory_detail_v1(stat, 100, "3\n", "65536\n", "200\n", None)
    assert d == {"failcnt": 3, "kernel": 65536, "mapped_file": 8192, "max_usage": 200, "swap": 12288}
    # No total_swap in memory.stat: memsw usage minus usage; no memsw either: 0.
    assert st.memory_detail_v1("", 100, None, None, None, "150\n")["swap"] == 50
    d = st.memory_detail_v1("", 100, None, None, None, None)
    assert d == {"failcnt": 0, "kernel": 0, "mapped_file": 0, "max_usage": 100, "swap": 0}


def test_memory_detail_v2():
    stat = "anon 10\nfile_mapped 4096\nkernel 9999\nkernel_stack 16384\nslab 100\n"
    d = st.memory_detail_v2(stat, 500, "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n", "700\n", "8192\n")
    assert d == {"failcnt": 4, "kernel": 9999, "mapped_file": 4096, "max_usage": 700, "swap": 8192}
    # Older kernels: no "kernel" key (sum of its parts), no memory.peak (current usage), no swap file.
    d = st.memory_detail_v2("kernel_stack 16384\nslab 100\npercpu 4\nsock 0\n", 500, None, None, None)
    assert d == {"failcnt": 0, "kernel": 16488, "mapped_file": 0, "max_usage": 500, "swap": 0}


def test_spec_values_unlimited_is_zero():
    assert st.spec_v1("100000\n", "1024\n", V1_UNLIMITED) == {
        "spec_cpu_period": 100000, "spec_cpu_shares": 1024, "spec_memory_swap_limit": 0}
    assert st.spec_v1("100000\n", "2\n", f"{64 * MiB}\n")["spec_memory_swap_limit"] == 64 * MiB
    assert st.spec_v1(None, None, None) == {"spec_cpu_period": 0, "spec_cpu_shares": 0, "spec_memory_swap_limit": 0}
    # v2: period from cpu.max, shares from weight, memsw = swap.max + memory.max.
    assert st.spec_v2("20000 100000\n", "100\n", "0\n", f"{64 * MiB}\n") == {
        "spec_cpu_period": 100000, "spec_cpu_shares": st.weight_to_shares(100), "spec_memory_swap_limit": 64 * MiB}
    assert st.spec_v2("max 100000\n", "1\n", "max\n", f"{64 * MiB}\n")["spec_memory_swap_limit"] == 0
    assert st.spec_v2(None, None, "0\n", "max\n")["spec_memory_swap_limit"] == 0
    # runc maps shares 2 -> weight 1 and 262144 -> 10000; 1024 -> 39; the inverse lands near.
    assert st.weight_to_shares(1) == 2 and st.weight_to_shares(10000) == 262144
    assert abs(st.weight_to_shares(39) - 1024) < 30


def test_read_detail_v1():
    files = v1_files(limit=f"{64 * MiB}\n")
    files.update({
        "/cg/cpu/c/cpu.stat": "nr_periods 10\nnr_throttled 1\nthrottled_time 1000\n",
        "/cg/cpu/c/cpu.cfs_period_us": "100000\n", "/cg/cpu/c/cpu.shares": "512\n",
        "/cg/cpuacct/c/cpuacct.stat": "user 1\nsystem 2\n",
        "/cg/memory/c/memory.failcnt": "5\n", "/cg/memory/c/memory.kmem.usage_in_bytes": "4096\n",
        "/cg/memory/c/memory.max_usage_in_bytes": f"{90 * MiB}\n",
        "/cg/memory/c/memory.memsw.limit_in_bytes": f"{64 * MiB}\n", "/cg/pids/c/pids.max": "max\n",
    })
    d = st.read_detail(V1_DIRS, 80 * MiB, reader=fake_fs(files))
    assert d["cfs_periods"] == 10 and d["cfs_throttled_ns"] == 1000 and d["user_ns"] > 0
    assert d["spec_cpu_period"] == 100000 and d["spec_cpu_shares"] == 512
    assert d["failcnt"] == 5 and d["kernel"] == 4096 and d["max_usage"] == 90 * MiB and d["swap"] == 0
    assert d["spec_memory_swap_limit"] == 64 * MiB and d["threads_max"] == 0


def test_read_detail_v2():
    files = {"/u/c/cpu.stat": "usage_usec 10\nuser_usec 7\nsystem_usec 3\nnr_periods 2\nnr_throttled 1\n"
                              "throttled_usec 5\n",
             "/u/c/cpu.max": "20000 100000\n", "/u/c/cpu.weight": "100\n",
             "/u/c/memory.stat": "file_mapped 1\n", "/u/c/memory.events": "max 2\n",
             "/u/c/memory.swap.max": "0\n", "/u/c/memory.max": f"{64 * MiB}\n", "/u/c/pids.max": "100\n"}
    d = st.read_detail({cg.UNIFIED: "/u/c"}, 3, reader=fake_fs(files))
    assert d["cfs_throttled_ns"] == 5000 and d["system_ns"] == 3000 and d["spec_cpu_period"] == 100000
    assert d["failcnt"] == 2 and d["max_usage"] == 3 and d["spec_memory_swap_limit"] == 64 * MiB
    assert d["threads_max"] == 100


def test_procs_of_and_process_sample(tmp_path):
    files = {"/cg/pids/c/cgroup.procs": "12\n34\n"}
    assert st.procs_of(V1_DIRS, reader=fake_fs(files)) == [12, 34]
    assert st.procs_of({cg.UNIFIED: "/u"}, reader=fake_fs({"/u/cgroup.procs": ""})) == []
    assert st.procs_of({}, reader=fake_fs({})) is None
    # A fake /proc: pid 12 with 3 threads and fds (one a socket), pid 34 gone meanwhile.
    base = tmp_path / "12"
    (base / "task").mkdir(parents=True)
    for t in ("12", "13", "14"):
        (base / "task" / t).mkdir()
    (base / "fd").mkdir()
    os.symlink("/dev/null", base / "fd" / "0")
    os.symlink("socket:[4242]", base / "fd" / "3")
    os.symlink("pipe:[77]", base / "fd" / "4")
    p = st.process_sample([12, 34], str(tmp_path))
    assert (p.processes, p.fds, p.sockets, p.threads, p.truncated) == (2, 3, 1, 3, False)
    # Bounds: sockets are checked for at most max_fds fds; processes past max_procs are not walked.
    assert st.process_sample([12, 34], str(tmp_path), max_fds=1).truncated
    assert st.process_sample([34, 12], str(tmp_path), max_procs=1).threads == 0


def test_process_sample_of_this_process():
    s = socket.socket()
    try:
        p = st.process_sample([os.getpid()])
        assert p.fds >= 4 and p.sockets >= 1 and p.threads >= 1
    finally:
        s.close()


def test_parse_net_dev():
    text = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
  eth0: 5000      40    1    2    0     0          0         0     7000      50    3    4    0     0       0          0
"""
    lo, eth0 = st.parse_net_dev(text)
    assert lo.name == "lo" and eth0.name == "eth0"
    assert (eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_dropped) == (5000, 40, 1, 2)
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_dropped) == (7000, 50, 3, 4)


def test_network_from_proc_net_dev_only_when_in_the_pods_netns(tmp_path):
    proc = tmp_path / "proc"
    (proc / "7" / "ns").mkdir(parents=True)
    (proc / "7" / "net").mkdir()
    netns = tmp_path / "netns"
    netns.write_text("")
    os.symlink(netns, proc / "7" / "ns" / "net")  # stat follows it: the same inode as the pod's netns
    (proc / "7" / "net" / "dev").write_text("h1\nh2\n  eth0: 1 2 3 4 0 0 0 0 5 6 7 8 0 0 0 0\n")
    col = st.StatsCollector(FakeRuntime([], []), mounts=[], proc_root=str(proc))
    n = col.network(Sb("s1", pid=7, netns_path=str(netns)))
    assert n.default.name == "eth0" and n.default.tx_dropped == 8
    other = tmp_path / "other"
    other.write_text("")
    assert col._net_dev(Sb("s1", pid=7, netns_path=str(other))) is None  # another netns: pid reused
    assert col._net_dev(Sb("s1", pid=0, netns_path=str(netns))) is None


class Images:
    root = "/nonexistent-images-root"

    def __init__(self):
        self.calls = 0

    def container_usage(self, key):
        self.calls += 1
        from types import SimpleNamespace
        return SimpleNamespace(size=4096 * self.calls, inodes=3)


def test_writable_layer_usage_is_cached_per_container_for_the_ttl():
    now = [100.0]
    rt = FakeRuntime([Sb("s1")], [Ctr("c1", "s1", state=ContainerState.EXITED), Ctr("c2", "s1")])
    rt.images = Images()
    col = st.StatsCollector(rt, mounts=[], usage_ttl=10, clock=lambda: now[0])
    a = col.containers(rt.list_containers())
    assert rt.images.calls == 2 and a[0].writable_layer.used_bytes == 4096
    now[0] += 5
    b = col.containers(rt.list_containers())
    assert rt.images.calls == 2 and b[0].writable_layer is a[0].writable_layer  # no walk within the TTL
    now[0] += 7  # past the TTL (10 s + at most 20 % jitter)
    col.containers(rt.list_containers())
    assert rt.images.calls == 4
    del rt.containers["c1"]
    col.forget_gone()
    assert "c1" not in col._layer and "c2" in col._layer


# Names critest (cri-tools pkg/validate) requires in ListMetricDescriptors, with values in
# ListPodSandboxMetrics unless noted.
REQUIRED_WITH_VALUES = """
container_cpu_cfs_periods_total container_cpu_cfs_throttled_periods_total container_cpu_cfs_throttled_seconds_total
container_cpu_system_seconds_total container_cpu_usage_seconds_total container_cpu_user_seconds_total
container_file_descriptors container_fs_inodes_free container_fs_inodes_total container_fs_limit_bytes
container_fs_usage_bytes container_last_seen container_memory_cache container_memory_failcnt
container_memory_failures_total container_memory_kernel_usage container_memory_mapped_file
container_memory_max_usage_bytes container_memory_rss container_memory_swap container_memory_usage_bytes
container_memory_working_set_bytes container_network_receive_bytes_total container_network_receive_errors_total
container_network_receive_packets_dropped_total container_network_receive_packets_total
container_network_transmit_bytes_total container_network_transmit_errors_total
container_network_transmit_packets_dropped_total container_network_transmit_packets_total
container_oom_events_total container_processes container_sockets container_spec_cpu_period
container_spec_cpu_shares container_spec_memory_limit_bytes container_spec_memory_swap_limit_bytes
container_start_time_seconds container_threads container_threads_max
""".split()
DESCRIBED_ONLY = ["container_blkio_device_usage_total", "container_fs_reads_bytes_total", "container_fs_reads_total",
                  "container_fs_writes_bytes_total", "container_fs_writes_total"]


def test_every_required_metric_is_described_and_has_a_value_with_matching_labels():
    descs = {d.name: d for d in rpc_stats.descriptors()}
    assert set(REQUIRED_WITH_VALUES + DESCRIBED_ONLY) <= set(descs)
    assert all(d.help and d.label_keys for d in descs.values())
    detail = {k: 1 for _m, k, _d in rpc_stats._DETAIL_FIELDS}
    c = Ctr("c1", "s1", started_at=1_700_000_000 * 10**9)
    s = st.ContainerSample(id="c1", record=c, cpu=st.CpuSample(1, 2, 3),
                           memory=st.MemorySample(1, 10, 8, 6, 2, 100, 1, None, None),
                           writable_layer=st.FsSample(1, "/x", 4096, 3, 10**9, 1000), processes=2, oom_kills=0,
                           detail=detail, proc=st.ProcessSample(1, 4, 1, 2))
    p = st.PodSample(id="s1", record=Sb("s1"), processes=3, containers=[s], network=st.NetworkSample(
        1, [st.InterfaceSample("eth0", 1, 2, 3, 4, 5, 6, 7, 8)], None))
    pm = rpc_stats.pod_metrics(p, {"c1": "busybox"})
    got: dict[str, list[str]] = {}
    for m in [*pm.metrics, *pm.container_metrics[0].metrics]:
        got.setdefault(m.name, list(m.label_values))
        assert len(m.label_values) == len(descs[m.name].label_keys), m.name
        assert m.metric_type == rpc_stats.DESCRIPTORS[m.name][2]
    assert [n for n in REQUIRED_WITH_VALUES if n not in got] == []
    # Every described metric either has a value or is one critest allows without one.
    assert [n for n in descs if n not in got] == DESCRIBED_ONLY
    by = {m.name: m.value.value for m in pm.container_metrics[0].metrics}
    assert by["container_start_time_seconds"] == 1_700_000_000 and by["container_fs_limit_bytes"] == 10**9
    assert by["container_sockets"] == 1 and by["container_threads"] == 2


def test_collector_detail_on_a_fake_v2_host(tmp_path, monkeypatch):
    from moorage.testing.statsfs import make_v2_host
    mounts = [cg.CgroupMount(str(tmp_path), "/", 2, ())]
    c = Ctr("c1", "s1", pid=os.getpid())
    rt = FakeRuntime([Sb("s1")], [c])
    monkeypatch.setattr(cg, "cgroup_dirs_for_pid", lambda pid, m: cg.cgroup_dirs(cg.parse_proc_cgroup("0::/p/c1\n"), m))
    d = make_v2_host(tmp_path, "/p/c1", 1000, 200)
    (d / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (d / "pids.max").write_text("max\n")
    col = st.StatsCollector(rt, mounts=mounts)
    [plain] = col.containers(rt.list_containers())
    assert plain.detail is None and plain.proc is None  # the stats RPCs never pay for it
    detailed = col.container(c, detail=True)
    assert detailed.detail["threads_max"] == 0 and detailed.detail["cfs_periods"] == 0
    assert detailed.proc.processes == 1 and detailed.proc.fds > 0
