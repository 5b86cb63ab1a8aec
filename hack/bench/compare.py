#!/usr/bin/env python3
"""moorage beside containerd: the same CRI workload over gRPC against both, interleaved.

Both runtimes run for the whole benchmark (``sidebyside``): moorage as the test daemon with its
stock config (dirs, socket and log level aside) and a containerd on temporary dirs with a config
of its own (Debian's, installed with apt-get when missing, or a 2.x build named by
``$CONTAINERD``).  They share one local ``docker-registry``, the busybox test image, the catatonit
``pause`` stand-in as containerd's sandbox image and the same CNI conflist shape on one bridge.
Every pod gets the cgroup parent ``/mrgcmp-<tag>``, removed at the end.

Figures (``--figures``, comma-separated; all by default):

* ``lifecycle``: each step of runp, create, start, stop, rm, stopp, rmp and the whole round;
* ``reads``: ContainerStatus, PodSandboxStatus, ImageStatus, ListImages, ListContainers,
  ListPodSandbox and ImageFsInfo with ``--pods`` pods of 2 containers each;
* ``memory``: daemon RSS at a fresh start, RSS and PSS of the daemon plus its per-pod processes
  (moorage: conmons and their children; containerd: its shims and their children) idle and with
  ``--pods`` pods / 2x containers;
* ``pull``: a cold pull of a ``--pull-mb`` image of 10 random gzip layers (removed after each);
* ``stop``: StopContainer right after StartContainer; counts those that wait out the timeout;
* ``scaling``: daemon RSS at each of ``--scale`` pods (1 container each) and the cost per pod.

Calls alternate between the runtimes (and which goes first), so host load drifts hit both.  It
prints the median, p95 and the ratio moorage / containerd per figure; it asserts nothing.  On
exit, Ctrl-C or SIGTERM it removes every pod of both runtimes, both daemons and their shims or
conmons, their mounts, netns, the bridge and its rules, the cgroup tree and the temporary dirs.

    .venv/bin/python hack/bench/compare.py [--quick] [--figures lifecycle,reads] [--rounds 20]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from sidebyside import (
    Containerd,
    Moorage,
    Network,
    Registry,
    Runtime,
    descendants,
    ensure_containerd,
    log,
    missing_tools,
    pct,
)

from moorage.core.procs import cmdlines
from moorage.cri.api import api_pb2 as pb
from moorage.testing import kube
from moorage.testing.testimages import build_critest_images, build_random_layers, cached_build_all

FIGURES = ("lifecycle", "reads", "memory", "pull", "stop", "scaling")
STEPS = ("runp", "create", "start", "stop", "rm", "stopp", "rmp")
STOP_TIMEOUT = 2  # seconds of grace for the "stop right after start" figure


@dataclass
class Results:
    """figure -> runtime -> samples, with the unit each figure is printed in."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def add(self, figure: str, runtime: str, value: float, unit: str = "ms") -> None:
        self.samples.setdefault(figure, {}).setdefault(runtime, []).append(value)
        self.units[figure] = unit


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn()
    return r, (time.perf_counter() - t0) * 1000


def interleave(runtimes: list[Runtime], i: int) -> list[Runtime]:
    return runtimes if i % 2 == 0 else runtimes[::-1]


class Workload:
    """The CRI calls both runtimes get, with the same configs."""

    def __init__(self, image: str, cgroup_parent: str) -> None:
        self.image = image
        self.cgroup_parent = cgroup_parent

    def pod(self, tag: str) -> pb.PodSandboxConfig:
        name = f"cmp-{tag}-{uuid.uuid4().hex[:8]}"
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
            hostname=name, linux=pb.LinuxPodSandboxConfig(cgroup_parent=self.cgroup_parent))

    def container(self, name: str = "c") -> pb.ContainerConfig:
        # A shell that exits on SIGTERM (its handler is installed a moment after start: the "stop
        # right after start" figure counts the stops that land before it).
        return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=self.image),
                                  command=["sh", "-c", "trap 'exit 0' TERM; sleep 1000000 & wait"])

    def round(self, r: Runtime, tag: str) -> dict[str, float]:
        t: dict[str, float] = {}
        cfg = self.pod(tag)
        resp, t["runp"] = timed(lambda: r.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120))
        sid = resp.pod_sandbox_id
        resp, t["create"] = timed(lambda: r.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, config=self.container(), sandbox_config=cfg), timeout=120))
        cid = resp.container_id
        _, t["start"] = timed(lambda: r.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120))
        _, t["stop"] = timed(lambda: r.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10),
                                                        timeout=120))
        _, t["rm"] = timed(lambda: r.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120))
        _, t["stopp"] = timed(lambda: r.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120))
        _, t["rmp"] = timed(lambda: r.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                                          timeout=120))
        t["round"] = sum(t[s] for s in STEPS)
        return t

    def run_pods(self, r: Runtime, n: int, containers: int, workers: int = 4) -> list[tuple[str, list[str]]]:
        def one(i: int) -> tuple[str, list[str]]:
            cfg = self.pod(f"p{i}")
            sid = r.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
            cids = []
            for j in range(containers):
                cid = r.rt.CreateContainer(pb.CreateContainerRequest(
                    pod_sandbox_id=sid, config=self.container(f"c{j}"), sandbox_config=cfg), timeout=120).container_id
                r.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
                cids.append(cid)
            return sid, cids
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            return list(ex.map(one, range(n)))

    @staticmethod
    def remove_pods(r: Runtime, pods: list[tuple[str, list[str]]], workers: int = 4) -> None:
        def one(p: tuple[str, list[str]]) -> None:
            r.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p[0]), timeout=120)
            r.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p[0]), timeout=120)
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            list(ex.map(one, pods))


# --- memory ---------------------------------------------------------------------------------------

def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def daemon_pid(r: Runtime) -> int:
    if isinstance(r, Moorage):
        assert r.d.proc is not None
        return r.d.proc.pid
    assert isinstance(r, Containerd) and r.proc is not None
    return r.proc.pid


def per_pod_roots(r: Runtime) -> list[int]:
    """moorage: its conmons (double-forked, so not the daemon's children); containerd: its shims."""
    if isinstance(r, Containerd):
        return r.shims()
    assert isinstance(r, Moorage)
    mark = r.d.base.encode()
    return [pid for pid, argv in cmdlines()
            if argv and os.path.basename(argv[0]) == b"conmon" and any(mark in a for a in argv)]


def memory_kb(r: Runtime) -> tuple[int, int, int]:
    """(daemon RSS, RSS of daemon + per-pod processes, PSS of the same) in KiB."""
    d = daemon_pid(r)
    pids = set(descendants([d] + per_pod_roots(r)))
    return (_status_kb(d, "VmRSS:"), sum(_status_kb(p, "VmRSS:") for p in pids), sum(_pss_kb(p) for p in pids))


# --- figures --------------------------------------------------------------------------------------

def fig_lifecycle(runtimes: list[Runtime], w: Workload, res: Results, rounds: int) -> None:
    for r in runtimes:
        w.round(r, "warm")
    for i in range(rounds):
        for r in interleave(runtimes, i):
            for step, v in w.round(r, f"l{i}").items():
                res.add(f"lifecycle {step}", r.name, v)


def fig_pods(runtimes: list[Runtime], w: Workload, res: Results, pods: int, calls: int, figures: set[str]) -> None:
    """Memory with pods and the read paths, on one set of ``pods`` pods x 2 containers per runtime."""
    if "memory" in figures:
        for r in runtimes:
            _, rss, pss = memory_kb(r)
            res.add("daemon+pods RSS idle", r.name, rss / 1024, "MiB")
            res.add("daemon+pods PSS idle", r.name, pss / 1024, "MiB")
    made: dict[str, list[tuple[str, list[str]]]] = {}
    try:
        for r in runtimes:
            log(f"{r.name}: starting {pods} pods with 2 containers each")
            made[r.name] = w.run_pods(r, pods, 2)
        time.sleep(2)  # let start-up work (exit watchers, stats) settle before measuring
        if "memory" in figures:
            for r in runtimes:
                _, rss, pss = memory_kb(r)
                res.add(f"daemon+pods RSS {pods} pods", r.name, rss / 1024, "MiB")
                res.add(f"daemon+pods PSS {pods} pods", r.name, pss / 1024, "MiB")
        if "reads" not in figures:
            return
        image = w.image
        calls_of: dict[str, Callable[[Runtime], Any]] = {
            "ContainerStatus": lambda r: r.rt.ContainerStatus(
                pb.ContainerStatusRequest(container_id=made[r.name][0][1][0]), timeout=30),
            "PodSandboxStatus": lambda r: r.rt.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=made[r.name][0][0]), timeout=30),
            "ImageStatus": lambda r: r.img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image)),
                                                       timeout=30),
            "ListImages": lambda r: r.img.ListImages(pb.ListImagesRequest(), timeout=30),
            f"ListContainers ({2 * pods})": lambda r: r.rt.ListContainers(pb.ListContainersRequest(), timeout=30),
            f"ListPodSandbox ({pods})": lambda r: r.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30),
            f"ImageFsInfo ({2 * pods} ctrs)": lambda r: r.img.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30),
        }
        for name, call in calls_of.items():
            for r in runtimes:
                call(r)  # warm
            for i in range(calls):
                for r in interleave(runtimes, i):
                    _, ms = timed(lambda c=call, r=r: c(r))
                    res.add(name, r.name, ms)
    finally:
        for r in runtimes:
            if r.name in made:
                w.remove_pods(r, made[r.name])


def fig_pull(runtimes: list[Runtime], res: Results, ref: str, rounds: int) -> None:
    for i in range(rounds):
        for r in interleave(runtimes, i):
            _, ms = timed(lambda r=r: r.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=600))
            res.add("cold pull", r.name, ms / 1000, "s")
            r.img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)


def fig_stop(runtimes: list[Runtime], w: Workload, res: Results, n: int) -> None:
    """StopContainer issued right after StartContainer returned, ``n`` times per runtime."""
    pods = {r.name: w.pod("stop") for r in runtimes}
    sids = {r.name: r.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pods[r.name]), timeout=120).pod_sandbox_id
            for r in runtimes}
    waited = {r.name: 0 for r in runtimes}
    try:
        for i in range(n):
            for r in interleave(runtimes, i):
                cid = r.rt.CreateContainer(pb.CreateContainerRequest(
                    pod_sandbox_id=sids[r.name], config=w.container(f"s{i}"), sandbox_config=pods[r.name]),
                    timeout=120).container_id
                r.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
                _, ms = timed(lambda r=r, cid=cid: r.rt.StopContainer(
                    pb.StopContainerRequest(container_id=cid, timeout=STOP_TIMEOUT), timeout=120))
                res.add("stop right after start", r.name, ms)
                if ms >= STOP_TIMEOUT * 1000 * 0.9:
                    waited[r.name] += 1
                r.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)
    finally:
        for r in runtimes:
            Workload.remove_pods(r, [(sids[r.name], [])])
    for name, k in waited.items():
        res.add(f"stops waiting {STOP_TIMEOUT}s (of {n})", name, k, "count")


def fig_scaling(runtimes: list[Runtime], w: Workload, res: Results, steps: list[int]) -> None:
    made: dict[str, list[tuple[str, list[str]]]] = {r.name: [] for r in runtimes}
    base: dict[str, int] = {}
    try:
        for n in steps:
            for r in runtimes:
                more = n - len(made[r.name])
                if more > 0:
                    log(f"{r.name}: {n} pods")
                    made[r.name] += w.run_pods(r, more, 1)
            time.sleep(2)
            for r in runtimes:
                rss = memory_kb(r)[0]
                res.add(f"daemon RSS at {n} pods", r.name, rss / 1024, "MiB")
                base.setdefault(r.name, rss)
                if n and n != steps[0]:
                    res.add(f"daemon KiB per pod ({steps[0]}->{n})", r.name, (rss - base[r.name]) / (n - steps[0]),
                            "KiB")
    finally:
        for r in runtimes:
            w.remove_pods(r, made[r.name])


# --- report ---------------------------------------------------------------------------------------

def report(res: Results, versions: dict[str, str], args: argparse.Namespace, load: list[float]) -> None:
    print(f"\nmoorage beside containerd ({'quick' if args.quick else 'full'} run, interleaved)")
    print(f"  host: {os.cpu_count()} CPUs, 1-min load average {load[0]:.1f} before, {load[-1]:.1f} after")
    for name, v in versions.items():
        print(f"  {name}: {v}")
    head = (f"{'figure':<34}{'unit':>6}{'n':>5}{'moorage p50':>13}{'p95':>9}{'containerd p50':>16}{'p95':>9}"
            f"{'ratio':>8}")
    print(head)
    print("-" * len(head))
    for fig, per in res.samples.items():
        m, c = per.get("moorage", []), per.get("containerd", [])
        if not m or not c:
            continue
        mp, cp = statistics.median(m), statistics.median(c)
        ratio = f"{mp / cp:.2f}" if cp else ("=" if mp == cp else "inf")
        print(f"{fig:<34}{res.units[fig]:>6}{min(len(m), len(c)):>5}{mp:>13.2f}{pct(m, 95):>9.2f}{cp:>16.2f}"
              f"{pct(c, 95):>9.2f}{ratio:>8}")
    print("ratio = moorage p50 / containerd p50 (below 1: moorage is faster or smaller)")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run: fewer rounds, pods and calls, a smaller scale")
    ap.add_argument("--figures", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    ap.add_argument("--rounds", type=int, help="lifecycle rounds per runtime (default 20, quick 6)")
    ap.add_argument("--pods", type=int, help="pods (2 containers each) for reads and memory (default 50, quick 50)")
    ap.add_argument("--calls", type=int, help="calls per read figure and runtime (default 100, quick 30)")
    ap.add_argument("--pull-mb", type=int, default=100, help="size of the pulled image (10 layers)")
    ap.add_argument("--pulls", type=int, help="cold pulls per runtime (default 3, quick 1)")
    ap.add_argument("--stops", type=int, help="stop-right-after-start tries per runtime (default 100, quick 20)")
    ap.add_argument("--scale", help="pod counts for the RSS scaling figure (default 0,50,200; quick 0,20,50)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install containerd when missing")
    args = ap.parse_args()
    q = args.quick
    args.rounds = args.rounds or (6 if q else 20)
    args.pods = args.pods or 50
    args.calls = args.calls or (30 if q else 100)
    args.pulls = args.pulls or (1 if q else 3)
    args.stops = args.stops or (20 if q else 100)
    args.scale = [int(x) for x in (args.scale or ("0,20,50" if q else "0,50,200")).split(",")]
    args.figures = {f.strip() for f in args.figures.split(",") if f.strip()}
    unknown = args.figures - set(FIGURES)
    if unknown:
        ap.error(f"unknown figures: {', '.join(sorted(unknown))}")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("compare: needs root")
    if missing_tools():
        raise SystemExit(f"compare: missing {' '.join(missing_tools())}")
    containerd_bin = ensure_containerd(not args.no_install)
    signal.signal(signal.SIGTERM, _terminate)

    work = tempfile.mkdtemp(prefix="mrgcmp-")
    tag = uuid.uuid4().hex[:6]
    cgroup_parent = f"/mrgcmp-{tag}"
    # No hostPorts: no pod touches iptables, so the CNI tests' lock (iptables before/after) is not needed.
    network = Network(f"mrgc{tag}", f"mrgc-net-{tag}", "", "", os.path.join(work, "ipam"), hostports=False)
    registry = Registry(os.path.join(work, "registry"))
    runtimes: list[Runtime] = []
    versions: dict[str, str] = {}
    res = Results()
    problems: list[str] = []
    load = [os.getloadavg()[0]]
    containerd_paths = Containerd.fixed_paths_before()
    try:
        log("building and pushing the test images")
        layouts = {"busybox": cached_build_all()["busybox"],
                   "pause": build_critest_images(os.path.join(work, "critest-images"))["pause"].layout}
        if "pull" in args.figures:
            layouts["big"] = build_random_layers(os.path.join(work, "big"), "big", 10,
                                                 args.pull_mb * 1_000_000 // 9)
        registry.start()
        registry.push(layouts)
        network.create()
        runtimes = [Moorage(network), Containerd(containerd_bin, network, registry)]
        for r in runtimes:
            r.start()
            versions[r.name] = r.version()
            time.sleep(1)
            if "memory" in args.figures:
                res.add("daemon RSS fresh start", r.name, memory_kb(r)[0] / 1024, "MiB")
            for ref in (registry.busybox, registry.pause):
                r.pull(ref)
        log("runtimes up, images pulled: " + ", ".join(f"{k}: {v}" for k, v in versions.items()))
        w = Workload(registry.busybox, cgroup_parent)
        if "lifecycle" in args.figures:
            log(f"lifecycle: {args.rounds} rounds per runtime")
            fig_lifecycle(runtimes, w, res, args.rounds)
        if args.figures & {"reads", "memory"}:
            fig_pods(runtimes, w, res, args.pods, args.calls, args.figures)
        if "pull" in args.figures:
            log(f"cold pull of {args.pull_mb} MB x {args.pulls} per runtime")
            fig_pull(runtimes, res, registry.busybox.replace("/busybox:latest", "/big:latest"), args.pulls)
        if "stop" in args.figures:
            log(f"stop right after start: {args.stops} per runtime")
            fig_stop(runtimes, w, res, args.stops)
        if "scaling" in args.figures:
            fig_scaling(runtimes, w, res, args.scale)
    except KeyboardInterrupt:
        problems.append("interrupted: partial figures")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not strand the teardown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for r in runtimes:
            try:
                problems += r.stop()
            except (OSError, RuntimeError, grpc.RpcError, subprocess.SubprocessError) as e:
                problems.append(f"stopping {r.name}: {e!r}")
        registry.stop()
        network.remove()
        problems += [f"cgroup {p}" for p in kube.remove_cgroup_tree(cgroup_parent)]
        problems += Containerd.remove_fixed_paths(containerd_paths)
        shutil.rmtree(work, ignore_errors=True)
    load.append(os.getloadavg()[0])
    report(res, versions, args, load)
    if problems:
        print("\nproblems:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
