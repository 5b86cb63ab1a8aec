"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from moorage.core.errors import MoorageError, bound, disk_full, is_disk_full

_CODES = {name: getattr(grpc.StatusCode, name) for name in grpc.StatusCode.__members__}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised below ``cri/`` to (code, message); the message is bounded, whatever
    raised it (a status over gRPC's 16 KiB metadata limit would reach the client as RESOURCE_EXHAUSTED)."""
    code, msg = _status_for(exc)
    return code, bound(msg)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if not isinstance(exc, MoorageError) and is_disk_full(exc):
        exc = disk_full(exc)
    if isinstance(exc, MoorageError):
        return _CODES.get(exc.code, grpc.StatusCode.INTERNAL), exc.message
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "operation timed out"
    if isinstance(exc, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
