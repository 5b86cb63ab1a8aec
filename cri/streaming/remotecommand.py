"""The Kubernetes remote command protocol (exec/attach), independent of transport.

Over SPDY the client opens one stream per channel, named by the ``streamType``
header; over WebSocket the channels are numbered (stdin 0, stdout 1, stderr 2,
error 3, resize 4).  The pure helpers here (negotiation, expected streams,
status and resize encoding) are shared by both; :func:`run_command` drives a
backend call over whatever :class:`CommandIO` a transport provides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from moorage.core.errors import MoorageError

from .backend import ByteQueue, InputStream, Writer

log = logging.getLogger(__name__)

V1, V2, V3, V4, V5 = "channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io", "v4.channel.k8s.io", "v5.channel.k8s.io"
SPDY_PROTOCOLS = [V4, V3, V2, V1]  # v5 only exists for WebSocket

ERROR, STDIN, STDOUT, STDERR, RESIZE = "error", "stdin", "stdout", "stderr", "resize"
CHANNEL_NUMBERS = {STDIN: 0, STDOUT: 1, STDERR: 2, ERROR: 3, RESIZE: 4}

HEADER_STREAM_TYPE = "streamType"
HEADER_PROTOCOL_VERSION = "X-Stream-Protocol-Version"
HEADER_ACCEPTED_VERSIONS = "X-Accepted-Stream-Protocol-Versions"


class RemoteCommandError(Exception):
    """The remote side reported a failure that is not a plain exit code."""


def split_header_values(values: list[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def negotiate(client_protocols: list[str], server_protocols: list[str]) -> str | None:
    """The first protocol the client offers that the server accepts (client's preference wins)."""
    for proto in client_protocols:
        if proto in server_protocols:
            return proto
    return None


def _version(protocol: str) -> int:
    name = protocol.replace("base64.", "")
    return int(name[1]) if name.startswith("v") and name[1].isdigit() else 1


def supports_resize(protocol: str) -> bool:
    return _version(protocol) >= 3


def uses_json_status(protocol: str) -> bool:
    return _version(protocol) >= 4


def expected_streams(protocol: str, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> set[str]:
    """Stream types a SPDY client must open before the command starts."""
    wanted = {ERROR}
    for name, on in ((STDIN, stdin), (STDOUT, stdout), (STDERR, stderr)):
        if on:
            wanted.add(name)
    if tty and supports_resize(protocol):
        wanted.add(RESIZE)
    return wanted


# --------------------------------------------------------------------------- status (metav1.Status)


def status_success() -> dict:
    return {"metadata": {}, "status": "Success"}


def status_exit_code(code: int) -> dict:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def status_internal_error(message: str) -> dict:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode_status(status: dict, json_status: bool) -> bytes:
    """What goes on the error stream.  Before v4 success is silence and failure a message."""
    if json_status:
        return json.dumps(status, separators=(",", ":")).encode()
    if status.get("status") == "Success":
        return b""
    return status.get("message", "unknown error").encode()


def decode_status(data: bytes, json_status: bool) -> int:
    """Exit code from the error stream's content; raises RemoteCommandError for other failures."""
    if not json_status:
        if data:
            raise RemoteCommandError(data.decode("utf-8", "replace"))
        return 0
    if not data:
        return 0
    try:
        status = json.loads(data)
    except ValueError:
        raise RemoteCommandError(f"malformed status: {data[:200]!r}") from None
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == "NonZeroExitCode":
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message", ""))
                except ValueError:
                    break
    raise RemoteCommandError(status.get("message") or "unknown error")


# --------------------------------------------------------------------------- resize


def encode_resize(width: int, height: int) -> bytes:
    return json.dumps({"Width": width, "Height": height}).encode() + b"\n"


class ResizeDecoder:
    """Splits a byte stream of concatenated JSON TerminalSize objects."""

    MAX_PENDING = 4096

    def __init__(self) -> None:
        self._buf = ""
        self._dec = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        self._buf += data.decode("utf-8", "replace")
        sizes = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                break
            try:
                obj, end = self._dec.raw_decode(text)
            except ValueError:
                if len(text) > self.MAX_PENDING:
                    raise ValueError("malformed resize event") from None
                self._buf = text
                break
            self._buf = text[end:]
            if isinstance(obj, dict):
                w, h = obj.get("Width", obj.get("width")), obj.get("Height", obj.get("height"))
                if isinstance(w, int) and isinstance(h, int) and 0 <= w < 1 << 16 and 0 <= h < 1 << 16:
                    sizes.append((w, h))
        return sizes


async def resize_events(source: ByteQueue) -> AsyncIterator[tuple[int, int]]:
    decoder = ResizeDecoder()
    while chunk := await source.read():
        try:
            sizes = decoder.feed(chunk)
        except ValueError:
            log.info("ignoring the rest of a malformed resize stream")
            return
        for size in sizes:
            yield size


# --------------------------------------------------------------------------- running a session


@dataclass
class CommandIO:
    """The transport's half of one exec/attach session."""

    stdin: ByteQueue | None
    stdout: Writer | None
    stderr: Writer | None
    resize: ByteQueue | None
    close_output: Callable[[], Awaitable[None]]  # end stdout/stderr (FIN)
    write_status: Callable[[bytes], Awaitable[None]]  # write to the error stream and end it
    disconnected: asyncio.Event
    json_status: bool


BackendCall = Callable[
    [InputStream | None, Writer | None, Writer | None, AsyncIterator[tuple[int, int]] | None],
    Coroutine[Any, Any, int | None],
]


async def cancel_and_wait(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def run_command(io: CommandIO, call: BackendCall, what: str = "error executing command in container") -> None:
    """Run the backend call; report its outcome, or cancel it if the client goes away."""
    resize = resize_events(io.resize) if io.resize is not None else None
    task = asyncio.create_task(call(io.stdin, io.stdout, io.stderr, resize))
    gone = asyncio.create_task(io.disconnected.wait())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # client disconnected, or we are being cancelled
            await cancel_and_wait(task)
    if task.cancelled():
        return
    try:
        code = task.result()
        status = status_success() if not code else status_exit_code(code)
    except MoorageError as e:
        status = status_internal_error(f"{what}: {e.message}")
    except (ConnectionError, asyncio.CancelledError):
        return  # the client went away while we were writing to it
    except Exception as e:
        log.exception("streaming backend call failed")
        status = status_internal_error(f"{what}: {e}")
    with contextlib.suppress(ConnectionError):
        await io.close_output()
        await io.write_status(encode_status(status, io.json_status))
