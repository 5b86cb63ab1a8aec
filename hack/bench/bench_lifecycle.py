#!/usr/bin/env python3
"""Pod/container lifecycle benchmark over the real CRI socket of a daemon it starts on temp dirs.

    .venv/bin/python hack/bench/bench_lifecycle.py [-n 20] [-k 8] [--pods 50] [--list-pods 100]

Measures (printed as a table):
  * N sequential rounds of RunPodSandbox → CreateContainer → StartContainer → StopContainer →
    RemoveContainer → StopPodSandbox → RemovePodSandbox: p50/p95 per step and per round;
  * the same with K rounds in parallel (K client threads, N rounds in all);
  * 10 RunPodSandbox calls at once against one alone: the wall time of the ten over that of one
    (1.0 would be perfect overlap, 10 full serialisation);
  * daemon RSS idle and with --pods running pods (one sleeping container each);
  * memory per pod: conmon + infra (catatonit) RSS (0 for pods without an infra process,
    runtime.drop_infra), and conmon + container RSS;
  * ListContainers / ListPodSandbox / ContainerStatus latency with --list-pods pods and two
    containers each (the kubelet relists every second).

Needs root, runc, conmon, catatonit and docker-registry (the busybox test image is built
offline and served from a registry on 127.0.0.1).  Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

from moorage.core.procs import cmdlines
from moorage.cri.api import api_pb2 as pb
from moorage.testing.daemon import DaemonProcess, teardown
from moorage.testing.registry import (
    TestRegistry,
    _push_images,
    _start_registry,
    _stop_process,
)
from moorage.testing.runtime_env import remove_cgroup_tree

STEPS = ["RunPodSandbox", "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer",
         "StopPodSandbox", "RemovePodSandbox"]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pod_cfg(tag: str) -> pb.PodSandboxConfig:
    name = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
    return pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
                               hostname=name)


def ctr_cfg(image: str, name: str = "c") -> pb.ContainerConfig:
    # catatonit as PID 1 forwards SIGTERM to sleep, so StopContainer does not wait for its timeout
    # (a bare sleep as PID 1 ignores SIGTERM).
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
                              command=["/usr/bin/catatonit", "--", "sleep", "100000"])


class Bench:
    def __init__(self, rt, image: str) -> None:
        self.rt = rt
        self.image = image

    def round(self, tag: str) -> dict[str, float]:
        t: dict[str, float] = {}
        rt = self.rt

        def timed(step: str, fn):
            t0 = time.perf_counter()
            r = fn()
            t[step] = time.perf_counter() - t0
            return r

        pcfg = pod_cfg(tag)
        sid = timed("RunPodSandbox", lambda: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg), timeout=120)
                    ).pod_sandbox_id
        cid = timed("CreateContainer", lambda: rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, config=ctr_cfg(self.image), sandbox_config=pcfg), timeout=120)).container_id
        timed("StartContainer", lambda: rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120))
        timed("StopContainer", lambda: rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10),
                                                        timeout=120))
        timed("RemoveContainer", lambda: rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120))
        timed("StopPodSandbox", lambda: rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120))
        timed("RemovePodSandbox", lambda: rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                                              timeout=120))
        t["round"] = sum(t[s] for s in STEPS)
        return t


def table(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    w = max(len(r[0]) for r in rows) + 2
    print(f"  {'':<{w}}{'p50 / value':>14}{'p95':>12}")
    for name, a, b in rows:
        print(f"  {name:<{w}}{a:>14}{b:>12}")


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def summarize(title: str, rounds: list[dict[str, float]], wall: float | None = None) -> None:
    rows = [(s, ms(pct([r[s] for r in rounds], 50)), ms(pct([r[s] for r in rounds], 95))) for s in STEPS + ["round"]]
    if wall is not None:
        rows.append(("throughput", f"{len(rounds) / wall:.2f} rounds/s", ""))
    table(title, rows)


def run_pods(rt, image: str, n: int, containers: int, workers: int = 8) -> list[tuple[str, list[str]]]:
    def one(i: int) -> tuple[str, list[str]]:
        pcfg = pod_cfg(f"p{i}")
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg), timeout=120).pod_sandbox_id
        cids = []
        for j in range(containers):
            cid = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=ctr_cfg(image, f"c{j}"),
                                                               sandbox_config=pcfg), timeout=120).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
            cids.append(cid)
        return sid, cids

    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, range(n)))


def remove_pods(rt, pods: list[tuple[str, list[str]]], workers: int = 8) -> None:
    def one(p):
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p[0]), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p[0]), timeout=120)

    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, pods))


def parallel_runp(rt, k: int = 10, reps: int = 5) -> list[tuple[float, float]]:
    """(wall of k RunPodSandbox at once, wall of one alone) for each of ``reps`` tries."""
    out = []
    for r in range(reps):
        cfgs = [pod_cfg(f"par{r}-{i}") for i in range(k)]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(k) as ex:
            sids = list(ex.map(lambda c: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=c), timeout=120)
                               .pod_sandbox_id, cfgs))
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        sids.append(rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_cfg(f"one{r}")), timeout=120).pod_sandbox_id)
        out.append((wall, time.perf_counter() - t0))
        remove_pods(rt, [(s, []) for s in sids])
    return out


def latency(fn, n: int) -> tuple[float, float]:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return pct(xs, 50), pct(xs, 95)


def conmon_pids_of(base: str) -> dict[str, int]:
    """container/sandbox id → conmon pid, for conmons of this daemon."""
    out = {}
    for pid, args in cmdlines():
        if args and os.path.basename(args[0]) == b"conmon" and base.encode() in b" ".join(args):
            for i, a in enumerate(args):
                if a in (b"-c", b"--cid") and i + 1 < len(args):
                    out[args[i + 1].decode()] = pid
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20, help="sequential rounds (and rounds of the parallel run)")
    ap.add_argument("-k", type=int, default=8, help="parallel clients")
    ap.add_argument("--pods", type=int, default=50, help="running pods for the RSS figure")
    ap.add_argument("--list-pods", type=int, default=100, help="pods (2 containers each) for the list latency")
    ap.add_argument("--list-calls", type=int, default=50)
    ap.add_argument("--handler", default="", help="runtime handler (default: runc)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2

    from moorage.testing.testimages import cached_build_all

    work = tempfile.mkdtemp(prefix="mrg-bench-", dir="/tmp")
    reg = TestRegistry(host="", scheme="http", base_dir=os.path.join(work, "registry"))
    parent = f"/moorage-bench-{uuid.uuid4().hex[:8]}"
    d = DaemonProcess(base=os.path.join(work, "d"),
                      extra_config=f'[runtime]\ndefault_cgroup_parent = "{parent}"\n'
                                   f'default_handler = "{args.handler or "runc"}"\n')
    os.makedirs(d.base)
    try:
        layouts = cached_build_all()
        _start_registry(reg, tls=None, auth=None, verify=False)
        _push_images(reg, {"busybox": layouts["busybox"]}, ["busybox"])
        image = reg.images["busybox"].ref
        d.start()
        rt = d.runtime
        d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
        b = Bench(rt, image)
        print(f"moorage lifecycle benchmark: n={args.n} k={args.k} pods={args.pods} list-pods={args.list_pods} "
              f"handler={args.handler or 'runc'} cpus={os.cpu_count()}")

        b.round("warmup")
        t0 = time.perf_counter()
        seq = [b.round(f"s{i}") for i in range(args.n)]
        summarize(f"Sequential lifecycle ({args.n} rounds)", seq, time.perf_counter() - t0)

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.k) as ex:
            par = list(ex.map(lambda i: b.round(f"k{i}"), range(args.n)))
        summarize(f"Parallel lifecycle ({args.n} rounds, {args.k} at a time)", par, time.perf_counter() - t0)

        tries = parallel_runp(rt)
        walls, ones = [w for w, _ in tries], [o for _, o in tries]
        table("10 RunPodSandbox at once (5 tries)", [
            ("wall of the 10", ms(statistics.median(walls)), ms(max(walls))),
            ("one alone", ms(statistics.median(ones)), ms(max(ones))),
            ("ratio (1 = full overlap, 10 = serial)", f"{statistics.median(walls) / statistics.median(ones):.1f}", ""),
        ])

        idle = rss_kb(d.proc.pid)
        pods = run_pods(rt, image, args.pods, 1)
        busy = rss_kb(d.proc.pid)
        conmons = conmon_pids_of(d.base)
        infra, ctr = [], []
        for sid, cids in pods:
            st = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
            import json

            ipid = json.loads(st.info["info"])["pid"]
            infra.append((rss_kb(conmons.get(sid, 0)) if sid in conmons else 0) + (rss_kb(ipid) if ipid else 0))
            cst = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cids[0], verbose=True))
            cpid = json.loads(cst.info["info"])["pid"]
            ctr.append(rss_kb(conmons.get(cids[0], 0)) + rss_kb(cpid))
        table("Memory (RSS)", [
            ("daemon idle", f"{idle / 1024:.1f} MiB", ""),
            (f"daemon with {args.pods} pods", f"{busy / 1024:.1f} MiB", ""),
            ("per pod: conmon + infra", f"{statistics.median(infra):.0f} KiB", f"{pct(infra, 95):.0f} KiB"),
            ("per container: conmon + pid 1", f"{statistics.median(ctr):.0f} KiB", f"{pct(ctr, 95):.0f} KiB"),
        ])
        more = max(0, args.list_pods - args.pods)
        pods2 = run_pods(rt, image, more, 1)
        # A second container in every pod: list_pods pods, 2 * list_pods containers.
        allpods = pods + pods2
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            def add(p):
                sid = p[0]
                pcfg = pod_cfg("x")
                cid = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=ctr_cfg(image, "second"),
                                                                   sandbox_config=pcfg), timeout=120).container_id
                rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
            list(ex.map(add, allpods))
        nc = len(rt.ListContainers(pb.ListContainersRequest()).containers)
        npods = len(rt.ListPodSandbox(pb.ListPodSandboxRequest()).items)
        some_c = allpods[0][1][0]
        some_s = allpods[0][0]
        rows = []
        for name, fn in [
            ("ListContainers", lambda: rt.ListContainers(pb.ListContainersRequest())),
            ("ListContainers (running)", lambda: rt.ListContainers(pb.ListContainersRequest(
                filter=pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))))),
            ("ListPodSandbox", lambda: rt.ListPodSandbox(pb.ListPodSandboxRequest())),
            ("ContainerStatus", lambda: rt.ContainerStatus(pb.ContainerStatusRequest(container_id=some_c))),
            ("PodSandboxStatus", lambda: rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=some_s))),
        ]:
            p50, p95 = latency(fn, args.list_calls)
            rows.append((name, ms(p50), ms(p95)))
        table(f"List/status latency with {npods} pods and {nc} containers ({args.list_calls} calls each)", rows)
        t0 = time.perf_counter()
        remove_pods(rt, allpods)
        print(f"\n  removed {len(allpods)} pods in {time.perf_counter() - t0:.1f} s")
    finally:
        try:
            if d.proc is not None and d.proc.poll() is None:
                d.cleanup_pods()
        finally:
            teardown(d)
            _stop_process(reg.proc)
            shutil.rmtree(work, ignore_errors=True)
            remove_cgroup_tree(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
