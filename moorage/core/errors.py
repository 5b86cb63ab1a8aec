"""Domain errors shared by every layer below ``cri/``.

Handlers and libraries raise these; ``cri/errors.py`` maps them to gRPC status
codes in exactly one place.  Messages are written for a person reading them in
``crictl`` output: say what was wrong and, where possible, what to do.
"""

from __future__ import annotations

import errno
import sqlite3

#: How much of an untrusted value a message may echo (``clip``).
MAX_ECHO = 256
#: The longest message a status may carry: gRPC metadata is refused past 16 KiB, and a
#: message is also one log line.  The edge cuts any longer one (``bound``).
MAX_MESSAGE = 4096


def clip(value: object, limit: int = MAX_ECHO) -> str:
    """``repr`` of an untrusted value for a message, cut to ``limit`` characters.

    The repr escapes newlines, NULs and control characters, so the echo cannot
    forge log lines; the cut keeps a 200 KB argv out of a gRPC status.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    head = text[:limit]
    more = len(text.encode("utf-8", "surrogatepass")) - len(head.encode("utf-8", "surrogatepass"))
    return f"{head!r}…({more} more bytes)"


def bound(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` cut to ``limit`` characters, saying how much was cut (the edge's last guard)."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}…({len(message) - limit} more characters cut)"


class MoorageError(Exception):
    """Base class: an error with a message meant for the API caller."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        message = bound(message)
        super().__init__(message)
        self.message = message


class InvalidArgument(MoorageError):
    code = "INVALID_ARGUMENT"


class NotFound(MoorageError):
    code = "NOT_FOUND"


class AlreadyExists(MoorageError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(MoorageError):
    code = "FAILED_PRECONDITION"


class Unauthenticated(MoorageError):
    code = "UNAUTHENTICATED"


class PermissionDenied(MoorageError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(MoorageError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(MoorageError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(MoorageError):
    code = "UNAVAILABLE"


class DataLoss(MoorageError):
    """Content does not match the digest or size it was announced with (a registry or an
    archive served something else): retrying the same source will not help."""

    code = "DATA_LOSS"


class Unimplemented(MoorageError):
    code = "UNIMPLEMENTED"


class Internal(MoorageError):
    code = "INTERNAL"


class RuntimeFailure(MoorageError):
    """The OCI runtime (runc/crun) or conmon refused or failed an operation.

    Not a bug in moorage: the message carries the runtime's own words, and the
    edge answers UNKNOWN with it, as containerd does.  The message is bounded
    (a runtime can print pages) so it fits in a gRPC status and one log line.
    """

    code = "UNKNOWN"
    MAX_MESSAGE = 4096

    def __init__(self, message: str) -> None:
        if len(message) > self.MAX_MESSAGE:
            cut = len(message) - self.MAX_MESSAGE
            message = f"{message[:self.MAX_MESSAGE]}... ({cut} more characters cut)"
        super().__init__(message)


class DiskFull(ResourceExhausted):
    """The filesystem moorage writes to is full (ENOSPC), over quota (EDQUOT), or SQLite said
    "database or disk is full": RESOURCE_EXHAUSTED, as the caller can only wait or free space."""


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) is a full disk or an exceeded quota."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, sqlite3.OperationalError) and (
                getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(exc: BaseException, what: str = "") -> DiskFull:
    """The domain error for a full disk; the message names what was being written (bounded)."""
    if isinstance(exc, DiskFull):
        return exc
    quota = isinstance(exc, OSError) and exc.errno == errno.EDQUOT
    why = "disk quota exceeded" if quota else "no space left on device"
    path = what or (exc.filename if isinstance(exc, OSError) and isinstance(exc.filename, str) else "")
    where = f" writing {path[:256]}" if path else ""
    return DiskFull(f"{why}{where}; free space on that filesystem and retry")
