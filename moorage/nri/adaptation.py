"""The runtime side of NRI: the plugin registry and the lifecycle hooks.

``Adaptation`` listens on the NRI socket for external plugins and launches the
pre-installed ones (``<plugin_path>/NN-name``, each with its end of a socketpair
and its config from ``<plugin_config_path>/NN-name.conf`` or ``name.conf``).  A
plugin registers, is configured (it answers which events it wants) and is
synchronized with every pod and container; from then on it gets the events it
subscribed to, in ascending index order.

It implements the runtime's ``LifecycleHooks`` port: the runtime never imports
this package.  A plugin that fails, hangs or disconnects never wedges the
daemon: each call has the request timeout, after which the plugin is dropped;
the CRI call goes on (as containerd's NRI does) or fails with
DEADLINE_EXCEEDED/UNAVAILABLE with ``fail_on_plugin_loss``.  A plugin that
answers a creation or update with an error fails that CRI call.

Synchronization and creations exclude each other (``SyncGate``): a pod or
container is either in a new plugin's Synchronize or gets its own event to
that plugin, never neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message

import moorage
from moorage.core.errors import DeadlineExceeded, FailedPrecondition, MoorageError, NotFound, Unavailable
from moorage.nri import convert, merge
from moorage.nri.api import api_pb2 as nri
from moorage.nri.plugin import IDX_RE, NAME_RE, Plugin, PluginLost, PluginRejected
from moorage.runtime.adjust import ContainerAdjustment
from moorage.runtime.model import LinuxContainerResources
from moorage.runtime.records import Container, ContainerState, Sandbox
from moorage.runtime.service import Runtime

log = logging.getLogger("moorage.nri")

#: the NRI version whose api.proto moorage speaks (told to plugins in Configure)
NRI_VERSION = "v0.12.1"
#: pods or containers per Synchronize message; the rest follow with more=true
SYNC_CHUNK = 256

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class NRISettings:
    enable: bool = True
    socket_path: str = "/var/run/nri/nri.sock"
    plugin_path: str = "/opt/nri/plugins"
    plugin_config_path: str = "/etc/nri/conf.d"
    registration_timeout: float = 5.0
    request_timeout: float = 2.0
    disable_connections: bool = False
    fail_on_plugin_loss: bool = False


class SyncGate:
    """Many creations at once, or one plugin synchronization (which waits for them and bars new ones)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._creating = 0
        self._syncing = False

    @contextlib.asynccontextmanager
    async def creating(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._syncing)
            self._creating += 1
        try:
            yield
        finally:
            async with self._cond:
                self._creating -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def synchronizing(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._syncing)
            self._syncing = True  # from here no new creation starts
            try:
                await self._cond.wait_for(lambda: self._creating == 0)
            except BaseException:
                self._syncing = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            async with self._cond:
                self._syncing = False
                self._cond.notify_all()


def parse_plugin_file(name: str) -> tuple[str, str] | None:
    """``NN-name`` -> (idx, name); None if the file is not named as NRI plugins are."""
    idx, sep, base = name.partition("-")
    if not sep or not IDX_RE.match(idx) or not NAME_RE.match(base):
        return None
    return idx, base


def discover_plugins(plugin_path: str) -> tuple[list[str], list[str]]:
    """Executables in ``plugin_path``: (those named NN-name, in launch order; the others, ignored)."""
    try:
        names = sorted(os.listdir(plugin_path))
    except OSError:
        return [], []
    good: list[str] = []
    bad: list[str] = []
    for fname in names:
        try:
            st = os.stat(os.path.join(plugin_path, fname))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            (good if parse_plugin_file(fname) is not None else bad).append(fname)
    return good, bad


class Adaptation:
    def __init__(self, settings: NRISettings) -> None:
        self.s = settings
        self._runtime: Runtime | None = None
        self._gate = SyncGate()
        self.plugins: list[Plugin] = []  # synchronized, in index order
        self._pending: set[Plugin] = set()
        self._server: asyncio.AbstractServer | None = None
        self._procs: dict[Plugin, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pods_stopped: set[str] = set()
        self._ctrs_stopped: set[str] = set()

    def attach(self, runtime: Runtime) -> None:
        """The runtime the plugins' own updates and evictions go to (built after this object)."""
        self._runtime = runtime

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "Adaptation.attach was not called"
        return self._runtime

    # -- start and stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.s.disable_connections:
            path = self.s.socket_path
            os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket of an earlier daemon
            self._server = await asyncio.start_unix_server(self._accept, path=path)
            os.chmod(path, 0o600)  # plugins can change every container: root only
            log.info("NRI listening", extra={"fields": {"socket": path}})
        await self._launch_preinstalled()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.s.socket_path)
            self._server = None
        for p in [*self.plugins, *self._pending]:
            p.close("runtime shutting down")
        self.plugins.clear()
        for proc in list(self._procs.values()):
            await _end_process(proc)
        self._procs.clear()
        for t in list(self._tasks):
            t.cancel()

    def state(self) -> dict[str, object]:
        """For Status verbose and ``moorage check``."""
        return {"enabled": True, "socket": "" if self.s.disable_connections else self.s.socket_path,
                "plugins": [p.qualified for p in self.plugins]}

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- plugins arriving ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plugin = Plugin(reader, writer, self._plugin_updates)
        await self._admit(plugin, config=None)

    async def _launch_preinstalled(self) -> None:
        good, bad = discover_plugins(self.s.plugin_path)
        for fname in bad:
            log.warning("NRI: ignoring %s in %s: plugin files are named NN-name (two-digit index)",
                        fname, self.s.plugin_path)
        for fname in good:
            parsed = parse_plugin_file(fname)
            assert parsed is not None
            try:
                await self._launch(os.path.join(self.s.plugin_path, fname), *parsed)
            except (OSError, MoorageError) as e:
                log.warning("NRI: launching plugin %s failed: %s", fname, e)

    def plugin_config(self, idx: str, name: str) -> str:
        for cand in (f"{idx}-{name}.conf", f"{name}.conf"):
            try:
                with open(os.path.join(self.s.plugin_config_path, cand)) as f:
                    return f.read(1 << 20)
            except FileNotFoundError:
                continue
        return ""

    async def _launch(self, path: str, idx: str, name: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = theirs.fileno()
            # As NRI launches plugins: only these three variables; the socket by fd number.
            env = {"NRI_PLUGIN_NAME": name, "NRI_PLUGIN_IDX": idx, "NRI_PLUGIN_SOCKET": str(fd)}
            proc = await asyncio.create_subprocess_exec(path, env=env, pass_fds=(fd,), stdin=asyncio.subprocess.DEVNULL,
                                                        start_new_session=True)
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        plugin = Plugin(reader, writer, self._plugin_updates, name=name, idx=idx, launched=True)
        self._procs[plugin] = proc
        log.info("NRI: launched plugin", extra={"fields": {"plugin": plugin.qualified, "pid": proc.pid}})
        self._spawn(self._admit(plugin, config=self.plugin_config(idx, name)))

    async def _admit(self, plugin: Plugin, config: str | None) -> None:
        """Registration, Configure and Synchronize; then the plugin gets events until it goes."""
        self._pending.add(plugin)
        plugin.start()
        try:
            try:
                await asyncio.wait_for(plugin.registered.wait(), self.s.registration_timeout)
            except TimeoutError:
                raise PluginLost(f"plugin did not register within {self.s.registration_timeout:g}s") from None
            if config is None:
                config = self.plugin_config(plugin.idx, plugin.name)
            if any(p.qualified == plugin.qualified for p in self.plugins):
                raise PluginRejected(f"a plugin {plugin.qualified} is already registered")
            resp = await plugin.call("Configure", nri.ConfigureRequest(
                config=config, runtime_name="moorage", runtime_version=moorage.__version__,
                registration_timeout=int(self.s.registration_timeout * 1000),
                request_timeout=int(self.s.request_timeout * 1000), NRI_version=NRI_VERSION),
                nri.ConfigureResponse, self.s.request_timeout)
            valid = (1 << (nri.LAST - 1)) - 1
            plugin.events = (resp.events & valid) or valid
            async with self._gate.synchronizing():
                updates = await self._synchronize(plugin)
                plugin.ready = True
                self.plugins.append(plugin)
                self.plugins.sort(key=lambda p: (p.idx, p.name))
            log.info("NRI plugin ready", extra={"fields": {"plugin": plugin.qualified, "events": plugin.events}})
            if updates:
                self._spawn(self._apply_updates(plugin.qualified, updates, []))
        except (PluginLost, PluginRejected) as e:
            log.warning("NRI: plugin %s dropped: %s", plugin.qualified, e)
            plugin.close(str(e))
            self._pending.discard(plugin)
            await self._reap(plugin)
            return
        finally:
            self._pending.discard(plugin)
        await plugin.endpoint.wait_closed()
        self._drop(plugin, plugin.endpoint.close_reason or "disconnected")
        await self._reap(plugin)

    async def _synchronize(self, plugin: Plugin) -> list[nri.ContainerUpdate]:
        """Send every visible pod and container (in chunks); the synchronization is part of the
        registration, so it has the registration timeout (a plugin may take a while to take stock)."""
        rt = self.runtime
        pods = [convert.pod(sb) for sb in rt.list_sandboxes()]
        ctrs = [convert.container(c, rt.container_spec(c.id)) for c in rt.list_containers()]
        updates: list[nri.ContainerUpdate] = []
        while True:
            req = nri.SynchronizeRequest(pods=pods[:SYNC_CHUNK], containers=ctrs[:SYNC_CHUNK])
            pods, ctrs = pods[SYNC_CHUNK:], ctrs[SYNC_CHUNK:]
            req.more = bool(pods or ctrs)
            resp = await plugin.call("Synchronize", req, nri.SynchronizeResponse, self.s.registration_timeout)
            updates += resp.update
            if not req.more:
                return updates

    def _drop(self, plugin: Plugin, reason: str) -> None:
        plugin.close(reason)
        if plugin in self.plugins:
            self.plugins.remove(plugin)
            # a plugin leaving on its own is ordinary; one dropped for a fault is not
            level = logging.INFO if reason == "connection closed by peer" else logging.WARNING
            log.log(level, "NRI: plugin %s gone: %s", plugin.qualified, reason)

    async def _reap(self, plugin: Plugin) -> None:
        proc = self._procs.pop(plugin, None)
        if proc is not None:
            await _end_process(proc)

    # -- calling the plugins ---------------------------------------------------------------------------

    def _lost(self, plugin: Plugin, e: PluginLost, fail: bool) -> None:
        self._drop(plugin, str(e))
        if fail and self.s.fail_on_plugin_loss:
            cls = DeadlineExceeded if "did not answer" in str(e) else Unavailable
            raise cls(f"NRI: {e}; the plugin was dropped")

    async def _each(self, event: int, method: str, req: Message, resp_type: type[M], *,
                    fail: bool) -> list[tuple[str, M]]:
        """Call every subscribed plugin in order: its answers.  With ``fail``, an error answer fails
        the caller (FAILED_PRECONDITION); otherwise it is logged."""
        out: list[tuple[str, M]] = []
        for p in list(self.plugins):
            if not p.subscribed(event) or p not in self.plugins:
                continue
            try:
                out.append((p.qualified, await p.call(method, req, resp_type, self.s.request_timeout)))
            except PluginLost as e:
                self._lost(p, e, fail)
            except PluginRejected as e:
                if fail:
                    raise FailedPrecondition(str(e)) from None
                log.warning("NRI: %s", e)
        return out

    # -- LifecycleHooks (runtime/ports.py) --------------------------------------------------------------

    def creating(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._gate.creating()

    async def run_pod_sandbox(self, sb: Sandbox) -> None:
        self._pods_stopped.discard(sb.id)
        await self._each(nri.RUN_POD_SANDBOX, "RunPodSandbox", nri.RunPodSandboxRequest(pod=convert.pod(sb)),
                         nri.RunPodSandboxResponse, fail=True)

    async def stop_pod_sandbox(self, sb: Sandbox) -> None:
        if sb.id in self._pods_stopped:
            return  # once per pod: a second StopPodSandbox changes nothing
        self._pods_stopped.add(sb.id)
        await self._each(nri.STOP_POD_SANDBOX, "StopPodSandbox", nri.StopPodSandboxRequest(pod=convert.pod(sb)),
                         nri.StopPodSandboxResponse, fail=False)

    async def remove_pod_sandbox(self, sb: Sandbox) -> None:
        self._pods_stopped.discard(sb.id)
        await self._each(nri.REMOVE_POD_SANDBOX, "RemovePodSandbox", nri.RemovePodSandboxRequest(pod=convert.pod(sb)),
                         nri.RemovePodSandboxResponse, fail=False)

    async def update_pod_sandbox(self, sb: Sandbox, overhead: LinuxContainerResources | None,
                                 resources: LinuxContainerResources | None) -> None:
        req = nri.UpdatePodSandboxRequest(pod=convert.pod(sb))
        if overhead is not None:
            req.overhead_linux_resources.CopyFrom(convert.resources_from_model(overhead))
        if resources is not None:
            req.linux_resources.CopyFrom(convert.resources_from_model(resources))
        await self._each(nri.UPDATE_POD_SANDBOX, "UpdatePodSandbox", req, nri.UpdatePodSandboxResponse, fail=True)

    async def post_update_pod_sandbox(self, sb: Sandbox) -> None:
        await self._each(nri.POST_UPDATE_POD_SANDBOX, "PostUpdatePodSandbox",
                         nri.PostUpdatePodSandboxRequest(pod=convert.pod(sb)), nri.PostUpdatePodSandboxResponse,
                         fail=False)

    async def create_container(self, sb: Sandbox, ctr: Container, spec: dict) -> ContainerAdjustment | None:
        self._ctrs_stopped.discard(ctr.id)
        if not self.plugins:
            return None
        req = nri.CreateContainerRequest(pod=convert.pod(sb), container=convert.container(ctr, spec))
        req.container.state = nri.CONTAINER_CREATED
        result = merge.Result(ctr.id)
        for plugin, resp in await self._each(nri.CREATE_CONTAINER, "CreateContainer", req,
                                             nri.CreateContainerResponse, fail=True):
            result.adjust_with(plugin, resp.adjust)
            result.update_with(plugin, [u for u in resp.update if u.container_id != ctr.id])
            result.evict_with(plugin, resp.evict)
        await self._validate(req, result)
        bad = convert.unsupported(result.adjust)
        if bad:
            raise FailedPrecondition(f"NRI adjustment of container {ctr.id} asks for what moorage does not "
                                     f"support: {', '.join(bad)}")
        adj = convert.adjustment(result.adjust)
        if result.updates or result.evictions:
            self._spawn(self._apply_updates("CreateContainer", list(result.updates.values()), result.evictions))
        return adj

    async def _validate(self, req: nri.CreateContainerRequest, result: merge.Result) -> None:
        """Validating plugins (NRI's ValidateContainerAdjustment) see the merged result and may reject it."""
        validators = [p for p in self.plugins if p.subscribed(nri.VALIDATE_CONTAINER_ADJUSTMENT)]
        if not validators:
            return
        vreq = nri.ValidateContainerAdjustmentRequest(
            pod=req.pod, container=req.container, adjust=result.adjust, update=list(result.updates.values()),
            plugins=[nri.PluginInstance(name=p.name, index=p.idx) for p in self.plugins
                     if p.subscribed(nri.CREATE_CONTAINER)])
        for name, resp in await self._each(nri.VALIDATE_CONTAINER_ADJUSTMENT, "ValidateContainerAdjustment", vreq,
                                           nri.ValidateContainerAdjustmentResponse, fail=True):
            if resp.reject:
                raise FailedPrecondition(f"NRI validator {name} rejected the adjustment of container "
                                         f"{req.container.id}: {convert.clean_text(resp.reason)}")

    async def post_create_container(self, sb: Sandbox, ctr: Container) -> None:
        await self._notify(nri.POST_CREATE_CONTAINER, "PostCreateContainer", nri.PostCreateContainerRequest,
                           nri.PostCreateContainerResponse, sb, ctr)

    async def start_container(self, sb: Sandbox, ctr: Container) -> None:
        await self._notify(nri.START_CONTAINER, "StartContainer", nri.StartContainerRequest,
                           nri.StartContainerResponse, sb, ctr)

    async def post_start_container(self, sb: Sandbox, ctr: Container) -> None:
        await self._notify(nri.POST_START_CONTAINER, "PostStartContainer", nri.PostStartContainerRequest,
                           nri.PostStartContainerResponse, sb, ctr)

    async def update_container(self, sb: Sandbox, ctr: Container,
                               res: LinuxContainerResources) -> LinuxContainerResources:
        if not self.plugins:
            return res
        req = nri.UpdateContainerRequest(pod=convert.pod(sb), container=self._container(ctr),
                                         linux_resources=convert.resources_from_model(res))
        result = merge.Result(ctr.id)
        for plugin, resp in await self._each(nri.UPDATE_CONTAINER, "UpdateContainer", req,
                                             nri.UpdateContainerResponse, fail=True):
            result.update_with(plugin, resp.update)
            result.evict_with(plugin, resp.evict)
        own = result.updates.pop(ctr.id, None)
        if own is not None:  # a plugin's change to this very update
            res = convert.resources_to_model(own.linux.resources, res)
        if result.updates or result.evictions:
            self._spawn(self._apply_updates("UpdateContainer", list(result.updates.values()), result.evictions))
        return res

    async def post_update_container(self, sb: Sandbox, ctr: Container) -> None:
        await self._notify(nri.POST_UPDATE_CONTAINER, "PostUpdateContainer", nri.PostUpdateContainerRequest,
                           nri.PostUpdateContainerResponse, sb, ctr)

    async def stop_container(self, sb: Sandbox, ctr: Container) -> None:
        if ctr.id in self._ctrs_stopped:
            return  # once per container: its exit and a later RemoveContainer both report it
        self._ctrs_stopped.add(ctr.id)
        req = nri.StopContainerRequest(pod=convert.pod(sb), container=self._container(ctr))
        result = merge.Result(ctr.id)
        for plugin, resp in await self._each(nri.STOP_CONTAINER, "StopContainer", req, nri.StopContainerResponse,
                                             fail=False):
            try:
                result.update_with(plugin, [u for u in resp.update if u.container_id != ctr.id])
            except MoorageError as e:
                log.warning("NRI: updates asked on StopContainer ignored: %s", e.message)
        if result.updates:
            self._spawn(self._apply_updates("StopContainer", list(result.updates.values()), []))

    async def remove_container(self, sb: Sandbox, ctr: Container) -> None:
        self._ctrs_stopped.discard(ctr.id)
        await self._notify(nri.REMOVE_CONTAINER, "RemoveContainer", nri.RemoveContainerRequest,
                           nri.RemoveContainerResponse, sb, ctr)

    def _container(self, ctr: Container) -> nri.Container:
        return convert.container(ctr, self.runtime.container_spec(ctr.id) if self._runtime is not None else None)

    async def _notify(self, event: int, method: str, req_type: type[Message], resp_type: type[Message],
                      sb: Sandbox, ctr: Container) -> None:
        if not any(p.subscribed(event) for p in self.plugins):
            return
        req = req_type(pod=convert.pod(sb), container=self._container(ctr))
        await self._each(event, method, req, resp_type, fail=False)

    # -- what plugins ask on their own ---------------------------------------------------------------

    async def _plugin_updates(self, plugin: Plugin, req: nri.UpdateContainersRequest) -> list[nri.ContainerUpdate]:
        result = merge.Result()
        result.update_with(plugin.qualified, req.update)
        return await self._apply_updates(plugin.qualified, list(result.updates.values()), list(req.evict))

    async def _apply_updates(self, who: str, updates: Sequence[nri.ContainerUpdate],
                             evictions: Sequence[nri.ContainerEviction]) -> list[nri.ContainerUpdate]:
        """Updates go through UpdateContainerResources' path (without a second round of hooks);
        evictions stop the container at once.  Returns the updates that failed."""
        rt = self.runtime
        failed: list[nri.ContainerUpdate] = []
        for u in updates:
            try:
                rec = rt.get_container(u.container_id)
                if rec.status.state not in (ContainerState.CREATED, ContainerState.RUNNING):
                    raise FailedPrecondition(f"container {rec.id} has exited")
                lc = rec.metadata.config.linux
                base = rec.status.resources or (lc.resources if lc is not None else None) or LinuxContainerResources()
                await rt.update_resources_unhooked(rec.id, convert.resources_to_model(u.linux.resources, base))
                log.info("NRI: container updated", extra={"fields": {"by": who, "id": rec.id}})
            except MoorageError as e:
                if not u.ignore_failure:
                    log.warning("NRI: update of container %s asked by %s failed: %s",
                                convert.clean_text(u.container_id, 80), who, e.message)
                failed.append(u)
        for ev in evictions:
            try:
                rec = rt.get_container(ev.container_id)
            except NotFound:
                continue
            log.warning("NRI: evicting container", extra={"fields": {"by": who, "id": rec.id,
                                                                     "reason": convert.clean_text(ev.reason, 200)}})
            try:
                await rt.stop_container(rec.id, 0)
            except MoorageError as e:
                log.warning("NRI: eviction of %s failed: %s", rec.id, e.message)
        return failed


async def _end_process(proc: asyncio.subprocess.Process) -> None:
    """End a launched plugin: SIGTERM, then SIGKILL after a second."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 1.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
