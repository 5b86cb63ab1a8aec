#!/usr/bin/env python3
"""Pod startup under a real kubelet: moorage against containerd, same kubelet, images and CNI.

Measures "static pod manifest dropped -> all of its containers running", for 1 pod and
for 10 pods dropped at once, and "manifests removed -> no pod left running":

* ``CRI running``: every container of the batch is CONTAINER_RUNNING on the runtime's
  CRI socket (polled every 20 ms); the primary figure.
* ``kubelet Running``: the kubelet's read-only ``/pods`` shows every pod Running with all
  containers running (polled every 100 ms; quantised by the kubelet's 1 s PLEG relist).
* ``stopped``: after the manifests go, no ready sandbox and no running container of the
  batch is left on the CRI socket.

Both runtimes run for the whole benchmark, each on its own temporary dirs and socket:
moorage as ``moorage.testing.daemon.DaemonProcess`` (stock config apart from dirs) and
Debian's ``containerd`` (installed with apt-get when missing) with its own config.  Both
get the same CNI conflist (a bridge ``mrgb<hex>`` and a free 10.238.x.0/24 owned by this
script) and pull from the same local ``docker-registry`` holding the project's offline
test images (busybox; containerd's sandbox image is the catatonit ``pause`` stand-in built
for critest).  Images are pulled into both runtimes before anything is measured.

Rounds are interleaved: each block starts a fresh standalone kubelet (static pods, own
root dir, ports and cgroup root) on one runtime, runs one unmeasured warm-up pod and then
``--rounds`` rounds of 1 and of 10 pods, and stops it; blocks alternate between the
runtimes (and which goes first), so host load drifts hit both alike.

Needs root, a kubelet (``$KUBELET`` or on PATH; see /work/shared/kubelet or
test/e2e/kubelet/README.md for building one offline), runc, conmon, catatonit,
docker-registry, iptables and the CNI plugins in /usr/lib/cni.  Everything it creates is
removed at the end, including what the kubelet changes on the host (sysctls, KUBE-*
iptables chains, /var/lib/kubelet/device-plugins, /var/log/containers, its mounts and
cgroups) and containerd's mounts and shims.  It prints figures and asserts nothing.

    KUBELET=/path/to/kubelet .venv/bin/python hack/bench/bench_kubelet_startup.py [--rounds 3] [--blocks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    ensure_containerd,
    free_port,
    log,
    missing_tools,
    pct,
)

from moorage.cri.api import api_pb2 as pb
from moorage.testing import kube
from moorage.testing.testimages import build_critest_images, cached_build_all

CRI_POLL = 0.02
PODS_POLL = 0.1
BATCH_TIMEOUT = 300.0
WAIT_POLL = 0.2  # the other waits (kubelet up, pods gone): finer than wait_for's default


def find_kubelet() -> str | None:
    k = os.environ.get("KUBELET") or shutil.which("kubelet")
    return k if k and os.access(k, os.X_OK) else None


# --- a standalone kubelet -----------------------------------------------------------------------

@dataclass
class Kubelet(kube.KubeletDirs):
    binary: str
    runtime: Runtime
    base: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="mrgb-kubelet-"))
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    proc: subprocess.Popen | None = None
    read_only_port: int = 0

    @property
    def node(self) -> str:
        return f"mrgb{self.tag}"

    @property
    def cgroup_root(self) -> str:
        return f"/mrgb-{self.tag}"

    def start(self) -> None:
        for d in ("root", "manifests", "pod-logs", "volume-plugins"):
            os.makedirs(self.path(d), exist_ok=True)
        self.read_only_port = free_port()
        healthz = free_port()
        cfg = kube.kubelet_config(
            self.runtime.socket, self, self.cgroup_root,
            address="127.0.0.1", port=free_port(), readOnlyPort=self.read_only_port, healthzPort=healthz,
            authentication={"anonymous": {"enabled": True}, "webhook": {"enabled": False}, "x509": {}},
            staticPodPath=self.manifests, fileCheckFrequency="1s", serializeImagePulls=False)
        with open(self.path("kubelet.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        kube.make_cgroup_root(self.cgroup_root)
        self.proc = kube.start_logged(
            [self.binary, f"--config={self.path('kubelet.json')}", f"--root-dir={self.path('root')}",
             f"--cert-dir={self.path('pki')}", f"--hostname-override={self.node}", "--v=1"],
            self.path("kubelet.log"))

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"kubelet exited with {self.proc.returncode}:\n{self.log_tail()}")
            return (kube.http_get(f"http://127.0.0.1:{healthz}/healthz")[0] == 200
                    and kube.http_get(f"http://127.0.0.1:{self.read_only_port}/pods")[0] == 200)
        kube.wait_for(healthy, 90, "the kubelet's healthz and read-only port", WAIT_POLL)

    def log_tail(self, n: int = 4000) -> str:
        return kube.read_from(self.path("kubelet.log"))[-n:]

    def pods(self) -> list[dict[str, Any]]:
        code, body = kube.http_get(f"http://127.0.0.1:{self.read_only_port}/pods", timeout=30)
        if code != 200:
            raise OSError(f"GET /pods: {code}")
        return json.loads(body).get("items") or []

    def write_manifests(self, names: list[str], image: str) -> None:
        """Stage the manifests, then move them all into staticPodPath in one quick burst."""
        staged = []
        for name in names:
            manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                        "spec": {"terminationGracePeriodSeconds": 2, "containers": [{
                            "name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                            # exits on SIGTERM at once: stop time is the runtime's, not a grace period
                            "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 1000000 & wait"]}]}}
            tmp = self.path(f".{name}.json")
            with open(tmp, "w") as f:
                json.dump(manifest, f)
            staged.append((tmp, self.path("manifests", f"{name}.json")))
        for src, dst in staged:
            os.replace(src, dst)

    def remove_manifests(self, names: list[str] | None = None) -> None:
        for n in os.listdir(self.path("manifests")):
            if names is None or n.removesuffix(".json") in names:
                os.unlink(self.path("manifests", n))

    def stop(self) -> list[str]:
        """Remove every pod through the kubelet, stop it, undo its mounts and cgroups."""
        problems = []
        if self.proc is not None and self.proc.poll() is None:
            self.remove_manifests()
            try:
                kube.wait_for(lambda: not self.pods() and not ready_sandboxes(self.runtime), 120,
                              "the kubelet to stop every pod", WAIT_POLL)
            except AssertionError as e:
                problems.append(str(e))
        kube.stop_process(self.proc)
        self.runtime.remove_all_pods()
        problems += [f"kubelet {p}" for p in kube.remove_kubelet_leftovers(self.base, self.cgroup_root, lazy=True)]
        if not kube.unmount_under(self.base, lazy=True):  # nothing stayed mounted: the dir can go
            shutil.rmtree(self.base, ignore_errors=True)
        return problems


def ready_sandboxes(runtime: Runtime) -> list[pb.PodSandbox]:
    return kube.list_sandboxes(runtime.rt, ready_only=True, timeout=30)


# --- one measurement ----------------------------------------------------------------------------

@dataclass
class Sample:
    cri: float
    kubelet: float
    stopped: float


def pod_names_running_in_cri(runtime: Runtime) -> set[str]:
    f = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
    cs = runtime.rt.ListContainers(pb.ListContainersRequest(filter=f), timeout=30).containers
    return {c.labels.get("io.kubernetes.pod.name", "") for c in cs}


def kubelet_running(pods: list[dict[str, Any]], want: set[str]) -> bool:
    ok = set()
    for p in pods:
        st = p.get("status") or {}
        cs = st.get("containerStatuses") or []
        if st.get("phase") == "Running" and cs and all("running" in c.get("state", {}) for c in cs):
            ok.add(p["metadata"]["name"])
    return want <= ok


def batch(k: Kubelet, image: str, prefix: str, n: int) -> Sample:
    """Drop ``n`` manifests at once; time until all run (CRI, kubelet), then until all stopped."""
    names = [f"{prefix}-{i}" for i in range(n)]
    want = {f"{name}-{k.node}" for name in names}  # static pods' names carry the node name
    t_cri = t_kub = 0.0
    t0 = time.perf_counter()
    k.write_manifests(names, image)
    deadline = time.monotonic() + BATCH_TIMEOUT
    next_pods = 0.0
    while not (t_cri and t_kub):
        now = time.perf_counter()
        if not t_cri and want <= pod_names_running_in_cri(k.runtime):
            t_cri = time.perf_counter() - t0
        if not t_kub and now >= next_pods:
            next_pods = now + PODS_POLL
            if kubelet_running(k.pods(), want):
                t_kub = time.perf_counter() - t0
        if time.monotonic() > deadline:
            raise RuntimeError(f"{k.runtime.name}: {n} pods not running after {BATCH_TIMEOUT}s\n{k.log_tail()}")
        time.sleep(CRI_POLL)

    t1 = time.perf_counter()
    k.remove_manifests(names)

    def gone() -> bool:
        sb = {s.labels.get("io.kubernetes.pod.name", "") for s in ready_sandboxes(k.runtime)}
        return not (want & sb) and not (want & pod_names_running_in_cri(k.runtime))
    kube.wait_for(gone, BATCH_TIMEOUT, f"{k.runtime.name}: {n} pods to stop", CRI_POLL)
    t_stop = time.perf_counter() - t1
    # Let the kubelet finish with them (status, cleanup) before the next batch.
    kube.wait_for(lambda: not (want & {p["metadata"]["name"] for p in k.pods()}), 120, "the kubelet to forget them",
                  WAIT_POLL)
    return Sample(t_cri, t_kub, t_stop)


# --- the run ------------------------------------------------------------------------------------

def run_block(kubelet_bin: str, runtime: Runtime, image: str, rounds: int, block: int,
              results: dict[tuple[str, int], list[Sample]], pod_logs: list[str]) -> list[str]:
    k = Kubelet(kubelet_bin, runtime)
    pod_logs.append(k.path("pod-logs"))
    try:
        t0 = time.perf_counter()
        k.start()
        log(f"block {block}: kubelet on {runtime.name} up in {time.perf_counter() - t0:.1f} s")
        batch(k, image, f"warm{block}", 1)  # not counted: first pod after a kubelet start
        for r in range(rounds):
            for n in (1, 10):
                s = batch(k, image, f"b{block}r{r}n{n}", n)
                results.setdefault((runtime.name, n), []).append(s)
                log(f"  {runtime.name:<10} {n:>2} pods: CRI running {s.cri:6.2f} s, kubelet Running "
                    f"{s.kubelet:6.2f} s, stopped {s.stopped:6.2f} s")
    finally:
        problems = k.stop()
    return problems


def report(results: dict[tuple[str, int], list[Sample]], versions: dict[str, str], rounds: int,
           blocks: int, load: list[float]) -> None:
    print(f"\nPod startup under a standalone kubelet ({blocks} block(s) x {rounds} round(s) per runtime, "
          "interleaved; seconds)")
    print(f"  host: {os.cpu_count()} CPUs, 1-min load average {load[0]:.1f} before, {load[-1]:.1f} after")
    for name, v in versions.items():
        print(f"  {name}: {v}")
    metrics: list[tuple[str, Callable[[Sample], float]]] = [
        ("manifest -> CRI running", lambda s: s.cri),
        ("manifest -> kubelet Running", lambda s: s.kubelet),
        ("removed -> stopped (CRI)", lambda s: s.stopped),
    ]
    head = (f"{'metric':<29}{'pods':>5}{'n':>4}{'moorage p50':>13}{'p95':>8}{'containerd p50':>16}{'p95':>8}"
            f"{'ratio p50':>11}{'ratio p95':>11}")
    print(head)
    print("-" * len(head))
    for label, get in metrics:
        for n in (1, 10):
            m = [get(s) for s in results.get(("moorage", n), [])]
            c = [get(s) for s in results.get(("containerd", n), [])]
            if not m or not c:
                continue
            mp50, mp95, cp50, cp95 = statistics.median(m), pct(m, 95), statistics.median(c), pct(c, 95)
            print(f"{label:<29}{n:>5}{min(len(m), len(c)):>4}{mp50:>13.3f}{mp95:>8.3f}{cp50:>16.3f}{cp95:>8.3f}"
                  f"{mp50 / cp50:>11.2f}{mp95 / cp95:>11.2f}")
    print("ratio = moorage / containerd (below 1: moorage is faster)")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of 1 and of 10 pods per block")
    ap.add_argument("--blocks", type=int, default=2, help="kubelet blocks per runtime (interleaved)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install containerd when missing")
    args = ap.parse_args()
    kubelet_bin = find_kubelet()
    if kubelet_bin is None:
        raise SystemExit("bench_kubelet_startup: no kubelet binary; set KUBELET=/path/to/kubelet or put one "
                         "on PATH (build one offline as test/e2e/kubelet/README.md describes)")
    if os.geteuid() != 0:
        raise SystemExit("bench_kubelet_startup: needs root")
    if missing_tools():
        raise SystemExit(f"bench_kubelet_startup: missing {' '.join(missing_tools())}")
    containerd_bin = ensure_containerd(not args.no_install)

    work = tempfile.mkdtemp(prefix="mrgb-bench-")
    tag = uuid.uuid4().hex[:6]
    network = Network(f"mrgb{tag}", f"mrgb-net-{tag}", "", "", os.path.join(work, "ipam"))
    registry = Registry(os.path.join(work, "registry"))
    runtimes: list[Runtime] = []
    results: dict[tuple[str, int], list[Sample]] = {}
    versions: dict[str, str] = {}
    pod_logs: list[str] = []
    problems: list[str] = []
    with kube.host_lock(kube.KUBELET_LOCK), kube.host_lock(kube.CNI_LOCK):
        load = [os.getloadavg()[0]]
        before = kube.HostSnapshot.take()
        containerd_paths = Containerd.fixed_paths_before()
        try:
            log("building and pushing the test images")
            layouts = {"busybox": cached_build_all()["busybox"],
                       "pause": build_critest_images(os.path.join(work, "critest-images"))["pause"].layout}
            registry.start()
            registry.push(layouts)
            network.create()
            runtimes = [Moorage(network), Containerd(containerd_bin, network, registry)]
            for r in runtimes:
                r.start()
                versions[r.name] = r.version()
                for ref in (registry.busybox, registry.pause):
                    r.pull(ref)  # images are local before anything is timed
            log("runtimes up, images pulled: " + ", ".join(f"{k}: {v}" for k, v in versions.items()))
            for block in range(args.blocks):
                order = runtimes if block % 2 == 0 else runtimes[::-1]
                for r in order:
                    problems += run_block(kubelet_bin, r, registry.busybox, args.rounds, block, results, pod_logs)
                    problems += before.restore(pod_logs)
        finally:
            for r in runtimes:
                try:
                    problems += r.stop()
                except (OSError, RuntimeError, grpc.RpcError, subprocess.SubprocessError) as e:  # tear the rest down
                    problems.append(f"stopping {r.name}: {e!r}")
            registry.stop()
            network.remove()
            problems += before.restore(pod_logs)
            problems += Containerd.remove_fixed_paths(containerd_paths)
            shutil.rmtree(work, ignore_errors=True)
            if problems:
                print("\nteardown problems:\n  " + "\n  ".join(problems), file=sys.stderr)
    load.append(os.getloadavg()[0])
    report(results, versions, args.rounds, args.blocks, load)
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
