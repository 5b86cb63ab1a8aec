#!/usr/bin/env python3
"""Benchmark: the cost of ListContainerStats with N running containers, and of one /metrics scrape.

Also ListPodSandboxStats and ListPodSandboxMetrics over the same pods.  The daemon caches each
container's writable-layer usage for ~10 s (as cAdvisor does), so the rounds measure the steady
state of a frequent poller; the first, cold ListContainerStats call (every layer walked) is
printed separately.

Runs as root on a throw-away daemon (temporary root/state/socket, like the integration tests),
with a local docker-registry serving the offline-built busybox image.  Everything it made is
removed at the end.

    .venv/bin/python hack/bench/bench_stats.py [--containers 100] [--rounds 30]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

from moorage.cri.api import api_pb2 as pb
from moorage.testing import registry as regfix
from moorage.testing.cri import container_config, pod_config
from moorage.testing.daemon import DaemonProcess, new_base, teardown
from moorage.testing.testimages import cached_build_all


def timings(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(len(xs) * 0.95))]
    return (f"{name:<44} median {statistics.median(xs) * 1000:8.2f} ms   p95 {p95 * 1000:8.2f} ms   "
            f"min {xs[0] * 1000:8.2f} ms   (n={len(xs)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--pods", type=int, default=10, help="containers are spread over this many pods")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()

    reg = regfix.TestRegistry(host="", scheme="http", base_dir=tempfile.mkdtemp(prefix="moorage-bench-reg-"))
    d = DaemonProcess(base=new_base())
    try:
        layouts = cached_build_all()
        regfix._start_registry(reg, tls=None, auth=None, verify=False)
        regfix._push_images(reg, layouts, ["busybox"])
        image = reg.images["busybox"].ref
        d.start()
        rt = d.runtime
        d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
        t0 = time.perf_counter()
        pods = []
        for i in range(args.pods):
            cfg = pod_config(f"bench-{i}")
            pods.append((rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id, cfg))
        for i in range(args.containers):
            sid, cfg = pods[i % len(pods)]
            cid = rt.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, sandbox_config=cfg,
                config=container_config(image, ["sleep", "36000"], name=f"c{i}")), timeout=120).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
        setup = time.perf_counter() - t0
        running = [c for c in rt.ListContainers(pb.ListContainersRequest()).containers
                   if c.state == pb.CONTAINER_RUNNING]
        print(f"{len(pods)} pods, {len(running)} running containers (set up in {setup:.1f}s)")

        def list_stats():
            r = rt.ListContainerStats(pb.ListContainerStatsRequest(), timeout=60)
            assert len(r.stats) == args.containers

        def list_pod_stats():
            r = rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), timeout=60)
            assert len(r.stats) == args.pods

        def pod_metrics():
            rt.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest(), timeout=60)

        url = f"http://127.0.0.1:{d.metrics_port}/metrics"
        size = [0]

        def scrape():
            with urllib.request.urlopen(url, timeout=10) as r:
                size[0] = len(r.read())

        cold = timings(list_stats, 1)  # walks every layer and finds every cgroup dir
        print(summary("ListContainerStats, first call (cold)", cold))
        print(summary(f"ListContainerStats ({args.containers} containers)", timings(list_stats, args.rounds)))
        print(summary(f"ListPodSandboxStats ({args.pods} pods)", timings(list_pod_stats, args.rounds)))
        print(summary("ListPodSandboxMetrics", timings(pod_metrics, args.rounds)))
        print(summary("GET /metrics", timings(scrape, args.rounds)) + f"   {size[0]} bytes")
        return 0
    finally:
        if d.proc is not None:
            teardown(d)
        else:
            shutil.rmtree(d.base, ignore_errors=True)
        regfix._stop_process(reg.proc)
        shutil.rmtree(reg.base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
