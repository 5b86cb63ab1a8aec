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
