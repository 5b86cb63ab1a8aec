#!/usr/bin/env python3
"""Pull benchmark: moorage's cold pull vs ``skopeo copy`` of the same image.

Generates a ~200 MB image in ~10 gzip layers (half incompressible random data, half
compressible text), pushes it to a local ``docker-registry`` started on 127.0.0.1 (random
port, temporary storage), then times

* a cold pull through a fresh moorage daemon (CRI PullImage: download + verify + unpack into
  overlay snapshots + record), and
* ``skopeo copy --src-tls-verify=false docker://127.0.0.1:PORT/bench/big:latest oci:DIR``
  (download + verify only),

and prints MB/s for both (MB of compressed blobs moved, and of unpacked data for moorage)
and the ratio.  Everything it starts is stopped and every temp dir removed at the end.

    .venv/bin/python hack/bench/bench_pull.py [--size-mb 200] [--layers 10] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
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
import time

import httpx

from moorage.cri.api import api_pb2 as pb
from moorage.images import oci
from moorage.images.platform import host_platform
from moorage.images.registry import RegistryClient
from moorage.testing.daemon import DaemonProcess, free_port

MB = 1_000_000


def make_layer(i: int, size: int, rng: random.Random) -> tuple[bytes, bytes]:
    """(uncompressed tar, gzip blob) of about *size* bytes: a random file and a text file."""
    half = size // 2
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(2000)]
    text = io.BytesIO()
    n = 0
    while n < size - half:
        line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
        text.write(line)
        n += len(line)
    files = {f"data/layer{i}/random.bin": os.urandom(half), f"data/layer{i}/text.txt": text.getvalue()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("data", f"data/layer{i}"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 946684800
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 946684800
            tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    return tar, gzip.compress(tar, compresslevel=6, mtime=0)


def start_registry(base: str) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    port = free_port()
    cfg = {"version": "0.1", "log": {"level": "error", "accesslog": {"disabled": True}},
           "storage": {"filesystem": {"rootdirectory": os.path.join(base, "storage")}},
           "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"}}
    path = os.path.join(base, "registry.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    log = open(os.path.join(base, "registry.log"), "ab")
    proc = subprocess.Popen([exe, "serve", path], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://{host}/v2/", timeout=1, trust_env=False).status_code == 200:
                return proc, host
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("docker-registry did not start")


async def push(host: str, layers: list[tuple[bytes, bytes]]) -> tuple[str, int, int]:
    plat = host_platform()
    config = {"architecture": plat.architecture, "os": "linux", "config": {"Cmd": ["sh"]},
              "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(t) for t, _ in layers]}}
    if plat.variant:
        config["variant"] = plat.variant
    cfg_bytes = oci.canonical_json(config)
    repo = f"{host}/bench/big"
    async with RegistryClient(trust_env=False) as c:
        await c.push_blob(repo, cfg_bytes)
        for _, blob in layers:
            await c.push_blob(repo, blob)
        manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                    "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(cfg_bytes),
                               "size": len(cfg_bytes)},
                    "layers": [{"mediaType": oci.OCI_LAYER_GZIP, "digest": oci.sha256_digest(b), "size": len(b)}
                               for _, b in layers]}
        await c.push_manifest(repo, "latest", oci.canonical_json(manifest), oci.OCI_MANIFEST)
    return f"{repo}:latest", sum(len(b) for _, b in layers), sum(len(t) for t, _ in layers)


def time_moorage_pull(ref: str, sync: bool = True) -> float:
    # written into the daemon config's [images] table (DaemonProcess.write_config ends with it)
    extra = "" if sync else "sync_snapshots = false\n"
    d = DaemonProcess(base=tempfile.mkdtemp(prefix="mrg-bench-", dir="/tmp"), extra_config=extra)
    try:
        d.start()
        t0 = time.perf_counter()
        d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=1800)
        return time.perf_counter() - t0
    finally:
        d.stop()
        with open("/proc/self/mounts") as f:
            mounted = [l.split()[1] for l in f if l.split()[1].startswith(d.base + "/")]
        for mp in sorted(mounted, reverse=True):
            subprocess.run(["umount", "-l", mp], check=False)
        shutil.rmtree(d.base, ignore_errors=True)


def time_skopeo(ref: str, base: str) -> float | None:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        return None
    dest = tempfile.mkdtemp(prefix="skopeo-", dir=base)
    env = {**os.environ, "HOME": base}  # no user config or auth files
    try:
        t0 = time.perf_counter()
        subprocess.run([skopeo, "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{dest}/img:latest"],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200, help="uncompressed image size (default 200)")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1, help="repeat the timings and report the best")
    ap.add_argument("--no-sync", action="store_true",
                    help="images.sync_snapshots = false (no syncfs per layer, as containerd's default)")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="moorage-bench-")
    proc = None
    try:
        rng = random.Random(1)
        t0 = time.perf_counter()
        layers = [make_layer(i, args.size_mb * MB // args.layers, rng) for i in range(args.layers)]
        print(f"generated {args.layers} layers in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        proc, host = start_registry(base)
        ref, compressed, uncompressed = asyncio.run(push(host, layers))
        del layers
        print(f"image {ref}: {args.layers} gzip layers, {compressed / MB:.1f} MB compressed, "
              f"{uncompressed / MB:.1f} MB unpacked")
        m_times, s_times = [], []
        for _ in range(args.runs):
            m_times.append(time_moorage_pull(ref, sync=not args.no_sync))
            s = time_skopeo(ref, base)
            if s is not None:
                s_times.append(s)
        m = min(m_times)
        print(f"moorage cold pull (download+verify+unpack{'' if not args.no_sync else ', no syncfs'}): {m:.2f}s  "
              f"{compressed / MB / m:.1f} MB/s compressed, {uncompressed / MB / m:.1f} MB/s unpacked")
        if s_times:
            s = min(s_times)
            print(f"skopeo copy docker:// -> oci: (download+verify): {s:.2f}s  {compressed / MB / s:.1f} MB/s compressed")
            print(f"ratio moorage/skopeo time: {m / s:.2f}x  (skopeo does no unpack)")
        else:
            print("skopeo not installed: no comparison")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
