"""The Kubernetes port-forward protocol.

SPDY (``portforward.k8s.io``): for every forwarded connection the client opens
two streams carrying headers ``streamType`` (``error`` / ``data``), ``port`` and
``requestID``; the server pairs them by request id, connects to the port and
copies bytes, and writes any failure as text to the error stream.

WebSocket: the ports come from the ``port`` query parameter; port ``i`` uses
channel ``2i`` for data and ``2i+1`` for errors, and the server's first message
on each channel is the port as a little-endian uint16.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .backend import InputStream, StreamingBackend, Writer

PROTOCOL = "portforward.k8s.io"
STREAM_TYPE, PORT, REQUEST_ID = "streamtype", "port", "requestid"  # SPDY header names arrive lowercased
DATA, ERROR = "data", "error"
COPY_CHUNK = 64 * 1024


class PortForwardError(Exception):
    pass


def parse_port(value: str | None) -> int:
    if not value:
        raise PortForwardError('"port" header is required')
    try:
        port = int(value, 10)
    except ValueError:
        raise PortForwardError(f"unable to parse {value!r} as a port") from None
    if not 0 < port < 1 << 16:
        raise PortForwardError(f"port {value!r} must be between 1 and 65535")
    return port


def parse_ports_query(values: list[str]) -> list[int]:
    """The WebSocket variant's ``?port=80&port=443`` (or ``port=80,443``)."""
    if not values:
        raise PortForwardError('query parameter "port" is required')
    return [parse_port(p) for v in values for p in v.split(",")]


def request_id(headers: dict[str, str], stream_id: int) -> str:
    """The pair key; old clients send no requestID, so derive one from consecutive stream ids."""
    rid = headers.get(REQUEST_ID)
    if rid:
        return rid
    return str(stream_id if headers.get(STREAM_TYPE) == ERROR else stream_id - 2)


S = TypeVar("S")


@dataclass
class StreamPair(Generic[S]):
    error: S | None = None
    data: S | None = None
    port: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class StreamPairs(Generic[S]):
    """Collects (error, data) stream pairs by request id; transport-agnostic (``S`` is the stream type)."""

    def __init__(self) -> None:
        self.pending: dict[str, StreamPair[S]] = {}

    def add(self, rid: str, stream_type: str, port: int, stream: S) -> tuple[StreamPair[S], bool]:
        """Returns (pair, complete).  Raises PortForwardError on a duplicate stream type."""
        pair: StreamPair[S] = self.pending.setdefault(rid, StreamPair(port=port))
        if getattr(pair, stream_type) is not None:
            raise PortForwardError(f"{stream_type} stream already assigned for request {rid}")
        setattr(pair, stream_type, stream)
        complete = pair.error is not None and pair.data is not None
        if complete:
            del self.pending[rid]
            if pair.timer is not None:
                pair.timer.cancel()
        return pair, complete


async def forward(
    backend: StreamingBackend,
    sandbox_id: str,
    port: int,
    inbound: InputStream,
    send: Writer,
    end_send: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Connect to ``port`` and copy both ways until the pod side closes.

    The client's end of stream becomes a TCP half-close.  Raises on connect failure."""
    reader, writer = await backend.port_forward(sandbox_id, port)

    async def upstream() -> None:
        while data := await inbound.read(COPY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    up = asyncio.create_task(upstream())
    try:
        while data := await reader.read(COPY_CHUNK):
            await send(data)
        if end_send is not None:
            await end_send()
    finally:
        up.cancel()
        with contextlib.suppress(BaseException):
            await up
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def error_message(port: int, sandbox_id: str, err: BaseException) -> str:
    return f"error forwarding port {port} to pod sandbox {sandbox_id}: {err}"
