"""The OCI runtime adapter: runc or crun, each container supervised by conmon.

``OCIRuntime`` is the one place that runs ``conmon`` and the OCI runtime
binary.  Everything is asyncio subprocesses; nothing here blocks the loop for
long (small state files are read inline).

On-disk layout under ``state_dir`` (shared by all handlers; container ids are
unique across handlers)::

    <state_dir>/<handler>/          --root of runc/crun for that handler
    <state_dir>/exits/<cid>         conmon's exit file: exit status as text
    <state_dir>/attach/<cid>        symlink (made by conmon) to the bundle;
                                    .../<cid>/attach is the attach socket
    <state_dir>/conmon/<cid>/       conmon's --persist-dir and cwd:
        conmon.pid                  pid of the (daemonized) conmon
        conmon.log                  conmon's own stderr before it daemonizes
        meta.json                   bundle, log path, ... (for later calls)
        cgroup.json                 host cgroup dirs of the container
        exit, oom                   written by conmon
        exec-*/                     scratch dirs of running exec sessions
                                    (process.json, pid; ctl and attach for
                                    interactive sessions)

conmon is started without ``--sync``: it double-forks, so the container's
supervisor is re-parented away from the daemon and survives daemon restarts
(design principle 3).  Exec sessions use ``--sync`` instead: they are short
and the daemon waits for them.  A session whose daemon died has nobody left
to read it: ``reap_exec_sessions`` (start-up recovery) kills such leftovers.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import math
import os
import re
import shutil
import signal as _signal
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from moorage.core import procs
from moorage.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MoorageError,
    NotFound,
    RuntimeFailure,
    clip,
)
from moorage.core.fs import private_dir
from moorage.runtime import cgroups
from moorage.runtime.conmon import (
    REOPEN_LOGS_EVENT,
    TIMED_OUT_MESSAGE,
    WIN_RESIZE_EVENT,
    ConmonOptions,
    DirWatcher,
    SyncMessage,
    clean_runtime_error,
    conmon_argv,
    ctl_message,
    parse_exit_file,
    parse_sync_message,
)

log = logging.getLogger("moorage.oci")

DEFAULT_CREATE_TIMEOUT = 240.0
DEFAULT_COMMAND_TIMEOUT = 120.0
MAX_EXEC_OUTPUT = 16 * 1024 * 1024
# conmon's own -T for exec sessions is a backstop for when the daemon dies
# mid-exec; the daemon enforces the real timeout itself (sub-second precise).
EXEC_BACKSTOP_SECONDS = 5
# After the exec'd process exits, how long to keep reading output that a
# leftover background process may still be writing into the pipes.
EXEC_DRAIN_GRACE = 2.0
CONMON_EXIT_GRACE = 10.0
POLL_INTERVAL = 1.0  # fallback poll for wait_exit, besides inotify
# conmon's debug lines from an interactive exec's forked child land in the exec's stderr: keep them out.
EXEC_CONMON_LOG_LEVEL = "error"

KNOWN_HANDLERS = {"runc": "/usr/sbin/runc", "crun": "/usr/bin/crun"}

_CID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STRIP_ENV = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class OCIRuntimeError(RuntimeFailure):
    """runc/crun (or conmon) failed; ``message`` carries the runtime's own words.

    A domain error (gRPC UNKNOWN), not INTERNAL: the runtime refused, moorage did not break.
    """

    def __init__(self, message: str, *, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass
class RuntimeHandler:
    """A named OCI runtime binary.  ``root`` defaults to ``<state_dir>/<name>``."""

    name: str
    path: str
    root: str | None = None

    @classmethod
    def default(cls, name: str) -> RuntimeHandler:
        if name not in KNOWN_HANDLERS:
            raise InvalidArgument(f"unknown runtime handler {name!r}; known: {', '.join(sorted(KNOWN_HANDLERS))}")
        path = shutil.which(name) or KNOWN_HANDLERS[name]
        return cls(name, path)


@dataclass
class ContainerState:
    """What ``runc state`` says.  ``status`` is created|running|stopped|paused (or creating)."""

    id: str
    status: str
    pid: int
    bundle: str = ""
    created: str = ""
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class ExitStatus:
    code: int
    finished_at: datetime
    oom_killed: bool = False


@runtime_checkable
class OCIRuntimeAPI(Protocol):
    """What the rest of ``runtime/`` uses; tests may substitute a fake."""

    handler: RuntimeHandler

    async def create(self, cid: str, bundle: str, *, log_path: str, name: str | None = None,
                     stdin: bool = False, stdin_once: bool = False, tty: bool = False,
                     log_size_max: int | None = None, timeout: float = DEFAULT_CREATE_TIMEOUT) -> int: ...
    async def start(self, cid: str) -> None: ...
    async def kill(self, cid: str, signal: int, all: bool = False) -> None: ...
    async def delete(self, cid: str, force: bool = False) -> None: ...
    async def state(self, cid: str) -> ContainerState: ...
    async def list(self) -> list[ContainerState]: ...
    def exit_status(self, cid: str) -> ExitStatus | None: ...
    def exit_code(self, cid: str) -> tuple[int, datetime] | None: ...
    async def wait_exit(self, cid: str, timeout: float | None = None) -> int: ...
    async def exec_sync(self, cid: str, cmd: builtins.list[str], timeout: float | None, *,
                        max_output: int = MAX_EXEC_OUTPUT) -> tuple[int, bytes, bytes]: ...
    async def update(self, cid: str, resources: dict[str, Any]) -> None: ...
    async def reopen_log(self, cid: str) -> None: ...
    async def resize(self, cid: str, height: int, width: int) -> None: ...
    async def exec_session(self, cid: str, cmd: builtins.list[str], *, tty: bool = False, stdin: bool = False,
                           console_size: tuple[int, int] | None = None) -> ExecSession: ...
    def reap_exec_sessions(self) -> builtins.list[int]: ...
    def attach_socket_path(self, cid: str) -> str: ...
    def conmon_pid(self, cid: str) -> int | None: ...


def _classify(text: str, cid: str, action: str, root: str = "") -> MoorageError:
    """Map a runtime's error text to a domain error; the runtime's words stay in the message."""
    low = text.lower()
    msg = f"{action} container {cid}: {text}" if text else f"{action} container {cid} failed"
    # runc: "container does not exist"; crun: "error opening file `<root>/<cid>/status`: No such file
    # or directory" or "cannot open directory '<root>/<cid>': No such file or directory".
    state_path = os.path.join(root, cid) if root else f"/{cid}"
    if "container does not exist" in low or "container not found" in low or (
        "no such file or directory" in low and (f"{state_path}/status" in text or f"{state_path}'" in text)
    ):
        return NotFound(f"container {cid} is not known to the OCI runtime ({text})")
    if "already exists" in low or "exists already" in low or "with id exists" in low:
        return AlreadyExists(msg)
    if "not running" in low or "is stopped" in low or "stopped container" in low or "not stopped" in low \
            or "cannot delete container" in low or "is paused" in low or "not in `created` or `stopped`" in low:
        return FailedPrecondition(msg)
    return OCIRuntimeError(msg, stderr=text)


def exec_start_failure_code(text: str) -> int | None:
    """The exit code a shell gives a command the runtime could not start, from the runtime's
    words: 127 for a missing binary, 126 for one that is not executable (as Docker answers);
    None when the failure is something else (the container, the runtime)."""
    low = text.lower()
    if "executable file not found" in low or "no such file or directory" in low:
        return 127
    if "permission denied" in low or "exec format error" in low or "is a directory" in low:
        return 126
    return None


async def _wait_pid_exit(pid: int, timeout: float) -> None:
    """Return once process ``pid`` has exited (or after ``timeout``); the caller re-checks."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (old kernel): a short sleep instead
        await asyncio.sleep(min(timeout, 0.01))
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, exited)
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV and not k.startswith("_OCI_")}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if extra:
        env.update(extra)
    return env


def _proc_is_conmon_for(pid: int, cid: str) -> bool:
    """True if *pid* is a live (non-zombie) conmon supervising *cid*."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    if not args or not args[0] or not os.path.basename(args[0]).startswith(b"conmon"):
        return False
    want = cid.encode()
    return any(args[i] in (b"-c", b"--cid") and i + 1 < len(args) and args[i + 1] == want for i in range(len(args)))


def _descendants(pid: int) -> list[int]:
    """Pids of all descendants of *pid* (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # Format: pid (comm) state ppid ...; comm may contain spaces and parens.
        rest = data[data.rfind(b")") + 2:].split()
        if len(rest) >= 2:
            children.setdefault(int(rest[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(pid: int) -> None:
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, _signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_descendants(pid: int) -> int:
    """SIGKILL everything below *pid* (not *pid* itself); returns how many were signalled."""
    n = 0
    for p in _descendants(pid):
        try:
            os.kill(p, _signal.SIGKILL)
            n += 1
        except ProcessLookupError:
            pass
    return n


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _exec_conmon_session_dir(args: list[bytes], conmon_dir: str) -> str | None:
    """The exec-* dir of the session if *args* is an exec conmon started by an OCIRuntime on *conmon_dir*.

    Proof required: argv[0] is conmon, ``--exec`` is given, and ``--exec-process-spec`` is
    ``<conmon_dir>/<cid>/exec-<id>/process.json`` with ``<cid>`` the ``-c`` argument.
    """
    if not args or not args[0] or not os.path.basename(args[0]).startswith(b"conmon") or b"--exec" not in args:
        return None

    def after(flag: bytes) -> bytes | None:
        for i in range(len(args) - 1):
            if args[i] == flag:
                return args[i + 1]
        return None

    spec, cid = after(b"--exec-process-spec"), after(b"-c")
    if not spec or not cid:
        return None
    spec_s, cid_s = os.fsdecode(spec), os.fsdecode(cid)
    workdir = os.path.dirname(spec_s)
    if (os.path.basename(spec_s) != "process.json" or not os.path.basename(workdir).startswith("exec-")
            or os.path.dirname(workdir) != os.path.join(conmon_dir, cid_s) or not _CID_RE.match(cid_s)):
        return None
    return workdir


def _process_start_time(pid: int) -> float | None:
    """When *pid* started (seconds since the epoch, about 1 s precise)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def connect_seqpacket(path: str) -> socket.socket:
    """Connect (non-blocking) to a conmon attach socket, however long its path (via an O_PATH fd of its dir)."""
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


class _SyncPipe:
    """Async line reader over the read end of a sync pipe."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "rb", buffering=0)
        self._transport: asyncio.ReadTransport | None = None
        self._reader = asyncio.StreamReader(limit=1 << 20)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        proto = asyncio.StreamReaderProtocol(self._reader)
        self._transport, _ = await loop.connect_read_pipe(lambda: proto, self._file)

    async def message(self) -> SyncMessage | None:
        line = await self._reader.readline()
        if not line:
            return None
        return parse_sync_message(line)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        else:
            self._file.close()


class _OutputBudget:
    """One byte budget shared by an ExecSync's stdout and stderr, as CRI-O caps both together.

    What does not fit is read and dropped (the process must not block on a full pipe) and
    counted, so the caller can say how much was cut.
    """

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.dropped = 0

    def take(self, chunk: bytes) -> bytes:
        kept = chunk[:max(self.left, 0)]
        self.left -= len(kept)
        self.dropped += len(chunk) - len(kept)
        return kept


async def _read_bounded(stream: asyncio.StreamReader, budget: _OutputBudget, buf: bytearray) -> None:
    """Read *stream* to EOF, keeping in *buf* what *budget* still allows (the rest is discarded)."""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        buf += budget.take(chunk)


def truncation_marker(dropped: int, limit: int) -> bytes:
    """Appended to an ExecSync's stderr when output was cut, so the caller sees it was."""
    return (f"\n[moorage: ExecSync output truncated: {dropped} bytes of stdout and stderr over the "
            f"{limit}-byte limit were dropped]\n").encode()


class ExecSession:
    """A running interactive exec (``conmon --exec --exec-attach --sync``) from ``OCIRuntime.exec_session``.

    * ``sock``: conmon's attach socket (SOCK_SEQPACKET, non-blocking).  Frames read are
      ``<pipe byte><data>`` (``STDOUT_PIPE``/``STDERR_PIPE``; with a TTY all output is
      ``STDOUT_PIPE``); bytes written go to the process's stdin (at most ``STDIN_CHUNK`` per
      send); ``shutdown(SHUT_WR)`` closes its stdin.
    * ``pid``: host pid of the exec'd process.
    * ``wait()``: its exit code, once conmon reports it.
    * ``resize(height, width)``: the TTY size.
    * ``close()``: always call it; kills the process tree unless ``wait()`` saw the exit,
      reaps conmon and removes the session's files.
    """

    STDOUT_PIPE, STDERR_PIPE = 2, 3
    STDIN_CHUNK = 8192  # conmon reads one SOCK_SEQPACKET message into a 32 KiB buffer

    def __init__(self, cid: str, cmd: list[str], exec_id: str, workdir: str, link: str) -> None:
        self.cid, self.cmd, self.exec_id, self.workdir = cid, list(cmd), exec_id, workdir
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.exited = False
        self._link = link
        self._proc: asyncio.subprocess.Process | None = None
        self._sync: _SyncPipe | None = None
        self._attach: _SyncPipe | None = None
        self._fds: list[int] = []
        self._closed = False

    @property
    def ctl_path(self) -> str:
        return os.path.join(self.workdir, "ctl")

    def resize(self, height: int, width: int) -> bool:
        """Send a terminal size to conmon; False once conmon is gone."""
        try:
            fd = os.open(self.ctl_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            os.write(fd, ctl_message(WIN_RESIZE_EVENT, height, width))
        except OSError:
            pass
        finally:
            os.close(fd)
        return True

    async def wait(self) -> int:
        """The exec'd process's exit code (conmon's report; it has closed the attach socket by then)."""
        assert self._sync is not None
        result = await self._sync.message()
        self.exited = True
        if result is None:
            raise OCIRuntimeError(
                f"conmon for exec {clip(self.cmd)} in container {self.cid} ended without reporting an exit code")
        if result.data < 0 and result.message:
            raise OCIRuntimeError(f"exec {clip(self.cmd)} in container {self.cid}: {result.message}")
        return result.data

    async def close(self) -> None:
        """Kill what still runs (unless the exit was seen), reap conmon, free fds and files.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            proc = self._proc
            if proc is not None and proc.returncode is None:
                await asyncio.shield(self._reap(proc))
        finally:
            if self.sock is not None:
                self.sock.close()
            for fd in self._fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
            for p in (self._sync, self._attach):
                if p is not None:
                    p.close()
            try:
                os.unlink(self._link)
            except OSError:
                pass
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        if not self.exited:
            # The client left (or something failed): kill the exec'd process tree, then conmon ends.
            for _ in range(5):
                if not _kill_descendants(proc.pid):
                    break
                await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(proc.wait(), CONMON_EXIT_GRACE)
        except TimeoutError:
            _kill_descendants(proc.pid)
            try:
                os.killpg(proc.pid, _signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            await proc.wait()


HYBRID_V2_CONTROLLERS = "/sys/fs/cgroup/unified/cgroup.controllers"


def _crun_refuses_hybrid() -> bool:
    """crun 1.8 refuses hybrid hosts whose cgroup2 mount still offers controllers."""
    try:
        with open(HYBRID_V2_CONTROLLERS) as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _hybrid_safe(handler: RuntimeHandler, state_dir: str) -> RuntimeHandler:
    """On such a host, run crun in a private mount namespace without the cgroup2 mount,
    so it uses the v1 hierarchies only (as runc does there).  Nothing changes on the host."""
    if not os.path.basename(handler.path).startswith("crun") or not _crun_refuses_hybrid():
        return handler
    os.makedirs(state_dir, mode=0o711, exist_ok=True)
    wrapper = os.path.join(state_dir, f"{handler.name}-cgroupv1")
    text = ("#!/bin/sh\n"
            "exec unshare --mount --propagation private /bin/sh -c "
            f"'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec {handler.path} \"$@\"' crun \"$@\"\n")
    tmp = wrapper + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, wrapper)
    return RuntimeHandler(handler.name, wrapper, handler.root or os.path.join(state_dir, handler.name))


class OCIRuntime:
    """Drives one runtime handler (runc or crun) with one conmon per container."""

    def __init__(
        self,
        handler: RuntimeHandler,
        state_dir: str,
        conmon_path: str = "conmon",
        log_level: str = "info",
        *,
        systemd_cgroup: bool = False,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        # Root-only: the runtime's state (runc's state.json holds the whole spec, env included),
        # conmon's persist dirs and exec process specs, exit files, attach sockets.
        private_dir(self.state_dir)
        self.handler = _hybrid_safe(handler, self.state_dir)
        self.root = os.path.abspath(handler.root or os.path.join(self.state_dir, handler.name))
        self.conmon_path = shutil.which(conmon_path) or conmon_path
        self.log_level = log_level.lower()
        self.systemd_cgroup = systemd_cgroup
        self.command_timeout = command_timeout
        self.exit_dir = os.path.join(self.state_dir, "exits")
        self.socket_dir = os.path.join(self.state_dir, "attach")
        self.conmon_dir = os.path.join(self.state_dir, "conmon")
        # wait_exit machinery (bound to the loop it was first used on).
        self._waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._watch_loop: asyncio.AbstractEventLoop | None = None
        self._watcher: DirWatcher | None = None
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ paths

    def _check_cid(self, cid: str) -> None:
        if not _CID_RE.match(cid or ""):
            raise InvalidArgument(
                f"container id {cid!r} is not usable: use 1-128 letters, digits, '_', '.', '-' "
                "(starting with a letter or digit)"
            )

    def persist_dir(self, cid: str) -> str:
        self._check_cid(cid)
        return os.path.join(self.conmon_dir, cid)

    def exit_file(self, cid: str) -> str:
        self._check_cid(cid)
        return os.path.join(self.exit_dir, cid)

    def attach_socket_path(self, cid: str) -> str:
        """conmon's attach socket (SOCK_SEQPACKET) for *cid*; exists while conmon runs.

        The path may be longer than ``sun_path`` allows; connect through an
        ``O_PATH`` fd of its directory (``/proc/self/fd/<n>/attach``) in that case.
        """
        self._check_cid(cid)
        return os.path.join(self.socket_dir, cid, "attach")

    def _meta(self, cid: str) -> dict[str, Any]:
        try:
            with open(os.path.join(self.persist_dir(cid), "meta.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            raise NotFound(f"container {cid} was not created by this runtime (no conmon state)") from None

    def conmon_pid(self, cid: str) -> int | None:
        """Pid of the conmon supervising *cid*, if it is still running."""
        try:
            with open(os.path.join(self.persist_dir(cid), "conmon.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if _proc_is_conmon_for(pid, cid) else None

    # ------------------------------------------------------------------ runtime binary

    async def _run(self, args: list[str], *, cid: str, action: str, input: bytes | None = None,
                   timeout: float | None = None) -> bytes:
        argv = [self.handler.path, f"--root={self.root}", *args]
        limit = timeout or self.command_timeout
        try:
            rc, out, err = await procs.run_captured(argv, input=input, env=_child_env(), timeout=limit)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self.handler.name} {args[0]} for container {cid} did not finish within "
                f"{limit:g}s and was killed"
            ) from None
        if rc != 0:
            text = clean_runtime_error(err) or clean_runtime_error(out)
            raise _classify(text, cid, f"{self.handler.name} {action}", self.root)
        return out

    # ------------------------------------------------------------------ lifecycle

    async def create(
        self,
        cid: str,
        bundle: str,
        *,
        log_path: str,
        name: str | None = None,
        stdin: bool = False,
        stdin_once: bool = False,
        tty: bool = False,
        log_size_max: int | None = None,
        timeout: float = DEFAULT_CREATE_TIMEOUT,
    ) -> int:
        """Start conmon, which runs ``<runtime> create``; returns the container init's pid.

        The container is created, not started.  On failure nothing is left behind
        and the error carries the runtime's message.
        """
        self._check_cid(cid)
        bundle = os.path.abspath(bundle)
        if not os.path.isfile(os.path.join(bundle, "config.json")):
            raise InvalidArgument(f"bundle {bundle} has no config.json")
        if not log_path:
            raise InvalidArgument("a log path is required for conmon")
        log_path = os.path.abspath(log_path)
        pdir = self.persist_dir(cid)
        if self.conmon_pid(cid) is not None:
            raise AlreadyExists(f"container {cid} already has a running conmon")
        for d in (self.root, self.exit_dir, self.socket_dir, self.conmon_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(log_path), mode=0o755, exist_ok=True)
        # Never touch (or, on failure, delete) a container the runtime already has.
        try:
            existing = await self.state(cid)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"container {cid} already exists in {self.handler.name} ({existing.status})")
        shutil.rmtree(pdir, ignore_errors=True)
        os.makedirs(pdir, mode=0o700)
        self._remove_quietly(self.exit_file(cid))
        meta = {"bundle": bundle, "log_path": log_path, "handler": self.handler.name,
                "runtime_path": self.handler.path, "tty": tty, "stdin": stdin, "name": name or cid}
        with open(os.path.join(pdir, "meta.json"), "w") as f:
            json.dump(meta, f)

        opts = ConmonOptions(
            conmon_path=self.conmon_path, runtime_path=self.handler.path, cid=cid, cuuid=cid,
            runtime_root=self.root, container_pidfile=os.path.join(bundle, "pidfile"), name=name or cid,
            bundle=bundle, log_path=log_path, exit_dir=self.exit_dir, persist_dir=pdir,
            conmon_pidfile=os.path.join(pdir, "conmon.pid"), socket_dir=self.socket_dir,
            log_level=self.log_level, log_size_max=log_size_max, stdin=stdin,
            leave_stdin_open=stdin and not stdin_once, terminal=tty, systemd_cgroup=self.systemd_cgroup,
        )
        argv = conmon_argv(opts)
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        start_r, start_w = os.pipe2(os.O_CLOEXEC)
        sync = _SyncPipe(sync_r)
        conmon_log = os.path.join(pdir, "conmon.log")
        try:
            with open(conmon_log, "wb") as logf:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                    pass_fds=(sync_w, start_r), cwd=pdir, start_new_session=True,
                    env=_child_env({"_OCI_SYNCPIPE": str(sync_w), "_OCI_STARTPIPE": str(start_r)}),
                )
            os.close(sync_w)
            sync_w = -1
            os.close(start_r)
            start_r = -1
            await sync.open()
            # conmon waits for this before forking; a place to move it into a cgroup.
            os.write(start_w, b"0")
            os.close(start_w)
            start_w = -1
            try:
                async with asyncio.timeout(timeout):
                    rc = await proc.wait()  # the first conmon exits once it has daemonized
                    msg = await sync.message() if rc == 0 else None
            except TimeoutError:
                await self._abort_create(cid, proc)
                raise DeadlineExceeded(
                    f"creating container {cid} with {self.handler.name} took longer than {timeout:g}s; gave up"
                ) from None
            except asyncio.CancelledError:
                await self._abort_create(cid, proc)
                raise
        finally:
            for fd in (sync_w, start_r, start_w):
                if fd >= 0:
                    os.close(fd)
            sync.close()

        if msg is None or msg.data <= 0:
            if msg is not None and msg.message:
                text = clean_runtime_error(msg.message)
            else:
                text = self._read_text(conmon_log) or f"conmon exited with status {proc.returncode}"
            err = _classify(text, cid, f"{self.handler.name} create", self.root)
            if isinstance(err, AlreadyExists):  # lost a race with another create: leave theirs alone
                raise err
            await self._abort_create(cid, None)
            if isinstance(err, NotFound):  # "does not exist" from inside create is about a path, not the id
                err = OCIRuntimeError(f"{self.handler.name} create container {cid}: {text}", stderr=text)
            raise err
        pid = msg.data

        def record_cgroups() -> None:
            dirs = cgroups.cgroup_dirs_for_pid(pid)
            with open(os.path.join(pdir, "cgroup.json"), "w") as f:
                json.dump(dirs, f)

        try:
            # mountinfo grows with every container's mounts; parsing it took ms of loop time
            await asyncio.to_thread(record_cgroups)
        except (MoorageError, OSError):
            pass
        return pid

    async def _abort_create(self, cid: str, proc: asyncio.subprocess.Process | None) -> None:
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
        pid = self.conmon_pid(cid)
        if pid is not None:
            try:
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            await self._run(["delete", "--force", cid], cid=cid, action="delete")
        except MoorageError:
            pass
        await self._wait_conmon_gone(cid, CONMON_EXIT_GRACE)
        self._cleanup_files(cid)

    async def start(self, cid: str) -> None:
        self._check_cid(cid)
        await self._run(["start", cid], cid=cid, action="start")

    async def kill(self, cid: str, signal: int, all: bool = False) -> None:
        self._check_cid(cid)
        args = ["kill"] + (["--all"] if all else []) + [cid, str(int(signal))]
        await self._run(args, cid=cid, action="kill")

    async def delete(self, cid: str, force: bool = False) -> None:
        """Delete the container from the runtime and drop conmon's files; a no-op if already gone."""
        self._check_cid(cid)
        try:
            await self._run(["delete"] + (["--force"] if force else []) + [cid], cid=cid, action="delete")
        except NotFound:
            pass
        # conmon notices the exit and writes the exit file; let it finish so no file reappears later.
        if not await self._wait_conmon_gone(cid, CONMON_EXIT_GRACE):
            pid = self.conmon_pid(cid)
            if pid is not None:
                try:
                    os.kill(pid, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await self._wait_conmon_gone(cid, CONMON_EXIT_GRACE)
        self._cleanup_files(cid)

    async def _wait_conmon_gone(self, cid: str, grace: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (pid := self.conmon_pid(cid)) is not None:
            left = deadline - loop.time()
            if left <= 0:
                return False
            # Woken by the exit itself (a pidfd turns readable), not by a poll: RemoveContainer
            # right after a stop used to sleep 50 ms for a conmon that was just finishing.
            await _wait_pid_exit(pid, min(left, 0.5))
        return True

    def _cleanup_files(self, cid: str) -> None:
        self._remove_quietly(self.exit_file(cid))
        link = os.path.join(self.socket_dir, cid)
        if os.path.islink(link):
            self._remove_quietly(link)
        shutil.rmtree(self.persist_dir(cid), ignore_errors=True)

    @staticmethod
    def _remove_quietly(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    @staticmethod
    def _read_text(path: str, limit: int = 16384) -> str:
        try:
            with open(path, "rb") as f:
                return clean_runtime_error(f.read(limit))
        except OSError:
            return ""

    async def state(self, cid: str) -> ContainerState:
        self._check_cid(cid)
        out = await self._run(["state", cid], cid=cid, action="state")
        return self._parse_state(json.loads(out))

    async def list(self) -> list[ContainerState]:
        if not os.path.isdir(self.root):
            return []
        out = await self._run(["list", "--format", "json"], cid="*", action="list")
        data = json.loads(out or b"null") or []
        return [self._parse_state(d) for d in data]

    @staticmethod
    def _parse_state(d: dict[str, Any]) -> ContainerState:
        return ContainerState(
            id=d.get("id", ""), status=d.get("status", "unknown"), pid=int(d.get("pid") or 0),
            bundle=d.get("bundle", ""), created=d.get("created", ""),
            annotations=d.get("annotations") or {},
        )

    # ------------------------------------------------------------------ exit & OOM

    def oom_killed(self, cid: str) -> bool:
        """True if conmon saw an OOM event, or the container's memory cgroup counted an OOM kill."""
        pdir = self.persist_dir(cid)
        if os.path.exists(os.path.join(pdir, "oom")):
            return True
        try:
            with open(os.path.join(pdir, "cgroup.json")) as f:
                dirs = json.load(f)
        except (OSError, ValueError):
            return False
        return cgroups.oom_kill_count(dirs) > 0

    def exit_status(self, cid: str) -> ExitStatus | None:
        """The recorded exit, or None while the container has not exited (or was never started)."""
        path = self.exit_file(cid)
        try:
            with open(path, "rb") as f:
                code = parse_exit_file(f.read())
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # torn write cannot happen (rename), but be safe
        finished = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)
        return ExitStatus(code=code, finished_at=finished, oom_killed=self.oom_killed(cid))

    def exit_code(self, cid: str) -> tuple[int, datetime] | None:
        st = self.exit_status(cid)
        return None if st is None else (st.code, st.finished_at)

    async def wait_exit(self, cid: str, timeout: float | None = None) -> int:
        """Wait until conmon records *cid*'s exit; returns the exit status.

        One inotify watch on the exit dir serves every waiter, with a 1 s poll
        as a fallback.  Raises ``DeadlineExceeded`` on timeout and ``Internal``
        if conmon died without recording an exit.
        """
        st = self.exit_status(cid)
        if st is not None:
            return st.code
        loop = asyncio.get_running_loop()
        if self._watch_loop is not loop:
            self._stop_watching()
            self._waiters.clear()
            self._watch_loop = loop
        fut: asyncio.Future[int] = loop.create_future()
        self._waiters.setdefault(cid, []).append(fut)
        try:
            self._ensure_watching(loop)
            self._check_exit(cid)  # the file may have appeared before the watch
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                raise DeadlineExceeded(f"container {cid} did not exit within {timeout:g}s") from None
        finally:
            lst = self._waiters.get(cid, [])
            if fut in lst:
                lst.remove(fut)
            if not lst:
                self._waiters.pop(cid, None)
            if not self._waiters:
                self._stop_watching()

    def _ensure_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        os.makedirs(self.exit_dir, mode=0o700, exist_ok=True)
        if self._watcher is None or not self._watcher.running:
            self._watcher = DirWatcher(self.exit_dir, self._on_exit_name)
            self._watcher.start(loop)
        if self._poller is None or self._poller.done():
            self._poller = loop.create_task(self._poll_exits())

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._poller is not None:
            if not self._poller.done() and not self._poller.get_loop().is_closed():
                self._poller.cancel()
            self._poller = None

    def _on_exit_name(self, name: str) -> None:
        if name == "":
            for cid in list(self._waiters):
                self._check_exit(cid)
        elif name in self._waiters:
            self._check_exit(name)

    def _check_exit(self, cid: str, conmon_gone: bool = False) -> None:
        st = self.exit_status(cid)
        futs = self._waiters.get(cid, [])
        for fut in futs:
            if fut.done():
                continue
            if st is not None:
                fut.set_result(st.code)
            elif conmon_gone:
                fut.set_exception(Internal(
                    f"conmon for container {cid} is gone without recording an exit code in "
                    f"{self.exit_file(cid)}; see {os.path.join(self.persist_dir(cid), 'conmon.log')}"
                ))

    async def _poll_exits(self) -> None:
        while self._waiters:
            await asyncio.sleep(POLL_INTERVAL)
            for cid in list(self._waiters):
                # No persist dir at all: conmon's state is gone (e.g. a reboot wiped the state
                # dir), so no conmon will ever record this exit.
                pdir = self.persist_dir(cid)
                gone = self.conmon_pid(cid) is None and (
                    not os.path.isdir(pdir) or os.path.exists(os.path.join(pdir, "conmon.pid")))
                self._check_exit(cid, conmon_gone=gone)

    # ------------------------------------------------------------------ exec

    def _exec_process_spec(self, cid: str, cmd: builtins.list[str]) -> dict[str, Any]:
        bundle = self._meta(cid)["bundle"]
        try:
            with open(os.path.join(bundle, "config.json")) as f:
                process = dict(json.load(f).get("process") or {})
        except (OSError, ValueError) as e:
            raise FailedPrecondition(f"cannot read the OCI config of container {cid} in {bundle}: {e}") from e
        process["args"] = list(cmd)
        process["terminal"] = False
        process.pop("consoleSize", None)
        return process

    async def exec_sync(
        self, cid: str, cmd: builtins.list[str], timeout: float | None, *, max_output: int = MAX_EXEC_OUTPUT
    ) -> tuple[int, bytes, bytes]:
        """Run *cmd* in the running container; returns (exit code, stdout, stderr).

        stdout and stderr together are cut at *max_output* bytes (the rest is read and
        dropped; a ``truncation_marker`` then ends stderr and a warning is logged).
        *timeout* (seconds, None or <= 0 for none): when it passes, the
        exec'd process and everything it started are SIGKILLed and
        ``DeadlineExceeded`` is raised — the kubelet maps that gRPC code to a
        probe timeout.  A binary the runtime cannot find or execute answers exit
        code 127 or 126 with the runtime's words on stderr (``exec_start_failure_code``);
        any other failure to start (container not running) raises with them.
        """
        self._check_cid(cid)
        if not cmd:
            raise InvalidArgument("exec needs a command")
        if timeout is not None and timeout <= 0:
            timeout = None
        process = self._exec_process_spec(cid, cmd)
        pdir = self.persist_dir(cid)
        exec_id = uuid.uuid4().hex
        workdir = os.path.join(pdir, f"exec-{exec_id[:12]}")
        os.makedirs(workdir, mode=0o700)
        try:
            return await self._exec_sync(cid, cmd, process, workdir, exec_id, timeout, max_output)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def _exec_sync(self, cid: str, cmd: builtins.list[str], process: dict[str, Any], workdir: str, exec_id: str,
                         timeout: float | None, max_output: int) -> tuple[int, bytes, bytes]:
        spec_path = os.path.join(workdir, "process.json")
        with open(spec_path, "w") as f:
            json.dump(process, f)
        opts = ConmonOptions(
            conmon_path=self.conmon_path, runtime_path=self.handler.path, cid=cid, cuuid=exec_id,
            runtime_root=self.root, container_pidfile=os.path.join(workdir, "pid"), passthrough=True,
            # In passthrough mode conmon's own messages go to the exec'd command's stderr,
            # which the caller reads as the command's output: keep conmon quiet.
            log_level="error", sync=True, exec_process_spec=spec_path,
            timeout=(math.ceil(timeout) + EXEC_BACKSTOP_SECONDS) if timeout else None,
        )
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        sync = _SyncPipe(sync_r)
        proc = None
        out, err = bytearray(), bytearray()
        budget = _OutputBudget(max_output)
        readers: list[asyncio.Task[None]] = []
        try:
            proc = await asyncio.create_subprocess_exec(
                *conmon_argv(opts), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(sync_w,), cwd=workdir, start_new_session=True,
                env=_child_env({"_OCI_SYNCPIPE": str(sync_w)}),
            )
            os.close(sync_w)
            sync_w = -1
            await sync.open()
            assert proc.stdout is not None and proc.stderr is not None
            readers = [asyncio.ensure_future(_read_bounded(proc.stdout, budget, out)),
                       asyncio.ensure_future(_read_bounded(proc.stderr, budget, err))]
            exec_pid = None
            timed_out = False
            result: SyncMessage | None = None
            try:
                async with asyncio.timeout(timeout):
                    first = await sync.message()
                    if first is not None and first.data > 0:
                        exec_pid = first.data
                        result = await sync.message()
                    else:
                        result = first
            except TimeoutError:
                timed_out = True
            if timed_out:
                if exec_pid is not None:
                    _kill_tree(exec_pid)
                else:
                    self._kill_group(proc)
                try:
                    async with asyncio.timeout(CONMON_EXIT_GRACE):
                        await sync.message()
                except TimeoutError:
                    self._kill_group(proc)
                await self._finish_exec(proc, readers)
                raise DeadlineExceeded(
                    f"command {clip(cmd)} in container {cid} timed out after {timeout:g}s; it was killed"
                )
            await self._finish_exec(proc, readers)
            if exec_pid is None:
                text = (clean_runtime_error((result.message or "") if result else "")
                        or clean_runtime_error(bytes(err)) or clean_runtime_error(bytes(out))
                        or f"conmon exited with status {proc.returncode}")
                e = _classify(text, cid, f"{self.handler.name} exec {clip(cmd[0])} in", self.root)
                code = exec_start_failure_code(text) if type(e) is OCIRuntimeError else None
                if code is not None:
                    # As CRI-O: a command that cannot start is an answer, not an error: the
                    # kubelet's exec probe sees a failed command and the runtime's words.
                    return code, bytes(out), (text.rstrip("\n") + "\n").encode()
                raise e
            if result is None:
                raise OCIRuntimeError(
                    f"conmon for exec {clip(cmd)} in container {cid} ended without reporting an exit code "
                    f"(status {proc.returncode})"
                )
            if result.data < 0 and result.message == TIMED_OUT_MESSAGE:
                raise DeadlineExceeded(f"command {clip(cmd)} in container {cid} timed out; it was killed")
            if budget.dropped:
                # The command's name only: its arguments and output may hold anything.
                log.warning("ExecSync output truncated", extra={"fields": {
                    "container": cid, "command": cmd[0][:256], "kept_bytes": max_output,
                    "dropped_bytes": budget.dropped}})
                err += truncation_marker(budget.dropped, max_output)
            return result.data, bytes(out), bytes(err)
        finally:
            if sync_w >= 0:
                os.close(sync_w)
            sync.close()
            for t in readers:
                if not t.done():
                    t.cancel()
            if proc is not None and proc.returncode is None:
                self._kill_group(proc)
                await proc.wait()

    @staticmethod
    def _kill_group(proc: asyncio.subprocess.Process) -> None:
        try:
            os.killpg(proc.pid, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def _finish_exec(self, proc: asyncio.subprocess.Process, readers: builtins.list[asyncio.Task[None]]) -> None:
        # Output written just before exit is still in the pipes; a background child
        # that keeps them open must not hold us forever.
        done, pending = await asyncio.wait(readers, timeout=EXEC_DRAIN_GRACE)
        for t in pending:
            t.cancel()
        try:
            await asyncio.wait_for(proc.wait(), CONMON_EXIT_GRACE)
        except TimeoutError:
            self._kill_group(proc)
            await proc.wait()

    # ------------------------------------------------------------------ interactive exec

    async def exec_session(self, cid: str, cmd: builtins.list[str], *, tty: bool = False, stdin: bool = False,
                           console_size: tuple[int, int] | None = None) -> ExecSession:
        """Start *cmd* in the running container as an interactive session.

        One ``conmon --exec --exec-attach --sync`` per session, with ``--terminal`` for
        *tty* (and ``TERM=xterm`` unless the container sets TERM); *console_size* is
        (height, width).  conmon opens an attach socket in the session's scratch dir
        and tells us on ``_OCI_ATTACHPIPE``; we connect, then release it through
        ``_OCI_STARTPIPE``, so ``<runtime> exec`` starts only once no output can be
        lost.  The container's own conmon is not involved.  Returns once the process
        runs; a command that cannot start raises with the runtime's message.  The
        caller must ``close()`` the session.
        """
        self._check_cid(cid)
        if not cmd:
            raise InvalidArgument("exec needs a command")
        process = self._exec_process_spec(cid, cmd)  # the container's process, with these args
        process["terminal"] = bool(tty)
        if tty:
            env = list(process.get("env") or [])
            if not any(e.startswith("TERM=") for e in env):
                process["env"] = env + ["TERM=xterm"]
            if console_size is not None:
                process["consoleSize"] = {"height": console_size[0], "width": console_size[1]}
        exec_id = uuid.uuid4().hex
        workdir = os.path.join(self.persist_dir(cid), f"exec-{exec_id[:12]}")
        os.makedirs(workdir, mode=0o700)
        sess = ExecSession(cid, cmd, exec_id, workdir, os.path.join(self.socket_dir, exec_id))
        try:
            await self._start_exec_session(sess, process, tty, stdin)
        except BaseException:
            await sess.close()
            raise
        return sess

    async def _start_exec_session(self, sess: ExecSession, process: dict[str, Any], tty: bool, stdin: bool) -> None:
        cid, workdir = sess.cid, sess.workdir
        spec_path = os.path.join(workdir, "process.json")
        with open(spec_path, "w") as f:
            json.dump(process, f)
        os.makedirs(self.socket_dir, mode=0o700, exist_ok=True)
        opts = ConmonOptions(
            conmon_path=self.conmon_path, runtime_path=self.handler.path, cid=cid, cuuid=sess.exec_id,
            runtime_root=self.root, container_pidfile=os.path.join(workdir, "pid"), bundle=workdir,
            socket_dir=self.socket_dir, log_level=EXEC_CONMON_LOG_LEVEL, stdin=stdin, terminal=tty,
            sync=True, exec_process_spec=spec_path, exec_attach=True,
        )
        # No log driver: output goes to the attach socket only ("none" needs conmon >= 2.0.x).
        argv = conmon_argv(opts) + ["--log-path", "none"]
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        sess._fds.append(sync_w)
        sess._sync = _SyncPipe(sync_r)
        attach_r, attach_w = os.pipe2(os.O_CLOEXEC)
        sess._fds.append(attach_w)
        sess._attach = _SyncPipe(attach_r)
        start_r, start_w = os.pipe2(os.O_CLOEXEC)
        sess._fds += [start_r, start_w]
        conmon_log = os.path.join(workdir, "conmon.log")
        with open(conmon_log, "wb") as logf:
            sess._proc = proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                pass_fds=(sync_w, attach_w, start_r), cwd=workdir, start_new_session=True,
                env=_child_env({"_OCI_SYNCPIPE": str(sync_w), "_OCI_ATTACHPIPE": str(attach_w),
                                "_OCI_STARTPIPE": str(start_r)}),
            )
        for fd in (sync_w, attach_w, start_r):
            os.close(fd)
            sess._fds.remove(fd)
        await sess._sync.open()
        await sess._attach.open()
        os.write(start_w, b"0")  # conmon's first wait (a chance to move it into a cgroup)
        ready = await sess._attach.message()  # the attach socket is listening
        if ready is None:
            await asyncio.wait_for(proc.wait(), CONMON_EXIT_GRACE)
            raise self._exec_failure(sess, await sess._sync.message(), conmon_log, proc.returncode)
        sess.sock = connect_seqpacket(os.path.join(workdir, "attach"))
        os.write(start_w, b"0")  # now conmon may run `<runtime> exec`
        os.close(start_w)
        sess._fds.remove(start_w)
        first = await sess._sync.message()
        if first is None or first.data <= 0:
            raise self._exec_failure(sess, first, conmon_log, None)
        sess.pid = first.data

    def _exec_failure(self, sess: ExecSession, msg: SyncMessage | None, conmon_log: str,
                      rc: int | None) -> MoorageError:
        text = clean_runtime_error(msg.message) if msg is not None and msg.message else ""
        if not text:
            text = self._read_text(conmon_log)
        text = text or f"conmon exited with status {rc}"
        return _classify(text, sess.cid, f"exec {clip(sess.cmd[0])} in", "")

    def reap_exec_sessions(self) -> builtins.list[int]:
        """Kill exec sessions a previous daemon process left behind; remove their files.

        Exec conmons run with ``--sync`` as the daemon's children.  After a daemon crash
        they and their commands keep running with nobody to read their output or end
        them (an interactive ``sh`` would stay forever).  Meant for start-up, before any
        new session exists: every ``exec-*`` dir is stale then.  Only processes whose
        ``/proc/<pid>/cmdline`` proves them exec conmons of this state dir are killed
        (with everything below them), by pid.  Returns the conmon pids killed.
        """
        killed = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if _exec_conmon_session_dir(_cmdline(pid), self.conmon_dir) is None:
                continue
            # Snapshot the tree first: once conmon dies its children are re-parented.
            _kill_tree(pid)
            killed.append(pid)
        stale_dirs: list[tuple[str, str]] = []
        if os.path.isdir(self.conmon_dir):
            for cid in os.listdir(self.conmon_dir):
                d = os.path.join(self.conmon_dir, cid)
                try:
                    names = os.listdir(d)
                except OSError:
                    continue
                stale_dirs += [(cid, os.path.join(d, n)) for n in names if n.startswith("exec-")]
        for cid, d in stale_dirs:
            # A session's conmon may be gone (e.g. SIGPIPE on its dead daemon's pipes) while the
            # exec'd process lives on in the container: runc's pid file of the session names it.
            orphan = self._orphaned_exec_process(cid, os.path.join(d, "pid"))
            if orphan is not None:
                _kill_tree(orphan)
                killed.append(orphan)
            shutil.rmtree(d, ignore_errors=True)
        if os.path.isdir(self.socket_dir):  # conmon's <socket_dir>/<exec id> links to exec dirs
            for name in os.listdir(self.socket_dir):
                link = os.path.join(self.socket_dir, name)
                try:
                    target = os.readlink(link)
                except OSError:
                    continue
                if os.path.basename(os.path.normpath(target)).startswith("exec-"):
                    self._remove_quietly(link)
        return killed

    def _orphaned_exec_process(self, cid: str, pidfile: str) -> int | None:
        """The pid in an exec session's pid file, if that process still runs in *cid*.

        Proof required: it lives in the pid namespace of the container's init (and is not
        the init), and it started before the pid file was written (so not a reused pid).
        """
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            written = os.stat(pidfile).st_mtime
            with open(os.path.join(self._meta(cid)["bundle"], "pidfile")) as f:
                init = int(f.read().strip())
            if pid <= 1 or pid == init:
                return None
            if os.readlink(f"/proc/{pid}/ns/pid") != os.readlink(f"/proc/{init}/ns/pid"):
                return None
            started = _process_start_time(pid)
        except (OSError, ValueError, KeyError, MoorageError):
            return None
        return pid if started is not None and started <= written + 2 else None

    # ------------------------------------------------------------------ resources & control

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        """Apply OCI ``linux.resources`` (JSON-able dict) to the running container."""
        self._check_cid(cid)
        if not isinstance(resources, dict):
            raise InvalidArgument("resources must be an OCI linux.resources object")
        pdir = self.persist_dir(cid)
        os.makedirs(pdir, mode=0o700, exist_ok=True)
        path = os.path.join(pdir, f"resources-{uuid.uuid4().hex[:8]}.json")
        try:
            with open(path, "w") as f:
                json.dump(resources, f)
            await self._run(["update", "--resources", path, cid], cid=cid, action="update")
        finally:
            self._remove_quietly(path)

    def _write_ctl(self, cid: str, data: bytes, what: str) -> None:
        bundle = self._meta(cid)["bundle"]
        path = os.path.join(bundle, "ctl")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, OSError) as e:
            raise FailedPrecondition(
                f"cannot {what} for container {cid}: its conmon is not running ({path}: {e.strerror})"
            ) from None
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    async def reopen_log(self, cid: str) -> None:
        """Ask conmon to reopen (re-create) the container's log file at its original path."""
        self._meta(cid)  # NotFound for containers we do not know
        if self.conmon_pid(cid) is None:
            raise FailedPrecondition(f"container {cid} is not running (no conmon); nothing to reopen")
        self._write_ctl(cid, ctl_message(REOPEN_LOGS_EVENT), "reopen the log")

    async def resize(self, cid: str, height: int, width: int) -> None:
        """Resize the container's terminal (only meaningful with tty=True)."""
        self._check_cid(cid)
        self._write_ctl(cid, ctl_message(WIN_RESIZE_EVENT, height, width), "resize the terminal")
