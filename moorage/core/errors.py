"""Domain errors shared by every layer below ``cri/``.

Handlers and libraries raise these; ``cri/errors.py`` maps them to gRPC status
codes in exactly one place.  Messages are written for a person reading them in
``crictl`` output: say what was wrong and, where possible, what to do.
"""

from __future__ import annotations


class MoorageError(Exception):
    """Base class: an error with a message meant for the API caller."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
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
