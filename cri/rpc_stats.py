"""RuntimeService stats and metrics RPCs.

ContainerStats / ListContainerStats / PodSandboxStats / ListPodSandboxStats (and
their Stream* forms) translate ``runtime.stats`` samples into CRI messages.
ListMetricDescriptors / ListPodSandboxMetrics serve the cAdvisor-named metrics
the kubelet exposes on /metrics/cadvisor when it takes pod and container
metrics from the CRI (``PodAndContainerStatsFromCRI``): values are unsigned
integers as the CRI carries them (CPU seconds are whole seconds), and every
metric carries the label keys of its descriptor in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from moorage.core.errors import NotFound
from moorage.cri import validate
from moorage.cri.api import api_pb2 as pb
from moorage.cri.batches import Batching
from moorage.runtime import stats as st
from moorage.runtime.model import PodSandboxMetadata
from moorage.runtime.records import ContainerState, Sandbox, SandboxState
from moorage.runtime.service import Runtime

Ctx: TypeAlias = grpc.aio.ServicerContext  # Any to mypy: grpc ships no stubs

# cAdvisor's labels as the kubelet's /metrics/cadvisor shows them: id, name, image (cAdvisor's own)
# plus container, pod and namespace (added by the kubelet).  For pod-level series container="POD".
BASE_LABELS = ("id", "name", "image", "container", "pod", "namespace")

_C, _G = pb.COUNTER, pb.GAUGE

# name -> (help, extra label keys, type)
DESCRIPTORS: dict[str, tuple[str, tuple[str, ...], pb.MetricType]] = {
    "container_cpu_usage_seconds_total": ("Cumulative cpu time consumed in seconds.", ("cpu",), _C),
    "container_memory_usage_bytes": (
        "Current memory usage in bytes, including all memory regardless of when it was accessed", (), _G),
    "container_memory_working_set_bytes": ("Current working set in bytes.", (), _G),
    "container_memory_rss": ("Size of RSS in bytes.", (), _G),
    "container_memory_cache": ("Number of bytes of page cache memory.", (), _G),
    "container_memory_failures_total": ("Cumulative count of memory allocation failures.",
                                        ("failure_type", "scope"), _C),
    "container_spec_memory_limit_bytes": ("Memory limit for the container.", (), _G),
    "container_oom_events_total": ("Count of out of memory events observed for the container", (), _C),
    "container_processes": ("Number of processes running inside the container.", (), _G),
    "container_fs_usage_bytes": ("Number of bytes that are consumed by the container on this filesystem.",
                                 ("device",), _G),
    "container_fs_inodes_total": ("Number of Inodes", ("device",), _G),
    "container_last_seen": ("Last time a container was seen by the exporter", (), _G),
    "container_network_receive_bytes_total": ("Cumulative count of bytes received", ("interface",), _C),
    "container_network_receive_packets_total": ("Cumulative count of packets received", ("interface",), _C),
    "container_network_receive_packets_dropped_total": ("Cumulative count of packets dropped while receiving",
                                                        ("interface",), _C),
    "container_network_receive_errors_total": ("Cumulative count of errors encountered while receiving",
                                               ("interface",), _C),
    "container_network_transmit_bytes_total": ("Cumulative count of bytes transmitted", ("interface",), _C),
    "container_network_transmit_packets_total": ("Cumulative count of packets transmitted", ("interface",), _C),
    "container_network_transmit_packets_dropped_total": (
        "Cumulative count of packets dropped while transmitting", ("interface",), _C),
    "container_network_transmit_errors_total": ("Cumulative count of errors encountered while transmitting",
                                                ("interface",), _C),
    # CPU detail
    "container_cpu_user_seconds_total": ("Cumulative user cpu time consumed in seconds.", (), _C),
    "container_cpu_system_seconds_total": ("Cumulative system cpu time consumed in seconds.", (), _C),
    "container_cpu_cfs_periods_total": ("Number of elapsed enforcement period intervals.", (), _C),
    "container_cpu_cfs_throttled_periods_total": ("Number of throttled period intervals.", (), _C),
    "container_cpu_cfs_throttled_seconds_total": ("Total time duration the container has been throttled.", (), _C),
    # memory detail
    "container_memory_failcnt": ("Number of memory usage hits limits", (), _C),
    "container_memory_kernel_usage": ("Size of kernel memory allocated in bytes.", (), _G),
    "container_memory_mapped_file": ("Size of memory mapped files in bytes.", (), _G),
    "container_memory_max_usage_bytes": ("Maximum memory usage recorded in bytes", (), _G),
    "container_memory_swap": ("Container swap usage in bytes.", (), _G),
    # the filesystem holding the writable layer
    "container_fs_limit_bytes": ("Number of bytes that can be consumed by the container on this filesystem.",
                                 ("device",), _G),
    "container_fs_inodes_free": ("Number of available Inodes", ("device",), _G),
    # block I/O: described (the kubelet's /metrics/cadvisor lists them) but not sampled yet
    "container_blkio_device_usage_total": ("Blkio Device bytes usage",
                                           ("device", "major", "minor", "operation"), _C),
    "container_fs_reads_bytes_total": ("Cumulative count of bytes read", ("device",), _C),
    "container_fs_reads_total": ("Cumulative count of reads completed", ("device",), _C),
    "container_fs_writes_bytes_total": ("Cumulative count of bytes written", ("device",), _C),
    "container_fs_writes_total": ("Cumulative count of writes completed", ("device",), _C),
    # the cgroup's own limits
    "container_spec_cpu_period": ("CPU period of the container.", (), _G),
    "container_spec_cpu_shares": ("CPU share of the container.", (), _G),
    "container_spec_memory_swap_limit_bytes": ("Memory swap limit for the container.", (), _G),
    # processes
    "container_file_descriptors": ("Number of open file descriptors for the container.", (), _G),
    "container_sockets": ("Number of open sockets for the container.", (), _G),
    "container_threads": ("Number of threads running inside the container", (), _G),
    "container_threads_max": ("Maximum number of threads allowed inside the container, infinity if value is zero",
                              (), _G),
    "container_start_time_seconds": ("Start time of the container since unix epoch in seconds.", (), _G),
}

# (metric, key in ContainerSample.detail, divisor): integer values as the CRI carries them.
_DETAIL_FIELDS = (
    ("container_cpu_user_seconds_total", "user_ns", 1_000_000_000),
    ("container_cpu_system_seconds_total", "system_ns", 1_000_000_000),
    ("container_cpu_cfs_periods_total", "cfs_periods", 1),
    ("container_cpu_cfs_throttled_periods_total", "cfs_throttled_periods", 1),
    ("container_cpu_cfs_throttled_seconds_total", "cfs_throttled_ns", 1_000_000_000),
    ("container_memory_failcnt", "failcnt", 1),
    ("container_memory_kernel_usage", "kernel", 1),
    ("container_memory_mapped_file", "mapped_file", 1),
    ("container_memory_max_usage_bytes", "max_usage", 1),
    ("container_memory_swap", "swap", 1),
    ("container_spec_cpu_period", "spec_cpu_period", 1),
    ("container_spec_cpu_shares", "spec_cpu_shares", 1),
    ("container_spec_memory_swap_limit_bytes", "spec_memory_swap_limit", 1),
    ("container_threads_max", "threads_max", 1),
)

_NET_FIELDS = (
    ("container_network_receive_bytes_total", "rx_bytes"),
    ("container_network_receive_packets_total", "rx_packets"),
    ("container_network_receive_packets_dropped_total", "rx_dropped"),
    ("container_network_receive_errors_total", "rx_errors"),
    ("container_network_transmit_bytes_total", "tx_bytes"),
    ("container_network_transmit_packets_total", "tx_packets"),
    ("container_network_transmit_packets_dropped_total", "tx_dropped"),
    ("container_network_transmit_errors_total", "tx_errors"),
)


def _u(v: int | None) -> pb.UInt64Value | None:
    return None if v is None else pb.UInt64Value(value=max(0, int(v)))


# --------------------------------------------------------------------------- samples -> protobuf


def cpu_pb(c: st.CpuSample | None) -> pb.CpuUsage | None:
    if c is None:
        return None
    return pb.CpuUsage(timestamp=c.timestamp_ns, usage_core_nano_seconds=_u(c.usage_core_ns),
                       usage_nano_cores=_u(c.usage_nano_cores))


def memory_pb(m: st.MemorySample | None) -> pb.MemoryUsage | None:
    if m is None:
        return None
    return pb.MemoryUsage(timestamp=m.timestamp_ns, working_set_bytes=_u(m.working_set_bytes),
                          available_bytes=_u(m.available_bytes), usage_bytes=_u(m.usage_bytes),
                          rss_bytes=_u(m.rss_bytes), page_faults=_u(m.page_faults),
                          major_page_faults=_u(m.major_page_faults))


def container_stats_pb(s: st.ContainerSample) -> pb.ContainerStats:
    rec = s.record
    md = rec.metadata.config.metadata
    attrs = pb.ContainerAttributes(id=rec.id, metadata=pb.ContainerMetadata(name=md.name, attempt=md.attempt),
                                   labels=dict(rec.metadata.labels), annotations=dict(rec.metadata.annotations))
    wl = None
    if s.writable_layer is not None:
        w = s.writable_layer
        wl = pb.FilesystemUsage(timestamp=w.timestamp_ns, fs_id=pb.FilesystemIdentifier(mountpoint=w.mountpoint),
                                used_bytes=_u(w.used_bytes), inodes_used=_u(w.inodes_used))
    return pb.ContainerStats(attributes=attrs, cpu=cpu_pb(s.cpu), memory=memory_pb(s.memory), writable_layer=wl)


def _iface_pb(i: st.InterfaceSample) -> pb.NetworkInterfaceUsage:
    return pb.NetworkInterfaceUsage(name=i.name, rx_bytes=_u(i.rx_bytes), rx_errors=_u(i.rx_errors),
                                    tx_bytes=_u(i.tx_bytes), tx_errors=_u(i.tx_errors))


def pod_stats_pb(p: st.PodSample) -> pb.PodSandboxStats:
    sb = p.record
    md = sb.metadata.config.metadata
    attrs = pb.PodSandboxAttributes(
        id=sb.id, metadata=pb.PodSandboxMetadata(name=md.name, uid=md.uid, namespace=md.namespace,
                                                 attempt=md.attempt),
        labels=dict(sb.metadata.labels), annotations=dict(sb.metadata.annotations))
    net = None
    if p.network is not None:
        n = p.network
        net = pb.NetworkUsage(timestamp=n.timestamp_ns,
                              default_interface=_iface_pb(n.default) if n.default else None,
                              interfaces=[_iface_pb(i) for i in n.interfaces])
    proc = None
    if p.processes is not None:
        proc = pb.ProcessUsage(timestamp=p.cpu.timestamp_ns if p.cpu else time.time_ns(),
                               process_count=_u(p.processes))
    return pb.PodSandboxStats(attributes=attrs, linux=pb.LinuxPodSandboxStats(
        cpu=cpu_pb(p.cpu), memory=memory_pb(p.memory), network=net, process=proc,
        containers=[container_stats_pb(c) for c in p.containers]))


# --------------------------------------------------------------------------- metrics


def descriptors() -> list[pb.MetricDescriptor]:
    return [pb.MetricDescriptor(name=n, help=h, label_keys=[*BASE_LABELS, *extra])
            for n, (h, extra, _t) in DESCRIPTORS.items()]


class _MetricBuilder:
    def __init__(self, base: list[str], ts: int) -> None:
        self.base = base
        self.ts = ts
        self.out: list[pb.Metric] = []

    def add(self, name: str, value: int | None, *extra: str) -> None:
        if value is None:
            return
        self.out.append(pb.Metric(name=name, timestamp=self.ts, metric_type=DESCRIPTORS[name][2],
                                  label_values=[*self.base, *extra], value=pb.UInt64Value(value=max(0, int(value)))))


def container_metrics(s: st.ContainerSample, pod_md: PodSandboxMetadata, image: str) -> list[pb.Metric]:
    rec = s.record
    name = rec.metadata.config.metadata.name
    b = _MetricBuilder([rec.id, rec.name, image, name, pod_md.name, pod_md.namespace], time.time_ns())
    b.add("container_last_seen", int(time.time()))
    if s.cpu is not None:
        b.add("container_cpu_usage_seconds_total", s.cpu.usage_core_ns // 1_000_000_000, "total")
    m = s.memory
    if m is not None:
        b.add("container_memory_usage_bytes", m.usage_bytes)
        b.add("container_memory_working_set_bytes", m.working_set_bytes)
        b.add("container_memory_rss", m.rss_bytes)
        b.add("container_memory_cache", m.cache_bytes)
        b.add("container_spec_memory_limit_bytes", m.limit_bytes if m.limit_bytes is not None else 0)
        for ftype, v in (("pgfault", m.page_faults), ("pgmajfault", m.major_page_faults)):
            b.add("container_memory_failures_total", v, ftype, "container")
    b.add("container_oom_events_total", s.oom_kills)
    b.add("container_processes", s.processes)
    if s.writable_layer is not None:
        w = s.writable_layer
        b.add("container_fs_usage_bytes", w.used_bytes, w.mountpoint)
        b.add("container_fs_inodes_total", w.inodes_used, w.mountpoint)
        b.add("container_fs_limit_bytes", w.capacity_bytes, w.mountpoint)
        b.add("container_fs_inodes_free", w.inodes_free, w.mountpoint)
    if s.detail is not None:
        for metric, key, div in _DETAIL_FIELDS:
            v = s.detail.get(key)
            b.add(metric, None if v is None else v // div)
    if s.proc is not None:
        b.add("container_file_descriptors", s.proc.fds)
        b.add("container_sockets", s.proc.sockets)
        b.add("container_threads", s.proc.threads)
    started = rec.status.started_at or rec.metadata.created_at
    if started:
        b.add("container_start_time_seconds", started // 1_000_000_000)
    return b.out


def pod_metrics(p: st.PodSample, image_names: dict[str, str]) -> pb.PodSandboxMetrics:
    sb = p.record
    md = sb.metadata.config.metadata
    b = _MetricBuilder([sb.id, sb.name, "", "POD", md.name, md.namespace], time.time_ns())
    if p.cpu is not None:
        b.add("container_cpu_usage_seconds_total", p.cpu.usage_core_ns // 1_000_000_000, "total")
    if p.memory is not None:
        b.add("container_memory_usage_bytes", p.memory.usage_bytes)
        b.add("container_memory_working_set_bytes", p.memory.working_set_bytes)
        b.add("container_memory_rss", p.memory.rss_bytes)
    b.add("container_processes", p.processes)
    if p.network is not None:
        for i in p.network.interfaces:
            for metric, attr in _NET_FIELDS:
                b.add(metric, getattr(i, attr), i.name)
    ctrs = [pb.ContainerMetrics(container_id=c.id,
                                metrics=container_metrics(c, md, image_names.get(c.id, "")))
            for c in p.containers if c.record.status.state == ContainerState.RUNNING]
    return pb.PodSandboxMetrics(pod_sandbox_id=sb.id, metrics=b.out, container_metrics=ctrs)


# --------------------------------------------------------------------------- the RPCs


def _labels(f: pb.ContainerStatsFilter | pb.PodSandboxStatsFilter | None) -> dict[str, str]:
    return dict(f.label_selector) if f is not None else {}


class StatsRPCs:
    """The RuntimeService's stats and metrics RPCs: records from ``runtime``, samples from ``collector``.

    Each Stream* RPC sends what its List* counterpart returns (same filter, same
    code), split by ``batching``.
    """

    def __init__(self, runtime: Runtime, collector: st.StatsCollector, batching: Batching | None = None) -> None:
        self.rt = runtime
        self.collector = collector
        self.batching = batching or Batching()

    async def ContainerStats(self, request: pb.ContainerStatsRequest, context: Ctx) -> pb.ContainerStatsResponse:
        validate.object_id(request.container_id, "container_id")
        rec = self.rt.get_container(request.container_id)  # NOT_FOUND names it
        s = await asyncio.to_thread(self.collector.container, rec)
        return pb.ContainerStatsResponse(stats=container_stats_pb(s))

    async def _list_container_stats(self, f: pb.ContainerStatsFilter | None) -> list[pb.ContainerStats]:
        col = self.collector
        if f is None or not (f.id or f.pod_sandbox_id or f.label_selector):
            col.forget_gone()
        recs = self.rt.list_containers(id_prefix=f.id if f is not None else "",
                                       sandbox_id=f.pod_sandbox_id if f is not None else "", labels=_labels(f))

        def work() -> list[pb.ContainerStats]:
            return [container_stats_pb(s) for s in col.containers(recs)]

        return await asyncio.to_thread(work)

    async def ListContainerStats(self, request: pb.ListContainerStatsRequest,
                                 context: Ctx) -> pb.ListContainerStatsResponse:
        f = request.filter if request.HasField("filter") else None
        return pb.ListContainerStatsResponse(stats=await self._list_container_stats(f))

    async def StreamContainerStats(self, request: pb.StreamContainerStatsRequest,
                                   context: Ctx) -> AsyncIterator[pb.StreamContainerStatsResponse]:
        f = request.filter if request.HasField("filter") else None
        for batch in self.batching.split(await self._list_container_stats(f)):
            yield pb.StreamContainerStatsResponse(container_stats=batch)

    async def _pod_stats(self, sbs: list[Sandbox]) -> list[pb.PodSandboxStats]:
        col = self.collector
        plan = col.plan_pods(sbs)

        def work() -> list[pb.PodSandboxStats]:
            return [pod_stats_pb(p) for p in col.pods(plan)]

        return await asyncio.to_thread(work)

    async def PodSandboxStats(self, request: pb.PodSandboxStatsRequest, context: Ctx) -> pb.PodSandboxStatsResponse:
        validate.object_id(request.pod_sandbox_id, "pod_sandbox_id")
        sb = self.rt.get_sandbox(request.pod_sandbox_id)
        if sb.status.phase is not None:
            raise NotFound(f"pod sandbox {sb.id} is still being created")
        return pb.PodSandboxStatsResponse(stats=(await self._pod_stats([sb]))[0])

    async def _list_pod_stats(self, f: pb.PodSandboxStatsFilter | None) -> list[pb.PodSandboxStats]:
        return await self._pod_stats(self.rt.list_sandboxes(id_prefix=f.id if f is not None else "",
                                                            labels=_labels(f) or None))

    async def ListPodSandboxStats(self, request: pb.ListPodSandboxStatsRequest,
                                  context: Ctx) -> pb.ListPodSandboxStatsResponse:
        f = request.filter if request.HasField("filter") else None
        return pb.ListPodSandboxStatsResponse(stats=await self._list_pod_stats(f))

    async def StreamPodSandboxStats(self, request: pb.StreamPodSandboxStatsRequest,
                                    context: Ctx) -> AsyncIterator[pb.StreamPodSandboxStatsResponse]:
        f = request.filter if request.HasField("filter") else None
        for batch in self.batching.split(await self._list_pod_stats(f)):
            yield pb.StreamPodSandboxStatsResponse(pod_sandbox_stats=batch)

    async def ListMetricDescriptors(self, request: pb.ListMetricDescriptorsRequest,
                                    context: Ctx) -> pb.ListMetricDescriptorsResponse:
        return pb.ListMetricDescriptorsResponse(descriptors=descriptors())

    async def _pod_metrics(self) -> list[pb.PodSandboxMetrics]:
        col = self.collector
        images = {c.id: c.metadata.image_name or c.metadata.image_ref for c in self.rt.containers.values()}
        plan = col.plan_pods(self.rt.list_sandboxes(state=SandboxState.READY))

        def work() -> list[pb.PodSandboxMetrics]:
            return [pod_metrics(p, images) for p in col.pods(plan, with_oom=True, detail=True)]

        return await asyncio.to_thread(work)

    async def ListPodSandboxMetrics(self, request: pb.ListPodSandboxMetricsRequest,
                                    context: Ctx) -> pb.ListPodSandboxMetricsResponse:
        return pb.ListPodSandboxMetricsResponse(pod_metrics=await self._pod_metrics())

    async def StreamPodSandboxMetrics(self, request: pb.StreamPodSandboxMetricsRequest,
                                      context: Ctx) -> AsyncIterator[pb.StreamPodSandboxMetricsResponse]:
        for batch in self.batching.split(await self._pod_metrics()):
            yield pb.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=batch)
