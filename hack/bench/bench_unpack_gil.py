#!/usr/bin/env python3
"""How long a layer unpack in a thread keeps the daemon's event-loop thread from the GIL.

Unpacks generated gzip layers with ``apply_layer`` in a worker thread (as ImageService does
through ``asyncio.to_thread``) while the main thread wakes every millisecond and records how
late it runs (the time it waits for a CPU and for the GIL).  Prints the lateness p50/p99/max
and unpack MB/s for each gzip backend, with the unpack idle as the baseline, for a layer of
two big files and one of many small files (where the pure-Python tar header loop dominates).

    .venv/bin/python hack/bench/bench_unpack_gil.py [--size-mb 40] [--small-files 20000]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from typing import Any

from moorage.images import gzipio, unpack

MB = 1_000_000


def big_layer(size: int) -> bytes:
    text = b"the quick brown fox jumps over the lazy dog " * (size // 88 + 1)
    files = {"random.bin": os.urandom(size // 2), "text.txt": text[: size // 2]}
    return _tar(files)


def small_layer(n: int) -> bytes:
    return _tar({f"d{i % 100}/f{i}": b"x" * (i % 700) for i in range(n)})


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def lateness_while(work: Any) -> tuple[list[float], float]:
    """Main-thread wake lateness (s) while *work* runs in a thread (None: 1 s idle); work's time."""
    done = threading.Event()
    took = [0.0]

    def run() -> None:
        t0 = time.perf_counter()
        if work is None:
            time.sleep(1.0)
        else:
            work()
        took[0] = time.perf_counter() - t0
        done.set()

    t = threading.Thread(target=run)
    late: list[float] = []
    t.start()
    while not done.is_set():
        t0 = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - t0 - 0.001)
    t.join()
    return late, took[0]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=40)
    ap.add_argument("--small-files", type=int, default=20000)
    ap.add_argument("--switch-interval-ms", type=float, default=0.0, help="sys.setswitchinterval (default: as is)")
    args = ap.parse_args()
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    work = tempfile.mkdtemp(prefix="pull-gil-")
    try:
        layers = {"big files": big_layer(args.size_mb * MB), f"{args.small_files} small files": small_layer(args.small_files)}
        late, _ = lateness_while(None)
        print(f"idle: wake lateness p50 {pct(late, 50) * 1e3:.2f} ms  p99 {pct(late, 99) * 1e3:.2f} ms  "
              f"max {max(late) * 1e3:.2f} ms (switch interval {sys.getswitchinterval() * 1e3:.1f} ms)")
        backends = ["isal", "zlib"] if gzipio.BACKEND == "isal" else ["zlib"]
        real_open = gzipio.open_gzip
        for name, blob in layers.items():
            for backend in backends:
                unpack.open_gzip = lambda s, b=backend: real_open(s, b)  # type: ignore[misc]
                target = tempfile.mkdtemp(dir=work)
                late, took = lateness_while(lambda b=blob, t=target: unpack.apply_layer(
                    io.BytesIO(b), t, mode="copy", sync=False))
                shutil.rmtree(target)
                print(f"{name:<20} {backend:<5} unpack {took:6.2f} s ({len(blob) / MB / took:5.1f} MB/s gzip in); "
                      f"wake lateness p50 {pct(late, 50) * 1e3:.2f} ms  p99 {pct(late, 99) * 1e3:.2f} ms  "
                      f"max {max(late) * 1e3:.2f} ms")
        unpack.open_gzip = real_open  # type: ignore[misc]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
