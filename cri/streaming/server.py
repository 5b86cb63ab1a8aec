"""The streaming server: exec / attach / port-forward over SPDY/3.1 and WebSocket.

The CRI servicer calls :meth:`StreamingServer.get_exec_url` (and friends) with
a plain request; the server parks it under a random single-use token and
returns ``http://HOST:PORT/exec/TOKEN``.  The client (kubelet, kubectl via the
API server, crictl) then connects there and upgrades the connection.  Each
TCP connection carries exactly one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from moorage.core.errors import InvalidArgument, ResourceExhausted

from . import portforward as pf
from . import remotecommand as rc
from . import spdy, wsframe
from .backend import InputStream, StreamingBackend, Writer
from .spdyio import SpdySession, SpdyStream
from .wsio import WebSocketChannels

log = logging.getLogger(__name__)


@dataclass
class ExecRequest:
    container_id: str
    cmd: list[str]
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass
class AttachRequest:
    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass
class PortForwardRequest:
    sandbox_id: str
    ports: list[int] = field(default_factory=list)


StreamRequest = ExecRequest | AttachRequest | PortForwardRequest
_KIND = {ExecRequest: "exec", AttachRequest: "attach", PortForwardRequest: "portforward"}


class TokenCache:
    """Single-use tokens that expire; bounded so a flood of URLs cannot grow it forever."""

    def __init__(self, ttl: float = 60.0, max_size: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.max_size, self._clock = ttl, max_size, clock
        self._entries: dict[str, tuple[float, StreamRequest]] = {}

    def put(self, request: StreamRequest) -> str:
        now = self._clock()
        if len(self._entries) >= self.max_size:
            self._entries = {t: e for t, e in self._entries.items() if e[0] > now}
            if len(self._entries) >= self.max_size:
                raise ResourceExhausted("too many in-flight streaming requests; retry later")
        token = secrets.token_urlsafe(24)
        self._entries[token] = (now + self.ttl, request)
        return token

    def peek(self, token: str) -> StreamRequest | None:
        """The request behind a live token, without using it up."""
        entry = self._entries.get(token)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def consume(self, token: str) -> StreamRequest | None:
        entry = self._entries.pop(token, None)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]


@dataclass
class HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]  # lowercased names

    def header(self, name: str) -> str:
        return ", ".join(self.headers.get(name, []))


class BadRequest(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []


_REASONS = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large"}
MAX_HEADERS = 100


def parse_request_head(head: bytes) -> HttpRequest:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, target, _ = parts
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip())
    if sum(len(v) for v in headers.values()) > MAX_HEADERS:
        raise BadRequest(431, "too many headers")
    url = urllib.parse.urlsplit(target)
    return HttpRequest(method, urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query), headers)


def validate_stdio(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be set (a terminal merges stderr into stdout)")


class StreamingServer:
    def __init__(
        self,
        backend: StreamingBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token_ttl: float = 60.0,
        stream_creation_timeout: float = 30.0,
        base_url: str | None = None,
        max_header_bytes: int = 64 * 1024,
        max_streams_per_session: int = 1000,
        max_pending_portforwards: int = 100,
    ) -> None:
        self.backend = backend
        self.host, self.port = host, port
        self.stream_creation_timeout = stream_creation_timeout
        # Per connection: concurrently open client streams, and port-forward requests still
        # waiting for the second stream of their pair.  More are refused (RST REFUSED_STREAM).
        self.max_streams_per_session = max_streams_per_session
        self.max_pending_portforwards = max_pending_portforwards
        self.max_header_bytes = max_header_bytes
        self.tokens = TokenCache(token_ttl)
        self._ssl: ssl.SSLContext | None = None
        if tls_cert or tls_key:
            if not tls_cert:
                raise InvalidArgument("the streaming server's TLS needs a certificate as well as a key")
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(tls_cert, tls_key)
        self._base_url = base_url
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    # ---- lifecycle

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, ssl=self._ssl, limit=self.max_header_bytes
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> StreamingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        if self._base_url:
            return self._base_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._ssl else 'http'}://{host}:{self.port}"

    # ---- URLs for the CRI servicer

    def get_exec_url(self, req: ExecRequest) -> str:
        if not req.container_id or not req.cmd:
            raise InvalidArgument("container id and command are required")
        validate_stdio(req.stdin, req.stdout, req.stderr, req.tty)
        return self._url(req)

    def get_attach_url(self, req: AttachRequest) -> str:
        if not req.container_id:
            raise InvalidArgument("container id is required")
        validate_stdio(req.stdin, req.stdout, req.stderr, req.tty)
        return self._url(req)

    def get_portforward_url(self, req: PortForwardRequest) -> str:
        if not req.sandbox_id:
            raise InvalidArgument("pod sandbox id is required")
        for p in req.ports:
            if not 0 < p < 1 << 16:
                raise InvalidArgument(f"invalid port {p}")
        return self._url(req)

    def _url(self, req: StreamRequest) -> str:
        return f"{self.base_url}/{_KIND[type(req)]}/{self.tokens.put(req)}"

    # ---- HTTP

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # stop() cancels this inner task, never the task asyncio.start_server created.
        task = asyncio.create_task(self._serve(reader, writer))
        self._conns.add(task)
        try:
            await task
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("streaming connection failed")
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self.stream_creation_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise BadRequest(431, "request head too large") from None
            except TimeoutError:
                return
            req = parse_request_head(head)
            if req.method not in ("GET", "POST"):
                raise BadRequest(405, f"method {req.method} not allowed")
            parts = req.path.strip("/").split("/")
            kind, token = parts if len(parts) == 2 else ("", "")
            # A token is used up only by the upgrade it was made for: a plain GET, a request of the
            # wrong kind or a failed protocol negotiation leaves it for the real client.
            request = self.tokens.peek(token) if kind in _KIND.values() else None
            if request is None or _KIND[type(request)] != kind:
                raise BadRequest(404, "unknown, used or expired streaming token")
            upgrade = req.header("upgrade").lower()

            def claim() -> None:
                if self.tokens.consume(token) is not request:
                    raise BadRequest(404, "unknown, used or expired streaming token")

            if upgrade == "websocket" and "upgrade" in req.header("connection").lower():
                await self._websocket(req, request, reader, writer, claim)
            elif upgrade.startswith("spdy/3.1"):
                await self._spdy(req, request, reader, writer, claim)
            else:
                raise BadRequest(400, "a SPDY/3.1 or WebSocket upgrade is required")
        except BadRequest as e:
            await _respond(writer, e.status, e.message, e.headers)

    async def _spdy(self, req: HttpRequest, request: StreamRequest, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, claim: Callable[[], None]) -> None:
        supported = [pf.PROTOCOL] if isinstance(request, PortForwardRequest) else rc.SPDY_PROTOCOLS
        offered = rc.split_header_values(req.headers.get("x-stream-protocol-version", []))
        proto = rc.negotiate(offered, supported)
        if proto is None:
            raise BadRequest(
                400,
                f"unable to upgrade: unable to negotiate protocol: client supports {offered}, server accepts {supported}",
                [(rc.HEADER_ACCEPTED_VERSIONS, p) for p in supported],
            )
        claim()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            + f"{rc.HEADER_PROTOCOL_VERSION}: {proto}\r\n\r\n".encode()
        )
        session = SpdySession(reader, writer, client=False, max_streams=self.max_streams_per_session)
        session.start()
        try:
            if isinstance(request, PortForwardRequest):
                await self._spdy_portforward(session, request)
            else:
                await self._spdy_command(session, request, proto)
        finally:
            await session.close()

    async def _spdy_command(self, session: SpdySession, request: ExecRequest | AttachRequest, proto: str) -> None:
        wanted = rc.expected_streams(proto, request.stdin, request.stdout, request.stderr, request.tty)
        streams: dict[str, SpdyStream] = {}
        try:
            async with asyncio.timeout(self.stream_creation_timeout):
                while not wanted <= streams.keys():
                    stream = await session.accept()
                    if stream is None:
                        return
                    kind = stream.header(rc.HEADER_STREAM_TYPE, "")
                    if kind in wanted and kind not in streams:
                        if kind in (rc.STDIN, rc.RESIZE):
                            stream.claim()  # read by the command once every stream is here
                        stream.reply()
                        streams[kind] = stream
                    else:
                        log.info("refusing unexpected %r stream", kind)
                        stream.reset(spdy.RstStatus.REFUSED_STREAM)
        except TimeoutError:
            log.info("timed out waiting for the client to create streams")
            return
        outputs = [streams[k] for k in (rc.STDOUT, rc.STDERR) if k in streams]

        async def close_output() -> None:
            for s in outputs:
                s.close()

        async def write_status(data: bytes) -> None:
            if data:
                await streams[rc.ERROR].write(data)
            streams[rc.ERROR].close()

        io = rc.CommandIO(
            stdin=streams[rc.STDIN].incoming if rc.STDIN in streams else None,
            stdout=streams[rc.STDOUT].write if rc.STDOUT in streams else None,
            stderr=streams[rc.STDERR].write if rc.STDERR in streams else None,
            resize=streams[rc.RESIZE].incoming if rc.RESIZE in streams else None,
            close_output=close_output,
            write_status=write_status,
            disconnected=session.closed,
            json_status=rc.uses_json_status(proto),
        )

        async def refuse_late_streams() -> None:
            while (stream := await session.accept()) is not None:
                stream.reset(spdy.RstStatus.REFUSED_STREAM)

        refuser = asyncio.create_task(refuse_late_streams())
        try:
            await self._run_command(io, request)
        finally:
            await rc.cancel_and_wait(refuser)

    async def _run_command(self, io: rc.CommandIO, request: ExecRequest | AttachRequest) -> None:
        if isinstance(request, ExecRequest):
            exec_request = request

            async def run_exec(stdin: InputStream | None, stdout: Writer | None, stderr: Writer | None,
                               resize: AsyncIterator[tuple[int, int]] | None) -> int | None:
                return await self.backend.exec(exec_request.container_id, list(exec_request.cmd), exec_request.tty,
                                               stdin, stdout, stderr, resize)
            await rc.run_command(io, run_exec)
        else:
            attach_request = request

            async def run_attach(stdin: InputStream | None, stdout: Writer | None, stderr: Writer | None,
                                 resize: AsyncIterator[tuple[int, int]] | None) -> int | None:
                await self.backend.attach(attach_request.container_id, attach_request.tty, stdin, stdout, stderr,
                                          resize)
                return 0
            await rc.run_command(io, run_attach, "error attaching to container")

    async def _spdy_portforward(self, session: SpdySession, request: PortForwardRequest) -> None:
        pairs: pf.StreamPairs[SpdyStream] = pf.StreamPairs()
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()

        def start(coro: Coroutine[Any, Any, None]) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def expire(rid: str) -> None:
            pair = pairs.pending.pop(rid, None)
            if pair is None:
                return
            log.info("port-forward request %s: timed out waiting for its streams", rid)
            if pair.error is not None:
                _abort(pair.error, f"timed out waiting for the streams of request {rid}")
            if pair.data is not None:
                pair.data.reset()

        try:
            while (stream := await session.accept()) is not None:
                headers = dict(stream.headers)
                try:
                    port = pf.parse_port(headers.get(pf.PORT))
                    kind = headers.get(pf.STREAM_TYPE)
                    if kind not in (pf.DATA, pf.ERROR):
                        raise pf.PortForwardError(f"invalid stream type {kind!r}")
                    if request.ports and port not in request.ports:
                        raise pf.PortForwardError(f"port {port} was not requested")
                except pf.PortForwardError as e:
                    log.info("refusing port-forward stream: %s", e)
                    stream.reset()
                    continue
                rid = pf.request_id(headers, stream.id)
                if rid not in pairs.pending and len(pairs.pending) >= self.max_pending_portforwards:
                    log.info("refusing port-forward stream: %d requests already wait for their other stream", len(pairs.pending))
                    stream.reset(spdy.RstStatus.REFUSED_STREAM)
                    continue
                stream.reply()
                try:
                    pair, complete = pairs.add(rid, kind, port, stream)
                except pf.PortForwardError as e:
                    stream.reset()
                    log.info("%s", e)
                    continue
                if complete:
                    assert pair.data is not None and pair.error is not None
                    if pair.data.was_reset or pair.error.was_reset:  # one of them went away while pending
                        pair.data.reset()
                        pair.error.reset()
                        continue
                    pair.data.claim()
                    start(self._spdy_forward_pair(request.sandbox_id, pair))
                elif pair.timer is None:
                    pair.timer = loop.call_later(self.stream_creation_timeout, expire, rid)
        finally:
            for pair in pairs.pending.values():
                if pair.timer is not None:
                    pair.timer.cancel()
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _spdy_forward_pair(self, sandbox_id: str, pair: pf.StreamPair[SpdyStream]) -> None:
        data, error = pair.data, pair.error
        assert data is not None and error is not None  # only complete pairs are forwarded
        try:
            await pf.forward(self.backend, sandbox_id, pair.port, data.incoming, data.write, _aclose(data))
        except Exception as e:  # noqa: BLE001 - reported to the client (if it is still there)
            await _write_error(error, pf.error_message(pair.port, sandbox_id, e))
        finally:
            data.incoming.feed_eof()  # discard anything the client still sends
            data.close()
            error.close()

    async def _websocket(self, req: HttpRequest, request: StreamRequest, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, claim: Callable[[], None]) -> None:
        if req.header("sec-websocket-version") != "13" or not req.header("sec-websocket-key"):
            raise BadRequest(400, "unsupported websocket version (13 required) or missing key")
        is_pf = isinstance(request, PortForwardRequest)
        supported = wsframe.PORTFORWARD_PROTOCOLS if is_pf else wsframe.REMOTECOMMAND_PROTOCOLS
        offered = rc.split_header_values(req.headers.get("sec-websocket-protocol", []))
        proto = wsframe.negotiate_subprotocol(offered, supported)
        if proto is None:
            raise BadRequest(
                400,
                f"requested protocol(s) are not supported: {offered}; supports {supported}",
                [(rc.HEADER_ACCEPTED_VERSIONS, p) for p in supported],
            )
        ports: list[int] = []
        if isinstance(request, PortForwardRequest):
            try:
                ports = pf.parse_ports_query(req.query.get("port", [])) if "port" in req.query else list(request.ports)
            except pf.PortForwardError as e:
                raise BadRequest(400, str(e)) from None
            if not ports or (request.ports and not set(ports) <= set(request.ports)):
                raise BadRequest(400, "no (or unrequested) ports to forward")
            readable = {2 * i for i in range(len(ports))}
        else:
            readable = ({0} if request.stdin else set()) | ({4} if request.tty else set())
        claim()
        writer.write(wsframe.handshake_response(req.header("sec-websocket-key"), proto))
        codec = wsframe.ChannelCodec(proto or ("v4.channel.k8s.io" if is_pf else rc.V1))
        chans = WebSocketChannels(reader, writer, codec, readable)
        chans.start()
        try:
            if isinstance(request, PortForwardRequest):
                await self._ws_portforward(chans, request.sandbox_id, ports)
            else:
                await self._ws_command(chans, request)
        finally:
            await chans.close()

    async def _ws_command(self, chans: WebSocketChannels, request: ExecRequest | AttachRequest) -> None:
        # An empty message on the lowest writable channel tells the client the session is up.
        await chans.send(1 if request.stdout else 2 if request.stderr else 3, b"")

        def writer(ch: int) -> Writer:
            return lambda data: chans.send(ch, data)

        async def write_status(data: bytes) -> None:
            if data:
                await chans.send(3, data)

        async def nothing() -> None:
            return None

        io = rc.CommandIO(
            stdin=chans.queues.get(0),
            stdout=writer(1) if request.stdout else None,
            stderr=writer(2) if request.stderr else None,
            resize=chans.queues.get(4),
            close_output=nothing,
            write_status=write_status,
            disconnected=chans.disconnected,
            json_status=chans.codec.v4_status,
        )
        await self._run_command(io, request)

    async def _ws_portforward(self, chans: WebSocketChannels, sandbox_id: str, ports: list[int]) -> None:
        for i, port in enumerate(ports):
            await chans.send(2 * i, wsframe.encode_port(port))
            await chans.send(2 * i + 1, wsframe.encode_port(port))

        async def one(i: int, port: int) -> None:
            try:
                await pf.forward(self.backend, sandbox_id, port, chans.queues[2 * i], lambda d: chans.send(2 * i, d))
            except Exception as e:  # noqa: BLE001 - reported to the client (if it is still there)
                with contextlib.suppress(ConnectionError):
                    await chans.send(2 * i + 1, pf.error_message(port, sandbox_id, e).encode())
            finally:
                chans.queues[2 * i].feed_eof()  # discard anything the client still sends

        work = asyncio.gather(*(one(i, p) for i, p in enumerate(ports)), return_exceptions=True)
        gone = asyncio.create_task(chans.disconnected.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {work, gone}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            work.cancel()
            with contextlib.suppress(BaseException):
                await work


def _aclose(stream: SpdyStream) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        stream.close()

    return close


def _abort(stream: SpdyStream, message: str) -> None:
    """Best effort: send ``message`` if the window allows it right now, then reset the stream."""
    data = message.encode()
    conn = stream.session.conn
    if not stream.was_reset and not stream.session.closed.is_set() and conn.send_window(stream.id) >= len(data):
        conn.send_data(stream.id, data)
    stream.reset()


async def _write_error(stream: SpdyStream, message: str) -> None:
    with contextlib.suppress(ConnectionError):
        await stream.write(message.encode())
        stream.close()


async def _respond(writer: asyncio.StreamWriter, status: int, message: str, headers: list[tuple[str, str]]) -> None:
    body = (message + "\n").encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}", "Connection: close"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
