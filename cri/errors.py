"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from moorage.core.errors import MoorageError

_CODES = {name: getattr(grpc.StatusCode, name) for name in grpc.StatusCode.__members__}

# A status message travels in a response header: gRPC refuses headers over 16 KiB (and then
# answers RESOURCE_EXHAUSTED instead of the real code), and the edge logs it on one line.
MAX_STATUS_MESSAGE = 4096


def _bounded(msg: str) -> str:
    if len(msg) <= MAX_STATUS_MESSAGE:
        return msg
    return f"{msg[:MAX_STATUS_MESSAGE]}... ({len(msg) - MAX_STATUS_MESSAGE} more characters cut)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised below ``cri/`` to (code, message); the message is bounded."""
    if isinstance(exc, MoorageError):
        return _CODES.get(exc.code, grpc.StatusCode.INTERNAL), _bounded(exc.message)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, _bounded(str(exc) or "operation timed out")
    if isinstance(exc, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED, _bounded(str(exc))
    return grpc.StatusCode.INTERNAL, _bounded(f"internal error: {type(exc).__name__}: {exc}")
