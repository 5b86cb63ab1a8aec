#!/usr/bin/env python3
"""Benchmark exec and port-forward: ExecSync vs streaming exec (SPDY, WebSocket), port-forward MB/s.

    .venv/bin/python hack/bench/bench_streaming.py            # scratch daemon + local registry (root)
    .venv/bin/python hack/bench/bench_streaming.py --socket /run/moorage/moorage.sock --image busybox-ref

Without ``--socket`` it starts what the integration tests use: a moorage daemon
on temporary dirs and a local docker-registry with the offline-built busybox,
and tears both down at the end.  Latencies are end to end as a kubelet sees
them: for streaming exec, the Exec RPC + connect + upgrade + run ``true`` +
exit status.  Port-forward throughput is one HTTP download of ``--mb`` MB from
busybox httpd inside the pod (loopback-only pod netns) through the streaming
server, per protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

import grpc
import websocket

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.cri.streaming import client as spdy_client
from moorage.testing.cri import container_config, pod_config, run_container, wait_for

PORT = 8080


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def report(name: str, secs: list[float]) -> None:
    ms = [s * 1000 for s in secs]
    print(f"{name:<34} n={len(ms):<4} p50={pct(ms, 50):7.1f} ms  p95={pct(ms, 95):7.1f} ms  "
          f"mean={statistics.mean(ms):7.1f} ms")


def bench_exec_sync(rt, cid: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=30), timeout=60)
        out.append(time.perf_counter() - t0)
        assert r.exit_code == 0
    return out


def bench_spdy_exec(rt, cid: str, n: int) -> list[float]:
    async def go() -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            url = rt.Exec(pb.ExecRequest(container_id=cid, cmd=["true"], stdout=True, stderr=True)).url
            r = await spdy_client.run(url)
            out.append(time.perf_counter() - t0)
            assert r.exit_code == 0
        return out
    return asyncio.run(go())


def bench_ws_exec(rt, cid: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        url = rt.Exec(pb.ExecRequest(container_id=cid, cmd=["true"], stdout=True, stderr=True)).url
        ws = websocket.create_connection(url.replace("http", "ws", 1), subprotocols=["v5.channel.k8s.io"],
                                         timeout=60)
        status = b""
        while True:
            try:
                opcode, msg = ws.recv_data()
            except websocket.WebSocketConnectionClosedException:
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            if msg[:1] == b"\x03":
                status += msg[1:]
        ws.close()
        out.append(time.perf_counter() - t0)
        assert b'"Success"' in status, status
    return out


def bench_pf_spdy(rt, sid: str, size: int) -> float:
    async def go() -> float:
        url = rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sid, port=[PORT])).url
        t0 = time.perf_counter()
        got = 0
        async with await spdy_client.PortForwardClient.connect(url) as pfc:
            conn = await pfc.open(PORT)
            await conn.write(b"GET /big HTTP/1.0\r\n\r\n")
            conn.close_write()
            while chunk := await conn.read():
                got += len(chunk)
        secs = time.perf_counter() - t0
        assert got > size, got
        return secs
    return asyncio.run(go())


def bench_pf_ws(rt, sid: str, size: int) -> float:
    url = rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sid, port=[PORT])).url + f"?port={PORT}"
    t0 = time.perf_counter()
    ws = websocket.create_connection(url.replace("http", "ws", 1), subprotocols=["v4.channel.k8s.io"], timeout=60)
    ws.send_binary(b"\x00" + b"GET /big HTTP/1.0\r\n\r\n")
    got = 0
    while True:
        try:
            opcode, msg = ws.recv_data()
        except websocket.WebSocketConnectionClosedException:
            break
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        if msg[:1] == b"\x00":
            got += len(msg) - 1
    ws.close()
    secs = time.perf_counter() - t0
    assert got > size, got
    return secs


def run(rt, images, image: str, args) -> None:
    images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    cfg = pod_config("bench-streaming")
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
    try:
        main = run_container(rt, sid, cfg, container_config(image, ["sleep", "3600"], name="main"))
        script = (f"mkdir -p /www && dd if=/dev/zero of=/www/big.tmp bs=1M count={args.mb} 2>/dev/null && "
                  f"mv /www/big.tmp /www/big && exec httpd -f -p 127.0.0.1:{PORT} -h /www")
        run_container(rt, sid, cfg, container_config(image, ["sh", "-c", script], name="httpd"))
        probe = ["wget", "-q", "--spider", f"http://127.0.0.1:{PORT}/big"]
        wait_for(lambda: rt.ExecSync(pb.ExecSyncRequest(container_id=main, cmd=probe, timeout=10)).exit_code == 0,
                 120, 0.2, "httpd in the pod")
        size = args.mb << 20
        # warm-up (page cache, first conmon/runc start)
        bench_exec_sync(rt, main, 3)
        bench_spdy_exec(rt, main, 3)
        print(f"moorage streaming benchmark ({args.n} runs each; {os.cpu_count()} CPUs)")
        # Interleaved, so that load drift on the machine hits every method alike.
        lat: dict[str, list[float]] = {"ExecSync true": [], "streaming exec true (SPDY/3.1)": [],
                                       "streaming exec true (WebSocket v5)": []}
        for _ in range(args.n):
            for (_name, xs), fn in zip(lat.items(), (bench_exec_sync, bench_spdy_exec, bench_ws_exec)):
                xs += fn(rt, main, 1)
        for name, xs in lat.items():
            report(name, xs)
        for name, fn in (("SPDY", bench_pf_spdy), ("WebSocket", bench_pf_ws)):
            mbs = [args.mb / fn(rt, sid, size) for _ in range(args.pf_runs)]
            print(f"port-forward {name:<10} {args.mb} MB x{args.pf_runs}: median {statistics.median(mbs):7.1f} MB/s "
                  f"(best {max(mbs):.1f})")
    finally:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", help="an existing moorage socket (default: start a scratch daemon)")
    ap.add_argument("--image", help="busybox image reference (with --socket)")
    ap.add_argument("-n", type=int, default=50, help="runs per latency figure")
    ap.add_argument("--mb", type=int, default=100, help="port-forward download size in MB")
    ap.add_argument("--pf-runs", type=int, default=3)
    args = ap.parse_args()
    if args.socket:
        if not args.image:
            ap.error("--image is required with --socket")
        ch = grpc.insecure_channel(f"unix://{args.socket}")
        run(pbg.RuntimeServiceStub(ch), pbg.ImageServiceStub(ch), args.image, args)
        return 0

    from moorage.testing.daemon import DaemonProcess, teardown
    from moorage.testing.registry import (
        TestRegistry,
        _push_images,
        _start_registry,
        _stop_process,
    )
    from moorage.testing.testimages import cached_build_all

    work = tempfile.mkdtemp(prefix="mrg-bench-")
    reg = TestRegistry(host="", scheme="http", base_dir=os.path.join(work, "registry"))
    os.makedirs(reg.base_dir)
    d = DaemonProcess(base=tempfile.mkdtemp(prefix="mrg-", dir="/tmp"))
    try:
        layouts = cached_build_all()
        _start_registry(reg, tls=None, auth=None, verify=False)
        _push_images(reg, layouts, ["busybox"])
        d.start()
        run(d.runtime, d.images, reg.images["busybox"].ref, args)
    finally:
        teardown(d)
        _stop_process(reg.proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
