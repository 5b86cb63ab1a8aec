"""What sandboxes and containers share: settings, store, indexes, locks, exit watchers.

``Sandboxes`` (runtime/sandbox.py) and ``Containers`` (runtime/container.py) each
get one ``RuntimeContext``; neither imports the other nor the ``Runtime`` facade
(runtime/service.py), which composes them.  The context owns the in-memory
indexes (rebuilt from the store at start), the per-object locks, the retry-safe
create (``dedup``) and the exit watchers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from moorage.core.errors import AlreadyExists, InvalidArgument, MoorageError, NotFound
from moorage.core.fs import restrict_file
from moorage.core.store import Store, now_ns
from moorage.runtime import cdi as cdimod
from moorage.runtime import cgroups as cgroupsmod
from moorage.runtime import features as featuresmod
from moorage.runtime import oci as ocimod
from moorage.runtime import records
from moorage.runtime.events import EventHub
from moorage.runtime.ports import ImageProvider, LifecycleHooks, NoHooks, PodNetwork
from moorage.runtime.records import (
    Container,
    ContainerMeta,
    ContainerStatus,
    Sandbox,
    SandboxMeta,
    SandboxStatus,
)
from moorage.runtime.spec import HostLookups, RuntimeSpecConfig, cgroups_path

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
    #: Features never advertised (runtime/features.py names), e.g. to work around a kubelet.
    disabled_features: tuple[str, ...] = ()
    #: Resolve CDI device requests (False: they are ignored, logged).
    enable_cdi: bool = True
    #: CDI spec directories, lowest precedence first.
    cdi_spec_dirs: tuple[str, ...] = cdimod.DEFAULT_SPEC_DIRS
    #: Pods without a shared PID namespace (or a user namespace) get no infra process: their
    #: namespaces are pinned files (False: every pod runs one, as before).
    drop_infra: bool = True


LOST_STATE_MESSAGE = "container state lost (conmon and runtime state are gone, e.g. after a reboot)"
CONMON_LOST_MESSAGE = ("its conmon exited while the process still ran, so nothing could collect its output "
                       "or exit any more; moorage killed it (SIGKILL)")
CONMON_GONE_MESSAGE = "its conmon exited without recording the exit; the exit code is unknown"


@dataclass(frozen=True)
class ExitOutcome:
    """How a container's (or an infra's) process ended, as far as anyone can tell."""

    code: int
    finished_at: int  # ns
    reason: str  # CRI reason: Completed, Error, OOMKilled
    message: str = ""


def error_text(exc: BaseException) -> str:
    """An exception as a person reads it in a status message."""
    return exc.message if isinstance(exc, MoorageError) else (str(exc) or type(exc).__name__)


def _explain_failed_holder(name: str, recs: Iterable[Sandbox | Container], remove_verb: str) -> None:
    """If ``name`` is held by an object whose creation failed and could not be cleaned up,
    raise ALREADY_EXISTS saying so and naming the id to remove."""
    for r in recs:
        if r.name == name and r.status.reason == records.CREATE_FAILED:
            raise AlreadyExists(
                f"{r.kind} name {name!r} is held by {r.kind} {r.id}, whose creation failed and could not be "
                f"cleaned up ({r.status.message}); remove it with {remove_verb} {r.id}, then retry")


class RuntimeContext:
    def __init__(self, settings: RuntimeSettings, store: Store, images: ImageProvider, network: PodNetwork | None,
                 events: EventHub, host: HostLookups, observe: Callable[[str, float], None],
                 hooks: LifecycleHooks | None = None) -> None:
        self.s = settings
        #: NRI's lifecycle hooks (runtime/ports.py); no-ops when NRI is off
        self.hooks: LifecycleHooks = hooks if hooks is not None else NoHooks()
        self.store = store
        self.images = images
        self.network = network
        self.events = events
        self.host = host
        self.observe = observe
        self.sandboxes: dict[str, Sandbox] = {}
        self.containers: dict[str, Container] = {}
        self.removing_sandboxes: set[str] = set()  # RemovePodSandbox in progress: no new containers
        self.runtimes: dict[str, ocimod.OCIRuntimeAPI] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self._unclaimed: dict[str, str] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._exit_events: dict[str, asyncio.Event] = {}
        self.background: set[asyncio.Task[None]] = set()
        #: What each handler can do (probed once, on first use).
        self.features = featuresmod.FeatureProbe(settings.handlers, settings.default_handler,
                                                 settings.disabled_features, idmap_path=settings.root_dir)
        #: The CDI spec directories, re-read when they change (None: CDI is disabled).
        self.cdi = cdimod.SpecDirs(settings.cdi_spec_dirs) if settings.enable_cdi else None
        for d in (self.sandbox_root(""), self.sandbox_state(""), self.container_state("")):
            os.makedirs(d, mode=0o711, exist_ok=True)
        # Bundles stay searchable (0711: a pod's user namespace reaches its rootfs through them),
        # but their config.json, which holds the env, is root-only; older versions wrote it 0644.
        for d in (self.sandbox_state(""), self.container_state("")):
            for name in os.listdir(d):
                restrict_file(os.path.join(d, name, "bundle", "config.json"))

    # -- paths -------------------------------------------------------------------------

    def sandbox_root(self, sid: str) -> str:
        return os.path.join(self.s.root_dir, "sandboxes", sid)

    def sandbox_state(self, sid: str) -> str:
        return os.path.join(self.s.state_dir, "sandboxes", sid)

    def container_state(self, cid: str) -> str:
        return os.path.join(self.s.state_dir, "containers", cid)

    # -- runtime handlers ------------------------------------------------------------------

    def oci(self, handler: str) -> ocimod.OCIRuntimeAPI:
        name = handler or self.s.default_handler
        rt = self.runtimes.get(name)
        if rt is None:
            if name not in self.s.handlers:
                known = ", ".join(sorted(self.s.handlers))
                raise InvalidArgument(f"unknown runtime handler {name!r}; configured handlers: {known}")
            h = ocimod.RuntimeHandler(name, self.s.handlers[name], self.s.handler_roots.get(name) or None)
            rt = ocimod.OCIRuntime(h, os.path.join(self.s.state_dir, "oci"), self.s.conmon, self.s.log_level,
                                   systemd_cgroup=self.s.cgroup_driver == "systemd")
            self.runtimes[name] = rt
        return rt

    # -- records: the store through the one codec ----------------------------------------------

    # Records are committed without an fsync; the Runtime facade makes them durable (``durable``)
    # before each call returns, and RunPodSandbox before it writes the pod's files under root_dir.
    # See moorage/core/store.py.

    def _persist_sandbox(self, meta: SandboxMeta, status: SandboxStatus) -> None:
        self.store.update_sandbox(records.sandbox_row(meta, status), durable=False)

    def _persist_container(self, meta: ContainerMeta, status: ContainerStatus) -> None:
        self.store.update_container(records.container_row(meta, status), durable=False)

    async def durable(self) -> None:
        """Put every record change made so far on disk (one shared fsync, off the event loop)."""
        if self.store.unsynced():
            await asyncio.to_thread(self.store.sync)

    def add_sandbox(self, meta: SandboxMeta, status: SandboxStatus) -> Sandbox:
        """Store a new sandbox (reserving its name: ALREADY_EXISTS naming the holder) and index it.
        Not yet durable: the caller awaits ``durable`` before it makes files for it."""
        try:
            self.store.add_sandbox(records.sandbox_row(meta, status), durable=False)
        except AlreadyExists:
            _explain_failed_holder(meta.name, self.sandboxes.values(), "RemovePodSandbox")
            raise
        rec = Sandbox(meta, status, self._persist_sandbox)
        self.sandboxes[meta.id] = rec
        return rec

    def add_container(self, meta: ContainerMeta, status: ContainerStatus) -> Container:
        """Store a new container (reserving its name: ALREADY_EXISTS naming the holder) and index it.
        Not yet durable (its snapshot's record, written durably, and the facade's barrier follow)."""
        try:
            self.store.add_container(records.container_row(meta, status), durable=False)
        except AlreadyExists:
            _explain_failed_holder(meta.name, self.containers.values(), "RemoveContainer")
            raise
        rec = Container(meta, status, self._persist_container)
        self.containers[meta.id] = rec
        return rec

    def load(self) -> None:
        """Fill the indexes from the store (old rows are decoded too)."""
        for row in self.store.list_sandboxes():
            meta, status = records.decode_sandbox(row)
            self.sandboxes[meta.id] = Sandbox(meta, status, self._persist_sandbox)
        for row in self.store.list_containers():
            cmeta, cstatus = records.decode_container(row)
            self.containers[cmeta.id] = Container(cmeta, cstatus, self._persist_container)

    def forget_sandbox(self, sid: str) -> None:
        self.store.delete_sandbox(sid, durable=False)
        self.sandboxes.pop(sid, None)
        self._locks.pop(sid, None)
        self._exit_events.pop(sid, None)

    def forget_container(self, cid: str, stored: bool = True) -> None:
        """Drop a container from the indexes and (``stored``) its row from the store."""
        if stored:
            self.store.delete_container(cid, durable=False)
        self.containers.pop(cid, None)
        self._locks.pop(cid, None)
        ev = self._exit_events.pop(cid, None)
        if ev is not None:
            ev.set()  # a StopContainer waiting for this exit: the container is gone

    def get_sandbox(self, sid: str) -> Sandbox:
        """By full id or unique prefix."""
        rec = self.sandboxes.get(sid)
        if rec is not None:
            return rec
        if sid:
            matches = [s for s in self.sandboxes if s.startswith(sid)]
            if len(matches) == 1:
                return self.sandboxes[matches[0]]
            if len(matches) > 1:
                raise InvalidArgument(f"pod sandbox id prefix {sid!r} is ambiguous ({len(matches)} sandboxes)")
        raise NotFound(f"pod sandbox {sid!r} not found")

    def get_container(self, cid: str) -> Container:
        """By full id or unique prefix."""
        rec = self.containers.get(cid)
        if rec is not None:
            return rec
        if cid:
            matches = [c for c in self.containers if c.startswith(cid)]
            if len(matches) == 1:
                return self.containers[matches[0]]
            if len(matches) > 1:
                raise InvalidArgument(f"container id prefix {cid!r} is ambiguous ({len(matches)} containers)")
        raise NotFound(f"container {cid!r} not found")

    # -- helpers shared by sandboxes and containers -------------------------------------------

    def lock(self, obj_id: str) -> asyncio.Lock:
        return self._locks[obj_id]

    async def timed(self, op: str, aw: Awaitable[Any], **attrs: Any) -> Any:
        """Await ``aw`` as operation ``op``: a duration sample and a child span (``oci_create`` -> ``oci.create``)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with trace.get_tracer("moorage").start_as_current_span(op.replace("_", ".", 1),
                                                               attributes={"moorage.operation": op, **attrs}):
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
            def keep(f: asyncio.Future[str]) -> None:
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
                except MoorageError as e:  # conmon went without an exit file: on_exit asks runc
                    log.warning("exit watcher for %s: %s", obj_id, e.message)
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

    def cancel_watcher(self, obj_id: str) -> None:
        """Stop watching ``obj_id`` without releasing its waiters (the object goes away next)."""
        watcher = self._watchers.pop(obj_id, None)
        if watcher is not None:
            watcher.cancel()

    def forget_watcher(self, obj_id: str) -> None:
        """Stop watching ``obj_id`` (its exit was recorded otherwise) and release its waiters."""
        self.cancel_watcher(obj_id)
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

    async def settle_exit(self, obj_id: str, handler: str) -> ExitOutcome | None:
        """The truth about a process whose exit watcher returned, or that nobody watches any more.

        The one rule for a live exit watcher and for recovery alike: conmon's exit file if it
        wrote one; while conmon still supervises the process, None (keep watching).  With no
        conmon, runc decides: a process runc still runs is killed, because without its conmon
        its output goes nowhere and its exit would never be recorded, and a kubelet would start
        a replacement beside it (reported as exit 137 and why); one runc knows as stopped
        exited unseen (255); one runc does not know is lost (255, e.g. after a reboot).
        """
        rt = self.oci(handler)
        st = rt.exit_status(obj_id)
        if st is None and rt.conmon_pid(obj_id) is not None:
            return None
        st = st or rt.exit_status(obj_id)  # conmon may have written it just before it went
        if st is not None:
            reason = "OOMKilled" if st.oom_killed else ("Completed" if st.code == 0 else "Error")
            return ExitOutcome(st.code, int(st.finished_at.timestamp() * 1e9), reason)
        try:
            state = await rt.state(obj_id)
        except NotFound:
            return ExitOutcome(255, now_ns(), "Error", LOST_STATE_MESSAGE)
        except MoorageError as e:
            log.warning("state of %s with its conmon gone: %s", obj_id, e.message)
            state = None
        if state is not None and state.status == "stopped":
            return ExitOutcome(255, now_ns(), "Error", CONMON_GONE_MESSAGE)
        log.warning("conmon of %s is gone but the process still runs; killing it", obj_id)
        await self.end_process(obj_id, handler)
        return ExitOutcome(137, now_ns(), "Error", CONMON_LOST_MESSAGE)

    async def end_process(self, obj_id: str, handler: str, timeout: float = 10.0) -> bool:
        """SIGKILL what runc runs for ``obj_id`` and wait until runc says it stopped (or forgot it).

        Used where no conmon will report the exit, so "stopped" must come from runc itself;
        False if it still ran after ``timeout``.
        """
        rt = self.oci(handler)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        killed = False
        while True:
            try:
                state = await rt.state(obj_id)
            except NotFound:
                return True
            except MoorageError as e:
                log.warning("state of %s: %s", obj_id, e.message)
                return False
            if state.status == "stopped":
                return True
            if loop.time() >= deadline:
                return False
            if not killed:
                try:
                    await rt.kill(obj_id, signal.SIGKILL)
                    killed = True
                except NotFound:
                    return True
                except MoorageError as e:
                    log.info("SIGKILL to %s: %s", obj_id, e.message)
            await asyncio.sleep(0.05)

    async def release_cgroup(self, obj_id: str, parent: str) -> None:
        """Remove the cgroup of ``obj_id`` under ``parent`` if the OCI runtime left it behind.

        ``runc delete`` removes it as a rule; a runtime interrupted by a daemon crash (its
        create or delete cut short) can leave the empty dirs, which nothing else would remove.
        Only the cgroupfs driver's paths are ours to remove; a cgroup with processes stays.
        """
        if self.s.cgroup_driver != "cgroupfs":
            return
        try:
            path = cgroups_path("cgroupfs", parent or self.s.default_cgroup_parent, obj_id)
            await asyncio.to_thread(cgroupsmod.remove_cgroup, path, attempts=10)
        except (MoorageError, OSError) as e:
            log.warning("removing the cgroup of %s: %s", obj_id, error_text(e))

    async def stop_watchers(self) -> None:
        for t in list(self._watchers.values()):
            t.cancel()
        for t in list(self._watchers.values()):
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._watchers.clear()
