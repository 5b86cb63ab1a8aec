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

import pytest
import websocket

from cri.streaming import client as sc
from cri.streaming.remotecommand import V4, RemoteCommandError
from cri.streaming.spdyio import StreamClosedError
from cri.streaming.server import AttachRequest, ExecRequest, PortForwardRequest, StreamingServer
from runtime.errors import NotFound

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
