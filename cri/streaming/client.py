"""moorage's own SPDY client for exec/attach/port-forward URLs (tests and the ``moorage`` CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl as ssl_module
import urllib.parse
from dataclasses import dataclass

from . import portforward as pf
from . import remotecommand as rc
from .backend import ByteQueue
from .spdyio import SpdySession, SpdyStream

MAX_ERROR_BODY = 64 * 1024


class UpgradeError(Exception):
    """The server refused the upgrade (unknown token, unsupported protocol, ...)."""

    def __init__(self, status: int, body: str, headers: dict[str, list[str]]) -> None:
        super().__init__(f"HTTP {status}: {body.strip()}")
        self.status, self.body, self.headers = status, body, headers


async def spdy_upgrade(
    url: str, protocols: list[str], ssl: ssl_module.SSLContext | None = None
) -> tuple[SpdySession, str]:
    """Connect, upgrade to SPDY/3.1 and return the started session and negotiated protocol."""
    u = urllib.parse.urlsplit(url)
    secure = u.scheme == "https"
    port = u.port or (443 if secure else 80)
    reader, writer = await asyncio.open_connection(
        u.hostname, port, ssl=(ssl or ssl_module.create_default_context()) if secure else None, limit=64 * 1024
    )
    try:
        target = u.path + (f"?{u.query}" if u.query else "")
        lines = [f"POST {target} HTTP/1.1", f"Host: {u.netloc}", "Connection: Upgrade", "Upgrade: SPDY/3.1"]
        lines += [f"{rc.HEADER_PROTOCOL_VERSION}: {p}" for p in protocols]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers: dict[str, list[str]] = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
        if status != 101:
            length = min(int((headers.get("content-length") or ["0"])[0]), MAX_ERROR_BODY)
            body = (await reader.readexactly(length)).decode("utf-8", "replace") if length else ""
            raise UpgradeError(status, body, headers)
    except BaseException:
        writer.close()
        raise
    session = SpdySession(reader, writer, client=True)
    session.start()
    return session, (headers.get(rc.HEADER_PROTOCOL_VERSION.lower()) or [""])[0]


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class RemoteCommand:
    """A running exec/attach session.  Read :attr:`stdout`/:attr:`stderr`, then :meth:`wait`."""

    def __init__(self, session: SpdySession, protocol: str, streams: dict[str, SpdyStream]) -> None:
        self.session, self.protocol, self._streams = session, protocol, streams
        self.stdout: ByteQueue | None = streams[rc.STDOUT].incoming if rc.STDOUT in streams else None
        self.stderr: ByteQueue | None = streams[rc.STDERR].incoming if rc.STDERR in streams else None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool = True,
        tty: bool = False,
        protocols: list[str] | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> RemoteCommand:
        session, proto = await spdy_upgrade(url, protocols or rc.SPDY_PROTOCOLS, ssl)
        try:
            streams: dict[str, SpdyStream] = {}
            for kind in (rc.ERROR, rc.STDIN, rc.STDOUT, rc.STDERR, rc.RESIZE):
                if kind in rc.expected_streams(proto, stdin, stdout, stderr and not tty, tty):
                    streams[kind] = await session.open_stream([(rc.HEADER_STREAM_TYPE.lower(), kind)])
            streams[rc.ERROR].close()  # we never write to the error stream
            for kind in (rc.STDOUT, rc.STDERR):
                if kind in streams:
                    streams[kind].close()
        except BaseException:
            await session.close()
            raise
        return cls(session, proto, streams)

    async def write_stdin(self, data: bytes) -> None:
        await self._streams[rc.STDIN].write(data)

    def close_stdin(self) -> None:
        self._streams[rc.STDIN].close()

    async def resize(self, width: int, height: int) -> None:
        if rc.RESIZE in self._streams:
            await self._streams[rc.RESIZE].write(rc.encode_resize(width, height))

    async def wait(self) -> int:
        """Exit code from the error stream (0 for attach); RemoteCommandError on other failures."""
        error = self._streams[rc.ERROR]
        data = await error.incoming.read_all(MAX_ERROR_BODY)
        if not error.ended:
            raise ConnectionError("connection lost before the command finished")
        return rc.decode_status(data, rc.uses_json_status(self.protocol))

    async def close(self) -> None:
        await self.session.close()


async def run(
    url: str,
    stdin: bytes | None = None,
    *,
    tty: bool = False,
    stdout: bool = True,
    stderr: bool = True,
    resize: tuple[int, int] | None = None,
    protocols: list[str] | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> ExecResult:
    """Connect, feed ``stdin`` (then close it), collect the output and the exit code."""
    cmd = await RemoteCommand.connect(
        url, stdin=stdin is not None, stdout=stdout, stderr=stderr and not tty, tty=tty, protocols=protocols, ssl=ssl
    )
    try:
        if resize is not None:
            await cmd.resize(*resize)

        async def feed() -> None:
            if stdin is not None:
                await cmd.write_stdin(stdin)
                cmd.close_stdin()

        async def collect(q: ByteQueue | None) -> bytes:
            return await q.read_all() if q is not None else b""

        _, out, err, code = await asyncio.gather(feed(), collect(cmd.stdout), collect(cmd.stderr), cmd.wait())
        return ExecResult(code, out, err)
    finally:
        await cmd.close()


class PortForwardStream:
    """One forwarded connection: ``read``/``write``/``close_write`` like a socket."""

    def __init__(self, data: SpdyStream, error: SpdyStream) -> None:
        self._data, self._error = data, error

    async def read(self, n: int = 65536) -> bytes:
        return await self._data.read(n)

    async def write(self, data: bytes) -> None:
        await self._data.write(data)

    def close_write(self) -> None:
        self._data.close()

    async def error(self) -> str | None:
        """The server's error message for this connection, once it has ended (None if none)."""
        data = await self._error.incoming.read_all(MAX_ERROR_BODY)
        return data.decode("utf-8", "replace") or None

    def close(self) -> None:
        self._data.reset()
        self._error.reset()


class PortForwardClient:
    def __init__(self, session: SpdySession) -> None:
        self.session = session
        self._ids = itertools.count()

    @classmethod
    async def connect(cls, url: str, ssl: ssl_module.SSLContext | None = None) -> PortForwardClient:
        session, _ = await spdy_upgrade(url, [pf.PROTOCOL], ssl)
        return cls(session)

    async def open(self, port: int) -> PortForwardStream:
        rid = str(next(self._ids))
        base = [(pf.PORT, str(port)), (pf.REQUEST_ID, rid)]
        error = await self.session.open_stream([(pf.STREAM_TYPE, pf.ERROR), *base])
        error.close()
        data = await self.session.open_stream([(pf.STREAM_TYPE, pf.DATA), *base])
        return PortForwardStream(data, error)

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> PortForwardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.close()
