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
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass

import grpc
import pytest
import websocket

from cri.api import api_pb2 as pb
from cri.streaming import client as spdy_client
from cri.streaming import remotecommand as rc
from test.helpers.cri import container_config, pod_config, run_container, status, wait_exited, wait_for

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


class WS:
    """A Kubernetes channel session over websocket-client (binary, or the base64 text variant)."""

    def __init__(self, url: str, protocol: str = "v5.channel.k8s.io", timeout: float = 60) -> None:
        self.protocol = protocol
        self.b64 = ".base64." in protocol or protocol.startswith("base64.")
        self.ws = websocket.create_connection(url.replace("http", "ws", 1), subprotocols=[protocol], timeout=timeout)
        assert self.ws.getsubprotocol() == protocol
        self.data: dict[int, bytearray] = {}
        self.closed = False

    def send(self, channel: int, data: bytes) -> None:
        if self.b64:
            import base64

            self.ws.send(str(channel) + base64.b64encode(data).decode())
        else:
            self.ws.send_binary(bytes([channel]) + data)

    def close_stdin(self) -> None:
        assert self.protocol.startswith("v5.")
        self.ws.send_binary(bytes([255, 0]))

    def resize(self, width: int, height: int) -> None:
        self.send(4, json.dumps({"Width": width, "Height": height}).encode())

    def recv(self) -> tuple[int, bytes] | None:
        """Next (channel, data); None once the server closed the connection."""
        if self.closed:
            return None
        try:
            opcode, msg = self.ws.recv_data()
        except websocket.WebSocketConnectionClosedException:
            self.closed = True
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self.closed = True
            return None
        if self.b64:
            import base64

            text = msg.decode()
            channel, payload = int(text[0]), base64.b64decode(text[1:])
        else:
            channel, payload = msg[0], bytes(msg[1:])
        self.data.setdefault(channel, bytearray()).extend(payload)
        return channel, payload

    def read_until(self, channel: int, needle: bytes) -> bytes:
        while needle not in self.data.get(channel, b""):
            if self.recv() is None:
                raise AssertionError(f"closed before {needle!r} arrived on channel {channel}: {self.data}")
        return bytes(self.data[channel])

    def finish(self) -> dict[int, bytes]:
        while self.recv() is not None:
            pass
        self.ws.close()
        return {ch: bytes(v) for ch, v in self.data.items()}

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (a client that vanished)."""
        self.ws.sock.shutdown(socket.SHUT_RDWR)
        self.ws.sock.close()


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
