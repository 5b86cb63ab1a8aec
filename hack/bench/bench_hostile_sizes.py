#!/usr/bin/env python3
"""Benchmark how long one oversized request stalls other calls (issue #14).

    .venv/bin/python hack/bench/bench_hostile_sizes.py            # scratch daemon (root)
    .venv/bin/python hack/bench/bench_hostile_sizes.py --socket /run/moorage/moorage.sock

A RunPodSandbox with 1, 4 and 12 MB of labels is sent (it is refused: labels and annotations
are limited per object) while another process calls Version back to back; printed per size:
how long the refusal took and the longest Version call meanwhile (p50 over the rounds).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import grpc

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.testing.cri import pod_config
from moorage.testing.daemon import DaemonProcess, new_base, teardown

PROBE = r"""
import select, sys, time, grpc
from moorage.cri.api import api_pb2 as pb, api_pb2_grpc as pbg
stub = pbg.RuntimeServiceStub(grpc.insecure_channel("unix://" + sys.argv[1]))
stub.Version(pb.VersionRequest(), timeout=10)
print("ready", flush=True)
longest = 0.0
while not select.select([sys.stdin], [], [], 0.005)[0]:
    t = time.perf_counter()
    stub.Version(pb.VersionRequest(), timeout=60)
    longest = max(longest, time.perf_counter() - t)
print(longest, flush=True)
"""


def one_round(socket: str, request: pb.RunPodSandboxRequest) -> tuple[float, float]:
    probe = subprocess.Popen([sys.executable, "-c", PROBE, socket], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
    ch = grpc.insecure_channel(f"unix://{socket}", options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pbg.RuntimeServiceStub(ch)
    t = time.perf_counter()
    try:
        stub.RunPodSandbox(request, timeout=120)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    took = time.perf_counter() - t
    ch.close()
    time.sleep(0.1)
    out, _ = probe.communicate("stop\n", timeout=120)
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise SystemExit(f"expected RESOURCE_EXHAUSTED, got {code}")
    return took, float(out.strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", default="")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    d = None
    socket = args.socket
    if not socket:
        d = DaemonProcess(base=new_base()).start()
        socket = d.socket
    try:
        for mb in (1, 4, 12):
            n = mb * 1_000_000 // 60
            req = pb.RunPodSandboxRequest(config=pod_config(labels={f"k{i:07d}": "v" * 50 for i in range(n)}))
            rounds = [one_round(socket, req) for _ in range(args.rounds)]
            took = statistics.median(r[0] for r in rounds) * 1000
            stall = statistics.median(r[1] for r in rounds) * 1000
            print(f"{req.ByteSize() / 1e6:5.1f} MB of labels ({n} labels): refused in {took:6.0f} ms (p50); "
                  f"longest concurrent Version call {stall:5.0f} ms (p50 of {args.rounds} rounds)")
    finally:
        if d is not None:
            teardown(d)


if __name__ == "__main__":
    main()
