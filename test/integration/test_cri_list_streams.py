"""The six Stream* RPCs against their List* counterparts, over the daemon's socket.

The daemon runs with ``MOORAGE_STREAM_BATCH_SIZE=2`` so that a few pods cross
batch boundaries: every stream must send what its List* call returns, each item
once, in messages of at most two items (full ones first), then end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.cri.batches import BATCH_SIZE_ENV
from moorage.testing.cri import container_config, pod_config, run_container
from moorage.testing.daemon import DaemonProcess, new_base, teardown

BATCH = 2


@pytest.fixture
def d() -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(base=new_base(), env={BATCH_SIZE_ENV: str(BATCH)})
    try:
        daemon.start()
        yield daemon
    finally:
        teardown(daemon)


def _batched(responses: list[Any], field: str) -> list[Any]:
    """The items of a finished stream, after checking how they were split into messages."""
    sizes = [len(getattr(r, field)) for r in responses]
    n = sum(sizes)
    assert sizes == [BATCH] * (n // BATCH) + ([n % BATCH] if n % BATCH else []), sizes
    return [item for r in responses for item in getattr(r, field)]


def _ids(items: list[Any], key: Callable[[Any], str]) -> list[str]:
    out = [key(i) for i in items]
    assert len(out) == len(set(out)), f"an item came twice: {out}"
    return out


def pods(d: DaemonProcess, f: pb.PodSandboxFilter | None = None) -> list[str]:
    listed = list(d.runtime.ListPodSandbox(pb.ListPodSandboxRequest(filter=f), timeout=30).items)
    streamed = _batched(list(d.runtime.StreamPodSandboxes(pb.StreamPodSandboxesRequest(filter=f), timeout=30)),
                        "pod_sandboxes")
    assert streamed == listed
    return _ids(streamed, lambda p: p.id)


def containers(d: DaemonProcess, f: pb.ContainerFilter | None = None) -> list[str]:
    listed = list(d.runtime.ListContainers(pb.ListContainersRequest(filter=f), timeout=30).containers)
    streamed = _batched(list(d.runtime.StreamContainers(pb.StreamContainersRequest(filter=f), timeout=30)),
                        "containers")
    assert streamed == listed
    return _ids(streamed, lambda c: c.id)


def images(d: DaemonProcess, f: pb.ImageFilter | None = None) -> list[str]:
    listed = list(d.images.ListImages(pb.ListImagesRequest(filter=f), timeout=30).images)
    streamed = _batched(list(d.images.StreamImages(pb.StreamImagesRequest(filter=f), timeout=30)), "images")
    assert streamed == listed
    return _ids(streamed, lambda i: i.id)


# Stats carry fresh samples on every call: the two answers agree on which items, in which order.

def pod_stats(d: DaemonProcess, f: pb.PodSandboxStatsFilter | None = None) -> list[str]:
    listed = d.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(filter=f), timeout=30).stats
    streamed = _batched(list(d.runtime.StreamPodSandboxStats(pb.StreamPodSandboxStatsRequest(filter=f),
                                                             timeout=30)), "pod_sandbox_stats")
    ids = _ids(streamed, lambda s: s.attributes.id)
    assert ids == [s.attributes.id for s in listed]
    return ids


def container_stats(d: DaemonProcess, f: pb.ContainerStatsFilter | None = None) -> list[str]:
    listed = d.runtime.ListContainerStats(pb.ListContainerStatsRequest(filter=f), timeout=30).stats
    streamed = _batched(list(d.runtime.StreamContainerStats(pb.StreamContainerStatsRequest(filter=f),
                                                            timeout=30)), "container_stats")
    ids = _ids(streamed, lambda s: s.attributes.id)
    assert ids == [s.attributes.id for s in listed]
    return ids


def pod_metrics(d: DaemonProcess) -> list[str]:
    listed = d.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest(), timeout=30).pod_metrics
    streamed = _batched(list(d.runtime.StreamPodSandboxMetrics(pb.StreamPodSandboxMetricsRequest(), timeout=30)),
                        "pod_sandbox_metrics")
    ids = _ids(streamed, lambda m: m.pod_sandbox_id)
    assert ids == [m.pod_sandbox_id for m in listed]
    for m in streamed:
        assert [c.container_id for c in m.container_metrics]  # each test pod runs one container
    return ids


def pull(d: DaemonProcess, registry: Any, name: str) -> str:
    ref = registry.images[name].ref
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
    return ref


def run_pod(d: DaemonProcess, image: str, **labels: str) -> tuple[str, str]:
    cfg = pod_config(labels=labels)
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
    cid = run_container(d.runtime, sid, cfg, container_config(image, ["sleep", "3600"], labels=labels))
    return sid, cid


def test_streams_of_nothing_send_no_message(d: DaemonProcess) -> None:
    assert pods(d) == containers(d) == images(d) == []
    assert pod_stats(d) == container_stats(d) == pod_metrics(d) == []


def test_streams_of_one_item(d: DaemonProcess, registry: Any) -> None:
    ref = pull(d, registry, "busybox")
    sid, cid = run_pod(d, ref)
    assert pods(d) == pod_stats(d) == pod_metrics(d) == [sid]
    assert containers(d) == container_stats(d) == [cid]
    assert len(images(d)) == 1


def test_streams_across_batches_and_with_filters(d: DaemonProcess, registry: Any) -> None:
    refs = [pull(d, registry, n) for n in ("busybox", "multilayer", "nonroot")]
    made = [run_pod(d, refs[0], tier="web" if i % 2 else "db") for i in range(5)]
    sids, cids = [s for s, _ in made], [c for _, c in made]

    # Everything: 5 pods and 5 containers make three messages each, 3 images two.
    assert sorted(pods(d)) == sorted(pod_stats(d)) == sorted(pod_metrics(d)) == sorted(sids)
    assert sorted(containers(d)) == sorted(container_stats(d)) == sorted(cids)
    assert len(images(d)) == 3

    # Each stream honours its List* filter: the same answer, split the same way.
    web = sorted(sids[i] for i in (1, 3))
    assert sorted(pods(d, pb.PodSandboxFilter(label_selector={"tier": "db"}))) == sorted(sids[i] for i in (0, 2, 4))
    assert sorted(pods(d, pb.PodSandboxFilter(label_selector={"tier": "web"}))) == web
    assert pods(d, pb.PodSandboxFilter(id=sids[2][:12])) == [sids[2]]
    assert containers(d, pb.ContainerFilter(pod_sandbox_id=sids[4])) == [cids[4]]
    assert sorted(containers(d, pb.ContainerFilter(label_selector={"tier": "db"}))) == sorted(
        cids[i] for i in (0, 2, 4))
    assert containers(d, pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_EXITED))) == []
    [img] = images(d, pb.ImageFilter(image=pb.ImageSpec(image=refs[1])))
    assert img == d.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=refs[1]))).image.id
    assert sorted(pod_stats(d, pb.PodSandboxStatsFilter(label_selector={"tier": "web"}))) == web
    assert pod_stats(d, pb.PodSandboxStatsFilter(id=sids[0])) == [sids[0]]
    assert sorted(container_stats(d, pb.ContainerStatsFilter(label_selector={"tier": "db"}))) == sorted(
        cids[i] for i in (0, 2, 4))
    assert container_stats(d, pb.ContainerStatsFilter(pod_sandbox_id=sids[1])) == [cids[1]]

    # StreamPodSandboxMetricsRequest has no filter; both calls cover ready pods only.
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sids[0]), timeout=60)
    assert sorted(pod_metrics(d)) == sorted(sids[1:])
    assert pods(d, pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY))) == [sids[0]]
