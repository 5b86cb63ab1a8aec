"""The streaming server end to end, with a fake backend that runs local processes.

Driven by moorage's own SPDY client and, for WebSocket, by the independent
``websocket-client`` library (run in a thread while the server runs in the loop).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import pty
import ssl
import struct
import subprocess
import termios
import urllib.parse

import pytest
import websocket

from moorage.core.errors import NotFound
from moorage.cri.streaming import client as sc
from moorage.cri.streaming import spdy
from moorage.cri.streaming.remotecommand import V4, RemoteCommandError
from moorage.cri.streaming.server import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    StreamingServer,
)
from moorage.cri.streaming.spdyio import StreamClosedError

BIG = 10 * 1024 * 1024


class FakeBackend:
    """Runs commands on the host; port_forward dials 127.0.0.1."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.killed: asyncio.Queue[int] = asyncio.Queue()
        self.resizes: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    async def exec(self, container_id, cmd, tty, stdin, stdout, stderr, resize):
        if container_id == "missing":
            raise NotFound("container missing not found")
        if tty:
            return await self._exec_tty(cmd, stdin, stdout, resize)
        pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=pipe if stdin else null, stdout=pipe if stdout else null, stderr=pipe if stderr else null
        )
        self.started.put_nowait(proc.pid)

        async def feed():
            with contextlib.suppress(ConnectionError):
                while data := await stdin.read():
                    proc.stdin.write(data)
                    await proc.stdin.drain()
                proc.stdin.close()

        async def copy(src, dst):
            while data := await src.read(65536):
                await dst(data)

        feeder = asyncio.create_task(feed()) if stdin else None
        try:
            await asyncio.gather(*(copy(s, d) for s, d in ((proc.stdout, stdout), (proc.stderr, stderr)) if d))
            return await proc.wait()
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            self.killed.put_nowait(proc.pid)
            raise
        finally:
            if feeder:
                feeder.cancel()

    async def _exec_tty(self, cmd, stdin, stdout, resize):
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[bytes] = asyncio.Queue()

        def readable():
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(master)
            out.put_nowait(data)

        async def sizes():
            async for w, h in resize:
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", h, w, 0, 0))
                self.resizes.put_nowait((w, h))

        async def feed():
            while data := await stdin.read():
                os.write(master, data)

        loop.add_reader(master, readable)
        tasks = [asyncio.create_task(c) for c in (sizes(), feed())]
        try:
            while data := await out.get():
                await stdout(data)
            return await proc.wait()
        finally:
            loop.remove_reader(master)
            for t in tasks:
                t.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            os.close(master)

    async def attach(self, container_id, tty, stdin, stdout, stderr, resize):
        await stdout(b"attached\n")

    async def port_forward(self, sandbox_id, port):
        return await asyncio.open_connection("127.0.0.1", port)


async def _echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def run(test, **server_options):
    """Run ``test(server, backend, echo_port)`` against a fresh server and echo service."""

    async def main():
        backend = FakeBackend()
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        try:
            async with StreamingServer(backend, **server_options) as server:
                await test(server, backend, echo.sockets[0].getsockname()[1])
        finally:
            echo.close()
            await echo.wait_closed()

    asyncio.run(main())


def ws_url(url: str) -> str:
    return "ws" + url[len("http") :]


def ws_collect(ws) -> dict[int, bytes]:
    """Read channel messages until the server closes; text (base64) messages are decoded."""
    got: dict[int, bytes] = {}
    while msg := ws.recv():
        if isinstance(msg, str):
            ch, data = int(msg[0]), base64.b64decode(msg[1:])
        else:
            ch, data = msg[0], msg[1:]
        got[ch] = got.get(ch, b"") + data
    return got


def ws_done(ws) -> None:
    ws.close()
    ws.shutdown()  # close() skips closing the socket once the server has closed first


# --------------------------------------------------------------------------- SPDY exec


def test_exec_stdin_echo():
    async def t(server, backend, _):
        url = server.get_exec_url(ExecRequest("c1", ["cat"], stdin=True))
        res = await sc.run(url, stdin=b"hello moorage\n" * 1000)
        assert res == sc.ExecResult(0, b"hello moorage\n" * 1000, b"")

    run(t)


def test_exec_nonzero_exit_and_stderr():
    async def t(server, backend, _):
        url = server.get_exec_url(ExecRequest("c1", ["sh", "-c", "echo out; echo err >&2; exit 7"]))
        res = await sc.run(url)
        assert (res.exit_code, res.stdout, res.stderr) == (7, b"out\n", b"err\n")

    run(t)


@pytest.mark.parametrize("proto", ["v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"])
def test_exec_older_protocols(proto):
    async def t(server, backend, _):
        ok = await sc.run(server.get_exec_url(ExecRequest("c1", ["echo", "hi"])), protocols=[proto])
        assert (ok.exit_code, ok.stdout) == (0, b"hi\n")
        with pytest.raises(RemoteCommandError, match="non-zero exit code 3"):
            await sc.run(server.get_exec_url(ExecRequest("c1", ["sh", "-c", "exit 3"])), protocols=[proto])

    run(t)


def test_exec_backend_error_is_reported():
    async def t(server, backend, _):
        with pytest.raises(RemoteCommandError, match="container missing not found"):
            await sc.run(server.get_exec_url(ExecRequest("missing", ["true"])))

    run(t)


def test_exec_tty_resize():
    async def t(server, backend, _):
        url = server.get_exec_url(ExecRequest("c1", ["sh", "-c", "read x; stty size"], tty=True, stdin=True, stderr=False))
        cmd = await sc.RemoteCommand.connect(url, stdin=True, tty=True)
        try:
            await cmd.resize(100, 40)
            assert await backend.resizes.get() == (100, 40)
            await cmd.write_stdin(b"go\n")
            out = await cmd.stdout.read_all()
            assert await cmd.wait() == 0
            assert b"40 100" in out
        finally:
            await cmd.close()

    run(t)


def test_attach():
    async def t(server, backend, _):
        res = await sc.run(server.get_attach_url(AttachRequest("c1", stdout=True, stderr=False)), stderr=False)
        assert (res.exit_code, res.stdout) == (0, b"attached\n")

    run(t)


def test_twenty_concurrent_execs():
    async def t(server, backend, _):
        async def one(i):
            url = server.get_exec_url(ExecRequest("c1", ["sh", "-c", f"cat; echo {i} >&2; exit {i % 3}"], stdin=True))
            return await sc.run(url, stdin=f"payload {i}\n".encode() * 500)

        results = await asyncio.gather(*(one(i) for i in range(20)))
        for i, r in enumerate(results):
            assert r == sc.ExecResult(i % 3, f"payload {i}\n".encode() * 500, f"{i}\n".encode())

    run(t)


def test_client_disconnect_kills_process():
    async def t(server, backend, _):
        url = server.get_exec_url(ExecRequest("c1", ["sleep", "300"], stdin=True))
        cmd = await sc.RemoteCommand.connect(url, stdin=True)
        pid = await backend.started.get()
        await cmd.close()
        assert await backend.killed.get() == pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    run(t)


def test_unexpected_stream_refused_and_missing_streams_time_out():
    async def t(server, backend, _):
        session, proto = await sc.spdy_upgrade(server.get_exec_url(ExecRequest("c1", ["true"])), [V4])
        try:
            assert proto == V4
            await session.open_stream([("streamtype", "error")])
            with pytest.raises(StreamClosedError):
                await session.open_stream([("streamtype", "bogus")])
            await session.closed.wait()  # stdout/stderr never came: the server gives up
            assert backend.started.empty()
        finally:
            await session.close()

    run(t, stream_creation_timeout=0.2)


def test_exec_over_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(cert))

    async def t(server, backend, _):
        url = server.get_exec_url(ExecRequest("c1", ["echo", "secure"]))
        assert url.startswith("https://127.0.0.1:")
        assert (await sc.run(url, ssl=ctx)).stdout == b"secure\n"

    run(t, tls_cert=str(cert), tls_key=str(key))


# --------------------------------------------------------------------------- HTTP errors


def test_bad_token_404_and_single_use():
    async def t(server, backend, _):
        with pytest.raises(sc.UpgradeError) as e:
            await sc.run(server.base_url + "/exec/not-a-token")
        assert e.value.status == 404
        url = server.get_exec_url(ExecRequest("c1", ["true"]))
        assert (await sc.run(url)).exit_code == 0
        with pytest.raises(sc.UpgradeError) as e:
            await sc.run(url)
        assert e.value.status == 404
        # A token only works for its own kind of request.
        url = server.get_exec_url(ExecRequest("c1", ["true"]))
        with pytest.raises(sc.UpgradeError) as e:
            await sc.run(url.replace("/exec/", "/attach/"))
        assert e.value.status == 404
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            await asyncio.to_thread(websocket.create_connection, ws_url(server.base_url) + "/exec/nope")
        assert e.value.status_code == 404

    run(t)


def test_only_a_valid_upgrade_of_the_right_kind_uses_up_a_token():
    """A plain GET (a link checker, a curious user), the wrong kind or a failed protocol
    negotiation gets its error and leaves the token for the real client."""

    async def t(server, backend, _):
        url = server.get_exec_url(ExecRequest("c1", ["echo", "still-here"]))
        host, port = server.base_url.split("//", 1)[1].split(":")
        path = url.split(server.base_url, 1)[1]
        for head in (f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n",  # no upgrade at all
                     f"GET {path.replace('/exec/', '/attach/')} HTTP/1.1\r\nHost: x\r\n"
                     "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n"):  # the wrong kind
            r, w = await asyncio.open_connection(host, int(port))
            w.write(head.encode())
            await w.drain()
            status = (await r.readline()).split()[1]
            assert status in (b"400", b"404"), status
            w.close()
            await w.wait_closed()
        with pytest.raises(sc.UpgradeError) as e:  # a protocol the server does not speak
            await sc.run(url, protocols=["v9.channel.k8s.io"])
        assert e.value.status == 400
        with pytest.raises(websocket.WebSocketBadStatusException):
            await asyncio.to_thread(websocket.create_connection, ws_url(url), subprotocols=["bogus.k8s.io"])
        res = await sc.run(url)  # the real client still gets its stream, once
        assert res.stdout == b"still-here\n"
        with pytest.raises(sc.UpgradeError) as e:
            await sc.run(url)
        assert e.value.status == 404

    run(t)


def test_unsupported_protocol_400():
    async def t(server, backend, _):
        with pytest.raises(sc.UpgradeError) as e:
            await sc.run(server.get_exec_url(ExecRequest("c1", ["true"])), protocols=["v9.channel.k8s.io"])
        assert e.value.status == 400
        assert "v4.channel.k8s.io" in e.value.body
        assert "v4.channel.k8s.io" in e.value.headers["x-accepted-stream-protocol-versions"]
        url = ws_url(server.get_exec_url(ExecRequest("c1", ["true"])))
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            await asyncio.to_thread(websocket.create_connection, url, subprotocols=["bogus.k8s.io"])
        assert e.value.status_code == 400
        assert b"v5.channel.k8s.io" in e.value.resp_body

    run(t)


# --------------------------------------------------------------------------- WebSocket exec


def test_websocket_v5_exec_with_close_signal():
    async def t(server, backend, _):
        url = ws_url(server.get_exec_url(ExecRequest("c1", ["sh", "-c", "cat; exit 4"], stdin=True)))

        def client():
            ws = websocket.create_connection(url, subprotocols=["v5.channel.k8s.io"])
            assert ws.getsubprotocol() == "v5.channel.k8s.io"
            ws.send_binary(b"\x00" + b"via websocket\n")
            ws.send_binary(bytes([255, 0]))  # close stdin
            got = ws_collect(ws)
            ws_done(ws)
            return got

        got = await asyncio.to_thread(client)
        assert got[1] == b"via websocket\n"
        status = json.loads(got[3])
        assert status["reason"] == "NonZeroExitCode"
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "4"}]

    run(t)


@pytest.mark.parametrize("proto", ["v4.base64.channel.k8s.io", "base64.channel.k8s.io"])
def test_websocket_base64_exec(proto):
    async def t(server, backend, _):
        cmd = ["sh", "-c", "head -c 5; echo err >&2"]
        url = ws_url(server.get_exec_url(ExecRequest("c1", cmd, stdin=True)))

        def client():
            ws = websocket.create_connection(url, subprotocols=[proto])
            ws.send("0" + base64.b64encode(b"abcdefgh").decode())
            got = ws_collect(ws)
            ws_done(ws)
            return got

        got = await asyncio.to_thread(client)
        assert (got[1], got[2]) == (b"abcde", b"err\n")
        if proto.startswith("v4."):
            assert json.loads(got[3]) == {"metadata": {}, "status": "Success"}
        else:
            assert got.get(3, b"") == b""

    run(t)


# --------------------------------------------------------------------------- port forward


def test_portforward_spdy_10mb():
    async def t(server, backend, echo_port):
        payload = os.urandom(BIG)
        url = server.get_portforward_url(PortForwardRequest("pod1"))
        async with await sc.PortForwardClient.connect(url) as pfc:
            conn = await pfc.open(echo_port)

            async def send():
                for off in range(0, BIG, 256 * 1024):
                    await conn.write(payload[off : off + 256 * 1024])
                conn.close_write()

            async def receive():
                h, n = hashlib.sha256(), 0
                while data := await conn.read():
                    h.update(data)
                    n += len(data)
                return n, h.hexdigest()

            _, (n, digest) = await asyncio.gather(send(), receive())
            assert (n, digest) == (BIG, hashlib.sha256(payload).hexdigest())
            assert await conn.error() is None

    run(t)


def test_portforward_spdy_connect_error_reported():
    async def t(server, backend, echo_port):
        closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        url = server.get_portforward_url(PortForwardRequest("pod1"))
        async with await sc.PortForwardClient.connect(url) as pfc:
            conn = await pfc.open(port)
            assert await conn.read() == b""
            assert f"error forwarding port {port}" in await conn.error()

    run(t)


def test_portforward_websocket_10mb():
    async def t(server, backend, echo_port):
        payload = os.urandom(BIG)
        url = ws_url(server.get_portforward_url(PortForwardRequest("pod1", [echo_port]))) + f"?port={echo_port}"

        def client():
            ws = websocket.create_connection(url, subprotocols=["v4.channel.k8s.io"])
            port = struct.pack("<H", echo_port)
            assert sorted([ws.recv(), ws.recv()]) == [b"\x00" + port, b"\x01" + port]

            def send():
                for off in range(0, BIG, 64 * 1024):
                    ws.send_binary(b"\x00" + payload[off : off + 64 * 1024])

            import threading

            sender = threading.Thread(target=send)
            sender.start()
            h, n = hashlib.sha256(), 0
            while n < BIG:
                msg = ws.recv()
                assert msg[0] == 0
                h.update(msg[1:])
                n += len(msg) - 1
            sender.join()
            ws_done(ws)
            return n, h.hexdigest()

        assert await asyncio.to_thread(client) == (BIG, hashlib.sha256(payload).hexdigest())

    run(t)


# --------------------------------------------------------------------------- SPDY peers that misbehave

GUARD = 10  # only so that a regression fails instead of hanging the run; nothing here is timed


class RawSpdy:
    """A hand-driven SPDY client built on the sans-I/O core; it never announces (or honours) flow control."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        # A receive window it never has to grant back: it sends no WINDOW_UPDATE, like spdystream.
        self.conn = spdy.SpdyConnection(client=True, recv_window=spdy.MAX_WINDOW)
        self.pending: list = []

    @classmethod
    async def connect(cls, url: str, protocol: str = "portforward.k8s.io") -> RawSpdy:
        u = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        writer.write(
            f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            f"X-Stream-Protocol-Version: {protocol}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    async def send(self, raw: bytes = b"") -> None:
        self.writer.write(self.conn.data_to_send() + raw)
        await self.writer.drain()

    async def open(self, headers, fin: bool = False) -> int:
        sid = self.conn.open_stream(headers, fin=fin)
        await self.send()
        return sid

    async def until(self, match):
        """The first event (already received, or read from now on) that satisfies ``match``."""
        while True:
            for i, ev in enumerate(self.pending):
                if match(ev):
                    return self.pending.pop(i)
            data = await self.reader.read(65536)
            assert data, "the server closed the connection"
            self.pending += self.conn.receive_data(data)
            await self.send()  # e.g. echo pings

    async def reset_of(self, sid: int) -> spdy.StreamReset:
        return await self.until(lambda ev: isinstance(ev, spdy.StreamReset) and ev.stream_id == sid)

    async def overfill(self, sid: int, n: int) -> None:
        """Send ``n`` bytes on ``sid`` with raw DATA frames, ignoring every window."""
        chunk = b"x" * spdy.MAX_DATA_CHUNK
        for _ in range(n // len(chunk)):
            await self.send(spdy.data_frame(sid, chunk))

    async def forward(self, rid: str, port: int, payload: bytes, error: int | None = None) -> bytes:
        """A well-formed port-forward request (its error stream may already be open): returns
        what came back on the data stream."""
        base = [("port", str(port)), ("requestid", rid)]
        if error is None:
            error = self.conn.open_stream([("streamtype", "error"), *base], fin=True)
        data = self.conn.open_stream([("streamtype", "data"), *base])
        self.conn.send_data(data, payload, fin=True)
        await self.send()
        got, ended = b"", set()
        while ended != {data, error}:  # both FINs: the server is done with the pair
            ev = await self.until(lambda ev: getattr(ev, "stream_id", None) in (data, error))
            assert not isinstance(ev, spdy.StreamReset), ev
            if isinstance(ev, spdy.DataReceived):
                assert ev.stream_id == data or not ev.data, f"error stream says {ev.data!r}"
                got += ev.data
                if ev.fin:
                    ended.add(ev.stream_id)
        return got

    def close(self) -> None:
        self.writer.close()


def test_overfilled_unpaired_portforward_stream_is_reset_and_the_session_keeps_working():
    async def t(server, backend, echo_port):
        async with asyncio.timeout(GUARD):
            raw = await RawSpdy.connect(server.get_portforward_url(PortForwardRequest("pod1")))
            try:
                lonely = await raw.open([("streamtype", "data"), ("port", str(echo_port)), ("requestid", "lonely")])
                await raw.overfill(lonely, 3 << 19)  # 1.5 MiB that nobody will ever read
                assert (await raw.reset_of(lonely)).status == spdy.RstStatus.FLOW_CONTROL_ERROR
                # The read loop still runs: pings are answered and a proper request on the same connection works.
                pid = raw.conn.ping()
                await raw.send()
                await raw.until(lambda ev: ev == spdy.PingAcknowledged(pid))
                assert await raw.forward("ok", echo_port, b"still here") == b"still here"
            finally:
                raw.close()

    run(t)


def test_client_hanging_up_after_overfilling_a_stream_ends_the_server_side():
    async def t(server, backend, echo_port):
        async with asyncio.timeout(GUARD):
            raw = await RawSpdy.connect(server.get_portforward_url(PortForwardRequest("pod1")))
            conns = set(server._conns)
            assert len(conns) == 1
            lonely = await raw.open([("streamtype", "data"), ("port", str(echo_port)), ("requestid", "lonely")])
            await raw.overfill(lonely, 3 << 19)
            raw.writer.write_eof()  # a clean hang-up (FIN after all the data), not a connection reset
            while await raw.reader.read(65536):
                pass  # the server closes its side once it has seen ours
            await asyncio.gather(*conns)  # and the connection's task has finished
            raw.close()

    run(t)


def test_expired_portforward_pairs_are_reset():
    async def t(server, backend, echo_port):
        async with asyncio.timeout(GUARD):
            raw = await RawSpdy.connect(server.get_portforward_url(PortForwardRequest("pod1")))
            try:
                port = ("port", str(echo_port))
                error = await raw.open([("streamtype", "error"), port, ("requestid", "a")])
                data = await raw.open([("streamtype", "data"), port, ("requestid", "b")])
                message = await raw.until(lambda ev: isinstance(ev, spdy.DataReceived) and ev.stream_id == error)
                assert b"timed out waiting for the streams of request a" in message.data
                await raw.reset_of(error)
                await raw.reset_of(data)
                assert not raw.conn.is_open(error) and not raw.conn.is_open(data)
                assert await raw.forward("c", echo_port, b"fine") == b"fine"
            finally:
                raw.close()

    run(t, stream_creation_timeout=0.2)


def test_streams_and_pending_portforward_pairs_are_capped_per_session():
    async def t(server, backend, echo_port):
        async with asyncio.timeout(GUARD):
            raw = await RawSpdy.connect(server.get_portforward_url(PortForwardRequest("pod1")))
            try:
                port = ("port", str(echo_port))
                waiting = [await raw.open([("streamtype", "error"), port, ("requestid", f"w{i}")], fin=True) for i in range(2)]
                for sid in waiting:
                    await raw.until(lambda ev, sid=sid: isinstance(ev, spdy.StreamReplied) and ev.stream_id == sid)
                # A third request still waiting for its pair is one too many ...
                third = await raw.open([("streamtype", "error"), port, ("requestid", "w2")])
                assert (await raw.reset_of(third)).status == spdy.RstStatus.REFUSED_STREAM
                # ... but completing a waiting one is fine (and frees its slot).
                assert await raw.forward("w0", echo_port, b"paired", error=waiting[0]) == b"paired"
                # Two forwarded connections the client keeps open (nothing pending) use the four streams
                # a session may have; a fifth stream is refused, and the first one open again once one ends.
                w1 = await raw.open([("streamtype", "data"), port, ("requestid", "w1")])
                y_error = await raw.open([("streamtype", "error"), port, ("requestid", "y")], fin=True)
                y_data = await raw.open([("streamtype", "data"), port, ("requestid", "y")])
                for sid in (w1, y_error, y_data):
                    await raw.until(lambda ev, sid=sid: isinstance(ev, spdy.StreamReplied) and ev.stream_id == sid)
                z = await raw.open([("streamtype", "error"), port, ("requestid", "z")], fin=True)
                assert (await raw.reset_of(z)).status == spdy.RstStatus.REFUSED_STREAM
                raw.conn.send_data(y_data, b"bye", fin=True)
                await raw.send()
                for sid in (y_error, y_data):
                    await raw.until(lambda ev, sid=sid: isinstance(ev, spdy.DataReceived) and ev.stream_id == sid and ev.fin)
                assert await raw.forward("z2", echo_port, b"room again") == b"room again"
            finally:
                raw.close()

    run(t, max_streams_per_session=4, max_pending_portforwards=2)


def test_stdin_from_a_peer_without_flow_control_is_backpressured_not_reset():
    """A claimed stream (exec stdin) that fills up still just pauses the read loop until it drains."""

    async def t(server, backend, _):
        async with asyncio.timeout(GUARD):
            raw = await RawSpdy.connect(server.get_exec_url(ExecRequest("c1", ["cat"], stdin=True)), V4)
            try:
                sids = {k: await raw.open([("streamtype", k)], fin=k != "stdin") for k in ("error", "stdin", "stdout", "stderr")}
                for sid in sids.values():
                    await raw.until(lambda ev, sid=sid: isinstance(ev, spdy.StreamReplied) and ev.stream_id == sid)
                size = 3 << 20

                async def push():
                    await raw.overfill(sids["stdin"], size)
                    await raw.send(spdy.data_frame(sids["stdin"], b"", fin=True))

                pusher = asyncio.create_task(push())
                n = 0
                while True:
                    ev = await raw.until(
                        lambda ev: isinstance(ev, (spdy.DataReceived, spdy.StreamReset)) and ev.stream_id != sids["stderr"]
                    )
                    assert isinstance(ev, spdy.DataReceived) and ev.stream_id == sids["stdout"], ev
                    n += len(ev.data)
                    if ev.fin:
                        break
                await pusher
                assert n == size
            finally:
                if "pusher" in locals():
                    pusher.cancel()
                raw.close()

    run(t)
