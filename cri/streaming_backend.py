"""The streaming server's process side: exec, attach and port-forward over the runtime.

* **exec** runs one ``conmon --exec --exec-attach`` per session (``--sync``, so
  conmon is our child and we read its exit report), with ``--terminal`` when a
  TTY is asked for.  conmon opens an attach socket in the session's scratch
  dir and tells us on ``_OCI_ATTACHPIPE``; we connect, then release it through
  ``_OCI_STARTPIPE`` so ``runc exec`` starts only once nothing can be lost.
  Frames from the socket are ``<pipe byte><data>`` (2 = stdout, 3 = stderr);
  stdin is written raw and a half-close (``SHUT_WR``) closes the process's
  stdin.  Resizes go to the session's ``ctl`` fifo.  The container is never
  involved: its own conmon is untouched and survives daemon restarts.  If the
  client goes away the session's whole process tree is SIGKILLed.
* **attach** connects to the container's conmon attach socket (same framing).
* **port-forward** connects to ``127.0.0.1:PORT`` (then ``[::1]``) from a
  socket created inside the pod's network namespace on a dedicated thread
  (``cni.netns.run_in_netns``), then handed to asyncio; host-network pods use
  the host's loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import uuid
from collections.abc import AsyncIterator

from cni import netns as netnsmod
from cri.streaming.backend import InputStream, Writer
from cri.streaming.server import StreamingServer
from runtime.conmon import WIN_RESIZE_EVENT, ConmonOptions, clean_runtime_error, conmon_argv, ctl_message
from runtime.errors import FailedPrecondition, Internal, MoorageError, NotFound
from runtime.oci import _child_env, _classify, _descendants, _SyncPipe

log = logging.getLogger("moorage.streaming")

STDOUT_PIPE, STDERR_PIPE = 2, 3
STDIN_CHUNK = 8192  # conmon reads one SOCK_SEQPACKET message into a 32 KiB buffer
RECV_SIZE = 64 * 1024
CONMON_EXIT_GRACE = 10.0
OUTPUT_DRAIN_GRACE = 2.0
INITIAL_SIZE_WAIT = 1.0  # how long a TTY exec waits for the client's first terminal size
CONNECT_TIMEOUT = 10.0
SANDBOX_READY = "SANDBOX_READY"
# conmon's debug lines from the forked child land in the exec's stderr: keep them out.
EXEC_CONMON_LOG_LEVEL = "error"


def _connect_unix_seqpacket(path: str) -> socket.socket:
    """Connect to a conmon attach socket, however long its path (via an O_PATH fd of its dir)."""
    dfd = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"/proc/self/fd/{dfd}/{os.path.basename(path)}")
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock
    finally:
        os.close(dfd)


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


def _kill_descendants(pid: int) -> int:
    """SIGKILL everything below ``pid``; returns how many were signalled."""
    n = 0
    for p in _descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
            n += 1
    return n


class RuntimeStreamingBackend:
    """:class:`cri.streaming.backend.StreamingBackend` over :class:`runtime.service.Runtime`."""

    def __init__(self, runtime) -> None:
        self.rt = runtime
        self.sessions: set[str] = set()  # exec ids in flight (for tests and metrics)

    # ------------------------------------------------------------------ exec

    def _running(self, container_id: str):
        rec = self.rt.running_container(container_id)  # NOT_FOUND / FAILED_PRECONDITION
        return rec, self.rt.oci(rec.runtime_handler)

    async def exec(self, container_id: str, cmd: list[str], tty: bool, stdin: InputStream | None,
                   stdout: Writer | None, stderr: Writer | None,
                   resize: AsyncIterator[tuple[int, int]] | None) -> int:
        rec, oci = self._running(container_id)
        cid = rec.id
        process = oci._exec_process_spec(cid, cmd)  # the container's process, with these args
        process["terminal"] = bool(tty)
        if tty:
            env = list(process.get("env") or [])
            if not any(e.startswith("TERM=") for e in env):
                process["env"] = env + ["TERM=xterm"]
        sizes: asyncio.Queue[tuple[int, int]] | None = None
        feeder = None
        if resize is not None:
            sizes = asyncio.Queue()
            feeder = asyncio.create_task(_feed(resize, sizes))
            if tty:
                # kubectl and the kubelet send the terminal size first: start the process at that size.
                with contextlib.suppress(asyncio.TimeoutError):
                    width, height = await asyncio.wait_for(sizes.get(), INITIAL_SIZE_WAIT)
                    process["consoleSize"] = {"height": height, "width": width}
        exec_id = uuid.uuid4().hex
        workdir = os.path.join(oci.persist_dir(cid), f"exec-{exec_id[:12]}")
        os.makedirs(workdir, mode=0o700)
        link = os.path.join(oci.socket_dir, exec_id)
        self.sessions.add(exec_id)
        try:
            return await self._exec(oci, cid, cmd, process, tty, exec_id, workdir, stdin, stdout, stderr, sizes)
        finally:
            await _cancel(feeder)
            self.sessions.discard(exec_id)
            with contextlib.suppress(OSError):
                os.unlink(link)
            shutil.rmtree(workdir, ignore_errors=True)

    async def _exec(self, oci, cid: str, cmd: list[str], process: dict, tty: bool, exec_id: str, workdir: str,
                    stdin: InputStream | None, stdout: Writer | None, stderr: Writer | None,
                    sizes: asyncio.Queue[tuple[int, int]] | None) -> int:
        spec_path = os.path.join(workdir, "process.json")
        with open(spec_path, "w") as f:
            json.dump(process, f)
        os.makedirs(oci.socket_dir, mode=0o700, exist_ok=True)
        opts = ConmonOptions(
            conmon_path=oci.conmon_path, runtime_path=oci.handler.path, cid=cid, cuuid=exec_id,
            runtime_root=oci.root, container_pidfile=os.path.join(workdir, "pid"), bundle=workdir,
            socket_dir=oci.socket_dir, log_level=EXEC_CONMON_LOG_LEVEL, stdin=stdin is not None, terminal=tty,
            sync=True, exec_process_spec=spec_path, exec_attach=True,
        )
        # No log driver: output goes to the attach socket only ("none" needs conmon >= 2.0.x).
        argv = conmon_argv(opts) + ["--log-path", "none"]
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        attach_r, attach_w = os.pipe2(os.O_CLOEXEC)
        start_r, start_w = os.pipe2(os.O_CLOEXEC)
        fds += [sync_w, attach_w, start_r, start_w]
        sync, attach_pipe = _SyncPipe(sync_r), _SyncPipe(attach_r)
        proc: asyncio.subprocess.Process | None = None
        sock: socket.socket | None = None
        tasks: list[asyncio.Task] = []
        exec_pid: int | None = None
        finished = False
        conmon_log = os.path.join(workdir, "conmon.log")
        try:
            with open(conmon_log, "wb") as logf:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                    pass_fds=(sync_w, attach_w, start_r), cwd=workdir, start_new_session=True,
                    env=_child_env({"_OCI_SYNCPIPE": str(sync_w), "_OCI_ATTACHPIPE": str(attach_w),
                                    "_OCI_STARTPIPE": str(start_r)}),
                )
            for fd in (sync_w, attach_w, start_r):
                os.close(fd)
                fds.remove(fd)
            await sync.open()
            await attach_pipe.open()
            os.write(start_w, b"0")  # conmon's first wait (a chance to move it into a cgroup)
            ready = await attach_pipe.message()  # the attach socket is listening
            if ready is None:
                await asyncio.wait_for(proc.wait(), CONMON_EXIT_GRACE)
                raise self._exec_failure(cid, cmd, await sync.message(), conmon_log, proc.returncode)
            sock = _connect_unix_seqpacket(os.path.join(workdir, "attach"))
            if sizes is not None:  # the ctl fifo exists now; conmon applies sizes once the PTY is up
                tasks.append(asyncio.create_task(self._resize_loop(os.path.join(workdir, "ctl"), sizes)))
            os.write(start_w, b"0")  # now conmon may run `runc exec`
            os.close(start_w)
            fds.remove(start_w)
            first = await sync.message()
            if first is None or first.data <= 0:
                raise self._exec_failure(cid, cmd, first, conmon_log, None)
            exec_pid = first.data
            out_task = asyncio.create_task(_pump_output(sock, stdout, stderr, tty))
            tasks.append(out_task)
            if stdin is not None:
                tasks.append(asyncio.create_task(_pump_input(sock, stdin)))
            exit_task = asyncio.create_task(sync.message())
            tasks.append(exit_task)
            await asyncio.wait({out_task, exit_task}, return_when=asyncio.FIRST_COMPLETED)
            if out_task.done() and out_task.exception() is not None:
                raise out_task.exception()
            result = await exit_task
            # conmon closes the attach socket before reporting; what it sent is already buffered.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(out_task), OUTPUT_DRAIN_GRACE)
            if out_task.done() and not out_task.cancelled() and out_task.exception() is not None:
                raise out_task.exception()
            finished = True
            if result is None:
                raise Internal(f"conmon for exec {cmd!r} in container {cid} ended without reporting an exit code")
            if result.data < 0 and result.message:
                raise Internal(f"exec {cmd!r} in container {cid}: {result.message}")
            return result.data
        finally:
            await _cancel(*tasks)
            if proc is not None and proc.returncode is None:
                await asyncio.shield(self._reap(proc, exec_pid, finished))
            if sock is not None:
                sock.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            sync.close()
            attach_pipe.close()

    async def _reap(self, proc: asyncio.subprocess.Process, exec_pid: int | None, finished: bool) -> None:
        """Make sure the session's conmon and everything it started are gone."""
        if not finished:
            # The client left (or something failed): kill the exec'd process tree, then conmon.
            for _ in range(5):
                if not _kill_descendants(proc.pid):
                    break
                await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(proc.wait(), CONMON_EXIT_GRACE)
        except asyncio.TimeoutError:
            _kill_descendants(proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def _exec_failure(self, cid: str, cmd: list[str], msg, conmon_log: str, rc: int | None) -> MoorageError:
        text = clean_runtime_error(msg.message) if msg is not None and msg.message else ""
        if not text:
            try:
                with open(conmon_log, "rb") as f:
                    text = clean_runtime_error(f.read(16384))
            except OSError:
                text = ""
        text = text or f"conmon exited with status {rc}"
        return _classify(text, cid, f"exec {cmd[0]!r} in", "")

    @staticmethod
    async def _resize_loop(ctl_path: str, sizes: asyncio.Queue[tuple[int, int]]) -> None:
        while True:
            width, height = await sizes.get()
            try:
                fd = os.open(ctl_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return  # conmon is gone
            try:
                os.write(fd, ctl_message(WIN_RESIZE_EVENT, height, width))
            except OSError:
                pass
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ attach

    async def attach(self, container_id: str, tty: bool, stdin: InputStream | None, stdout: Writer | None,
                     stderr: Writer | None, resize: AsyncIterator[tuple[int, int]] | None) -> None:
        rec, oci = self._running(container_id)
        try:
            sock = _connect_unix_seqpacket(oci.attach_socket_path(rec.id))
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
    async def _attach_resize(oci, cid: str, resize: AsyncIterator[tuple[int, int]]) -> None:
        async for width, height in resize:
            try:
                await oci.resize(cid, height, width)
            except MoorageError:
                return

    # ------------------------------------------------------------------ port-forward

    async def port_forward(self, sandbox_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sb = self.rt.get_sandbox(sandbox_id)
        if sb.state != SANDBOX_READY:
            raise FailedPrecondition(f"pod sandbox {sb.id} is not ready")
        if sb.netns_path:
            try:
                sock = await netnsmod.arun_in_netns(sb.netns_path, _connect_loopback, port)
            except NotFound as e:
                raise FailedPrecondition(f"pod sandbox {sb.id} has no network namespace: {e.message}") from None
        else:  # host network: the pod's localhost is the host's
            sock = await asyncio.to_thread(_connect_loopback, port)
        return await asyncio.open_connection(sock=sock, limit=256 * 1024)


def build_streaming(cfg, runtime) -> StreamingServer:
    """The daemon's streaming server component (``start``/``stop``) over ``runtime``."""
    s = cfg.streaming
    return StreamingServer(
        RuntimeStreamingBackend(runtime), s.address, s.port, tls_cert=s.tls_cert or None,
        tls_key=s.tls_key or None, token_ttl=s.token_ttl,
    )
