"""Daemon assembly: lock, store, services, gRPC on the unix socket, shutdown."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

import grpc

from moorage.core.errors import FailedPrecondition
from moorage.core.store import Store
from moorage.cri import config as configmod
from moorage.cri.edge import Edge
from moorage.cri.limits import KUBELET_MAX_MESSAGE, max_response_bytes
from moorage.cri.metrics import METRICS
from moorage.cri.notify import Notifier
from moorage.cri.reload import Reloader
from moorage.cri.services import Component, build_services
from moorage.runtime.records import ContainerState, SandboxState

log = logging.getLogger("moorage.server")


class DaemonLock:
    """An exclusive lock on the root dir, so two daemons never share one store."""

    def __init__(self, root_dir: str) -> None:
        self.path = os.path.join(root_dir, "moorage.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o711, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FailedPrecondition(
                    f"another moorage daemon (pid {holder}) is already running with root dir "
                    f"{os.path.dirname(self.path)}; stop it first or use another root_dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _prepare_socket(path: str) -> None:
    """Remove a stale socket left by a crashed daemon; refuse one that is alive."""
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    if not os.path.lexists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        log.info("removed stale socket", extra={"fields": {"socket": path}})
        return
    finally:
        s.close()
    raise FailedPrecondition(f"socket {path} is in use by another process; is another moorage running?")


class Daemon:
    def __init__(self, cfg: configmod.Config, load: Callable[[], configmod.LoadedConfig] | None = None,
                 notify: Notifier | None = None) -> None:
        # load: reads the config files again on SIGHUP (None: SIGHUP only logs that it is ignored)
        self.cfg = cfg
        self.load = load
        self.reloader: Reloader | None = None
        self._reload_pending = False
        self._tasks: set[asyncio.Task[object]] = set()
        self.notify = notify or Notifier()  # systemd readiness; a no-op one unless given
        self._heartbeat: asyncio.Task[None] | None = None
        self._states: Callable[[], tuple[dict[str, int], dict[str, int]]] | None = None
        self._serving = False
        self.lock = DaemonLock(cfg.root_dir)
        self.store: Store | None = None
        self.server: grpc.aio.Server | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self.components: list[Component] = []  # in start order

    def not_ready(self) -> str | None:
        if self._stopping:
            return "moorage is shutting down"
        return None

    def status_line(self) -> str:
        """What `systemctl status` shows while serving (re-sent by the heartbeat when counts change)."""
        if not self._serving or self._stopping or self._states is None:
            return ""
        sb, ct = self._states()
        return (f"serving on {self.cfg.socket}: {sum(sb.values())} pods ({sb.get(SandboxState.READY.value, 0)} ready), "
                f"{sum(ct.values())} containers ({ct.get(ContainerState.RUNNING.value, 0)} running)")

    async def start(self) -> None:
        cfg = self.cfg
        # From the first moment: SIGHUP's default action would end the daemon during recovery.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request_reload)
        # Pings start before recovery: a long recovery must not look like a hang to the watchdog.
        self._heartbeat = asyncio.create_task(self.notify.heartbeat(self.status_line))
        self.notify.status(f"starting: locking {cfg.root_dir}")
        try:
            self.lock.acquire()  # inside: a second daemon's refusal is reported as a failed start too
            for d in (cfg.root_dir, cfg.state_dir):
                os.makedirs(d, mode=0o711, exist_ok=True)
            self.store = Store(cfg.root_dir, cfg.namespace)
            services = build_services(cfg, self.store)
            self.components = services.components
            if self.load is not None and services.reload_targets is not None:
                self.reloader = Reloader(cfg, self.load, services.reload_targets)
            self._states = services.runtime.rt.states
            self.notify.status("recovering: loading the store, reconciling pods and containers with what runs")
            for comp in self.components:
                await comp.start()
            _prepare_socket(cfg.socket)
            max_response = max_response_bytes(os.environ)
            edge = Edge(self.not_ready, max_response)
            # Receive: the configured request cap (gRPC itself answers RESOURCE_EXHAUSTED above it,
            # before any of our code runs).  Send: the edge refuses larger responses with a clear
            # message first; this is the backstop.
            self.server = grpc.aio.server(
                options=[("grpc.max_receive_message_length", cfg.limits.grpc_max_recv_message_size),
                         ("grpc.max_send_message_length", KUBELET_MAX_MESSAGE)]
            )
            self.server.add_generic_rpc_handlers(
                tuple(edge.service_handler(name, *groups) for name, groups in services.rpc_groups().items())
            )
            self.server.add_insecure_port(f"unix://{cfg.socket}")
            await self.server.start()
            os.chmod(cfg.socket, int(cfg.socket_mode, 8))
            if cfg.metrics.enabled:
                try:
                    port = METRICS.serve(cfg.metrics.address)
                    log.info("metrics listening", extra={"fields": {"address": cfg.metrics.address, "port": port}})
                except OSError as e:
                    log.warning("metrics endpoint disabled: cannot listen on %s: %s", cfg.metrics.address, e.strerror)
            log.info("moorage ready", extra={"fields": {"socket": cfg.socket, "root": cfg.root_dir, "pid": os.getpid()}})
            # Recovery ran inside the components' start and the socket serves: only now READY=1.
            self._serving = True
            self.notify.ready(self.status_line())
            if self._reload_pending:
                self.request_reload()
        except BaseException as e:
            self.notify.status(f"failed to start: {e}")
            await self._teardown()
            raise

    def request_stop(self) -> None:
        self._stop_event.set()

    def request_reload(self) -> None:
        """SIGHUP: re-read the config files and apply what can change on a running daemon."""
        if self._stopping:
            return
        if self.server is None:  # still starting: reload once serving, so no edit is missed
            self._reload_pending = True
            return
        self._reload_pending = False
        if self.reloader is None:
            log.warning("SIGHUP ignored: this daemon was started without config files to reload")
            return
        self.notify.reloading("reloading the configuration")
        task: asyncio.Task[object] = asyncio.ensure_future(self._reload(self.reloader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self, reloader: Reloader) -> None:
        try:
            await reloader.reload()
        finally:
            self.notify.ready(self.status_line())  # systemd: the reload is over, whatever it applied

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop_event.wait()
        log.info("shutting down")
        await self.stop()

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        self.notify.stopping(f"stopping: finishing in-flight calls (up to {grace:g}s); containers keep running")
        if self._tasks:  # a reload in flight finishes before the parts it reconfigures stop
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace)  # refuses new calls, lets in-flight ones finish
        await self._teardown()
        log.info("moorage stopped")

    async def _teardown(self) -> None:
        for comp in reversed(self.components):
            try:
                await comp.stop()
            except Exception:
                log.exception("error stopping %s", type(comp).__name__)
        self.components = []
        METRICS.close()
        if self.server is not None and os.path.lexists(self.cfg.socket):
            try:
                os.unlink(self.cfg.socket)
            except OSError:
                pass
        self.server = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self.lock.release()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None


def _has_pidfd() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (OSError, AttributeError):
        return False
    return True


async def run(cfg: configmod.Config, load: Callable[[], configmod.LoadedConfig] | None = None) -> None:
    loop = asyncio.get_running_loop()
    if sys.version_info < (3, 12) and _has_pidfd():
        # 3.11's default watcher starts a thread per child and the loop waits for it to run
        # (ms on a busy host); a pidfd is just another readable fd (3.12 does this by default).
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)
    if loop.get_debug():
        # PYTHONASYNCIODEBUG=1 is for finding what blocks the loop: the default 100 ms threshold
        # only names disasters, while a read call's budget is a few ms.
        loop.slow_callback_duration = 0.005
    d = Daemon(cfg, load, Notifier.from_env())  # takes NOTIFY_SOCKET & co. out of the environment for children
    await d.start()
    await d.wait()
