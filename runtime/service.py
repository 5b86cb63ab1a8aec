"""The runtime: pod sandboxes and containers over the store, runc/conmon, CNI and images.

``Runtime`` owns the in-memory caches (rebuilt from the store at start), the
per-object locks, the exit watchers and the event hub.  The lifecycle verbs live
in ``runtime/sandbox.py`` and ``runtime/container.py``; recovery after a restart
is ``Runtime.start``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from moorage.core.store import Store
from moorage.runtime import oci as ocimod
from moorage.runtime.container import ContainerOps
from moorage.runtime.events import EventHub
from moorage.runtime.sandbox import SandboxOps
from moorage.runtime.spec import HostLookups, RuntimeSpecConfig

log = logging.getLogger("moorage.runtime")


@dataclass
class RuntimeSettings:
    """What the runtime needs from the daemon config (plain values)."""

    root_dir: str
    state_dir: str
    handlers: dict[str, str]  # name -> binary path
    handler_roots: dict[str, str] = field(default_factory=dict)
    default_handler: str = "runc"
    conmon: str = "conmon"
    infra_binary: str = "/usr/bin/catatonit"
    cgroup_driver: str = "cgroupfs"
    default_cgroup_parent: str = "/moorage"
    netns_dir: str = "/run/moorage/netns"
    log_level: str = "info"
    exec_sync_max_output: int = 16 * 1024 * 1024
    spec: RuntimeSpecConfig = field(default_factory=RuntimeSpecConfig)


class Runtime(SandboxOps, ContainerOps):
    def __init__(self, settings: RuntimeSettings, store: Store, images: Any, cni: Any | None,
                 events: EventHub | None = None, host: HostLookups | None = None,
                 observe: Callable[[str, float], None] | None = None) -> None:
        self.s = settings
        self.store = store
        self.images = images
        self.cni = cni
        self.events = events or EventHub()
        self.events.bind(self)  # events carry the pod state at publish time
        self.host = host or HostLookups()
        self.observe = observe or (lambda op, secs: None)
        self.sandboxes: dict[str, Any] = {}
        self.containers: dict[str, Any] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._inflight: dict[str, asyncio.Future] = {}
        self._unclaimed: dict[str, str] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._exit_events: dict[str, asyncio.Event] = {}
        self._removing_sandboxes: set[str] = set()  # RemovePodSandbox in progress: no new containers
        self._runtimes: dict[str, ocimod.OCIRuntime] = {}
        for d in (self.sandbox_root(""), self.sandbox_state(""), self.container_state("")):
            os.makedirs(d, mode=0o711, exist_ok=True)

    # -- paths -------------------------------------------------------------------------

    def sandbox_root(self, sid: str) -> str:
        return os.path.join(self.s.root_dir, "sandboxes", sid)

    def sandbox_state(self, sid: str) -> str:
        return os.path.join(self.s.state_dir, "sandboxes", sid)

    def container_state(self, cid: str) -> str:
        return os.path.join(self.s.state_dir, "containers", cid)

    # -- runtime handlers ------------------------------------------------------------------

    def oci(self, handler: str) -> ocimod.OCIRuntime:
        name = handler or self.s.default_handler
        rt = self._runtimes.get(name)
        if rt is None:
            if name not in self.s.handlers:
                from moorage.core.errors import InvalidArgument

                known = ", ".join(sorted(self.s.handlers))
                raise InvalidArgument(f"unknown runtime handler {name!r}; configured handlers: {known}")
            h = ocimod.RuntimeHandler(name, self.s.handlers[name], self.s.handler_roots.get(name) or None)
            rt = ocimod.OCIRuntime(h, os.path.join(self.s.state_dir, "oci"), self.s.conmon, self.s.log_level,
                                   systemd_cgroup=self.s.cgroup_driver == "systemd")
            self._runtimes[name] = rt
        return rt

    # -- helpers shared by sandboxes and containers -------------------------------------------

    def lock(self, obj_id: str) -> asyncio.Lock:
        return self._locks[obj_id]

    async def timed(self, op: str, aw: Awaitable, **attrs: Any) -> Any:
        """Await ``aw`` as operation ``op``: a duration sample and a child span (``oci_create`` -> ``oci.create``)."""
        from opentelemetry import trace

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with trace.get_tracer("moorage").start_as_current_span(op.replace("_", ".", 1), attributes={"moorage.operation": op, **attrs}):
            try:
                return await aw
            finally:
                self.observe(op, loop.time() - t0)

    async def dedup(self, name: str, work: Callable[[], Awaitable[str]]) -> str:
        """Run ``work`` once per name: a retry with the same name joins the call in flight.

        If the first caller went away (the kubelet timed out) and the work then
        succeeded, its result is kept for the retry, which returns it instead of
        failing with "name in use" (as CRI-O does).
        """
        unclaimed = self._unclaimed.pop(name, None)
        if unclaimed is not None and (unclaimed in self.sandboxes or unclaimed in self.containers):
            return unclaimed
        fut = self._inflight.get(name)
        if fut is None:
            fut = asyncio.ensure_future(work())
            self._inflight[name] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(name, None))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            def keep(f: asyncio.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._unclaimed[name] = f.result()

            fut.add_done_callback(keep)
            raise

    def watch_exit(self, obj_id: str, handler: str, on_exit: Callable[[str], Awaitable[None]]) -> None:
        """Call ``on_exit(id)`` once the process of ``obj_id`` has exited."""
        if obj_id in self._watchers:
            return
        ev = self._exit_events.setdefault(obj_id, asyncio.Event())
        ev.clear()

        async def watch() -> None:
            try:
                try:
                    await self.oci(handler).wait_exit(obj_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("exit watcher for %s failed", obj_id)
                await on_exit(obj_id)
            finally:
                # Also when cancelled (the object was removed, or the daemon stops): whoever
                # waits in wait_exited must not wait for an exit nobody will record.
                if self._watchers.get(obj_id) is task:
                    self._watchers.pop(obj_id, None)
                ev.set()

        task = asyncio.ensure_future(watch())
        self._watchers[obj_id] = task

    def forget_watcher(self, obj_id: str) -> None:
        """Stop watching ``obj_id`` (its exit was recorded otherwise) and release its waiters."""
        watcher = self._watchers.pop(obj_id, None)
        if watcher is not None:
            watcher.cancel()
        ev = self._exit_events.get(obj_id)
        if ev is not None:
            ev.set()

    async def wait_exited(self, obj_id: str, timeout: float | None) -> bool:
        """Wait until the exit of ``obj_id`` has been recorded; False on timeout."""
        ev = self._exit_events.get(obj_id)
        if ev is None or obj_id not in self._watchers:
            return True
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # -- lifecycle of the runtime itself ---------------------------------------------------------

    async def start(self) -> None:
        """Load the store and reconcile it with what is really running (after a restart)."""
        for sb in self.store.list_sandboxes():
            self.sandboxes[sb.id] = sb
        for c in self.store.list_containers():
            self.containers[c.id] = c
        for sb in list(self.sandboxes.values()):
            try:
                await self.recover_sandbox(sb)
            except Exception:
                log.exception("recovering sandbox %s failed", sb.id)
        for c in list(self.containers.values()):
            try:
                await self.recover_container(c)
            except Exception:
                log.exception("recovering container %s failed", c.id)
        try:
            self.recover_exec_sessions()
        except Exception:
            log.exception("reaping leftover exec sessions failed")
        self.collect_stale_netns()
        log.info("runtime recovered", extra={"fields": {"sandboxes": len(self.sandboxes),
                                                          "containers": len(self.containers)}})

    async def stop(self) -> None:
        # Containers keep running: conmon supervises them without us.
        for t in list(self._watchers.values()):
            t.cancel()
        for t in list(self._watchers.values()):
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._watchers.clear()
        for rt in self._runtimes.values():
            close = getattr(rt, "close", None)
            if close is not None:
                res = close()
                if asyncio.iscoroutine(res):
                    await res

    def states(self) -> tuple[dict[str, int], dict[str, int]]:
        sb: dict[str, int] = defaultdict(int)
        ct: dict[str, int] = defaultdict(int)
        for s in self.sandboxes.values():
            sb[s.state] += 1
        for c in self.containers.values():
            ct[c.state] += 1
        return dict(sb), dict(ct)
