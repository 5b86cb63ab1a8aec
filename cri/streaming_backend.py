"""The streaming server's process side: exec, attach and port-forward over the runtime.

* **exec** is an interactive session of the runtime adapter
  (``OCIRuntime.exec_session``: one ``conmon --exec --exec-attach`` per session,
  with ``--terminal`` when a TTY is asked for).  Frames from its attach socket
  are ``<pipe byte><data>`` (2 = stdout, 3 = stderr); stdin is written raw and a
  half-close (``SHUT_WR``) closes the process's stdin.  The container's own
  conmon is untouched and survives daemon restarts.  If the client goes away the
  session's whole process tree is SIGKILLed (``ExecSession.close``).
* **attach** connects to the container's conmon attach socket (same framing).
* **port-forward** connects to ``127.0.0.1:PORT`` (then ``[::1]``) from a
  socket created inside the pod's network namespace on a dedicated thread
  (``cni.netns.run_in_netns``), then handed to asyncio; host-network pods use
  the host's loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from moorage.core import netns as netnsmod
from moorage.core.errors import FailedPrecondition, MoorageError, NotFound
from moorage.cri.config import StreamingConfig
from moorage.cri.streaming.backend import InputStream, Writer
from moorage.cri.streaming.server import StreamingServer
from moorage.runtime.oci import ExecSession, OCIRuntimeAPI, connect_seqpacket
from moorage.runtime.records import Container, SandboxState
from moorage.runtime.service import Runtime

log = logging.getLogger("moorage.streaming")

STDOUT_PIPE, STDERR_PIPE = ExecSession.STDOUT_PIPE, ExecSession.STDERR_PIPE
STDIN_CHUNK = ExecSession.STDIN_CHUNK
RECV_SIZE = 64 * 1024
OUTPUT_DRAIN_GRACE = 2.0
INITIAL_SIZE_WAIT = 1.0  # how long a TTY exec waits for the client's first terminal size
CONNECT_TIMEOUT = 10.0


def _connect_loopback(port: int) -> socket.socket:
    """A TCP connection to localhost:port in the calling thread's network namespace."""
    errors = []
    for host in ("127.0.0.1", "::1"):
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            errors.append(f"{host}: {e.strerror or e}")
            continue
        sock.setblocking(False)
        return sock
    raise FailedPrecondition(f"cannot connect to port {port} inside the pod ({'; '.join(errors)})")


async def _pump_output(sock: socket.socket, stdout: Writer | None, stderr: Writer | None, tty: bool) -> None:
    """Copy conmon's attach frames to the client until conmon closes the socket."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            frame = await loop.sock_recv(sock, RECV_SIZE)
        except ConnectionResetError:
            return
        if not frame:
            return
        pipe, data = frame[0], frame[1:]
        if not data:
            continue
        out = stdout if pipe == STDOUT_PIPE or (tty and stderr is None) else stderr
        if out is not None:
            await out(data)


async def _pump_input(sock: socket.socket, stdin: InputStream) -> None:
    """Client stdin to conmon; the client's end of stdin becomes a half-close."""
    loop = asyncio.get_running_loop()
    while data := await stdin.read(STDIN_CHUNK):
        for i in range(0, len(data), STDIN_CHUNK):
            await loop.sock_sendall(sock, data[i:i + STDIN_CHUNK])
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


async def _feed(resize: AsyncIterator[tuple[int, int]], sizes: asyncio.Queue[tuple[int, int]]) -> None:
    async for size in resize:
        sizes.put_nowait(size)


async def _cancel(*tasks: asyncio.Task | None) -> None:
    for t in tasks:
        if t is not None and not t.done():
            t.cancel()
    for t in tasks:
        if t is not None:
            with contextlib.suppress(BaseException):
                await t


class RuntimeStreamingBackend:
    """:class:`cri.streaming.backend.StreamingBackend` over :class:`runtime.service.Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.sessions: set[str] = set()  # exec ids in flight (for tests and metrics)

    # ------------------------------------------------------------------ exec

    def _running(self, container_id: str) -> tuple[Container, OCIRuntimeAPI]:
        rec = self.rt.running_container(container_id)  # NOT_FOUND / FAILED_PRECONDITION
        return rec, self.rt.oci(rec.metadata.runtime_handler)

    async def exec(self, container_id: str, cmd: list[str], tty: bool, stdin: InputStream | None,
                   stdout: Writer | None, stderr: Writer | None,
                   resize: AsyncIterator[tuple[int, int]] | None) -> int:
        rec, oci = self._running(container_id)
        sizes: asyncio.Queue[tuple[int, int]] | None = None
        feeder = None
        console_size = None
        if resize is not None:
            sizes = asyncio.Queue()
            feeder = asyncio.create_task(_feed(resize, sizes))
            if tty:
                # kubectl and the kubelet send the terminal size first: start the process at that size.
                with contextlib.suppress(asyncio.TimeoutError):
                    width, height = await asyncio.wait_for(sizes.get(), INITIAL_SIZE_WAIT)
                    console_size = (height, width)
        sess: ExecSession | None = None
        tasks: list[asyncio.Task] = []
        try:
            sess = await oci.exec_session(rec.id, list(cmd), tty=tty, stdin=stdin is not None,
                                          console_size=console_size)
            self.sessions.add(sess.exec_id)
            sock = sess.sock
            assert sock is not None  # exec_session returns a session with its attach socket connected
            if sizes is not None:
                tasks.append(asyncio.create_task(self._resize_loop(sess, sizes)))
            out_task = asyncio.create_task(_pump_output(sock, stdout, stderr, tty))
            tasks.append(out_task)
            if stdin is not None:
                tasks.append(asyncio.create_task(_pump_input(sock, stdin)))
            exit_task = asyncio.create_task(sess.wait())
            tasks.append(exit_task)
            await asyncio.wait({out_task, exit_task}, return_when=asyncio.FIRST_COMPLETED)
            if out_task.done() and (exc := out_task.exception()) is not None:
                raise exc
            code = await exit_task
            # conmon closes the attach socket before reporting; what it sent is already buffered.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(out_task), OUTPUT_DRAIN_GRACE)
            if out_task.done() and not out_task.cancelled() and (exc := out_task.exception()) is not None:
                raise exc
            return code
        finally:
            await _cancel(feeder, *tasks)
            if sess is not None:
                await sess.close()
                self.sessions.discard(sess.exec_id)

    @staticmethod
    async def _resize_loop(sess: ExecSession, sizes: asyncio.Queue[tuple[int, int]]) -> None:
        while True:
            width, height = await sizes.get()
            if not sess.resize(height, width):
                return  # conmon is gone

    # ------------------------------------------------------------------ attach

    async def attach(self, container_id: str, tty: bool, stdin: InputStream | None, stdout: Writer | None,
                     stderr: Writer | None, resize: AsyncIterator[tuple[int, int]] | None) -> None:
        rec = self.rt.attachable_container(container_id, stdin=stdin is not None)
        oci = self.rt.oci(rec.metadata.runtime_handler)
        try:
            sock = connect_seqpacket(oci.attach_socket_path(rec.id))
        except OSError as e:
            raise FailedPrecondition(
                f"cannot attach to container {rec.id}: its conmon attach socket is not available ({e.strerror or e})"
            ) from None
        tasks: list[asyncio.Task] = []
        try:
            out_task = asyncio.create_task(_pump_output(sock, stdout, stderr, tty))
            tasks.append(out_task)
            if stdin is not None:
                tasks.append(asyncio.create_task(_pump_input(sock, stdin)))
            if resize is not None:
                tasks.append(asyncio.create_task(self._attach_resize(oci, rec.id, resize)))
            await out_task  # ends when the container exits (conmon closes its attach clients)
        finally:
            await _cancel(*tasks)
            sock.close()

    @staticmethod
    async def _attach_resize(oci: OCIRuntimeAPI, cid: str, resize: AsyncIterator[tuple[int, int]]) -> None:
        async for width, height in resize:
            try:
                await oci.resize(cid, height, width)
            except MoorageError:
                return

    # ------------------------------------------------------------------ port-forward

    async def port_forward(self, sandbox_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sb = self.rt.get_sandbox(sandbox_id)
        if sb.status.state != SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sb.id} is not ready")
        if sb.status.netns_path:
            try:
                sock = await netnsmod.arun_in_netns(sb.status.netns_path, _connect_loopback, port)
            except NotFound as e:
                raise FailedPrecondition(f"pod sandbox {sb.id} has no network namespace: {e.message}") from None
        else:  # host network: the pod's localhost is the host's
            sock = await asyncio.to_thread(_connect_loopback, port)
        return await asyncio.open_connection(sock=sock, limit=256 * 1024)


def build_streaming(s: StreamingConfig, runtime: Runtime) -> StreamingServer:
    """The daemon's streaming server component (``start``/``stop``) over ``runtime``."""
    return StreamingServer(
        RuntimeStreamingBackend(runtime), s.address, s.port, tls_cert=s.tls_cert or None,
        tls_key=s.tls_key or None, token_ttl=s.token_ttl,
    )
