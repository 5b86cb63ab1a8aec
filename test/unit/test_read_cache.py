"""cri.readcache and the servicers' ready-made answers: rebuilt on change, reused otherwise."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from moorage.core.store import ImageRecord, Store
from moorage.cri import encoded
from moorage.cri.api import api_pb2 as pb
from moorage.cri.readcache import ObjectCache
from moorage.cri.runtime_service import RuntimeServicer
from moorage.runtime.records import Container, ContainerState, Sandbox, SandboxState, replace
from moorage.testing import records

IMG = "sha256:" + "b" * 64


class Images:
    def __init__(self, store: Store) -> None:
        self.store = store


class FakeRuntime:
    """list/status over in-memory records, with a real image store."""

    def __init__(self, store: Store) -> None:
        self.images = Images(store)
        self.sandboxes: dict[str, Sandbox] = {}
        self.containers: dict[str, Container] = {}

    def list_sandboxes(self, id_prefix: str = "", state: SandboxState | None = None,
                       labels: dict[str, str] | None = None) -> list[Sandbox]:
        return [s for s in self.sandboxes.values() if s.id.startswith(id_prefix)
                and (state is None or s.status.state == state)]

    def list_containers(self, id_prefix: str = "", state: ContainerState | None = None, sandbox_id: str = "",
                        labels: dict[str, str] | None = None) -> list[Container]:
        return [c for c in self.containers.values() if c.id.startswith(id_prefix)
                and c.metadata.sandbox_id.startswith(sandbox_id) and (state is None or c.status.state == state)]

    def container_status(self, cid: str, verbose: bool = False) -> tuple[Container, dict[str, str]]:
        return self.containers[cid], ({"info": "{}"} if verbose else {})

    def sandbox_status(self, sid: str, verbose: bool = False) -> tuple[Sandbox, dict[str, str]]:
        return self.sandboxes[sid], {}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def list_containers(svc: RuntimeServicer, f: pb.ContainerFilter | None = None) -> list[pb.Container]:
    r = run(svc.ListContainers(pb.ListContainersRequest(filter=f), None))
    return list(r.parse(pb.ListContainersResponse).containers)


def test_object_cache_rebuilds_only_on_change() -> None:
    built: list[str] = []

    def build(rec: Container, extra: object) -> pb.Container:
        built.append(rec.id)
        return pb.Container(id=rec.id, state=pb.CONTAINER_RUNNING if rec.status.state == ContainerState.RUNNING
                            else pb.CONTAINER_EXITED, image_ref=str(extra))

    cache: ObjectCache[Container, pb.Container] = ObjectCache(build)
    c = records.container("a" * 64, "s" * 64)
    assert cache.get(c, "x").msg.state == pb.CONTAINER_RUNNING
    assert cache.get(c, "x").raw == pb.Container(id=c.id, state=pb.CONTAINER_RUNNING, image_ref="x").SerializeToString()
    assert built == [c.id]  # the second get was served from the slot
    c.update(lambda st: replace(st, state=ContainerState.EXITED, exit_code=1))
    assert cache.get(c, "x").msg.state == pb.CONTAINER_EXITED
    assert cache.get(c, "y").msg.image_ref == "y"  # what else it depends on changed
    assert len(built) == 3
    others = [records.container(f"{i:064x}", "s" * 64) for i in range(3)]
    for o in others:
        cache.get(o)
    assert len(cache) == 4
    cache.prune({others[0].id})
    assert len(cache) == 1
    cache.prune(set())
    assert len(cache) == 0


def test_lists_and_statuses_follow_state_changes(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    rt = FakeRuntime(store)
    svc = RuntimeServicer(cfg=None, runtime=rt)  # a fake with the runtime's read methods
    assert list_containers(svc) == []  # zero
    assert run(svc.ListPodSandbox(pb.ListPodSandboxRequest(), None)) == b""

    sb = records.sandbox("s" * 64)
    rt.sandboxes[sb.id] = sb
    c = records.container("a" * 64, sb.id, ContainerState.CREATED, image=IMG, image_ref=IMG)
    rt.containers[c.id] = c
    (item,) = list_containers(svc)  # one
    assert item.state == pb.CONTAINER_CREATED and item.image_ref == IMG and item.image.image == IMG
    c.update(lambda st: replace(st, state=ContainerState.RUNNING, pid=7, started_at=5))
    assert [i.state for i in list_containers(svc)] == [pb.CONTAINER_RUNNING]
    st = run(svc.ContainerStatus(pb.ContainerStatusRequest(container_id=c.id), None)).parse(pb.ContainerStatusResponse)
    assert st.status.state == pb.CONTAINER_RUNNING and st.status.started_at == 5 and not st.info
    verbose = run(svc.ContainerStatus(pb.ContainerStatusRequest(container_id=c.id, verbose=True), None))
    assert verbose.parse(pb.ContainerStatusResponse).info == {"info": "{}"}

    # The image the container shows follows the image store (a tag added by a pull).
    store.put_image(ImageRecord(id=IMG, repo_tags=["reg.local/bb:1"], repo_digests=["reg.local/bb@sha256:" + "c" * 64]))
    (item,) = list_containers(svc)
    assert item.image.image == "reg.local/bb:1" and item.image_ref == "reg.local/bb@sha256:" + "c" * 64

    # Many: one changes, the others are served as they were.
    more = [records.container(f"{i:064x}", sb.id, ContainerState.RUNNING, image=IMG, image_ref=IMG) for i in range(3)]
    for m in more:
        rt.containers[m.id] = m
    assert len(list_containers(svc)) == 4
    builds = svc.container_items.builds
    more[1].update(lambda st: replace(st, state=ContainerState.EXITED, exit_code=3, finished_at=9))
    listed = {i.id: i.state for i in list_containers(svc)}
    assert listed[more[1].id] == pb.CONTAINER_EXITED and listed[more[0].id] == pb.CONTAINER_RUNNING
    assert svc.container_items.builds == builds + 1
    running = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
    assert sorted(i.id for i in list_containers(svc, running)) == sorted([c.id, more[0].id, more[2].id])
    pod = run(svc.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sb.id), None))
    pod_msg = pod.parse(pb.PodSandboxStatusResponse)
    assert {s.id: s.exit_code for s in pod_msg.containers_statuses}[more[1].id] == 3
    assert pod_msg.status.state == pb.SANDBOX_READY and pod_msg.timestamp > 0

    # Removed objects disappear, and their slots go at the next full list.
    del rt.containers[more[2].id]
    assert more[2].id not in {i.id for i in list_containers(svc)}
    assert len(svc.container_items) == 3
    sb.update(lambda st: replace(st, state=SandboxState.NOTREADY))
    items = run(svc.ListPodSandbox(pb.ListPodSandboxRequest(), None)).parse(pb.ListPodSandboxResponse).items
    assert [i.state for i in items] == [pb.SANDBOX_NOTREADY]
    store.close()


def test_encoded_responses_are_what_the_message_serializes_to() -> None:
    msg = pb.ListContainersResponse(containers=[pb.Container(id="a", labels={"k": "v"}), pb.Container(id="b")])
    joined = encoded.Encoded(b"".join(encoded.field(1, c.SerializeToString()) for c in msg.containers))
    assert joined == msg.SerializeToString()
    assert type(encoded.serialize(joined)) is bytes and encoded.serialize(joined) == encoded.serialize(msg) == joined
    big = "x" * 300  # a length that needs a two-byte varint
    assert encoded.field(1, big.encode()) == pb.ImageSpec(image=big).SerializeToString()


def test_images_version_moves_on_writes_of_any_connection(tmp_path: Path) -> None:
    a, b = Store(str(tmp_path)), Store(str(tmp_path))
    v0 = a.images_version()
    assert a.images_version() == v0  # reading changes nothing
    a.put_image(ImageRecord(id=IMG, repo_tags=["r/x:1"]))
    v1 = a.images_version()
    assert v1 != v0
    b.delete_image(IMG)  # another connection: an offline ``moorage images import`` or rmi
    assert a.images_version() != v1
    a.close()
    b.close()
