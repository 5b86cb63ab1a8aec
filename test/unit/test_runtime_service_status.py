"""cri.runtime_service status building without a daemon: image look-ups are memoised per call."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from moorage.cri.api import api_pb2 as pb
from moorage.cri.runtime_service import RuntimeServicer
from moorage.runtime.records import ContainerState
from moorage.testing import records

IMG = "sha256:" + "b" * 64


@dataclass
class Img:
    id: str = IMG
    repo_tags: list = field(default_factory=lambda: ["registry.local/busybox:1"])
    repo_digests: list = field(default_factory=lambda: ["registry.local/busybox@sha256:" + "c" * 64])


class CountingStore:
    def __init__(self) -> None:
        self.lookups = 0

    def get_image(self, ref):
        self.lookups += 1
        return Img()

    def images_version(self):
        return (0, 0)


class FakeRuntime:
    def __init__(self, n: int) -> None:
        self.sb = records.sandbox("s" * 64, name="pod")
        self.ctrs = [records.container(f"{i:064x}", self.sb.id, ContainerState.CREATED, name=f"c{i}", image=IMG,
                                       image_ref=IMG) for i in range(n)]
        self.images = type("Images", (), {})()
        self.images.store = CountingStore()

    def sandbox_status(self, sid, verbose=False):
        return self.sb, {}

    def list_containers(self, sandbox_id=""):
        return list(self.ctrs)


def test_pod_sandbox_status_looks_each_image_up_once():
    rt = FakeRuntime(5)
    svc = RuntimeServicer(cfg=None, runtime=rt)
    r = asyncio.run(svc.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=rt.sb.id), None)).parse(
        pb.PodSandboxStatusResponse)
    assert len(r.containers_statuses) == 5
    assert rt.images.store.lookups == 1
    assert {s.image.image for s in r.containers_statuses} == {"registry.local/busybox:1"}
    assert {s.image_id for s in r.containers_statuses} == {IMG}
