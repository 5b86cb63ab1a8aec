"""RemoveContainer frees the id and name at once; its file work runs after, journalled for restarts."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from moorage.core.errors import NotFound
from moorage.core.store import Store, now_ns
from moorage.runtime.model import ContainerConfig, ContainerMetadata, PodSandboxConfig, PodSandboxMetadata
from moorage.runtime.oci import ExitStatus, OCIRuntimeError
from moorage.runtime.records import ContainerMeta, ContainerState, ContainerStatus, SandboxMeta, SandboxState, SandboxStatus
from moorage.runtime.service import Runtime, RuntimeSettings


class FakeOCI:
    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.exits: dict[str, ExitStatus] = {}  # what conmon wrote, until runc delete drops it
        self.pause: asyncio.Event | None = None
        self.fail = 0

    async def delete(self, cid: str, force: bool = False) -> None:
        if self.pause is not None:
            await self.pause.wait()
        if self.fail:
            self.fail -= 1
            raise OCIRuntimeError(f"delete container {cid}: busy")
        self.deleted.append(cid)
        self.exits.pop(cid, None)

    def exit_status(self, cid: str) -> ExitStatus | None:
        return self.exits.get(cid)

    def conmon_pid(self, cid: str) -> None:
        return None

    async def state(self, cid: str) -> None:
        raise NotFound(cid)


class FakeImages:
    def __init__(self) -> None:
        self.released: list[str] = []
        self.pause: asyncio.Event | None = None
        self.fail = 0

    async def release_rootfs(self, key: str, rootfs: str) -> None:
        if self.pause is not None:
            await self.pause.wait()
        if self.fail:
            self.fail -= 1
            raise OSError("device busy")
        self.released.append(key)


def runtime(tmp_path: Path) -> tuple[Runtime, FakeOCI, FakeImages]:
    settings = RuntimeSettings(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"),
                               handlers={"runc": "/bin/true"}, netns_dir=str(tmp_path / "netns"))
    images = FakeImages()
    rt = Runtime(settings, Store(str(tmp_path / "root")), images, None)  # type: ignore[arg-type]
    oci = FakeOCI()
    rt.ctx.runtimes["runc"] = oci  # type: ignore[assignment]
    return rt, oci, images


def add(rt: Runtime, n: int, state: ContainerState = ContainerState.EXITED) -> list[str]:
    sid = "5" * 64
    if sid not in rt.ctx.sandboxes:
        rt.ctx.add_sandbox(SandboxMeta(id=sid, name="pod_ns_u_0", created_at=now_ns(), runtime_handler="runc",
                                       config=PodSandboxConfig(metadata=PodSandboxMetadata(name="pod", namespace="ns",
                                                                                           uid="u"))),
                           SandboxStatus(state=SandboxState.READY))
    cids = []
    for _ in range(n):
        cid = f"{len(rt.ctx.containers) + 1:x}".rjust(64, "c")
        cfg = ContainerConfig(metadata=ContainerMetadata(name=f"c{cid[-4:]}"), image="busybox")
        rt.ctx.add_container(ContainerMeta(id=cid, name=f"c{cid[-4:]}_pod", sandbox_id=sid, created_at=now_ns(),
                                           config=cfg, image_ref="sha256:" + "a" * 64, image_name="busybox",
                                           runtime_handler="runc", snapshot_key=cid),
                             ContainerStatus(state=state))
        os.makedirs(os.path.join(rt.ctx.container_state(cid), "bundle", "rootfs"))
        cids.append(cid)
    return cids


def journals(rt: Runtime) -> list[str]:
    d = os.path.join(rt.ctx.s.root_dir, "removing")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_record_goes_at_once_files_after(tmp_path: Path) -> None:
    rt, oci, images = runtime(tmp_path)

    async def main() -> None:
        (cid,) = add(rt, 1)
        images.pause = asyncio.Event()
        await rt.remove_container(cid)
        # Gone for every caller (and from the store) although its layer is not released yet.
        assert cid not in rt.containers and not rt.ctx.store.list_containers()
        assert oci.deleted == [cid]  # the runtime's state (its cgroup) went before the call returned
        assert journals(rt) == [f"{cid}.json"] and images.released == []
        images.pause.set()
        await rt.container_ops.wait_removed()
        assert images.released == [cid] and journals(rt) == []
        assert not os.path.exists(rt.ctx.container_state(cid))
        await rt.remove_container(cid)  # removing what is gone is success

    asyncio.run(main())


def test_restart_finishes_what_was_journalled(tmp_path: Path) -> None:
    rt, _, images = runtime(tmp_path)

    async def main() -> None:
        cids = add(rt, 3)  # many
        images.fail = 2  # two clean-ups fail (a busy mount): their journals stay
        for cid in cids:
            await rt.remove_container(cid)
        await rt.container_ops.wait_removed()
        assert len(images.released) == 1 and len(journals(rt)) == 2
        # Garbage in the journal dir is dropped, never acted on.
        d = os.path.join(rt.ctx.s.root_dir, "removing")
        with open(os.path.join(d, "not-an-id.json"), "w") as f:
            f.write("{}")
        with open(os.path.join(d, "e" * 64 + ".json"), "w") as f:
            json.dump({"id": "e" * 64, "snapshot_key": "../../etc", "image_volumes": []}, f)

        again, _, images2 = runtime(tmp_path)  # the next daemon on the same dirs
        await again.start()
        assert sorted(images2.released) == sorted(c for c in cids if c not in images.released)
        assert journals(again) == []
        assert not any(os.path.exists(again.ctx.container_state(c)) for c in cids)

    asyncio.run(main())


def test_zero_removals_at_start(tmp_path: Path) -> None:
    rt, _, images = runtime(tmp_path)
    asyncio.run(rt.start())
    assert images.released == [] and journals(rt) == []


async def exit_all(rt: Runtime, oci: FakeOCI, cids: list[str]) -> None:
    """conmon recorded each exit and the watcher fired (the exit path, as for a real container)."""
    for cid in cids:
        oci.exits[cid] = ExitStatus(0, datetime.now(UTC))
        await rt.container_ops._on_exit(cid)
        assert rt.ctx.containers[cid].status.state == ContainerState.EXITED


def test_exit_releases_the_runtime_so_remove_has_nothing_to_wait_on(tmp_path: Path) -> None:
    rt, oci, _ = runtime(tmp_path)

    async def main() -> None:
        cids = add(rt, 3, ContainerState.RUNNING)  # many
        await exit_all(rt, oci, cids)
        await rt.container_ops.wait_released()
        assert oci.deleted == cids  # runc delete ran at the exit, once each
        assert all(rt.ctx.containers[c].status.released for c in cids)
        # The mark is stored: a restarted daemon does not delete again either.
        again, _, _ = runtime(tmp_path)
        again.ctx.load()
        assert all(again.ctx.containers[c].status.released for c in cids)
        for cid in cids:
            await rt.remove_container(cid)
        assert oci.deleted == cids  # no runc work in Remove
        await rt.container_ops.wait_removed()
        assert journals(rt) == [] and not rt.ctx.store.list_containers()

    asyncio.run(main())


def test_remove_while_the_release_is_in_flight(tmp_path: Path) -> None:
    rt, oci, images = runtime(tmp_path)

    async def main() -> None:
        (cid,) = add(rt, 1, ContainerState.RUNNING)
        oci.pause = asyncio.Event()
        await exit_all(rt, oci, [cid])
        await rt.remove_container(cid)  # returns although runc delete has not finished
        assert cid not in rt.containers and oci.deleted == []
        with open(os.path.join(rt.ctx.s.root_dir, "removing", f"{cid}.json")) as f:
            assert json.load(f)["runtime"] == {"handler": "runc", "cgroup_parent": ""}
        oci.pause.set()
        await rt.container_ops.wait_removed()
        assert oci.deleted == [cid] and images.released == [cid] and journals(rt) == []

    asyncio.run(main())


def test_failed_release_leaves_the_delete_to_remove(tmp_path: Path) -> None:
    rt, oci, _ = runtime(tmp_path)

    async def main() -> None:
        (cid,) = add(rt, 1, ContainerState.RUNNING)
        oci.fail = 1
        await exit_all(rt, oci, [cid])
        await rt.container_ops.wait_released()
        assert oci.deleted == [] and not rt.ctx.containers[cid].status.released
        await rt.remove_container(cid)
        assert oci.deleted == [cid]  # before the call returned, as before this change

    asyncio.run(main())


def test_restart_finishes_a_journalled_release(tmp_path: Path) -> None:
    rt, oci, _ = runtime(tmp_path)

    async def main() -> None:
        cids = add(rt, 2, ContainerState.RUNNING)
        oci.pause = asyncio.Event()  # the daemon dies with both releases in flight
        await exit_all(rt, oci, cids)
        for cid in cids:
            await rt.remove_container(cid)
        assert oci.deleted == [] and len(journals(rt)) == 2
        # A journal whose runtime part is not ours to act on is dropped without acting on it.
        bad = "d" * 64
        with open(os.path.join(rt.ctx.s.root_dir, "removing", f"{bad}.json"), "w") as f:
            json.dump({"id": bad, "snapshot_key": bad, "image_volumes": [],
                       "runtime": {"handler": "runc", "cgroup_parent": "/x/../../etc"}}, f)

        again, oci2, _ = runtime(tmp_path)
        await again.start()
        assert sorted(oci2.deleted) == sorted(cids) and journals(again) == []

    asyncio.run(main())
