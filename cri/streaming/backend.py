"""What the streaming server needs from the runtime, and the stream types it hands over.

The server owns the network side; a :class:`StreamingBackend` owns the process
side.  Stream types are deliberately small:

* **stdin** is an :class:`InputStream`: ``await stdin.read(n)`` returns up to
  ``n`` bytes, and ``b""`` once the client closed its stdin.  The concrete type
  passed in is :class:`ByteQueue`.
* **stdout / stderr** are :data:`Writer` callables: ``await stdout(data)``
  sends ``data`` to the client and returns once the connection has taken it
  (that await is the backpressure).  A backend must not call a writer after its
  call has returned or been cancelled.
* **resize** is an async iterator of ``(width, height)`` terminal sizes; it ends
  when the client closes the resize stream or disconnects.

Cancellation: if the client disconnects mid-stream the server cancels the
backend coroutine.  ``exec`` must then kill the process it started (and wait for
it); ``attach`` just detaches.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

Writer = Callable[[bytes], Awaitable[None]]
"""Send bytes to the client; awaiting it applies backpressure."""


class InputStream(Protocol):
    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes (``n > 0``); ``b""`` at end of stream."""
        ...


class StreamingBackend(Protocol):
    async def exec(
        self,
        container_id: str,
        cmd: list[str],
        tty: bool,
        stdin: InputStream | None,
        stdout: Writer | None,
        stderr: Writer | None,
        resize: AsyncIterator[tuple[int, int]] | None,
    ) -> int:
        """Run ``cmd`` in the container and return its exit code.

        Raise a ``runtime.errors`` domain error if the command could not be run
        at all (the client then sees the message in the error stream)."""
        ...

    async def attach(
        self,
        container_id: str,
        tty: bool,
        stdin: InputStream | None,
        stdout: Writer | None,
        stderr: Writer | None,
        resize: AsyncIterator[tuple[int, int]] | None,
    ) -> None:
        """Stream the container's stdio until it exits or the call is cancelled."""
        ...

    async def port_forward(self, sandbox_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to ``localhost:port`` inside the sandbox's network namespace."""
        ...


class ByteQueue:
    """An in-memory byte pipe from a transport to a consumer.

    ``feed`` never blocks; a producer that cares about memory checks
    :attr:`over_limit` and awaits :meth:`drained`.  ``on_consumed(n)`` is called
    as the consumer reads, which SPDY uses to grant flow-control window back.
    """

    def __init__(self, limit: int = 1 << 20, on_consumed: Callable[[int], None] | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._limit = limit
        self._on_consumed = on_consumed
        self._readable = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def size(self) -> int:
        return self._size

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def over_limit(self) -> bool:
        return self._size >= self._limit

    def feed(self, data: bytes) -> None:
        if self._eof or not data:
            return
        self._chunks.append(bytes(data))
        self._size += len(data)
        self._readable.set()
        if self.over_limit:
            self._drained.clear()

    def feed_eof(self) -> None:
        self._eof = True
        self._readable.set()
        self._drained.set()

    async def drained(self) -> None:
        await self._drained.wait()

    def discard(self) -> int:
        """Drop everything buffered and end the stream; returns the number of bytes dropped."""
        n, self._size = self._size, 0
        self._chunks.clear()
        self.feed_eof()
        return n

    async def read(self, n: int = 65536) -> bytes:
        while not self._chunks:
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        if len(chunk) > n:
            self._chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        self._size -= len(chunk)
        if not self.over_limit:
            self._drained.set()
        if self._on_consumed is not None:
            self._on_consumed(len(chunk))
        return chunk

    async def read_all(self, limit: int = 64 << 20) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk
            if len(out) > limit:
                raise ValueError("stream exceeds the size limit")
        return bytes(out)
