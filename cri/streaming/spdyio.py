"""Thin asyncio adapter around :class:`spdy.SpdyConnection` (used by server and client)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from . import spdy
from .backend import ByteQueue

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
# Receive window we announce (SPDY's default is 64 KiB, which caps loopback throughput by round trips).
RECV_WINDOW = 1 << 20


class StreamClosedError(ConnectionError):
    pass


class SpdyStream:
    def __init__(self, session: SpdySession, stream_id: int, headers: spdy.Headers, local: bool = False) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self.reply_headers: spdy.Headers | None = None
        self.was_reset = False
        self.ended = False  # the peer finished the stream normally (FIN)
        self.incoming = ByteQueue(on_consumed=self._consumed)
        # Whether something reads ``incoming``: streams we open are read by their opener; a
        # peer's stream only once the application claims it.  Unclaimed streams a peer
        # overfills are reset instead of stalling the connection's read loop.
        self.claimed = local
        # Streams we open wait for the peer's SYN_REPLY.
        self.replied: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if local else None

    def _fail_reply(self, message: str) -> None:
        if self.replied is not None and not self.replied.done():
            self.replied.set_exception(StreamClosedError(message))
            self.replied.exception()  # retrieved: the opener may already have given up

    def header(self, name: str, default: str | None = None) -> str | None:
        return spdy.header_value(self.headers, name, default)

    def _consumed(self, n: int) -> None:
        self.session.conn.acknowledge_received(self.id, n)
        self.session.flush()

    async def read(self, n: int = 65536) -> bytes:
        return await self.incoming.read(n)

    def claim(self) -> ByteQueue:
        """Declare that the application reads this stream (so a full buffer means backpressure)."""
        self.claimed = True
        return self.incoming

    def reply(self, headers: spdy.Headers | None = None) -> None:
        if self.was_reset or self.session.closed.is_set() or not self.session.conn.is_open(self.id):
            return
        self.session.conn.reply(self.id, headers or [])
        self.session.flush()

    async def write(self, data: bytes) -> None:
        """Send data, waiting for flow-control window and transport buffer space."""
        view = memoryview(data)
        while view:
            if self.was_reset or self.session.closed.is_set() or not self.session.conn.can_send(self.id):
                raise StreamClosedError(f"stream {self.id} is closed")
            window = self.session.conn.send_window(self.id)
            if window <= 0:
                await self.session.window_changed()
                continue
            chunk, view = view[:window], view[window:]
            self.session.conn.send_data(self.id, bytes(chunk))
            self.session.flush()
            await self.session.drain()

    def close(self) -> None:
        """Half-close: FIN on our side."""
        if not self.was_reset and not self.session.closed.is_set() and self.session.conn.is_open(self.id):
            self.session.conn.end_stream(self.id)
            self.session.flush()
            self.session.forget_if_done(self)

    def reset(self, status: int = spdy.RstStatus.CANCEL, discard: bool = False) -> None:
        """RST_STREAM; with ``discard``, also drop unread data (and grant its session window back)."""
        if not self.was_reset and not self.session.closed.is_set():
            self.was_reset = True
            self.session.conn.reset_stream(self.id, status)
            self.session.streams.pop(self.id, None)
            if discard and (dropped := self.incoming.discard()):
                self.session.conn.acknowledge_received(self.id, dropped)  # the stream is gone: session window only
            self.session.flush()
        self.incoming.feed_eof()
        self._fail_reply(f"stream {self.id} was reset")


class SpdySession:
    """Runs the read loop; new peer streams come out of :meth:`accept`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: bool, max_streams: int = 1000
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = spdy.SpdyConnection(client=client, recv_window=RECV_WINDOW, max_concurrent_streams=max_streams)
        self.streams: dict[int, SpdyStream] = {}
        self.closed = asyncio.Event()
        self._accept: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._window = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.conn.initiate()
        self.flush()
        self._task = asyncio.create_task(self._read_loop())

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as e:
            self._mark_closed()
            raise StreamClosedError(str(e)) from None

    def forget_if_done(self, stream: SpdyStream) -> None:
        if not self.conn.is_open(stream.id):
            self.streams.pop(stream.id, None)

    async def window_changed(self) -> None:
        ev = self._window
        await ev.wait()

    def _wake_writers(self) -> None:
        self._window.set()
        self._window = asyncio.Event()

    async def accept(self) -> SpdyStream | None:
        """Next stream opened by the peer, or None once the connection is gone."""
        if self.closed.is_set() and self._accept.empty():
            return None
        return await self._accept.get()

    async def open_stream(self, headers: spdy.Headers) -> SpdyStream:
        if self.closed.is_set():
            raise StreamClosedError("connection closed")
        sid = self.conn.open_stream(headers)
        stream = self.streams[sid] = SpdyStream(self, sid, headers, local=True)
        self.flush()
        await self.drain()
        assert stream.replied is not None  # a stream we open waits for the peer's reply
        await stream.replied
        return stream

    async def close(self) -> None:
        """GOAWAY and close the transport."""
        if not self.closed.is_set():
            self.conn.goaway()
            self.flush()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.drain(), 5)
        self._mark_closed()
        self.writer.close()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    def _mark_closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in self.streams.values():
            s.incoming.feed_eof()
            s._fail_reply("connection closed")
        self._accept.put_nowait(None)
        self._wake_writers()

    async def _read_loop(self) -> None:
        try:
            while data := await self.reader.read(READ_CHUNK):
                for ev in self.conn.receive_data(data):
                    await self._dispatch(ev)
                self.flush()
        except spdy.SpdyProtocolError as e:
            log.info("closing SPDY connection: %s", e)
            self.conn.goaway(spdy.GoAwayStatus.PROTOCOL_ERROR)
            self.flush()
        except (ConnectionError, OSError):
            pass
        finally:
            self._mark_closed()

    async def _dispatch(self, ev: spdy.Event) -> None:
        stream: SpdyStream | None
        if isinstance(ev, spdy.StreamOpened):
            opened = self.streams[ev.stream_id] = SpdyStream(self, ev.stream_id, ev.headers)
            if ev.fin:
                opened.ended = True
                opened.incoming.feed_eof()
            self._accept.put_nowait(opened)
        elif isinstance(ev, spdy.DataReceived):
            stream = self.streams.get(ev.stream_id)
            if stream is None:
                return
            stream.incoming.feed(ev.data)
            if ev.fin:
                stream.ended = True
                stream.incoming.feed_eof()
                self.forget_if_done(stream)
            elif stream.incoming.over_limit:
                if stream.claimed:
                    # Peer ignores flow control: stop reading the socket until the reader catches up.
                    await stream.incoming.drained()
                else:
                    # Nobody reads this stream (yet): waiting would stall the whole connection
                    # (frames, pings, RSTs, even the peer hanging up) for good.  Drop just it.
                    log.info("resetting SPDY stream %d: %d unread bytes and no reader", stream.id, stream.incoming.size)
                    stream.reset(spdy.RstStatus.FLOW_CONTROL_ERROR, discard=True)
        elif isinstance(ev, spdy.StreamReplied):
            stream = self.streams.get(ev.stream_id)
            if stream is not None and stream.replied is not None and not stream.replied.done():
                stream.reply_headers = ev.headers
                stream.replied.set_result(None)
            if stream is not None and ev.fin:
                stream.ended = True
                stream.incoming.feed_eof()
        elif isinstance(ev, spdy.HeadersReceived):
            stream = self.streams.get(ev.stream_id)
            if stream is not None and ev.fin:
                stream.ended = True
                stream.incoming.feed_eof()
        elif isinstance(ev, spdy.StreamReset):
            stream = self.streams.pop(ev.stream_id, None)
            if stream is not None:
                stream.was_reset = True
                stream.incoming.feed_eof()
                stream._fail_reply(f"stream {ev.stream_id} was reset (status {ev.status})")
            self._wake_writers()
        elif isinstance(ev, (spdy.WindowUpdated, spdy.SettingsReceived)):
            self._wake_writers()
