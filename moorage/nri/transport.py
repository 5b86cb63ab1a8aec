"""ttrpc over NRI's multiplexer, on asyncio: the adapter around ttrpc.py and mux.py.

One ``Endpoint`` is one end of a trunk connection.  It is a ttrpc client on one
logical connection and a ttrpc server on the other: the runtime calls the
plugin on connection 1 and serves the plugin on connection 2; a plugin does the
reverse.  The runtime and moorage's own test plugin (moorage.testing.nri) both
use it.  Requests served here run as their own tasks, so a slow handler never
holds up the read loop, and a call waits at most its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from moorage.nri import mux, ttrpc
from moorage.nri.api import ttrpc_pb2

log = logging.getLogger("moorage.nri")

# gRPC status codes as ttrpc carries them (google.rpc.Code)
OK = 0
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
UNAVAILABLE = 14


class RPCError(Exception):
    """The peer answered with a non-OK status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The trunk closed (or broke) before the answer came."""


#: (service, method, request payload) -> response payload; raise RPCError to answer an error
Handler = Callable[[str, str, bytes], Awaitable[bytes]]


class Endpoint:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client_conn: int,
                 server_conn: int, handler: Handler | None = None, name: str = "nri") -> None:
        self._reader, self._writer = reader, writer
        self._client_conn, self._server_conn = client_conn, server_conn
        self._handler = handler
        self._name = name
        self._ids = ttrpc.StreamIds()
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def run(self) -> None:
        """Read the trunk until it closes; then every call still waiting fails with ConnectionLost."""
        trunk = mux.Decoder()
        frames = {self._client_conn: ttrpc.Decoder(), self._server_conn: ttrpc.Decoder()}
        reason = "connection closed by peer"
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for conn_id, chunk in trunk.feed(data):
                    dec = frames.get(conn_id)
                    if dec is None:
                        continue  # a logical connection nobody opened: NRI drops it too
                    for frame in dec.feed(chunk):
                        self._dispatch(conn_id, frame)
        except (mux.MuxError, ttrpc.FramingError) as e:
            reason = f"protocol error: {e}"
        except (ConnectionError, OSError) as e:
            reason = f"connection error: {e}"
        finally:
            self.close(reason)

    def _dispatch(self, conn_id: int, frame: ttrpc.Frame) -> None:
        if conn_id == self._client_conn and frame.type == ttrpc.TYPE_RESPONSE:
            fut = self._pending.pop(frame.stream_id, None)
            if fut is not None and not fut.done():
                resp = ttrpc_pb2.Response()
                try:
                    resp.ParseFromString(frame.payload)
                except Exception as e:  # noqa: BLE001 - protobuf's DecodeError; any garbage answer
                    fut.set_exception(RPCError(UNKNOWN, f"undecodable ttrpc response: {e}"))
                    return
                fut.set_result(resp)
        elif conn_id == self._server_conn and frame.type == ttrpc.TYPE_REQUEST:
            task = asyncio.ensure_future(self._serve(frame))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, frame: ttrpc.Frame) -> None:
        resp = ttrpc_pb2.Response()
        try:
            req = ttrpc_pb2.Request()
            req.ParseFromString(frame.payload)
            if self._handler is None:
                raise RPCError(UNIMPLEMENTED, f"{req.service}/{req.method}: not served here")
            resp.payload = await self._handler(req.service, req.method, req.payload)
        except RPCError as e:
            resp.status.code, resp.status.message = e.code, e.message[:1024]
        except Exception as e:
            log.exception("%s: serving a ttrpc request failed", self._name)
            resp.status.code, resp.status.message = UNKNOWN, (str(e) or type(e).__name__)[:1024]
        self._send(self._server_conn, ttrpc.Frame(frame.stream_id, ttrpc.TYPE_RESPONSE, 0,
                                                  resp.SerializeToString()))

    def _send(self, conn_id: int, frame: ttrpc.Frame) -> None:
        if self.closed:
            raise ConnectionLost(self.close_reason or "connection closed")
        # Header and payload in chunks of their own, as Go's ttrpc writes them: NRI's mux hands a
        # reader one whole chunk per read, and ttrpc reads the header through a 4 KiB buffer, so a
        # chunk with a header and more than 4 KiB behind it fails there (ENOMEM).
        data = ttrpc.encode(frame)
        out = mux.encode(conn_id, data[:ttrpc.HEADER_LEN])
        if len(data) > ttrpc.HEADER_LEN:
            out += mux.encode(conn_id, data[ttrpc.HEADER_LEN:])
        self._writer.write(out)

    async def call(self, service: str, method: str, payload: bytes, timeout: float | None) -> bytes:
        """One unary call; TimeoutError after ``timeout`` seconds (the peer is told the deadline too)."""
        sid = self._ids.next()
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                timeout_nano=int(timeout * 1e9) if timeout else 0)
        fut: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[sid] = fut
        try:
            self._send(self._client_conn, ttrpc.Frame(sid, ttrpc.TYPE_REQUEST, 0, req.SerializeToString()))
            await self._writer.drain()
            resp = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise  # an OSError too, but the peer is slow, not gone
        except (ConnectionError, OSError) as e:
            raise ConnectionLost(f"connection error: {e}") from e
        finally:
            self._pending.pop(sid, None)
        if resp.status.code != OK:
            raise RPCError(resp.status.code, resp.status.message)
        return resp.payload

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.close_reason = reason
        self._closed.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(reason))
        self._pending.clear()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()
