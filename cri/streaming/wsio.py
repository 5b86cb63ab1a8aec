"""Thin asyncio adapter: a server-side WebSocket carrying Kubernetes channels."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .backend import ByteQueue
from .wsframe import ChannelClosed, ChannelCodec, ChannelData, CloseReceived, MessageReceived, WebSocketConnection, WebSocketError

log = logging.getLogger(__name__)

CLOSE_WAIT = 5.0  # how long to wait for the peer's close frame before dropping the connection


class WebSocketChannels:
    """Reads channel messages into per-channel queues and writes channel messages out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: ChannelCodec, readable: set[int]) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = codec
        self.ws = WebSocketConnection(server=True)
        self.queues = {ch: ByteQueue() for ch in readable}
        self.disconnected = asyncio.Event()
        self._peer_closed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop())

    def _flush(self) -> None:
        out = self.ws.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    async def send(self, channel: int, data: bytes) -> None:
        if self.disconnected.is_set() or self.ws.close_sent:
            raise ConnectionError("websocket closed")
        self.ws.send_message(self.codec.encode(channel, data))
        self._flush()
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as e:
            self._gone()
            raise ConnectionError(str(e)) from None

    async def close(self, code: int = 1000) -> None:
        if not self.ws.close_sent and not self.disconnected.is_set():
            self.ws.close(code)
            self._flush()
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                await asyncio.wait_for(self._peer_closed.wait(), CLOSE_WAIT)
        self._gone()
        self.writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    def _gone(self) -> None:
        self.disconnected.set()
        for q in self.queues.values():
            q.feed_eof()

    async def _read_loop(self) -> None:
        try:
            while data := await self.reader.read(65536):
                events = self.ws.receive_data(data)
                self._flush()  # pongs, close replies
                for ev in events:
                    if isinstance(ev, CloseReceived):
                        self._peer_closed.set()
                        return
                    if isinstance(ev, MessageReceived):
                        await self._on_message(ev.data)
        except WebSocketError as e:
            log.info("closing websocket: %s", e)
            self._flush()
        except (ConnectionError, OSError):
            pass
        finally:
            self._peer_closed.set()
            self._gone()

    async def _on_message(self, message: bytes) -> None:
        msg = self.codec.decode(message)
        if msg is None:
            return
        q = self.queues.get(msg.channel)
        if q is None:
            return  # not a channel the client may write to: ignore, like the kubelet
        if isinstance(msg, ChannelClosed):
            q.feed_eof()
        elif isinstance(msg, ChannelData):
            q.feed(msg.data)
            if q.over_limit:
                await q.drained()
