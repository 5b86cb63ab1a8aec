#!/usr/bin/env python3
"""Layer gzip decompression speed for each backend of ``moorage.images.gzipio`` (prints figures).

The input is half random bytes and half text, as the pull benchmark's layers, compressed at
level 6; reads go through the same 1 MiB reads the layer unpacker makes.

    .venv/bin/python hack/bench/bench_gzip.py [--size-mb 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import sys
import time

from moorage.images import gzipio

MB = 1_000_000


def sample(size: int) -> bytes:
    rng = random.Random(1)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(2000)]
    text = bytearray()
    while len(text) < size // 2:
        text += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    return os.urandom(size - size // 2) + bytes(text[: size // 2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="best of this many reads per backend")
    args = ap.parse_args()
    data = sample(args.size_mb * MB)
    blob = gzip.compress(data, compresslevel=6, mtime=0)
    print(f"{len(data) / MB:.0f} MB -> {len(blob) / MB:.1f} MB gzip; default backend: {gzipio.BACKEND}")
    for backend in ("isal", "zlib"):
        if backend == "isal" and gzipio.BACKEND != "isal":
            print("isal: not installed")
            continue
        best = float("inf")
        for _ in range(args.runs):
            t0 = time.perf_counter()
            f = gzipio.open_gzip(io.BytesIO(blob), backend)
            n = 0
            while chunk := f.read(1 << 20):
                n += len(chunk)
            best = min(best, time.perf_counter() - t0)
            assert n == len(data)
        print(f"{backend}: {len(blob) / MB / best:.0f} MB/s compressed in, {len(data) / MB / best:.0f} MB/s out "
              f"({best * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
