#!/usr/bin/env python3
"""Read-path latency while the daemon is busy: what the kubelet's PLEG relist sees.

Starts a daemon on temp dirs and a local ``docker-registry`` holding busybox (the project's
offline test image) and a generated image of ``--size-mb`` MB (default 200; ``--layers``
gzip layers of half random bytes and half text).  A separate poller process (so the
benchmark's own threads do not skew it) calls ListContainers and ContainerStatus in a loop

* idle (one pod with one container, nothing else happening),
* while the big image is cold-pulled alone, while ``--pods`` pods (one container each) start
  at once alone, and while both happen together (the image is removed between, so each pull
  is cold),

and prints p50/p95/p99/max per call and phase, the pull time and the pod start time.  It
asserts nothing.  Everything it starts is stopped and every temp dir removed at the end.

    .venv/bin/python hack/bench/bench_responsiveness.py [--size-mb 200] [--layers 10] [--pods 10]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gzip
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from typing import Any

import grpc

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.images import oci
from moorage.images.platform import host_platform
from moorage.testing.daemon import DaemonProcess, teardown
from moorage.testing.registry import TestRegistry, _push_images, _start_registry, _stop_process
from moorage.testing.runtime_env import remove_cgroup_tree

MB = 1_000_000


def make_layer(i: int, size: int, text_block: bytes) -> tuple[bytes, bytes]:
    """(tar, gzip blob): a random file and a text file (a 1 MB text block tiled: fast to make,
    and it compresses like fresh text since gzip's window is 32 KiB)."""
    half = size // 2
    text = (text_block * (half // len(text_block) + 1))[: size - half]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("data", f"data/layer{i}"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 946684800
            tf.addfile(ti)
        for name, data in ((f"data/layer{i}/random.bin", os.urandom(half)), (f"data/layer{i}/text.txt", text)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 946684800
            tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    return tar, gzip.compress(tar, compresslevel=6, mtime=0)


def push_big(reg: TestRegistry, size_mb: int, nlayers: int) -> tuple[str, int]:
    rng = random.Random(1)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(2000)]
    block = bytearray()
    while len(block) < MB:
        block += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    layers = [make_layer(i, size_mb * MB // nlayers, bytes(block)) for i in range(nlayers)]
    plat = host_platform()
    config: dict = {"architecture": plat.architecture, "os": "linux", "config": {"Cmd": ["sh"]},
                    "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(t) for t, _ in layers]}}
    if plat.variant:
        config["variant"] = plat.variant
    cfg = oci.canonical_json(config)
    repo = f"{reg.host}/bench/big"

    async def go() -> None:
        async with reg.client() as c:
            await c.push_blob(repo, cfg)
            for _, blob in layers:
                await c.push_blob(repo, blob)
            manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                        "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(cfg), "size": len(cfg)},
                        "layers": [{"mediaType": oci.OCI_LAYER_GZIP, "digest": oci.sha256_digest(b),
                                    "size": len(b)} for _, b in layers]}
            await c.push_manifest(repo, "latest", oci.canonical_json(manifest), oci.OCI_MANIFEST)

    asyncio.run(go())
    return f"{repo}:latest", sum(len(b) for _, b in layers)


def pod_cfg(tag: str) -> pb.PodSandboxConfig:
    name = f"resp-{tag}-{uuid.uuid4().hex[:8]}"
    return pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
                               hostname=name)


def start_pod(rt: pbg.RuntimeServiceStub, image: str, tag: str) -> str:
    pcfg = pod_cfg(tag)
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg), timeout=300).pod_sandbox_id
    ccfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image=image),
                              command=["/usr/bin/catatonit", "--", "sleep", "100000"])
    cid = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=ccfg, sandbox_config=pcfg),
                             timeout=300).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=300)
    return cid


# --------------------------------------------------------------------------- poller (own process)
def poll(socket: str, cid: str, stop_file: str, out: str) -> int:
    ch = grpc.insecure_channel(f"unix://{socket}")
    rt = pbg.RuntimeServiceStub(ch)
    lists: list[float] = []
    stats: list[float] = []
    rt.ListContainers(pb.ListContainersRequest(), timeout=30)  # connected (not measured)
    open(stop_file + ".ready", "w").close()
    while not os.path.exists(stop_file):
        for xs, call in ((lists, lambda: rt.ListContainers(pb.ListContainersRequest(), timeout=30)),
                         (stats, lambda: rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30))):
            t0 = time.perf_counter()
            call()
            xs.append(time.perf_counter() - t0)
        time.sleep(0.002)  # a relisting client, not a flood
    with open(out, "w") as f:
        json.dump({"ListContainers": lists, "ContainerStatus": stats}, f)
    return 0


def run_poller(d: DaemonProcess, cid: str, work: str, phase: str) -> tuple[subprocess.Popen, str, str]:
    stop, out = os.path.join(work, f"{phase}.stop"), os.path.join(work, f"{phase}.json")
    p = subprocess.Popen([sys.executable, __file__, "--poll", d.socket, cid, stop, out])
    while not os.path.exists(stop + ".ready"):  # its imports take seconds on a busy machine
        if p.poll() is not None:
            raise RuntimeError(f"poller exited with {p.returncode}")
        time.sleep(0.05)
    return p, stop, out


def finish_poller(p: subprocess.Popen, stop: str, out: str) -> dict[str, list[float]]:
    open(stop, "w").close()
    p.wait(60)
    with open(out) as f:
        return json.load(f)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def report(phase: str, res: dict[str, list[float]]) -> None:
    for name, xs in res.items():
        if not xs:
            print(f"  {phase:<22} {name:<16} no calls")
            continue
        print(f"  {phase:<22} {name:<16} n={len(xs):<5} p50 {pct(xs, 50) * 1e3:6.2f} ms  p95 {pct(xs, 95) * 1e3:6.2f} ms  "
              f"p99 {pct(xs, 99) * 1e3:6.2f} ms  max {max(xs) * 1e3:6.2f} ms")


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--poll":
        return poll(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200, help="uncompressed size of the pulled image")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--pods", type=int, default=10, help="pods started while the image is pulled")
    ap.add_argument("--idle-seconds", type=float, default=3.0)
    ap.add_argument("--daemon-log", default="", help="keep the daemon's log at this path")
    ap.add_argument("--asyncio-debug", action="store_true",
                    help="run the daemon with PYTHONASYNCIODEBUG=1 (its log names callbacks that block the loop)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    from moorage.testing.testimages import cached_build_all

    work = tempfile.mkdtemp(prefix="mrg-resp-", dir="/tmp")
    reg = TestRegistry(host="", scheme="http", base_dir=os.path.join(work, "registry"))
    parent = f"/moorage-resp-{uuid.uuid4().hex[:8]}"
    d = DaemonProcess(base=os.path.join(work, "d"), extra_config=f'[runtime]\ndefault_cgroup_parent = "{parent}"\n')
    if args.asyncio_debug:
        d.env["PYTHONASYNCIODEBUG"] = "1"
    os.makedirs(d.base)
    pollers: list[subprocess.Popen] = []
    try:
        layouts = cached_build_all()
        _start_registry(reg, tls=None, auth=None, verify=False)
        _push_images(reg, {"busybox": layouts["busybox"]}, ["busybox"])
        busybox = reg.images["busybox"].ref
        t0 = time.perf_counter()
        big, compressed = push_big(reg, args.size_mb, args.layers)
        print(f"image {big}: {args.layers} gzip layers, {compressed / MB:.1f} MB compressed "
              f"(made and pushed in {time.perf_counter() - t0:.0f} s)")
        d.start()
        rt = d.runtime
        assert rt is not None and d.images is not None
        d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=busybox)), timeout=120)
        cid = start_pod(rt, busybox, "probe")

        p, stop, out = run_poller(d, cid, work, "idle")
        pollers.append(p)
        time.sleep(args.idle_seconds)
        idle = finish_poller(p, stop, out)
        work_dir = work

        times: dict[str, float] = {}

        def pull() -> None:
            t = time.perf_counter()
            assert d.images is not None
            d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=big)), timeout=1800)
            times["pull"] = time.perf_counter() - t

        def pods() -> None:
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.pods) as ex:
                list(ex.map(lambda i: start_pod(rt, busybox, f"p{len(times)}-{i}"), range(args.pods)))
            times["pods"] = time.perf_counter() - t

        def phase(name: str, *work: Any) -> dict[str, list[float]]:
            p, stop, out = run_poller(d, cid, work_dir, name.replace(" ", "_"))
            pollers.append(p)
            threads = [threading.Thread(target=w) for w in work]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return finish_poller(p, stop, out)

        results = {"idle": idle}
        results["pull only"] = phase("pull only", pull)
        pull_alone = times.pop("pull")
        assert d.images is not None
        d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=big)), timeout=300)  # cold again
        results[f"{args.pods} pods only"] = phase("pods only", pods)
        pods_alone = times.pop("pods")
        results[f"pull + {args.pods} pods"] = phase("both", pull, pods)
        print(f"cold pull {pull_alone:.2f} s alone, {times['pull']:.2f} s with the pods; {args.pods} pods "
              f"started in {pods_alone:.2f} s alone, {times['pods']:.2f} s during the pull")
        for name, res in results.items():
            report(name, res)
    finally:
        for p in pollers:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            if d.proc is not None and d.proc.poll() is None:
                d.cleanup_pods()
        finally:
            if args.daemon_log and d.log_file and os.path.exists(d.log_file):
                shutil.copyfile(d.log_file, args.daemon_log)
            teardown(d)
            _stop_process(reg.proc)
            shutil.rmtree(work, ignore_errors=True)
            remove_cgroup_tree(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
