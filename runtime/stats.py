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

Results are plain dataclasses; ``cri/rpc_stats.py`` turns them into protobuf.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from runtime import cgroups as cg

log = logging.getLogger("moorage.stats")

RUNNING = "CONTAINER_RUNNING"
SANDBOX_READY = "SANDBOX_READY"


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


@dataclass
class InterfaceSample:
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


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


@dataclass
class ContainerSample:
    id: str
    record: Any  # runtime.store.ContainerRecord
    cpu: CpuSample | None = None
    memory: MemorySample | None = None
    writable_layer: FsSample | None = None
    processes: int | None = None
    oom_kills: int | None = None


@dataclass
class PodSample:
    id: str
    record: Any  # runtime.store.SandboxRecord
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

    def __init__(self, runtime: Any, min_window: float = 1.0,
                 mounts: list[cg.CgroupMount] | None = None,
                 interface_stats: Callable[[str], dict[str, Any]] | None = None) -> None:
        self.rt = runtime
        self.min_window_ns = int(min_window * 1e9)
        self._mounts = mounts
        self._interface_stats = interface_stats
        self._lock = threading.Lock()
        self._dirs: dict[str, tuple[int, dict[str, str]]] = {}  # id -> (pid, host dirs)
        self._prev: dict[str, tuple[int, int]] = {}  # id -> (timestamp ns, cpu usage ns)

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

    def pod_dirs(self, sb: Any) -> dict[str, str] | None:
        """The pod-level cgroup: the parent of the infra process's cgroup."""
        key = "pod:" + sb.id
        cached = self._dirs.get(key)
        if cached is not None and cached[0] == sb.pid:
            return cached[1]
        infra = self.dirs_for(sb.id, sb.pid)
        if infra is None:
            return None
        dirs = {k: os.path.dirname(v) for k, v in infra.items()}
        with self._lock:
            self._dirs[key] = (sb.pid, dirs)
        return dirs

    def pod_cgroup_shared(self, sb: Any, sandboxes: list[Any]) -> bool:
        """True when the sandbox's cgroup parent is not its own (the default parent, or shared)."""
        parent = sb.cgroup_parent or ""
        default = getattr(getattr(self.rt, "s", None), "default_cgroup_parent", "/moorage")
        if not parent or parent.rstrip("/") == (default or "").rstrip("/"):
            return True
        return any(o.id != sb.id and o.cgroup_parent == parent for o in sandboxes)

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
            for d in (self._dirs, self._prev):
                for k in [k for k in d if k.removeprefix("pod:") not in live]:
                    del d[k]

    # -- containers ---------------------------------------------------------------------------

    def container(self, rec: Any, with_oom: bool = False) -> ContainerSample:
        out = ContainerSample(id=rec.id, record=rec)
        if rec.state == RUNNING:
            dirs = self.dirs_for(rec.id, rec.pid)
            s = read_cgroup(dirs, with_oom) if dirs else None
            if s is not None:
                out.cpu = self.cpu(rec.id, s.timestamp_ns, s.cpu_usage_ns)
                out.memory = memory_sample(s.timestamp_ns, s.memory, s.cache_bytes) if s.memory else None
                out.processes = s.pids
                out.oom_kills = s.oom_kills
        out.writable_layer = self.writable_layer(rec)
        return out

    def writable_layer(self, rec: Any) -> FsSample | None:
        images = getattr(self.rt, "images", None)
        if images is None or not hasattr(images, "container_usage"):
            return None
        try:
            u = images.container_usage(rec.snapshot_key or rec.id)
        except OSError:
            return None  # removed while we walked it
        if u is None:
            return None
        mp = os.path.join(getattr(images, "root", ""), "snapshotter")
        return FsSample(timestamp_ns=time.time_ns(), mountpoint=mp, used_bytes=u.size, inodes_used=u.inodes)

    def containers(self, recs: list[Any], with_oom: bool = False) -> list[ContainerSample]:
        """Blocking (run in a thread); ``recs`` is a list taken on the event loop."""
        return [self.container(r, with_oom) for r in recs]

    def forget_gone(self) -> None:
        """Call on the event loop: drops state of containers and pods that no longer exist."""
        self.forget(set(self.rt.containers) | set(self.rt.sandboxes))

    # -- pods -------------------------------------------------------------------------------------

    def network(self, sb: Any) -> NetworkSample | None:
        if not sb.netns_path or sb.state != SANDBOX_READY:
            return None
        fn = self._interface_stats
        if fn is None:
            from cni.netns import interface_stats as fn
        try:
            raw = fn(sb.netns_path)
        except Exception as e:  # noqa: BLE001 - a vanished netns just has no figures
            log.debug("network stats of %s: %s", sb.id, e)
            return None
        ifaces = [InterfaceSample(name=n, rx_bytes=s.rx_bytes, rx_packets=s.rx_packets, rx_errors=s.rx_errors,
                                  rx_dropped=s.rx_dropped, tx_bytes=s.tx_bytes, tx_packets=s.tx_packets,
                                  tx_errors=s.tx_errors, tx_dropped=s.tx_dropped)
                  for n, s in sorted(raw.items()) if n != "lo"]  # cAdvisor leaves loopback out too
        default = next((i for i in ifaces if i.name == "eth0"), ifaces[0] if ifaces else None)
        return NetworkSample(timestamp_ns=time.time_ns(), interfaces=ifaces, default=default)

    def plan_pods(self, sbs: list[Any]) -> list[tuple[Any, list[Any], bool]]:
        """On the event loop: (sandbox, its containers, cgroup parent shared?) for each sandbox."""
        all_sbs = list(self.rt.sandboxes.values())
        by_sb: dict[str, list[Any]] = {}
        for c in self.rt.list_containers():
            by_sb.setdefault(c.sandbox_id, []).append(c)
        return [(sb, by_sb.get(sb.id, []), self.pod_cgroup_shared(sb, all_sbs)) for sb in sbs]

    def pod(self, sb: Any, ctrs: list[Any], shared: bool, with_oom: bool = False,
            with_network: bool = True) -> PodSample:
        """Blocking (run in a thread)."""
        out = PodSample(id=sb.id, record=sb)
        out.containers = [self.container(c, with_oom) for c in ctrs]
        s: CgroupSample | None = None
        if sb.state == SANDBOX_READY or any(c.record.state == RUNNING for c in out.containers):
            if shared:
                members = []
                infra_dirs = self.dirs_for(sb.id, sb.pid) if sb.state == SANDBOX_READY else None
                if infra_dirs:
                    m = read_cgroup(infra_dirs, with_oom)
                    if m is not None:
                        members.append(m)
                for c in out.containers:
                    if c.record.state == RUNNING:
                        d = self.dirs_for(c.id, c.record.pid)
                        m = read_cgroup(d, with_oom) if d else None
                        if m is not None:
                            members.append(m)
                s = sum_samples(members)
            else:
                dirs = self.pod_dirs(sb) if sb.state == SANDBOX_READY else None
                s = read_cgroup(dirs, with_oom) if dirs else None
        if s is not None:
            out.cpu = self.cpu("pod:" + sb.id, s.timestamp_ns, s.cpu_usage_ns)
            out.memory = memory_sample(s.timestamp_ns, s.memory, s.cache_bytes) if s.memory else None
            out.processes = s.pids
        if with_network:
            out.network = self.network(sb)
        return out

    def pods(self, plan: list[tuple[Any, list[Any], bool]], with_oom: bool = False) -> list[PodSample]:
        """Blocking (run in a thread); ``plan`` from :meth:`plan_pods`."""
        return [self.pod(sb, ctrs, shared, with_oom) for sb, ctrs, shared in plan]
