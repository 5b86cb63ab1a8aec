"""Runtime lifecycle races, with a fake OCI runtime and fake images (no root, no runc).

Each test interleaves two CRI calls deterministically through the fakes' pause points.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from dataclasses import dataclass, field

import pytest

from moorage.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from moorage.core.store import Store, now_ns
from moorage.runtime import records
from moorage.runtime.model import (
    ContainerConfig,
    ContainerMetadata,
    LinuxContainerResources,
    LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext,
    NamespaceOption,
    PodSandboxConfig,
    PodSandboxMetadata,
)
from moorage.runtime.records import (
    CREATE_FAILED,
    Container,
    ContainerMeta,
    ContainerState,
    ContainerStatus,
    Sandbox,
    SandboxMeta,
    SandboxState,
    SandboxStatus,
)
from moorage.runtime.service import Runtime, RuntimeSettings


class FakeOCI:
    def __init__(self) -> None:
        self.signals: list[tuple[str, int]] = []
        self.created: list[str] = []
        self.updated: list[str] = []
        self.exits: dict[str, asyncio.Future] = {}
        self.ignore: set[int] = {signal.SIGTERM}  # signals the "process" ignores
        self.delete_pause: asyncio.Event | None = None
        self.create_errors: list[BaseException] = []  # raised by the next create calls, in order
        self.delete_errors: list[BaseException] = []

    def _exit(self, cid: str) -> asyncio.Future:
        return self.exits.setdefault(cid, asyncio.get_running_loop().create_future())

    async def create(self, cid, bundle, **kw) -> int:
        if self.create_errors:
            raise self.create_errors.pop(0)
        self.created.append(cid)
        return 4242

    async def start(self, cid) -> None:
        await asyncio.sleep(0)

    async def kill(self, cid, sig, all=False) -> None:
        self.signals.append((cid, int(sig)))
        await asyncio.sleep(0)
        if int(sig) not in self.ignore and not self._exit(cid).done():
            self._exit(cid).set_result(128 + int(sig))

    async def delete(self, cid, force=False) -> None:
        if self.delete_errors:
            raise self.delete_errors.pop(0)
        if self.delete_pause is not None:
            await self.delete_pause.wait()
        await asyncio.sleep(0)
        if signal.SIGKILL not in self.ignore and not self._exit(cid).done():
            self._exit(cid).set_result(137)

    async def state(self, cid):
        raise NotFound(cid)

    def exit_status(self, cid):
        return None

    def conmon_pid(self, cid):
        return None

    async def wait_exit(self, cid, timeout=None) -> int:
        return await asyncio.shield(self._exit(cid))

    async def update(self, cid, resources) -> None:
        self.updated.append(cid)


@dataclass
class FakeImage:
    id: str = "sha256:" + "a" * 64
    config: dict = field(default_factory=dict)


class FakeImages:
    def __init__(self) -> None:
        self.prepare_pause: asyncio.Event | None = None
        self.prepared = asyncio.Event()
        self.released: list[str] = []
        self.prepare_errors: list[BaseException] = []
        self.release_errors: list[BaseException] = []

    def get_local(self, ref):
        return FakeImage()

    async def prepare_rootfs(self, cid, image, rootfs) -> None:
        if self.prepare_errors:
            raise self.prepare_errors.pop(0)
        self.prepared.set()
        if self.prepare_pause is not None:
            await self.prepare_pause.wait()

    async def release_rootfs(self, key, rootfs) -> None:
        if self.release_errors:
            raise self.release_errors.pop(0)
        self.released.append(key)


@pytest.fixture
def harness(tmp_path):
    settings = RuntimeSettings(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"),
                               handlers={"runc": "/bin/true"}, netns_dir=str(tmp_path / "netns"))
    store = Store(str(tmp_path / "root"))
    rt = Runtime(settings, store, FakeImages(), None)
    oci = FakeOCI()
    rt.ctx.runtimes["runc"] = oci
    return rt, oci


def add_sandbox(rt: Runtime, sid: str = "s" * 64) -> Sandbox:
    pod = PodSandboxMetadata(name="pod", namespace="ns", uid="u")
    cfg = PodSandboxConfig(metadata=pod, linux=LinuxPodSandboxConfig(security_context=LinuxSandboxSecurityContext(
        namespace_options=NamespaceOption(network="NODE", ipc="NODE"))))
    meta = SandboxMeta(id=sid, name=f"pod_{sid[:6]}", created_at=now_ns(), config=cfg, runtime_handler="runc")
    return rt.ctx.add_sandbox(meta, SandboxStatus(state=SandboxState.READY, pid=4000))


def add_container(rt: Runtime, sb: Sandbox, cid: str = "c" * 64,
                  state: ContainerState = ContainerState.CREATED) -> Container:
    cfg = ContainerConfig(metadata=ContainerMetadata(name="c"), image="busybox")
    meta = ContainerMeta(id=cid, name=f"c_{cid[:6]}", sandbox_id=sb.id, created_at=now_ns(), config=cfg,
                         image_ref=FakeImage().id, image_name="busybox", runtime_handler="runc", snapshot_key=cid)
    return rt.ctx.add_container(meta, ContainerStatus(state=state))


async def until(cond, what: str) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def settle() -> None:
    """Let every ready task run until it blocks (the fakes do no real I/O)."""
    for _ in range(50):
        await asyncio.sleep(0)


# -- 5: a cancelled exit watcher releases whoever waits for the exit -----------------------------

def test_stop_waiting_for_the_exit_returns_when_the_container_is_removed(harness):
    rt, oci = harness

    async def main():
        sb = add_sandbox(rt)
        rec = add_container(rt, sb, state=ContainerState.RUNNING)
        rt.ctx.watch_exit(rec.id, "runc", rt.container_ops._on_exit)
        stop = asyncio.ensure_future(rt.stop_container(rec.id, 20))
        await until(lambda: (rec.id, signal.SIGTERM) in oci.signals, "SIGTERM sent")
        await settle()  # StopContainer now waits for the exit
        oci.ignore.add(signal.SIGKILL)  # the exit never comes through the watcher
        async with rt.ctx.lock(rec.id):  # what RemoveContainer does once it holds the lock
            await rt.container_ops._destroy(rec)
        await stop
        assert (rec.id, signal.SIGKILL) not in oci.signals  # it did not wait out its 20 s

    asyncio.run(main())


def test_waiters_are_released_when_the_daemon_stops_watching(harness):
    rt, oci = harness

    async def main():
        sb = add_sandbox(rt)
        rec = add_container(rt, sb, state=ContainerState.RUNNING)
        rt.ctx.watch_exit(rec.id, "runc", rt.container_ops._on_exit)
        stop = asyncio.ensure_future(rt.stop_container(rec.id, 20))
        await until(lambda: (rec.id, signal.SIGTERM) in oci.signals, "SIGTERM sent")
        await settle()  # StopContainer now waits for the exit
        await rt.stop()
        await stop
        assert (rec.id, signal.SIGKILL) not in oci.signals

    asyncio.run(main())


# -- 6: StartContainer / UpdateContainerResources that waited for the lock of a removed container ----

@pytest.mark.parametrize("call", ["start", "update"])
def test_call_waiting_for_the_lock_of_a_removed_container_is_not_found(harness, call):
    rt, oci = harness

    async def main():
        sb = add_sandbox(rt)
        # A running container for UpdateContainerResources (it would reach runc), a created one for start.
        rec = add_container(rt, sb, state=ContainerState.RUNNING if call == "update" else ContainerState.CREATED)
        oci.delete_pause = asyncio.Event()
        remove = asyncio.ensure_future(rt.remove_container(rec.id))
        await settle()  # RemoveContainer holds the lock, deleting
        if call == "start":
            other = asyncio.ensure_future(rt.start_container(rec.id))
        else:
            other = asyncio.ensure_future(rt.update_resources(rec.id, LinuxContainerResources(cpu_shares=2)))
        await settle()  # waiting for the lock
        oci.delete_pause.set()
        await remove
        with pytest.raises(NotFound, match=f"{rec.id} not found \\(it was removed\\)"):
            await other
        assert rec.id not in oci.created and rec.id not in oci.updated
        assert rec.id not in rt.containers and not rt.ctx.store.list_containers()

    asyncio.run(main())


# -- 7: CreateContainer racing RemovePodSandbox leaves no orphan --------------------------------

def _cfg(name: str = "c") -> ContainerConfig:
    return ContainerConfig(metadata=ContainerMetadata(name=name), image="busybox", command=["true"])


@pytest.mark.parametrize("pause_in_prepare", [False, True])
def test_create_container_racing_remove_pod_sandbox_leaves_no_orphan(harness, pause_in_prepare):
    rt, oci = harness

    async def main():
        sb = add_sandbox(rt)
        if pause_in_prepare:
            rt.images.prepare_pause = asyncio.Event()
        create = asyncio.ensure_future(rt.create_container(sb.id, _cfg()))
        if pause_in_prepare:
            await until(rt.images.prepared.is_set, "the rootfs being prepared")
        remove = asyncio.ensure_future(rt.remove_sandbox(sb.id))
        await settle()
        if pause_in_prepare:
            rt.images.prepare_pause.set()
        res = await asyncio.gather(create, remove, return_exceptions=True)
        assert res[1] is None, res
        assert sb.id not in rt.sandboxes
        orphans = [c.id for c in rt.containers.values()] + [c.id for c in rt.ctx.store.list_containers()]
        assert not orphans, (res, orphans)
        assert isinstance(res[0], (FailedPrecondition, NotFound)), res
        assert sb.id in str(res[0])

    asyncio.run(main())


# -- 8: a create whose clean-up fails leaves a visible record that Remove* cleans ------------------

def _busy() -> OSError:
    return OSError(errno.EBUSY, "Device or resource busy", "/state/rootfs")


def test_failed_container_rollback_is_visible_and_removable(harness):
    rt, oci = harness

    async def main():
        sb = add_sandbox(rt)
        rt.images.prepare_errors.append(InvalidArgument("layer is corrupt"))
        rt.images.release_errors.append(_busy())  # the clean-up of the failed create fails too
        with pytest.raises(InvalidArgument, match="layer is corrupt"):
            await rt.create_container(sb.id, _cfg())
        [rec] = rt.list_containers()
        assert rec.status.state == ContainerState.EXITED and rec.status.reason == CREATE_FAILED
        assert "layer is corrupt" in rec.status.message and "Device or resource busy" in rec.status.message
        stored = records.decode_container(rt.ctx.store.get_container(rec.id))[1]
        assert stored.reason == CREATE_FAILED and stored.phase is None
        with pytest.raises(FailedPrecondition, match="exited"):
            await rt.start_container(rec.id)
        # A retry with the same name is told which id holds the name and how to free it.
        with pytest.raises(AlreadyExists, match=f"held by container {rec.id}.*RemoveContainer {rec.id}"):
            await rt.create_container(sb.id, _cfg())
        await rt.remove_container(rec.id)
        assert not rt.containers and not rt.ctx.store.list_containers()
        cid = await rt.create_container(sb.id, _cfg())
        assert rt.containers[cid].status.state == ContainerState.CREATED

    asyncio.run(main())


def test_failed_sandbox_rollback_is_visible_and_removable(harness):
    rt, oci = harness
    rt.ctx.s.drop_infra = False  # the failure injected is the infra's runc create
    pod = PodSandboxMetadata(name="web", namespace="ns", uid="u1")
    cfg = PodSandboxConfig(metadata=pod, linux=LinuxPodSandboxConfig(security_context=LinuxSandboxSecurityContext(
        namespace_options=NamespaceOption(network="NODE", ipc="NODE"))))

    async def main():
        oci.create_errors.append(FailedPrecondition("runc create: no such file"))
        oci.delete_errors.append(_busy())
        with pytest.raises(FailedPrecondition, match="runc create"):
            await rt.run_sandbox(cfg)
        [sb] = rt.list_sandboxes()
        assert sb.status.state == SandboxState.NOTREADY and sb.status.reason == CREATE_FAILED
        assert "runc create" in sb.status.message and "Device or resource busy" in sb.status.message
        with pytest.raises(AlreadyExists, match=f"held by pod sandbox {sb.id}.*RemovePodSandbox {sb.id}"):
            await rt.run_sandbox(cfg)
        await rt.remove_sandbox(sb.id)
        assert not rt.sandboxes and not rt.ctx.store.list_sandboxes()
        sid = await rt.run_sandbox(cfg)
        assert rt.sandboxes[sid].status.state == SandboxState.READY

    asyncio.run(main())


def test_images_in_use_are_those_of_the_containers(harness):
    rt, _oci = harness
    assert rt.images_in_use() == set()
    add_container(rt, add_sandbox(rt))
    assert rt.images_in_use() == {FakeImage().id}
