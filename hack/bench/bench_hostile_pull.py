#!/usr/bin/env python3
"""Event-loop stalls while the daemon refuses hostile registry documents.

A tiny hostile registry (``moorage.testing.registry.FakeHTTPServer`` on 127.0.0.1, no
docker-registry needed) serves, per case, the largest documents the limits let through to
the parser or its pre-scan: a 4 MiB manifest nested a million deep, a 4 MiB manifest just
under the value limit, one far over it, an 8 MiB config nested 4 million deep and an 8 MiB
config of long strings.  A fresh moorage daemon pulls each one (every pull fails) while a
thread calls ``Version`` every 10 ms (after one
unmeasured warm-up pull, which makes the daemon's HTTP client); the figures are the pull's wall time and the longest
and median ``Version`` latency during it.  It prints figures and asserts nothing.

    .venv/bin/python hack/bench/bench_hostile_pull.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable

import grpc

from moorage.cri.api import api_pb2 as pb
from moorage.images import oci
from moorage.testing.cri import image_client, runtime_client
from moorage.testing.daemon import DaemonProcess, new_base, teardown
from moorage.testing.registry import FakeHTTPServer, FakeRequest, FakeResponse

MIB = 1 << 20


def manifest_for(config: bytes) -> bytes:
    desc = oci.Descriptor(oci.OCI_CONFIG, oci.sha256_digest(config), len(config))
    return json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": desc.to_json(),
                       "layers": []}).encode()


def deep(n: int) -> bytes:
    return b'{"a": ' + b"[" * n + b"]" * n + b"}"


def values(n: int, size: int) -> bytes:
    body = b'{"schemaVersion": 2, "x": [' + b",".join([b"1"] * n) + b"]}"
    return body[:-2] + b" " * (size - len(body)) + b"]}" if len(body) < size else body


CASES: dict[str, tuple[bytes, bytes | None]] = {
    "manifest 4 MiB nested 2M deep": (deep(2 * MIB - 8), None),
    "manifest 4 MiB, 99 000 values": (values(99_000, 4 * MIB - 64), None),
    "manifest 4 MiB, 2M values": (values(2 * MIB - 32, 4 * MIB - 64), None),
    "config 8 MiB nested 4M deep": (b"", deep(4 * MIB - 8)),
    "config 8 MiB of strings": (b"", json.dumps({"config": {"Labels": {f"k{i}": "v" * 8000 for i in
                                                                          range(1000)}}}).encode()),
}


class Registry:
    """The hostile registry in its own thread; ``docs`` maps a route suffix to a response."""

    def __init__(self) -> None:
        self.docs: dict[str, tuple[str, bytes]] = {}
        self.host = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def _handle(self, req: FakeRequest) -> FakeResponse:
        for suffix, (ct, body) in self.docs.items():
            if req.route.endswith(suffix):
                return FakeResponse(200, {"Content-Type": ct}, body)
        return FakeResponse(404)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with FakeHTTPServer(self._handle) as srv:
            self.host = srv.host
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Registry:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def probe_during(d: DaemonProcess, work: Callable[[], None]) -> tuple[float, list[float]]:
    """Run *work* while Version is called every 10 ms; (work seconds, Version latencies)."""
    lat: list[float] = []
    done = threading.Event()

    def probe() -> None:
        rc = runtime_client(d)
        while not done.is_set():
            t = time.monotonic()
            rc.Version(pb.VersionRequest(), timeout=30)
            lat.append(time.monotonic() - t)
            time.sleep(0.01)

    th = threading.Thread(target=probe)
    th.start()
    t0 = time.monotonic()
    try:
        work()
    finally:
        took = time.monotonic() - t0
        done.set()
        th.join()
    return took, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    d = DaemonProcess(base=new_base())
    try:
        d.start()
        for _ in range(20):  # warm the channel and the daemon's first-call paths up
            runtime_client(d).Version(pb.VersionRequest(), timeout=30)
        with Registry() as reg:
            print(f"{'case':34} {'status':18} {'pull s':>7} {'max Version ms':>15} {'median ms':>10}")
            try:  # the first pull makes the HTTP client (CA bundle load): not what is measured
                image_client(d).PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=f"{reg.host}/warm/up:x")),
                                          timeout=60)
            except grpc.RpcError:
                pass
            took, lat = probe_during(d, lambda: time.sleep(1.0))
            print(f"{'(idle, 1 s, for reference)':34} {'-':18} {took:7.2f} {max(lat) * 1000:15.1f} "
                  f"{statistics.median(lat) * 1000:10.1f}")
            for name, (manifest, config) in CASES.items():
                if config is not None:
                    manifest = manifest_for(config)
                    reg.docs = {"/manifests/latest": (oci.OCI_MANIFEST, manifest),
                                f"/blobs/{oci.sha256_digest(config)}": ("application/octet-stream", config)}
                else:
                    reg.docs = {"/manifests/latest": (oci.OCI_MANIFEST, manifest)}
                worst, medians, pulls, code = 0.0, [], [], ""
                for _ in range(args.rounds):
                    def pull() -> None:
                        nonlocal code
                        try:
                            image_client(d).PullImage(pb.PullImageRequest(
                                image=pb.ImageSpec(image=f"{reg.host}/hostile/x:latest")), timeout=120)
                            code = "OK"
                        except grpc.RpcError as e:
                            code = e.code().name
                    took, lat = probe_during(d, pull)
                    pulls.append(took)
                    worst = max(worst, max(lat, default=0.0))
                    medians.append(statistics.median(lat) if lat else 0.0)
                print(f"{name:34} {code:18} {statistics.median(pulls):7.2f} {worst * 1000:15.1f} "
                      f"{statistics.median(medians) * 1000:10.1f}")
    finally:
        teardown(d)


if __name__ == "__main__":
    main()
