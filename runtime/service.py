"""The runtime: pod sandboxes and containers over the store, runc/conmon, CNI and images.

``Runtime`` is a facade the CRI layer calls.  It composes one ``RuntimeContext``
(runtime/context.py: store, indexes, locks, exit watchers, the retry-safe
create) with ``Sandboxes`` (runtime/sandbox.py) and ``Containers``
(runtime/container.py), and does the pod-wide verbs that need both (stopping or
removing a sandbox stops or removes its containers first).  Recovery after a
restart is ``Runtime.start``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable

from moorage.core.errors import NotFound
from moorage.core.store import Store
from moorage.runtime.container import Containers
from moorage.runtime.context import RuntimeContext, RuntimeSettings
from moorage.runtime.events import EventHub
from moorage.runtime.features import FeatureProbe
from moorage.runtime.model import ContainerConfig, LinuxContainerResources, PodSandboxConfig
from moorage.runtime.oci import OCIRuntime, OCIRuntimeAPI
from moorage.runtime.ports import ImageProvider, LifecycleHooks, PodNetwork
from moorage.runtime.records import Container, ContainerState, Sandbox, SandboxState
from moorage.runtime.sandbox import Sandboxes
from moorage.runtime.spec import HostLookups

__all__ = ["Runtime", "RuntimeSettings"]

log = logging.getLogger("moorage.runtime")


class Runtime:
    def __init__(self, settings: RuntimeSettings, store: Store, images: ImageProvider, cni: PodNetwork | None,
                 events: EventHub | None = None, host: HostLookups | None = None,
                 observe: Callable[[str, float], None] | None = None, hooks: LifecycleHooks | None = None) -> None:
        self.ctx = RuntimeContext(settings, store, images, cni, events or EventHub(), host or HostLookups(),
                                  observe or (lambda op, secs: None), hooks)
        self.sandbox_ops = Sandboxes(self.ctx)
        self.container_ops = Containers(self.ctx)
        self.events.bind(self.capture_pod)  # events carry the pod state at publish time

    # -- what the CRI layer reads ---------------------------------------------------------------

    @property
    def s(self) -> RuntimeSettings:
        return self.ctx.s

    @property
    def events(self) -> EventHub:
        return self.ctx.events

    @property
    def images(self) -> ImageProvider:
        return self.ctx.images

    @property
    def sandboxes(self) -> dict[str, Sandbox]:
        return self.ctx.sandboxes

    @property
    def containers(self) -> dict[str, Container]:
        return self.ctx.containers

    @property
    def features(self) -> FeatureProbe:
        """What each runtime handler can do (probed once): the features Status advertises."""
        return self.ctx.features

    def oci(self, handler: str) -> OCIRuntimeAPI:
        """The OCI runtime adapter of ``handler`` (exec and attach sessions use it directly)."""
        return self.ctx.oci(handler)

    def images_in_use(self) -> set[str]:
        """Ids of the images containers were created from (image GC keeps them)."""
        return {c.metadata.image_ref for c in self.ctx.containers.values()}

    def layer_tokens(self) -> dict[str, object]:
        """Snapshot key -> its container's status object, which is replaced on every change of
        state: the image service measures a writable layer again when its token changes."""
        return {(c.metadata.snapshot_key or c.id): c.status for c in self.ctx.containers.values()}

    def set_log_level(self, level: str) -> None:
        """conmon's log level for containers created from now on (a daemon reload)."""
        self.ctx.s.log_level = level
        for rt in self.ctx.runtimes.values():
            if isinstance(rt, OCIRuntime):
                rt.log_level = level.lower()

    def capture_pod(self, sandbox_id: str) -> tuple[Sandbox | None, tuple[Container, ...]]:
        """Read-only snapshots of a sandbox and of its listable containers, now."""
        sb = self.ctx.sandboxes.get(sandbox_id)
        if sb is None:
            return None, ()
        ctrs = [c for c in self.container_ops.query(sandbox_id=sandbox_id) if c.metadata.sandbox_id == sandbox_id]
        return sb.snapshot(), tuple(c.snapshot() for c in ctrs)

    # -- sandboxes -------------------------------------------------------------------------------

    async def run_sandbox(self, cfg: PodSandboxConfig, handler: str = "") -> str:
        try:
            return await self.sandbox_ops.run(cfg, handler)
        finally:
            await self.ctx.durable()

    def get_sandbox(self, sid: str) -> Sandbox:
        return self.ctx.get_sandbox(sid)

    async def stop_sandbox(self, sid: str) -> None:
        rec = self.ctx.get_sandbox(sid)
        try:
            for c in [c for c in self.ctx.containers.values() if c.metadata.sandbox_id == rec.id]:
                await self.container_ops.stop(c.id, 0)
            await self.sandbox_ops.stop(rec)
        finally:
            await self.ctx.durable()

    async def remove_sandbox(self, sid: str) -> None:
        try:
            rec = self.ctx.get_sandbox(sid)
        except NotFound:
            return  # the CRI asks Remove of an unknown sandbox to succeed
        # Mark it first (under its lock, which CreateContainer takes for its last check): a
        # container created from here on is refused, and every earlier one is listed below.
        async with self.ctx.lock(rec.id):
            self.ctx.removing_sandboxes.add(rec.id)
        try:
            for c in [c for c in self.ctx.containers.values() if c.metadata.sandbox_id == rec.id]:
                await self.container_ops.remove(c.id)
            await self.sandbox_ops.remove(rec)
        finally:
            self.ctx.removing_sandboxes.discard(rec.id)
            await self.ctx.durable()

    async def update_sandbox_resources(self, sid: str, overhead: LinuxContainerResources | None,
                                       resources: LinuxContainerResources | None) -> None:
        try:
            await self.sandbox_ops.update_resources(self.ctx.get_sandbox(sid), overhead, resources)
        finally:
            await self.ctx.durable()

    def sandbox_status(self, sid: str, verbose: bool = False) -> tuple[Sandbox, dict[str, str]]:
        return self.sandbox_ops.status(sid, verbose)

    def list_sandboxes(self, id_prefix: str = "", state: SandboxState | None = None,
                       labels: dict[str, str] | None = None) -> list[Sandbox]:
        return self.sandbox_ops.query(id_prefix, state, labels)

    # -- containers ------------------------------------------------------------------------------

    async def create_container(self, sandbox_id: str, cfg: ContainerConfig) -> str:
        try:
            return await self.container_ops.create(sandbox_id, cfg)
        finally:
            await self.ctx.durable()

    async def start_container(self, cid: str) -> None:
        try:
            await self.container_ops.start(cid)
        finally:
            await self.ctx.durable()

    async def stop_container(self, cid: str, timeout: int) -> None:
        try:
            await self.container_ops.stop(cid, timeout)
        finally:
            await self.ctx.durable()

    async def remove_container(self, cid: str) -> None:
        try:
            await self.container_ops.remove(cid)
        finally:
            await self.ctx.durable()

    def get_container(self, cid: str) -> Container:
        return self.ctx.get_container(cid)

    def container_status(self, cid: str, verbose: bool = False) -> tuple[Container, dict[str, str]]:
        return self.container_ops.status(cid, verbose)

    def list_containers(self, id_prefix: str = "", state: ContainerState | None = None, sandbox_id: str = "",
                        labels: dict[str, str] | None = None) -> list[Container]:
        return self.container_ops.query(id_prefix, state, sandbox_id, labels)

    def running_container(self, cid: str) -> Container:
        return self.container_ops.running(cid)

    def attachable_container(self, cid: str, stdin: bool) -> Container:
        return self.container_ops.attachable(cid, stdin)

    async def exec_sync(self, cid: str, cmd: list[str], timeout: int) -> tuple[int, bytes, bytes]:
        return await self.container_ops.exec_sync(cid, cmd, timeout)

    async def update_resources(self, cid: str, res: LinuxContainerResources) -> None:
        try:
            await self.container_ops.update_resources(cid, res)
        finally:
            await self.ctx.durable()

    async def update_resources_unhooked(self, cid: str, res: LinuxContainerResources) -> None:
        """An update an NRI plugin asked: UpdateContainerResources' path without the NRI hooks."""
        await self.container_ops.update_resources(cid, res, hooks=False)

    def container_spec(self, cid: str) -> dict | None:
        """The OCI spec a container was created with (its bundle's config.json), if readable."""
        try:
            with open(os.path.join(self.ctx.container_state(cid), "bundle", "config.json")) as f:
                spec: dict = json.load(f)
        except (OSError, ValueError):
            return None
        return spec

    async def reopen_log(self, cid: str) -> None:
        await self.container_ops.reopen_log(cid)

    # -- lifecycle of the runtime itself ---------------------------------------------------------

    async def start(self) -> None:
        """Load the store and reconcile it with what is really running (after a restart)."""
        self.ctx.load()
        await self.container_ops.finish_removals()
        for sb in list(self.ctx.sandboxes.values()):
            try:
                await self.sandbox_ops.recover(sb)
            except Exception:
                log.exception("recovering sandbox %s failed", sb.id)
        for c in list(self.ctx.containers.values()):
            try:
                await self.container_ops.recover(c)
            except Exception:
                log.exception("recovering container %s failed", c.id)
        try:
            self.container_ops.recover_exec_sessions()
        except Exception:
            log.exception("reaping leftover exec sessions failed")
        self.sandbox_ops.collect_stale_netns()
        await self.ctx.durable()
        log.info("runtime recovered", extra={"fields": {"sandboxes": len(self.ctx.sandboxes),
                                                          "containers": len(self.ctx.containers)}})

    async def stop(self) -> None:
        # Removals in flight finish (a crash instead leaves them to the journal and the next start).
        await self.container_ops.wait_removed()
        await self.container_ops.wait_released()  # else the next Remove of these does it
        # Containers keep running: conmon supervises them without us.
        await self.ctx.stop_watchers()
        await self.ctx.durable()  # exits recorded since the last call

    def states(self) -> tuple[dict[str, int], dict[str, int]]:
        """Sandboxes and containers by state (the state metrics)."""
        sb = Counter(s.status.state.value for s in self.ctx.sandboxes.values())
        ct = Counter(c.status.state.value for c in self.ctx.containers.values())
        return dict(sb), dict(ct)
