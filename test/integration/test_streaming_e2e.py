"""Exec / Attach / PortForward end to end: real daemon, real containers, real clients.

WebSocket sessions are driven by ``websocket-client`` (an independent client),
SPDY sessions by moorage's own client (``cri/streaming/client.py``).  Each
module gets one daemon and one pod (no CNI config: the pod has a loopback-only
network namespace, which is all port-forward to 127.0.0.1 needs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import time
import urllib.parse
import uuid
from dataclasses import dataclass

import grpc
import pytest
import websocket

from moorage.cri.api import api_pb2 as pb
from moorage.cri.streaming import client as spdy_client
from moorage.cri.streaming import remotecommand as rc
from moorage.testing.cri import (
    container_config,
    pod_config,
    run_container,
    status,
    wait_exited,
    wait_for,
)
from moorage.testing.streams import WS, exec_sessions_on_host

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("conmon") or not shutil.which("runc"),
                       reason="needs root, conmon and runc"),
]

BIG_MB = 10
HTTPD_PORT = 8080


@dataclass
class Env:
    d: object
    image: str
    sid: str
    pod_cfg: pb.PodSandboxConfig
    main: str  # busybox `sleep 3600`
    httpd: str  # busybox httpd on 127.0.0.1:8080 in the pod, serving /www/big (10 MB)
    big_sha256: str

    @property
    def rt(self):
        return self.d.runtime

    def run(self, command: list[str], **kw) -> str:
        return run_container(self.rt, self.sid, self.pod_cfg, container_config(self.image, command, **kw))

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 30) -> tuple[int, str, str]:
        r = self.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=timeout + 30)
        return r.exit_code, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")

    def exec_url(self, cid: str, cmd: list[str], *, tty=False, stdin=False, stdout=True, stderr=True) -> str:
        return self.rt.Exec(pb.ExecRequest(container_id=cid, cmd=cmd, tty=tty, stdin=stdin, stdout=stdout,
                                           stderr=stderr and not tty)).url

    def attach_url(self, cid: str, *, tty=False, stdin=False, stdout=True, stderr=True) -> str:
        return self.rt.Attach(pb.AttachRequest(container_id=cid, tty=tty, stdin=stdin, stdout=stdout,
                                               stderr=stderr and not tty)).url

    def portforward_url(self, ports: list[int]) -> str:
        return self.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=self.sid, port=ports)).url


@pytest.fixture(scope="module")
def env(module_daemon, registry):
    d = module_daemon
    image = registry.images["busybox"].ref
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    cfg = pod_config("streaming")
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
    try:
        main = run_container(d.runtime, sid, cfg, container_config(image, ["sleep", "3600"], name="main"))
        script = (f"mkdir -p /www && dd if=/dev/urandom of=/www/big bs=1M count={BIG_MB} 2>/dev/null && "
                  f"sha256sum /www/big > /tmp/sum && mv /tmp/sum /www/big.sha256 && exec httpd -f -p 127.0.0.1:{HTTPD_PORT} -h /www")
        httpd = run_container(d.runtime, sid, cfg, container_config(image, ["sh", "-c", script], name="httpd"))
        e = Env(d, image, sid, cfg, main, httpd, "")

        def sha():
            code, out, _ = e.exec_sync(httpd, ["cat", "/www/big.sha256"])
            return code == 0 and out.strip() and out.split()[0]
        e.big_sha256 = wait_for(sha, 60, 0.1, "the 10 MB file in the httpd container")
        yield e
    finally:
        for call, req in ((d.runtime.StopPodSandbox, pb.StopPodSandboxRequest),
                          (d.runtime.RemovePodSandbox, pb.RemovePodSandboxRequest)):
            try:
                call(req(pod_sandbox_id=sid), timeout=120)
            except grpc.RpcError:
                pass


def spdy_run(url: str, **kw) -> spdy_client.ExecResult:
    return asyncio.run(asyncio.wait_for(spdy_client.run(url, **kw), 120))


# ------------------------------------------------------------------------------------------- SPDY exec


def test_spdy_exec_stdout_stderr_and_exit_code(env):
    r = spdy_run(env.exec_url(env.main, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = spdy_run(env.exec_url(env.main, ["true"]))
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"", b"")


def test_spdy_exec_stdin_tty_and_resize(env):
    r = spdy_run(env.exec_url(env.main, ["cat"], stdin=True), stdin=b"line one\nline two\n")
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"line one\nline two\n", b"")
    # A TTY: the size sent before the command runs is the one it sees (stdin gates the command).
    r = spdy_run(env.exec_url(env.main, ["sh", "-c", "read x; stty size; exit 5"], tty=True, stdin=True),
                 stdin=b"go\n", tty=True, resize=(101, 37))
    assert r.exit_code == 5
    assert b"37 101" in r.stdout


def test_spdy_exec_of_a_missing_binary_reports_the_runtime_error(env):
    with pytest.raises(rc.RemoteCommandError) as e:
        spdy_run(env.exec_url(env.main, ["/no/such/binary"]))
    assert "/no/such/binary" in str(e.value)


def test_spdy_exec_older_protocols(env):
    for proto in (rc.V3, rc.V2, rc.V1):
        r = spdy_run(env.exec_url(env.main, ["sh", "-c", "echo hi; exit 0"]), protocols=[proto])
        assert (r.exit_code, r.stdout) == (0, b"hi\n"), proto


# ------------------------------------------------------------------------------------- WebSocket exec


def status_of(out: dict[int, bytes]) -> dict:
    return json.loads(out[3])


def test_ws_exec_stdout_stderr_and_success(env):
    for proto in ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io"):
        ws = WS(env.exec_url(env.main, ["sh", "-c", "echo out; echo err >&2"]), proto)
        out = ws.finish()
        assert out.get(1) == b"out\n" and out.get(2) == b"err\n", proto
        assert status_of(out)["status"] == "Success", proto


def test_ws_exec_non_zero_exit_code_in_the_status(env):
    for proto in ("v5.channel.k8s.io", "v4.channel.k8s.io"):
        out = WS(env.exec_url(env.main, ["sh", "-c", "exit 42"]), proto).finish()
        st = status_of(out)
        assert st["status"] == "Failure" and st["reason"] == "NonZeroExitCode", st
        assert {"reason": "ExitCode", "message": "42"} in st["details"]["causes"], st


def test_ws_exec_stdin_echo_with_cat(env):
    payload = os.urandom(300 * 1024) + b"\nend\n"  # more than one conmon stdin message
    ws = WS(env.exec_url(env.main, ["cat"], stdin=True))
    ws.send(0, b"hello\n")
    assert ws.read_until(1, b"hello\n") == b"hello\n"  # echoed while stdin is still open
    for i in range(0, len(payload), 50_000):
        ws.send(0, payload[i:i + 50_000])
    ws.close_stdin()
    out = ws.finish()
    assert out[1] == b"hello\n" + payload
    assert status_of(out)["status"] == "Success"


def test_ws_exec_tty_and_resize(env):
    ws = WS(env.exec_url(env.main, ["sh"], tty=True, stdin=True))
    ws.resize(101, 37)
    ws.send(0, b"stty size\n")
    ws.read_until(1, b"37 101")
    ws.resize(132, 50)  # a resize mid-session reaches the terminal
    deadline = time.monotonic() + 60
    while b"50 132" not in ws.data.get(1, b""):
        assert time.monotonic() < deadline, ws.data
        ws.send(0, b"stty size\n")
        ws.ws.settimeout(0.5)
        try:
            while ws.recv() is not None:
                pass
        except websocket.WebSocketTimeoutException:
            pass
        ws.ws.settimeout(60)
    ws.send(0, b"exit 7\n")
    out = ws.finish()
    assert 2 not in out  # a terminal merges stderr into stdout
    st = status_of(out)
    assert {"reason": "ExitCode", "message": "7"} in st["details"]["causes"], st


def test_ws_exec_missing_binary_fails_in_the_status(env):
    st = status_of(WS(env.exec_url(env.main, ["/no/such/binary"])).finish())
    assert st["status"] == "Failure" and "/no/such/binary" in st["message"], st


# ------------------------------------------------------------------------------------------- attach


def test_ws_attach_to_a_container_that_prints(env):
    cid = env.run(["sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.1; done"])
    ws = WS(env.attach_url(cid, stdin=False))
    ws.read_until(1, b"tick-")
    first = int(ws.data[1].split(b"tick-")[1].split(b"\n")[0])
    ws.read_until(1, f"tick-{first + 3}\n".encode())  # output keeps flowing, in order
    ws.ws.close()
    assert status(env.rt, cid).state == pb.CONTAINER_RUNNING  # detaching leaves it running


def test_ws_attach_with_stdin_until_the_container_exits(env):
    cid = env.run(["sh", "-c", "echo ready; read l; echo got-$l; echo oops >&2; exit 4"], stdin=True)
    ws = WS(env.attach_url(cid, stdin=True))
    ws.send(0, b"ping\n")
    out = ws.finish()  # conmon ends the attach when the container exits
    assert b"got-ping\n" in out[1] and out.get(2) == b"oops\n"
    assert status_of(out)["status"] == "Success"
    assert wait_exited(env.rt, cid).exit_code == 4


def test_spdy_attach(env):
    cid = env.run(["sh", "-c", "read l; echo spdy-$l"], stdin=True)
    r = spdy_run(env.attach_url(cid, stdin=True), stdin=b"hello\n")
    assert r.exit_code == 0 and r.stdout == b"spdy-hello\n"


# ------------------------------------------------------------------------------------- port forward

HTTP_GET_BIG = b"GET /big HTTP/1.0\r\nHost: pod\r\n\r\n"


def http_body(response: bytes) -> bytes:
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], response[:200]
    return body


def test_spdy_port_forward_10mb_from_httpd(env):
    async def go() -> bytes:
        async with await spdy_client.PortForwardClient.connect(env.portforward_url([HTTPD_PORT])) as pfc:
            conn = await pfc.open(HTTPD_PORT)
            await conn.write(HTTP_GET_BIG)
            conn.close_write()
            buf = bytearray()
            while chunk := await conn.read():
                buf += chunk
            assert await conn.error() is None
            return bytes(buf)

    body = http_body(asyncio.run(asyncio.wait_for(go(), 120)))
    assert len(body) == BIG_MB << 20
    assert hashlib.sha256(body).hexdigest() == env.big_sha256


def test_spdy_port_forward_two_connections_in_one_session(env):
    async def go() -> list[bytes]:
        async with await spdy_client.PortForwardClient.connect(env.portforward_url([])) as pfc:
            async def one() -> bytes:
                conn = await pfc.open(HTTPD_PORT)
                await conn.write(b"GET /big.sha256 HTTP/1.0\r\n\r\n")
                conn.close_write()
                buf = bytearray()
                while chunk := await conn.read():
                    buf += chunk
                return bytes(buf)
            return await asyncio.gather(one(), one())

    for resp in asyncio.run(asyncio.wait_for(go(), 120)):
        assert http_body(resp).split()[0].decode() == env.big_sha256


def test_spdy_port_forward_to_a_closed_port_reports_an_error(env):
    async def go() -> str | None:
        async with await spdy_client.PortForwardClient.connect(env.portforward_url([1])) as pfc:
            conn = await pfc.open(1)
            assert await conn.read() == b""
            return await conn.error()

    err = asyncio.run(asyncio.wait_for(go(), 60))
    assert err and "port 1" in err and env.sid in err


@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "portforward.k8s.io"])
def test_ws_port_forward_10mb_from_httpd(env, protocol):
    url = env.portforward_url([HTTPD_PORT]) + f"?port={HTTPD_PORT}"
    ws = WS(url, protocol)
    # The server first names the port on the data and the error channel (uint16, little endian).
    while len(ws.data.get(0, b"")) < 2 or len(ws.data.get(1, b"")) < 2:
        assert ws.recv() is not None
    assert bytes(ws.data[0][:2]) == HTTPD_PORT.to_bytes(2, "little") == bytes(ws.data[1][:2])
    del ws.data[0][:2], ws.data[1][:2]
    ws.send(0, HTTP_GET_BIG)
    out = ws.finish()  # httpd closes after the response; the server then ends the session
    assert not out.get(1), out.get(1)
    body = http_body(out[0])
    assert len(body) == BIG_MB << 20
    assert hashlib.sha256(body).hexdigest() == env.big_sha256


# ---------------------------------------------------------------------------------------- sessions


def test_twenty_concurrent_execs(env):
    n = 20
    urls = [env.exec_url(env.main, ["sh", "-c", f"echo start-{i}; sleep 1; echo end-{i} >&2; exit {i}"])
            for i in range(n)]

    async def go():
        return await asyncio.gather(*(spdy_client.run(u) for u in urls))

    results = asyncio.run(asyncio.wait_for(go(), 180))
    for i, r in enumerate(results):
        assert (r.exit_code, r.stdout, r.stderr) == (i, f"start-{i}\n".encode(), f"end-{i}\n".encode())
    assert not exec_sessions_on_host(env.main)


def sleeps_in(env, cid: str, marker: str) -> bool:
    code, out, err = env.exec_sync(cid, ["ps", "-o", "pid,args"])
    assert code == 0, err
    return any(f"sleep {marker}" in line for line in out.splitlines())


def exec_dirs(env, cid: str) -> list[str]:
    d = os.path.join(env.d.state, "oci", "conmon", cid)
    return [n for n in os.listdir(d) if n.startswith("exec-")] if os.path.isdir(d) else []


@pytest.mark.parametrize("transport", ["websocket", "spdy"])
def test_disconnect_mid_exec_kills_the_process(env, transport):
    marker = str(30000 + uuid.uuid4().int % 10000)
    cmd = ["sh", "-c", f"echo started; exec sleep {marker}"]
    if transport == "websocket":
        ws = WS(env.exec_url(env.main, cmd))
        ws.read_until(1, b"started\n")
        assert sleeps_in(env, env.main, marker) and exec_sessions_on_host(env.main)
        ws.abort()
    else:
        async def go():
            session = await spdy_client.RemoteCommand.connect(env.exec_url(env.main, cmd))
            buf = bytearray()
            while b"started\n" not in buf:
                buf += await session.stdout.read()
            assert sleeps_in(env, env.main, marker) and exec_sessions_on_host(env.main)
            session.session.writer.transport.abort()  # vanish without a GOAWAY
            await session.close()
        asyncio.run(asyncio.wait_for(go(), 60))
    wait_for(lambda: not sleeps_in(env, env.main, marker), 60, 0.1, "the exec'd sleep to be killed")
    wait_for(lambda: not exec_sessions_on_host(env.main), 60, 0.1, "the exec session's conmon to end")
    wait_for(lambda: not exec_dirs(env, env.main), 60, 0.1, "the exec session's files to be removed")
    assert status(env.rt, env.main).state == pb.CONTAINER_RUNNING


# ----------------------------------------------------------------------------------- refusals


def raw_http(url: str, headers: dict[str, str]) -> tuple[int, dict[str, list[str]], str]:
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        lines = [f"GET {u.path}{'?' + u.query if u.query else ''} HTTP/1.1", f"Host: {u.netloc}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    hdrs: dict[str, list[str]] = {}
    for line in rest:
        k, _, v = line.partition(":")
        hdrs.setdefault(k.strip().lower(), []).append(v.strip())
    return int(first.split()[1]), hdrs, body.decode()


WS_HEADERS = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_bad_used_and_wrong_kind_tokens_get_404_and_a_wrong_try_leaves_the_token(env):
    url = env.exec_url(env.main, ["true"])
    base = url.rsplit("/", 2)[0]
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(f"{base.replace('http', 'ws', 1)}/exec/not-a-token",
                                    subprotocols=["v5.channel.k8s.io"], timeout=30)
    assert e.value.status_code == 404
    with pytest.raises(spdy_client.UpgradeError) as e2:
        spdy_run(f"{base}/attach/{url.rsplit('/', 1)[1]}")  # an exec token is no attach token...
    assert e2.value.status == 404
    spdy_run(url)  # ...and that wrong try did not use it up: the real client gets its stream, once
    with pytest.raises(spdy_client.UpgradeError) as e2:
        spdy_run(url)
    assert e2.value.status == 404
    code, _, body = raw_http(f"{base}/portforward/nope", WS_HEADERS)
    assert code == 404 and "token" in body


def test_unsupported_protocol_gets_400_listing_the_supported_ones(env):
    code, headers, body = raw_http(env.exec_url(env.main, ["true"]),
                                   {**WS_HEADERS, "Sec-WebSocket-Protocol": "v9.channel.k8s.io"})
    assert code == 400
    for p in ("v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"):
        assert p in body and p in headers["x-accepted-stream-protocol-versions"]
    with pytest.raises(spdy_client.UpgradeError) as e:
        asyncio.run(spdy_client.spdy_upgrade(env.exec_url(env.main, ["true"]), ["v9.channel.k8s.io"]))
    assert e.value.status == 400 and rc.V4 in e.value.body
    assert rc.V4 in e.value.headers["x-accepted-stream-protocol-versions"]
    code, headers, body = raw_http(env.portforward_url([HTTPD_PORT]) + f"?port={HTTPD_PORT}",
                                   {**WS_HEADERS, "Sec-WebSocket-Protocol": "v5.channel.k8s.io"})
    assert code == 400 and "portforward.k8s.io" in body


def rpc_code(fn, req) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn(req, timeout=30)
    return e.value.code()


def test_rpcs_refuse_stopped_unknown_and_invalid_targets(env):
    done = env.run(["true"])
    wait_exited(env.rt, done)
    rt = env.rt
    assert rpc_code(rt.Exec, pb.ExecRequest(container_id=done, cmd=["true"], stdout=True)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_code(rt.Attach, pb.AttachRequest(container_id=done, stdout=True)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_code(rt.Exec, pb.ExecRequest(container_id="f" * 64, cmd=["true"], stdout=True)) \
        == grpc.StatusCode.NOT_FOUND
    assert rpc_code(rt.Attach, pb.AttachRequest(container_id="f" * 64, stdout=True)) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(rt.PortForward, pb.PortForwardRequest(pod_sandbox_id="f" * 64, port=[80])) \
        == grpc.StatusCode.NOT_FOUND
    for bad in (pb.ExecRequest(container_id=env.main, cmd=[], stdout=True),
                pb.ExecRequest(container_id=env.main, cmd=["true"]),  # no stream at all
                pb.ExecRequest(container_id=env.main, cmd=["sh"], tty=True, stdout=True, stderr=True)):
        assert rpc_code(rt.Exec, bad) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(rt.PortForward, pb.PortForwardRequest(pod_sandbox_id=env.sid, port=[70000])) \
        == grpc.StatusCode.INVALID_ARGUMENT
    url = rt.Exec(pb.ExecRequest(container_id=env.main[:12], cmd=["true"], stdout=True)).url  # id prefix
    assert spdy_run(url, stderr=False).exit_code == 0


def test_container_and_streaming_survive_a_daemon_kill_mid_exec(daemon, registry):
    d = daemon
    image = registry.images["busybox"].ref
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    cfg = pod_config("streaming-restart")
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
    cid = run_container(d.runtime, sid, cfg, container_config(image, ["sleep", "3600"]))
    ws = WS(d.runtime.Exec(pb.ExecRequest(container_id=cid, cmd=["sh", "-c", "echo started; sleep 5"],
                                          stdout=True)).url)
    ws.read_until(1, b"started\n")
    d.kill9()
    ws.finish()  # the connection went down with the daemon
    d.start()
    assert status(d.runtime, cid).state == pb.CONTAINER_RUNNING
    url = d.runtime.Exec(pb.ExecRequest(container_id=cid, cmd=["sh", "-c", "echo again; exit 2"],
                                        stdout=True, stderr=True)).url
    r = spdy_run(url)
    assert (r.exit_code, r.stdout) == (2, b"again\n")
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
