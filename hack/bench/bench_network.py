#!/usr/bin/env python3
"""Pod network benchmark: RunPodSandbox latency with CNI vs host network, and N pods in parallel.

Runs a real moorage daemon on temporary dirs whose CNI network is a bridge and
subnet owned by this script (``mrgn<random>``, a free 10.223.x.0/24, no gateway
forwarding, no masquerade; the same set-up as test/integration/test_network_*),
and removes everything afterwards.  Needs root and the CNI plugins in /usr/lib/cni.

    .venv/bin/python hack/bench/bench_network.py [--runs 20] [--parallel 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config
from moorage.testing.daemon import DaemonProcess, new_base, teardown
from moorage.testing.net import iptables_state
from moorage.testing.netlab import LOCK_PATH, NetLab

HOST_NET = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
    namespace_options=pb.NamespaceOption(network=pb.NODE)))


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


def run_pod(d: DaemonProcess, cfg: pb.PodSandboxConfig) -> tuple[str, float]:
    t0 = time.perf_counter()
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=300).pod_sandbox_id
    return sid, time.perf_counter() - t0


def remove(d: DaemonProcess, sid: str) -> None:
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=300)
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=300)


def sequential(d: DaemonProcess, runs: int, host_network: bool) -> list[float]:
    out = []
    for i in range(runs + 1):
        kw = {"linux": HOST_NET} if host_network else {}
        sid, secs = run_pod(d, pod_config(f"bench-{'host' if host_network else 'cni'}-{i}", **kw))
        if i:  # the first one warms caches (imports, plugin binaries): not counted
            out.append(secs)
        remove(d, sid)
    return out


def parallel(d: DaemonProcess, n: int) -> tuple[float, list[float], list[str]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(lambda i: run_pod(d, pod_config(f"bench-par-{i}")), range(n)))
    total = time.perf_counter() - t0
    sids = [s for s, _ in results]
    ips = {d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=s)).status.network.ip for s in sids}
    if len(ips) != n or "" in ips:
        raise SystemExit(f"parallel run: expected {n} distinct pod IPs, got {len(ips)}")
    t1 = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda s: remove(d, s), sids))
    return total, [secs for _, secs in results], [f"{time.perf_counter() - t1:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="sequential RunPodSandbox calls per mode")
    ap.add_argument("--parallel", type=int, default=50, help="pods networked at once (at most 250)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_network: needs root")
    import fcntl

    root = tempfile.mkdtemp(prefix="mrgn-bench-")
    lab = NetLab(root)
    lock = open(LOCK_PATH, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # the CNI tests' lock: portmap's shared chains
    d = None
    try:
        lab.iptables_before = iptables_state()
        lab.make_bridge()
        d = lab.daemon(lambda start=False: DaemonProcess(base=new_base()))
        cni = sequential(d, args.runs, host_network=False)
        host = sequential(d, args.runs, host_network=True)
        total, lat, rm = parallel(d, args.parallel)
    finally:
        if d is not None:
            teardown(d)
        lab.cleanup()
        shutil.rmtree(root, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()

    ms = lambda v: f"{v * 1000:8.1f}"  # noqa: E731
    print(f"\nRunPodSandbox latency (ms), {args.runs} sequential calls each, after one warm-up")
    print(f"{'mode':<22}{'p50':>9}{'p95':>9}{'mean':>9}{'max':>9}")
    for name, v in (("CNI (bridge chain)", cni), ("host network", host)):
        print(f"{name:<22}{ms(pct(v, 50))}{ms(pct(v, 95))}{ms(statistics.mean(v))}{ms(max(v))}")
    print(f"{'CNI overhead (p50)':<22}{ms(pct(cni, 50) - pct(host, 50))}")
    print(f"\n{args.parallel} pods networked in parallel")
    print(f"{'total wall time':<22}{total:8.2f} s")
    print(f"{'throughput':<22}{args.parallel / total:8.1f} pods/s")
    print(f"{'per-call p50 / p95':<22}{ms(pct(lat, 50))} /{ms(pct(lat, 95))} ms")
    print(f"{'stop+remove all':<22}{float(rm[0]):8.2f} s")


if __name__ == "__main__":
    main()
