"""Stats and metrics RPCs against real containers (cgroups of this host, v1 or v2)."""

from __future__ import annotations

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config, run_container, wait_for

MiB = 1024 * 1024


@pytest.fixture
def image(daemon, registry) -> str:
    ref = registry.images["busybox"].ref
    daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
    return ref


def new_pod(daemon, **kw):
    cfg = pod_config(**kw)
    sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    return sid, cfg


def cstats(daemon, cid) -> pb.ContainerStats:
    return daemon.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats


def test_memory_working_set_of_64mb(daemon, image):
    sid, pcfg = new_pod(daemon)
    # dd holds a 64 MiB buffer it filled from /dev/zero while it blocks writing into a pipe nobody reads.
    cid = run_container(daemon.runtime, sid, pcfg, container_config(
        image, ["sh", "-c", "dd if=/dev/zero bs=64M count=1 | sleep 3600"]))
    s = wait_for(lambda: (x := cstats(daemon, cid)).memory.working_set_bytes.value >= 64 * MiB and x,
                 timeout=60, what="working set >= 64 MiB")
    m = s.memory
    assert s.attributes.id == cid and s.attributes.metadata.name
    assert m.usage_bytes.value >= m.working_set_bytes.value
    assert m.rss_bytes.value >= 64 * MiB  # anonymous memory
    assert m.page_faults.value > 0  # (huge pages may fault the buffer in 2 MiB at a time)
    assert m.HasField("major_page_faults")
    assert m.timestamp > 0
    # No memory limit: no available_bytes.
    assert not m.HasField("available_bytes")
    pod = daemon.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid)).stats
    assert pod.attributes.id == sid and pod.attributes.metadata.name == pcfg.metadata.name
    assert pod.linux.memory.working_set_bytes.value >= 64 * MiB
    assert pod.linux.process.process_count.value >= 3  # infra + sh/dd/sleep
    assert [c.attributes.id for c in pod.linux.containers] == [cid]


def test_available_bytes_with_a_memory_limit(daemon, image):
    sid, pcfg = new_pod(daemon)
    cfg = container_config(image, ["sleep", "3600"],
                           linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(
                               memory_limit_in_bytes=256 * MiB)))
    cid = run_container(daemon.runtime, sid, pcfg, cfg)
    m = cstats(daemon, cid).memory
    assert m.HasField("available_bytes")
    assert m.available_bytes.value == 256 * MiB - m.working_set_bytes.value


def test_cpu_of_a_busy_loop_rises_between_samples(daemon, image):
    sid, pcfg = new_pod(daemon)
    cid = run_container(daemon.runtime, sid, pcfg, container_config(image, ["sh", "-c", "while :; do :; done"]))
    req = pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(id=cid))
    first = daemon.runtime.ListContainerStats(req).stats
    assert len(first) == 1 and first[0].attributes.id == cid
    u1 = first[0].cpu.usage_core_nano_seconds.value

    def rising():
        s = daemon.runtime.ListContainerStats(req).stats[0]
        return (s.cpu.usage_core_nano_seconds.value > u1 and s.cpu.usage_nano_cores.value > 0) and s

    s2 = wait_for(rising, timeout=60, what="CPU usage rising with nano_cores > 0")
    assert s2.cpu.timestamp > first[0].cpu.timestamp
    pod = daemon.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid)).stats
    assert pod.linux.cpu.usage_core_nano_seconds.value >= u1


def test_writable_layer_and_filters(daemon, image):
    sid, pcfg = new_pod(daemon)
    cid = run_container(daemon.runtime, sid, pcfg, container_config(
        image, ["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=5 && sleep 3600"], labels={"role": "writer"}))
    sid2, pcfg2 = new_pod(daemon)
    other = run_container(daemon.runtime, sid2, pcfg2, container_config(image, ["sleep", "3600"],
                                                                         labels={"role": "idle"}))
    created = run_container(daemon.runtime, sid2, pcfg2, container_config(image, ["true"]), start=False)
    wl = wait_for(lambda: (w := cstats(daemon, cid).writable_layer).used_bytes.value >= 5 * MiB and w,
                  what="writable layer >= 5 MiB")
    assert wl.inodes_used.value >= 2 and wl.fs_id.mountpoint
    fs = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest())
    assert wl.fs_id.mountpoint == fs.container_filesystems[0].fs_id.mountpoint

    def ids(**f):
        return sorted(s.attributes.id for s in daemon.runtime.ListContainerStats(
            pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(**f))).stats)

    assert ids() == sorted([cid, other, created])
    assert ids(pod_sandbox_id=sid2) == sorted([other, created])
    assert ids(label_selector={"role": "writer"}) == [cid]
    assert ids(id=other) == [other]
    assert ids(id="0" * 64) == []
    # A created (not running) container has attributes but no cgroup figures.
    s = cstats(daemon, created)
    assert s.attributes.id == created and not s.HasField("cpu") and not s.HasField("memory")

    pods = daemon.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest()).stats
    assert sorted(p.attributes.id for p in pods) == sorted([sid, sid2])
    only = daemon.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
        filter=pb.PodSandboxStatsFilter(id=sid2))).stats
    assert [p.attributes.id for p in only] == [sid2]
    assert sorted(c.attributes.id for c in only[0].linux.containers) == sorted([other, created])

    # Stream variants give the same sets.
    streamed = list(daemon.runtime.StreamContainerStats(pb.StreamContainerStatsRequest()))
    assert sorted(s.attributes.id for r in streamed for s in r.container_stats) == sorted([cid, other, created])


def test_unknown_ids_are_not_found(daemon):
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        daemon.runtime.ContainerStats(pb.ContainerStatsRequest(container_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        daemon.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_metric_descriptors_and_pod_sandbox_metrics(daemon, image):
    descs = {d.name: list(d.label_keys) for d in
             daemon.runtime.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors}
    for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes", "container_memory_rss",
                 "container_memory_usage_bytes", "container_network_receive_bytes_total",
                 "container_network_transmit_bytes_total", "container_processes"):
        assert name in descs
        assert descs[name][:3] == ["id", "name", "image"]
    assert descs["container_network_receive_bytes_total"][-1] == "interface"
    assert descs["container_cpu_usage_seconds_total"][-1] == "cpu"

    sid, pcfg = new_pod(daemon)
    cid = run_container(daemon.runtime, sid, pcfg, container_config(
        image, ["sh", "-c", "dd if=/dev/zero bs=64M count=1 | sleep 3600"], name="filler"))

    def filled():
        pms = daemon.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
        for pm in pms:
            for cm in pm.container_metrics:
                for m in cm.metrics:
                    if m.name == "container_memory_working_set_bytes" and m.value.value >= 64 * MiB:
                        return pms
        return None

    pms = wait_for(filled, timeout=60, what="working-set metric >= 64 MiB")
    assert [pm.pod_sandbox_id for pm in pms] == [sid]
    pm = pms[0]
    for m in [*pm.metrics, *(m for cm in pm.container_metrics for m in cm.metrics)]:
        assert m.name in descs, m.name
        assert len(m.label_values) == len(descs[m.name]), m.name
    [cm] = pm.container_metrics
    assert cm.container_id == cid
    by_name = {m.name: m for m in cm.metrics}
    labels = dict(zip(descs["container_memory_rss"], by_name["container_memory_rss"].label_values))
    assert labels["id"] == cid and labels["container"] == "filler" and labels["image"] == image
    assert labels["pod"] == pcfg.metadata.name and labels["namespace"] == pcfg.metadata.namespace
    assert by_name["container_processes"].value.value >= 2
    assert by_name["container_cpu_usage_seconds_total"].metric_type == pb.COUNTER
    pod_labels = dict(zip(descs["container_processes"],
                          next(m for m in pm.metrics if m.name == "container_processes").label_values))
    assert pod_labels["id"] == sid and pod_labels["container"] == "POD"
