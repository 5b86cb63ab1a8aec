"""conmon plumbing: command lines, sync-pipe messages, the ctl fifo, exit files.

Facts about conmon (2.1.x) this module relies on:

* The parent hands conmon pipe fds through environment variables:
  ``_OCI_SYNCPIPE`` (conmon writes JSON lines to it) and ``_OCI_STARTPIPE``
  (conmon blocks reading one message from it before doing anything, so the
  parent can e.g. move it into a cgroup first).
* With ``--api-version 1`` every sync message is one line
  ``{"data": N}`` or ``{"data": N, "message": "..."}``.  For a container
  create, N is the container's pid, or -1 on failure with the runtime's stderr
  as message.  For ``--exec`` there are two messages: the exec'd pid, then its
  exit status (-1 with ``"command timed out"`` if conmon's ``-T`` fired).
* Without ``--sync`` conmon forks once more and the process we started exits
  right away after writing ``--conmon-pidfile``: the real conmon is re-parented
  and outlives us.
* When the container exits, conmon writes its exit status as decimal text to
  ``<exit-dir>/<cid>`` (and ``<persist-dir>/exit``), atomically (temp file +
  rename).  Killed by signal S is reported as 128+S.
* On an OOM event conmon creates an empty ``oom`` file in ``--persist-dir``
  and in its working directory.
* The control fifo is ``<bundle>/ctl``; messages are ``"<type> <h> <w>\\n"``
  with type 1 = resize the terminal, 2 = reopen the log file.
* Without ``--full-attach`` the attach socket is
  ``<socket-dir-path>/<cuuid>/attach``, where ``<socket-dir-path>/<cuuid>`` is
  a symlink conmon makes to the bundle dir (and removes when it exits).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

WIN_RESIZE_EVENT = 1
REOPEN_LOGS_EVENT = 2
TIMED_OUT_MESSAGE = "command timed out"

CONMON_LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "fatal", "panic")


@dataclass
class ConmonOptions:
    """Everything that varies in a conmon command line."""

    conmon_path: str
    runtime_path: str
    cid: str
    cuuid: str
    runtime_root: str
    container_pidfile: str
    name: str | None = None
    bundle: str | None = None
    log_path: str | None = None  # k8s-file path, or None with passthrough=True
    passthrough: bool = False
    exit_dir: str | None = None
    persist_dir: str | None = None
    conmon_pidfile: str | None = None
    socket_dir: str | None = None
    log_level: str = "info"
    log_size_max: int | None = None
    stdin: bool = False
    leave_stdin_open: bool = False
    terminal: bool = False
    systemd_cgroup: bool = False
    sync: bool = False
    exec_process_spec: str | None = None  # set for --exec
    exec_attach: bool = False  # interactive exec: conmon waits on _OCI_ATTACHPIPE/_OCI_STARTPIPE
    timeout: int | None = None  # conmon -T, seconds
    no_pivot: bool = False
    extra_runtime_args: tuple[str, ...] = ()


def conmon_argv(o: ConmonOptions) -> list[str]:
    """The conmon command line for a container create or an exec session."""
    if o.log_level not in CONMON_LOG_LEVELS:
        raise ValueError(f"conmon log level {o.log_level!r} is not one of {', '.join(CONMON_LOG_LEVELS)}")
    argv = [
        o.conmon_path,
        "--api-version", "1",
        "-c", o.cid,
        "-u", o.cuuid,
        "-r", o.runtime_path,
        "-p", o.container_pidfile,
        "--log-level", o.log_level,
        "--runtime-arg", f"--root={o.runtime_root}",
    ]
    for a in o.extra_runtime_args:
        argv += ["--runtime-arg", a]
    if o.name:
        argv += ["-n", o.name]
    if o.bundle:
        argv += ["-b", o.bundle]
    if o.passthrough:
        argv += ["-l", "passthrough"]
    elif o.log_path:
        argv += ["-l", f"k8s-file:{o.log_path}"]
    if o.log_size_max is not None and o.log_size_max > 0:
        argv += ["--log-size-max", str(o.log_size_max)]
    if o.exit_dir:
        argv += ["--exit-dir", o.exit_dir]
    if o.persist_dir:
        argv += ["--persist-dir", o.persist_dir]
    if o.conmon_pidfile:
        argv += ["--conmon-pidfile", o.conmon_pidfile]
    if o.socket_dir:
        argv += ["--socket-dir-path", o.socket_dir]
    if o.stdin:
        argv.append("--stdin")
        if o.leave_stdin_open:
            argv.append("--leave-stdin-open")
    if o.terminal:
        argv.append("--terminal")
    if o.systemd_cgroup:
        argv.append("--systemd-cgroup")
    if o.sync:
        argv.append("--sync")
    if o.no_pivot:
        argv.append("--no-pivot")
    if o.exec_process_spec:
        argv += ["--exec", "--exec-process-spec", o.exec_process_spec]
        if o.exec_attach:
            argv.append("--exec-attach")
    if o.timeout is not None and o.timeout > 0:
        argv += ["--timeout", str(o.timeout)]
    return argv


@dataclass
class SyncMessage:
    data: int
    message: str | None = None


def parse_sync_message(line: bytes | str) -> SyncMessage:
    """Parse one sync-pipe line.  Tolerates the pre-API-1 keys (``pid``, ``exit_code``)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        # Very old conmons did not escape every control character; salvage what we can.
        m = re.match(r'\{\s*"(?:data|pid|exit_code)"\s*:\s*(-?\d+)\s*(?:,\s*"message"\s*:\s*"(.*)")?\s*\}\s*$', line, re.S)
        if not m:
            raise ValueError(f"unparseable message from conmon: {line!r}") from None
        return SyncMessage(int(m.group(1)), m.group(2))
    for key in ("data", "pid", "exit_code"):
        if key in obj:
            return SyncMessage(int(obj[key]), obj.get("message"))
    raise ValueError(f"unexpected message from conmon: {line!r}")


_LOGRUS_MSG = re.compile(r'level=(error|fatal|panic|warning)\s+msg="((?:[^"\\]|\\.)*)"')


def clean_runtime_error(text: str | bytes) -> str:
    """Turn runc/crun stderr into a one-message string a person can read.

    runc logs with logrus (``time=... level=error msg="..."``) or JSON
    (``{"level":"error","msg":"..."}``); crun prints ``crun: ...`` or a plain
    line.  The message text itself (e.g. ``exec: "/nope": stat /nope: no such
    file or directory``) is kept verbatim.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    msgs: list[str] = []
    warnings: list[str] = []  # runc's warnings (e.g. "unable to get oom kill count") only when nothing else
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = _LOGRUS_MSG.search(line)
        if m:
            try:
                msg = json.loads('"' + m.group(2) + '"')
            except json.JSONDecodeError:
                msg = m.group(2).replace('\\"', '"')
            (warnings if m.group(1) == "warning" else msgs).append(msg)
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                if isinstance(obj, dict) and "msg" in obj:
                    level = obj.get("level", "error")
                    if level in ("error", "fatal", "panic"):
                        msgs.append(str(obj["msg"]))
                    elif level == "warning":
                        warnings.append(str(obj["msg"]))
                    continue
            except json.JSONDecodeError:
                pass
        if re.match(r'time="[^"]*"\s+level=(debug|info)', line):
            continue
        msgs.append(line)
    msgs = msgs or warnings
    # De-duplicate while keeping order (runc repeats the final error).
    return "; ".join(dict.fromkeys(msgs))


def ctl_message(kind: int, height: int = 0, width: int = 0) -> bytes:
    return f"{kind} {height} {width}\n".encode()


def parse_exit_file(text: str | bytes) -> int:
    if isinstance(text, bytes):
        text = text.decode()
    return int(text.strip())


# --------------------------------------------------------------------------- inotify

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
_EVENT_HDR = struct.Struct("iIII")

_libc = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


def parse_inotify_events(buf: bytes) -> list[tuple[int, int, str]]:
    """``[(wd, mask, name), ...]`` from a read() of an inotify fd."""
    out = []
    off = 0
    while off + _EVENT_HDR.size <= len(buf):
        wd, mask, _cookie, length = _EVENT_HDR.unpack_from(buf, off)
        off += _EVENT_HDR.size
        name = buf[off:off + length].split(b"\0", 1)[0].decode("utf-8", "replace")
        off += length
        out.append((wd, mask, name))
    return out


class DirWatcher:
    """Calls *on_name(name)* for files completed in *directory* (written or renamed into it).

    One inotify fd on the asyncio loop, whatever the number of containers.
    *on_name("")* is called on a queue overflow, meaning "rescan everything".
    """

    def __init__(self, directory: str, on_name: Callable[[str], None]) -> None:
        self._dir = directory
        self._on_name = on_name
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Start watching; False if inotify is unavailable (callers then rely on polling)."""
        libc = _get_libc()
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return False
        wd = libc.inotify_add_watch(fd, os.fsencode(self._dir), IN_CLOSE_WRITE | IN_MOVED_TO)
        if wd < 0:
            os.close(fd)
            return False
        self._fd = fd
        self._loop = loop
        loop.add_reader(fd, self._readable)
        return True

    def _readable(self) -> None:
        try:
            buf = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            self.stop()
            self._on_name("")
            return
        for _wd, mask, name in parse_inotify_events(buf):
            if mask & IN_Q_OVERFLOW:
                self._on_name("")
            elif name:
                self._on_name(name)

    def stop(self) -> None:
        if self._fd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._loop = None

    @property
    def running(self) -> bool:
        return self._fd >= 0
