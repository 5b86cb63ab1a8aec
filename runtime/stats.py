"""Container and pod statistics from cgroups (v1 and v2) and the pod network namespace.

The kubelet polls ListContainerStats / ListPodSandboxStats every few seconds, so
collection is cheap: per container it reads only the five cgroup files it needs
(memory usage, limit and stat, CPU usage, pids.current), with no subprocesses;
a container's cgroup dirs are found once from ``/proc/<pid>/cgroup`` and cached
for its lifetime.  All reads happen in a worker thread (``collect_*`` are
blocking; the servicer calls them through ``asyncio.to_thread``).

CPU nano-cores are a rate between two samples of the same cgroup: the previous
sample is kept per container/pod and replaced once the new one is at least
``min_window`` newer, so frequent pollers (kubelet and crictl together) still get
a rate over a sensible window.

ListPodSandboxMetrics also wants the cAdvisor "detail" figures (CFS throttling,
user/system CPU, memory failcnt/kernel/mapped/max/swap, the cgroup's own limits,
open fds, sockets and threads of the container's processes): those are read only
on that path (``detail=True``), from a few more cgroup files and a bounded walk of
``/proc/<pid>/fd`` and ``/proc/<pid>/task`` for the pids in ``cgroup.procs``.

Writable-layer usage (a directory walk) and the size of the filesystem under it
are cached per container for ``usage_ttl`` seconds (10 s, as cAdvisor's fs
usage), so the frequent stats polls cost cgroup reads only.  Pod network counters
come from ``/proc/<infra pid>/net/dev`` (no namespace switch) when the infra
process is verifiably in the pod's network namespace.

Results are plain dataclasses; ``cri/rpc_stats.py`` turns them into protobuf.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from moorage.core.netns import InterfaceStats
from moorage.core.netns import interface_stats as netns_interface_stats
from moorage.runtime import cgroups as cg
from moorage.runtime.context import RuntimeSettings
from moorage.runtime.ports import ImageProvider
from moorage.runtime.records import Container, ContainerState, Sandbox, SandboxState

log = logging.getLogger("moorage.stats")

RUNNING = ContainerState.RUNNING
SANDBOX_READY = SandboxState.READY


class StatsSource(Protocol):
    """What the collector reads from the runtime (``runtime.service.Runtime``; tests use a fake)."""

    @property
    def s(self) -> RuntimeSettings: ...
    @property
    def images(self) -> ImageProvider | None: ...
    @property
    def sandboxes(self) -> Mapping[str, Sandbox]: ...
    @property
    def containers(self) -> Mapping[str, Container]: ...
    def list_containers(self) -> list[Container]: ...


# --------------------------------------------------------------------------- results


@dataclass
class CpuSample:
    timestamp_ns: int
    usage_core_ns: int
    usage_nano_cores: int | None = None  # None until a second sample exists


@dataclass
class MemorySample:
    timestamp_ns: int
    usage_bytes: int
    working_set_bytes: int
    rss_bytes: int | None
    cache_bytes: int | None
    page_faults: int | None
    major_page_faults: int | None
    limit_bytes: int | None  # None: unlimited
    available_bytes: int | None  # limit - working set, only when limited


@dataclass
class FsSample:
    timestamp_ns: int
    mountpoint: str
    used_bytes: int
    inodes_used: int
    capacity_bytes: int | None = None  # size of the filesystem holding the layer
    inodes_free: int | None = None


# One interface's counters: the same record moorage.core.netns reports from inside a namespace.
InterfaceSample = InterfaceStats


@dataclass
class NetworkSample:
    timestamp_ns: int
    interfaces: list[InterfaceSample]
    default: InterfaceSample | None


@dataclass
class CgroupSample:
    """What one read of a cgroup gives; fields are None when the kernel does not say."""

    timestamp_ns: int
    cpu_usage_ns: int | None = None
    memory: dict[str, int | None] | None = None
    cache_bytes: int | None = None
    pids: int | None = None
    oom_kills: int | None = None
    detail: dict[str, int] | None = None  # see read_detail


@dataclass
class ProcessSample:
    """Open files, sockets and threads of a cgroup's processes (bounded walk of /proc)."""

    processes: int
    fds: int
    sockets: int
    threads: int
    truncated: bool = False  # a bound was hit: the figures are lower bounds


@dataclass
class ContainerSample:
    id: str
    record: Container
    cpu: CpuSample | None = None
    memory: MemorySample | None = None
    writable_layer: FsSample | None = None
    processes: int | None = None
    oom_kills: int | None = None
    detail: dict[str, int] | None = None  # cgroup detail figures (metrics path only)
    proc: ProcessSample | None = None  # metrics path only


@dataclass
class PodSample:
    id: str
    record: Sandbox
    cpu: CpuSample | None = None
    memory: MemorySample | None = None
    network: NetworkSample | None = None
    processes: int | None = None
    containers: list[ContainerSample] = field(default_factory=list)


# --------------------------------------------------------------------------- pure helpers


def nano_cores(prev: tuple[int, int] | None, ts_ns: int, usage_ns: int) -> int | None:
    """CPU use in billionths of a core between ``prev`` = (timestamp, usage) and now."""
    if prev is None:
        return None
    dt = ts_ns - prev[0]
    du = usage_ns - prev[1]
    if dt <= 0 or du < 0:  # clock step or a recreated cgroup
        return None
    return du * 1_000_000_000 // dt


def memory_sample(ts: int, mem: dict[str, int | None], cache: int | None) -> MemorySample | None:
    usage = mem.get("usage")
    if usage is None:
        return None
    ws = mem.get("working_set") or 0
    limit = mem.get("limit")
    return MemorySample(
        timestamp_ns=ts, usage_bytes=usage, working_set_bytes=ws, rss_bytes=mem.get("rss"), cache_bytes=cache,
        page_faults=mem.get("pgfault"), major_page_faults=mem.get("pgmajfault"), limit_bytes=limit,
        available_bytes=max(0, limit - ws) if limit is not None else None,
    )


def cache_from_stat(stat: dict[str, int], v2: bool) -> int | None:
    if v2:
        return stat.get("file")
    return stat.get("total_cache", stat.get("cache"))


def read_cgroup(dirs: dict[str, str], with_oom: bool = False, reader: Callable[[str], str | None] | None = None
                ) -> CgroupSample | None:
    """Read the figures the stats RPCs need from a cgroup's host dirs (v1 or v2).

    Returns None when the cgroup is gone (the container exited meanwhile).
    ``reader`` is injectable for tests; it returns a file's text or None.
    """
    read = reader or _read
    ts = time.time_ns()
    out = CgroupSample(timestamp_ns=ts)
    mem_dir = dirs.get("memory")
    uni = dirs.get(cg.UNIFIED)
    stat_text = None
    if mem_dir:
        usage = read(os.path.join(mem_dir, "memory.usage_in_bytes"))
        if usage is None:
            return None
        stat_text = read(os.path.join(mem_dir, "memory.stat")) or ""
        oom = (read(os.path.join(mem_dir, "memory.oom_control")) or "") if with_oom else ""
        out.memory = cg.memory_stats_v1(usage, read(os.path.join(mem_dir, "memory.limit_in_bytes")) or "",
                                        stat_text, oom)
        out.cache_bytes = cache_from_stat(cg.parse_flat_keyed(stat_text), v2=False)
    elif uni:
        current = read(os.path.join(uni, "memory.current"))
        if current is None and read(os.path.join(uni, "cgroup.procs")) is None:
            return None
        if current is not None:
            stat_text = read(os.path.join(uni, "memory.stat")) or ""
            events = (read(os.path.join(uni, "memory.events")) or "") if with_oom else ""
            out.memory = cg.memory_stats_v2(current, read(os.path.join(uni, "memory.max")) or "max", stat_text,
                                            events)
            out.cache_bytes = cache_from_stat(cg.parse_flat_keyed(stat_text), v2=True)
    if out.memory is not None and with_oom:
        out.oom_kills = out.memory.get("oom_kills")
    cpuacct = dirs.get("cpuacct")
    text = read(os.path.join(cpuacct, "cpuacct.usage")) if cpuacct else None
    if text is not None:
        out.cpu_usage_ns = cg.parse_single_value(text)
    elif uni:
        text = read(os.path.join(uni, "cpu.stat"))
        if text is not None:
            out.cpu_usage_ns = cg.cpu_usage_ns_v2(text)
    pids_dir = dirs.get("pids") or uni
    if pids_dir:
        text = read(os.path.join(pids_dir, "pids.current"))
        if text is not None:
            out.pids = cg.parse_single_value(text)
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


# --------------------------------------------------------------------------- detail (metrics path)

# v1 "no limit" is a huge page-aligned number; cAdvisor shows unlimited spec values as 0.
_V1_UNLIMITED = 1 << 62
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _limit(text: str | None) -> int:
    """A limit file's value with "unlimited" ("max", -1, the v1 huge number) as 0, as cAdvisor shows it."""
    if text is None:
        return 0
    s = text.split()[0] if text.split() else ""
    if s in ("", "max", "-1"):
        return 0
    try:
        v = int(s)
    except ValueError:
        return 0
    return 0 if v >= _V1_UNLIMITED else v


def cpu_detail_v1(cpu_stat: str | None, cpuacct_stat: str | None, clk_tck: int = _CLK_TCK) -> dict[str, int]:
    """CFS throttling from v1 ``cpu.stat`` and user/system time (ns) from ``cpuacct.stat`` (USER_HZ ticks)."""
    out: dict[str, int] = {}
    if cpu_stat is not None:
        c = cg.parse_flat_keyed(cpu_stat)
        out["cfs_periods"] = c.get("nr_periods", 0)
        out["cfs_throttled_periods"] = c.get("nr_throttled", 0)
        out["cfs_throttled_ns"] = c.get("throttled_time", 0)  # v1: already nanoseconds
    if cpuacct_stat is not None:
        a = cg.parse_flat_keyed(cpuacct_stat)
        tick_ns = 1_000_000_000 // max(1, clk_tck)
        out["user_ns"] = a.get("user", 0) * tick_ns
        out["system_ns"] = a.get("system", 0) * tick_ns
    return out


def cpu_detail_v2(cpu_stat: str | None) -> dict[str, int]:
    """The same from v2 ``cpu.stat`` (microseconds)."""
    if cpu_stat is None:
        return {}
    c = cg.parse_flat_keyed(cpu_stat)
    return {"cfs_periods": c.get("nr_periods", 0), "cfs_throttled_periods": c.get("nr_throttled", 0),
            "cfs_throttled_ns": c.get("throttled_usec", 0) * 1000,
            "user_ns": c.get("user_usec", 0) * 1000, "system_ns": c.get("system_usec", 0) * 1000}


def memory_detail_v1(stat: str, usage: int | None, failcnt: str | None, kmem_usage: str | None,
                     max_usage: str | None, memsw_usage: str | None) -> dict[str, int]:
    """failcnt, kernel usage, mapped file, max usage and swap from the v1 memory controller.

    Swap is ``memory.stat`` total_swap when swap is accounted, else memsw usage minus usage,
    else 0 (no swap accounting: nothing can have been swapped out of this cgroup's books).
    """
    st_ = cg.parse_flat_keyed(stat)
    swap = st_.get("total_swap", st_.get("swap"))
    if swap is None:
        msw = cg.parse_single_value(memsw_usage) if memsw_usage else None
        swap = max(0, msw - usage) if msw is not None and usage is not None else 0
    return {
        "failcnt": (cg.parse_single_value(failcnt) or 0) if failcnt else 0,
        "kernel": (cg.parse_single_value(kmem_usage) or 0) if kmem_usage else 0,
        "mapped_file": st_.get("total_mapped_file", st_.get("mapped_file", 0)),
        "max_usage": (cg.parse_single_value(max_usage) or 0) if max_usage else (usage or 0),
        "swap": swap,
    }


_V2_KERNEL_PARTS = ("kernel_stack", "pagetables", "sec_pagetables", "percpu", "sock", "vmalloc", "slab")


def memory_detail_v2(stat: str, usage: int | None, events: str | None, peak: str | None,
                     swap_current: str | None) -> dict[str, int]:
    """The same from v2: failcnt is memory.events ``max`` (times the limit was hit), kernel usage is
    memory.stat ``kernel`` (or the sum of its parts on older kernels), max usage is memory.peak
    (the current usage where the kernel has no peak file)."""
    st_ = cg.parse_flat_keyed(stat)
    kernel = st_.get("kernel")
    if kernel is None:
        kernel = sum(st_.get(k, 0) for k in _V2_KERNEL_PARTS)
    return {
        "failcnt": cg.parse_flat_keyed(events).get("max", 0) if events else 0,
        "kernel": kernel,
        "mapped_file": st_.get("file_mapped", 0),
        "max_usage": (cg.parse_single_value(peak) or 0) if peak else (usage or 0),
        "swap": (cg.parse_single_value(swap_current) or 0) if swap_current else 0,
    }


def weight_to_shares(weight: int) -> int:
    """cgroup v2 cpu.weight [1, 10000] back to v1 cpu.shares [2, 262144] (the inverse of runc's mapping)."""
    return 2 + ((weight - 1) * 262142) // 9999


def spec_v1(cfs_period: str | None, shares: str | None, memsw_limit: str | None) -> dict[str, int]:
    return {"spec_cpu_period": _limit(cfs_period), "spec_cpu_shares": _limit(shares),
            "spec_memory_swap_limit": _limit(memsw_limit)}


def spec_v2(cpu_max: str | None, weight: str | None, swap_max: str | None, mem_max: str | None) -> dict[str, int]:
    """v2 limits in v1 terms: period from cpu.max, shares from cpu.weight, and the memory+swap limit
    as swap.max + memory.max (0 when either is unlimited), as the v1 memsw limit means."""
    period = 0
    if cpu_max:
        parts = cpu_max.split()
        if len(parts) == 2 and parts[1].isdigit():
            period = int(parts[1])
    w = _limit(weight)
    swap, mem = _limit(swap_max), _limit(mem_max)
    swap_limit = 0
    if swap_max is not None and swap_max.strip() != "max" and mem:
        swap_limit = swap + mem
    return {"spec_cpu_period": period, "spec_cpu_shares": weight_to_shares(w) if w else 0,
            "spec_memory_swap_limit": swap_limit}


def read_detail(dirs: dict[str, str], usage: int | None,
                reader: Callable[[str], str | None] | None = None) -> dict[str, int]:
    """The cAdvisor detail figures of a cgroup (v1 or v2); keys missing when the kernel has no file."""
    read = reader or _read
    out: dict[str, int] = {}
    uni = dirs.get(cg.UNIFIED)
    mem = dirs.get("memory")
    cpu, cpuacct = dirs.get("cpu"), dirs.get("cpuacct")
    if cpu or cpuacct:
        out.update(cpu_detail_v1(read(os.path.join(cpu, "cpu.stat")) if cpu else None,
                                 read(os.path.join(cpuacct, "cpuacct.stat")) if cpuacct else None))
        if cpu:
            out.update({k: v for k, v in spec_v1(read(os.path.join(cpu, "cpu.cfs_period_us")),
                                                 read(os.path.join(cpu, "cpu.shares")), None).items()
                        if k != "spec_memory_swap_limit"})
    elif uni:
        out.update(cpu_detail_v2(read(os.path.join(uni, "cpu.stat"))))
        s2 = spec_v2(read(os.path.join(uni, "cpu.max")), read(os.path.join(uni, "cpu.weight")), None, None)
        out["spec_cpu_period"], out["spec_cpu_shares"] = s2["spec_cpu_period"], s2["spec_cpu_shares"]
    if mem:
        j = lambda f: os.path.join(mem, f)  # noqa: E731
        out.update(memory_detail_v1(read(j("memory.stat")) or "", usage, read(j("memory.failcnt")),
                                    read(j("memory.kmem.usage_in_bytes")), read(j("memory.max_usage_in_bytes")),
                                    read(j("memory.memsw.usage_in_bytes"))))
        out["spec_memory_swap_limit"] = _limit(read(j("memory.memsw.limit_in_bytes")))
    elif uni:
        j = lambda f: os.path.join(uni, f)  # noqa: E731
        out.update(memory_detail_v2(read(j("memory.stat")) or "", usage, read(j("memory.events")),
                                    read(j("memory.peak")), read(j("memory.swap.current"))))
        out["spec_memory_swap_limit"] = spec_v2(None, None, read(j("memory.swap.max")),
                                                read(j("memory.max")))["spec_memory_swap_limit"]
    pids_dir = dirs.get("pids") or uni
    if pids_dir:
        text = read(os.path.join(pids_dir, "pids.max"))
        if text is not None:
            out["threads_max"] = _limit(text)
    return out


def procs_of(dirs: dict[str, str], reader: Callable[[str], str | None] | None = None) -> list[int] | None:
    """The pids in the cgroup (``cgroup.procs`` of any controller dir; v1 dirs all list the same)."""
    read = reader or _read
    for key in (cg.UNIFIED, "pids", "memory", "cpu", "cpuacct"):
        d = dirs.get(key)
        if d:
            text = read(os.path.join(d, "cgroup.procs"))
            if text is not None:
                return [int(x) for x in text.split() if x.isdigit()]
    return None


MAX_PROCS = 1024  # processes walked per container
MAX_FDS = 16384  # fds looked at per container (each socket check is a readlink)


def process_sample(pids: list[int], proc_root: str = "/proc", max_procs: int = MAX_PROCS,
                   max_fds: int = MAX_FDS) -> ProcessSample:
    """Count open fds, sockets and threads of ``pids`` from ``/proc``; bounded, never raises for a
    process that exits meanwhile.  Sockets are fds whose link reads ``socket:[inode]`` (as cAdvisor)."""
    fds = sockets = threads = 0
    truncated = len(pids) > max_procs
    budget = max_fds
    for pid in pids[:max_procs]:
        base = os.path.join(proc_root, str(pid))
        try:
            threads += len(os.listdir(os.path.join(base, "task")))
        except OSError:
            continue  # gone
        try:
            names = os.listdir(os.path.join(base, "fd"))
        except OSError:
            continue
        fds += len(names)
        for n in names:
            if budget <= 0:
                truncated = True
                break
            budget -= 1
            try:
                if os.readlink(os.path.join(base, "fd", n)).startswith("socket:"):
                    sockets += 1
            except OSError:
                pass  # closed meanwhile
    return ProcessSample(processes=len(pids), fds=fds, sockets=sockets, threads=threads, truncated=truncated)


def parse_net_dev(text: str) -> list[InterfaceSample]:
    """``/proc/<pid>/net/dev``: per-interface counters of the namespace the process is in."""
    out = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        f = rest.split()
        if len(f) < 12:
            continue
        try:
            v = [int(x) for x in f[:12]]
        except ValueError:
            continue
        out.append(InterfaceSample(name=name.strip(), rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2],
                                   rx_dropped=v[3], tx_bytes=v[8], tx_packets=v[9], tx_errors=v[10],
                                   tx_dropped=v[11]))
    return out


def sum_samples(samples: list[CgroupSample]) -> CgroupSample | None:
    """Add up member cgroups (for a pod whose cgroup parent is shared with other pods)."""
    if not samples:
        return None
    out = CgroupSample(timestamp_ns=max(s.timestamp_ns for s in samples))

    def add(a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else a + b

    for s in samples:
        out.cpu_usage_ns = add(out.cpu_usage_ns, s.cpu_usage_ns)
        out.pids = add(out.pids, s.pids)
        out.cache_bytes = add(out.cache_bytes, s.cache_bytes)
        out.oom_kills = add(out.oom_kills, s.oom_kills)
        if s.memory is not None:
            if out.memory is None:
                out.memory = {k: v for k, v in s.memory.items() if k != "limit"}
                out.memory["limit"] = None
            else:
                for k, v in s.memory.items():
                    if k != "limit":
                        out.memory[k] = add(out.memory.get(k), v)
    return out


# --------------------------------------------------------------------------- the collector


class StatsCollector:
    """Stats for the runtime's containers and pods.  Thread-safe; blocking."""

    def __init__(self, runtime: StatsSource, min_window: float = 1.0,
                 mounts: list[cg.CgroupMount] | None = None,
                 interface_stats: Callable[[str], dict[str, Any]] | None = None,
                 usage_ttl: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 proc_root: str = "/proc") -> None:
        self.rt = runtime
        self.min_window_ns = int(min_window * 1e9)
        self._mounts = mounts
        self._interface_stats = interface_stats
        self.usage_ttl = usage_ttl
        self._clock = clock
        self._proc = proc_root
        self._lock = threading.Lock()
        self._dirs: dict[str, tuple[int, dict[str, str]]] = {}  # id -> (pid, host dirs)
        self._prev: dict[str, tuple[int, int]] = {}  # id -> (timestamp ns, cpu usage ns)
        # Writable-layer usage per container id: (expires at, sample or None).  A walk of the
        # layer is the costly part of a stats call; cAdvisor refreshes fs usage every ~10 s too.
        self._layer: dict[str, tuple[float, FsSample | None]] = {}
        self._fs: dict[str, tuple[float, tuple[int, int]]] = {}  # mountpoint -> (expires, (bytes, free inodes))

    # -- cgroup location ----------------------------------------------------------------------

    def mounts(self) -> list[cg.CgroupMount]:
        if self._mounts is None:
            self._mounts = cg.host_mounts()
        return self._mounts

    def dirs_for(self, obj_id: str, pid: int) -> dict[str, str] | None:
        if not pid:
            return None
        cached = self._dirs.get(obj_id)
        if cached is not None and cached[0] == pid:
            return cached[1]
        try:
            dirs = cg.cgroup_dirs_for_pid(pid, self.mounts())
        except Exception:  # noqa: BLE001 - the process is gone: no cgroup figures
            return None
        with self._lock:
            self._dirs[obj_id] = (pid, dirs)
        return dirs

    def pod_dirs(self, sb: Sandbox) -> dict[str, str] | None:
        """The pod-level cgroup: the parent of the infra process's cgroup."""
        key = "pod:" + sb.id
        pid = sb.status.pid
        cached = self._dirs.get(key)
        if cached is not None and cached[0] == pid:
            return cached[1]
        if not sb.metadata.infra:
            # No infra process to ask: the pod cgroup is the parent of its cgroups path.
            dirs = cg.cgroup_dirs_for_path(cg.parent_of_cgroups_path(sb.metadata.cgroups_path), self.mounts())
        else:
            infra = self.dirs_for(sb.id, pid)
            if infra is None:
                return None
            dirs = {k: os.path.dirname(v) for k, v in infra.items()}
        with self._lock:
            self._dirs[key] = (pid, dirs)
        return dirs

    def pod_cgroup_shared(self, sb: Sandbox, sandboxes: list[Sandbox]) -> bool:
        """True when the sandbox's cgroup parent is not its own (the default parent, or shared)."""
        parent = sb.metadata.cgroup_parent or ""
        default = self.rt.s.default_cgroup_parent
        if not parent or parent.rstrip("/") == (default or "").rstrip("/"):
            return True
        return any(o.id != sb.id and o.metadata.cgroup_parent == parent for o in sandboxes)

    # -- rates ------------------------------------------------------------------------------------

    def cpu(self, key: str, ts: int, usage: int | None) -> CpuSample | None:
        if usage is None:
            return None
        with self._lock:
            prev = self._prev.get(key)
            rate = nano_cores(prev, ts, usage)
            if prev is None or ts - prev[0] >= self.min_window_ns or rate is None:
                self._prev[key] = (ts, usage)
        return CpuSample(timestamp_ns=ts, usage_core_ns=usage, usage_nano_cores=rate)

    def forget(self, live: set[str]) -> None:
        """Drop cached dirs and samples of containers and pods that are gone."""
        with self._lock:
            for d in (self._dirs, self._prev, self._layer):
                for k in [k for k in d if k.removeprefix("pod:") not in live]:
                    del d[k]

    # -- containers ---------------------------------------------------------------------------

    def container(self, rec: Container, with_oom: bool = False, detail: bool = False) -> ContainerSample:
        """``detail``: also the cAdvisor detail figures and /proc counts (ListPodSandboxMetrics)."""
        out = ContainerSample(id=rec.id, record=rec)
        if rec.status.state == RUNNING:
            dirs = self.dirs_for(rec.id, rec.status.pid)
            s = read_cgroup(dirs, with_oom) if dirs else None
            if s is not None:
                out.cpu = self.cpu(rec.id, s.timestamp_ns, s.cpu_usage_ns)
                out.memory = memory_sample(s.timestamp_ns, s.memory, s.cache_bytes) if s.memory else None
                out.processes = s.pids
                out.oom_kills = s.oom_kills
                if detail and dirs:
                    out.detail = read_detail(dirs, s.memory.get("usage") if s.memory else None)
                    pids = procs_of(dirs)
                    if pids is not None:
                        out.proc = process_sample(pids, self._proc)
        out.writable_layer = self.writable_layer(rec)
        return out

    def writable_layer(self, rec: Container) -> FsSample | None:
        """Usage of the container's writable layer, walked at most once per ``usage_ttl``."""
        now = self._clock()
        cached = self._layer.get(rec.id)
        if cached is not None and cached[0] > now:
            return cached[1]
        sample = self._walk_layer(rec)
        # Spread the expiries (+0-20 %) so containers created together are not all re-walked in one call.
        with self._lock:
            self._layer[rec.id] = (now + self.usage_ttl * (1 + 0.2 * random.random()), sample)
        return sample

    def _walk_layer(self, rec: Container) -> FsSample | None:
        images = self.rt.images
        if images is None:
            return None
        try:
            u = images.container_usage(rec.metadata.snapshot_key or rec.id)
        except OSError:
            return None  # removed while we walked it
        if u is None:
            return None
        mp = os.path.join(images.root, "snapshotter")
        cap, free = self.fs_capacity(mp)
        return FsSample(timestamp_ns=time.time_ns(), mountpoint=mp, used_bytes=u.size, inodes_used=u.inodes,
                        capacity_bytes=cap, inodes_free=free)

    def fs_capacity(self, path: str) -> tuple[int | None, int | None]:
        """(size in bytes, free inodes) of the filesystem holding ``path``; cached like layer usage."""
        now = self._clock()
        cached = self._fs.get(path)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            v = os.statvfs(path)
        except OSError:
            return None, None
        val = (v.f_blocks * v.f_frsize, v.f_ffree)
        with self._lock:
            self._fs[path] = (now + self.usage_ttl, val)
        return val

    def containers(self, recs: list[Container], with_oom: bool = False) -> list[ContainerSample]:
        """Blocking (run in a thread); ``recs`` is a list taken on the event loop."""
        return [self.container(r, with_oom) for r in recs]

    def forget_gone(self) -> None:
        """Call on the event loop: drops state of containers and pods that no longer exist."""
        self.forget(set(self.rt.containers) | set(self.rt.sandboxes))

    # -- pods -------------------------------------------------------------------------------------

    def network(self, sb: Sandbox) -> NetworkSample | None:
        netns_path = sb.status.netns_path
        if not netns_path or sb.status.state != SANDBOX_READY:
            return None
        ifaces = self._net_dev(sb) if self._interface_stats is None else None
        if ifaces is None:
            fn = self._interface_stats or netns_interface_stats
            try:
                raw = fn(netns_path)
            except Exception as e:  # noqa: BLE001 - a vanished netns just has no figures
                log.debug("network stats of %s: %s", sb.id, e)
                return None
            ifaces = list(raw.values())
        ifaces = sorted((i for i in ifaces if i.name != "lo"), key=lambda i: i.name)  # cAdvisor leaves lo out
        default = next((i for i in ifaces if i.name == "eth0"), ifaces[0] if ifaces else None)
        return NetworkSample(timestamp_ns=time.time_ns(), interfaces=ifaces, default=default)

    def _net_dev(self, sb: Sandbox) -> list[InterfaceSample] | None:
        """Counters from ``/proc/<infra pid>/net/dev`` (one file read, no namespace switch), but only
        when that process is verifiably in the pod's network namespace (same nsfs inode); else None."""
        if not sb.status.pid:
            return None
        base = os.path.join(self._proc, str(sb.status.pid))
        try:
            want = os.stat(sb.status.netns_path)
            have = os.stat(os.path.join(base, "ns", "net"))
            if (want.st_dev, want.st_ino) != (have.st_dev, have.st_ino):
                return None
            with open(os.path.join(base, "net", "dev")) as f:
                text = f.read()
        except OSError:
            return None
        return parse_net_dev(text)

    def plan_pods(self, sbs: list[Sandbox]) -> list[tuple[Sandbox, list[Container], bool]]:
        """On the event loop: (sandbox, its containers, cgroup parent shared?) for each sandbox."""
        all_sbs = list(self.rt.sandboxes.values())
        by_sb: dict[str, list[Container]] = {}
        for c in self.rt.list_containers():
            by_sb.setdefault(c.metadata.sandbox_id, []).append(c)
        return [(sb, by_sb.get(sb.id, []), self.pod_cgroup_shared(sb, all_sbs)) for sb in sbs]

    def pod(self, sb: Sandbox, ctrs: list[Container], shared: bool, with_oom: bool = False,
            with_network: bool = True, detail: bool = False) -> PodSample:
        """Blocking (run in a thread)."""
        out = PodSample(id=sb.id, record=sb)
        out.containers = [self.container(c, with_oom, detail=detail and c.status.state == RUNNING) for c in ctrs]
        s: CgroupSample | None = None
        ready = sb.status.state == SANDBOX_READY
        if ready or any(c.record.status.state == RUNNING for c in out.containers):
            if shared:
                members = []
                infra_dirs = self.dirs_for(sb.id, sb.status.pid) if ready else None
                if infra_dirs:
                    m = read_cgroup(infra_dirs, with_oom)
                    if m is not None:
                        members.append(m)
                for c in out.containers:
                    if c.record.status.state == RUNNING:
                        d = self.dirs_for(c.id, c.record.status.pid)
                        m = read_cgroup(d, with_oom) if d else None
                        if m is not None:
                            members.append(m)
                s = sum_samples(members)
            else:
                dirs = self.pod_dirs(sb) if ready else None
                s = read_cgroup(dirs, with_oom) if dirs else None
        if s is not None:
            out.cpu = self.cpu("pod:" + sb.id, s.timestamp_ns, s.cpu_usage_ns)
            out.memory = memory_sample(s.timestamp_ns, s.memory, s.cache_bytes) if s.memory else None
            out.processes = s.pids
        if with_network:
            out.network = self.network(sb)
        return out

    def pods(self, plan: list[tuple[Sandbox, list[Container], bool]], with_oom: bool = False,
             detail: bool = False) -> list[PodSample]:
        """Blocking (run in a thread); ``plan`` from :meth:`plan_pods`."""
        return [self.pod(sb, ctrs, shared, with_oom, detail=detail) for sb, ctrs, shared in plan]
