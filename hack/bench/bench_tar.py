#!/usr/bin/env python3
"""Tar reader benchmark: time and peak memory of applying hostile and ordinary layers.

Each layer is applied by ``moorage.images.unpack.apply_layer`` (which reads it with
``moorage.images.tarstream``) in a fresh child process, into a temporary directory, so the
child's peak RSS (``ru_maxrss``) is that layer's alone.  Printed per layer: the outcome (the
status the daemon would answer), seconds, and peak RSS (VmHWM) in MiB: over the child's
baseline (interpreter and imports), and in all.  ``--tarfile`` also times CPython's ``tarfile`` listing the same
bytes (the reader moorage used before), with a time limit per layer.

    .venv/bin/python hack/bench/bench_tar.py [--tarfile] [--tarfile-timeout 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from moorage.testing import tarcraft as tc


def layers() -> dict[str, bytes]:
    """The issue's hostile layers, and two ordinary ones for scale."""
    def glob(n: int) -> bytes:
        return tc.pax(body=b"".join(tc.pax_record(f"k{i}", "v") for i in range(n)), type_=b"g")

    return {
        "pax-length-80000-digits": tc.pax(body=b"8" * 80_000 + b" path=x\n") + tc.file("n"),
        "pax-length-120000-digits": tc.pax(body=b"1" * 120_000) + tc.file("n"),
        "global-pax-60000-keys": glob(60_000) + tc.file("n"),
        "global-pax-4000-keys-x-250": (glob(4000) + tc.file("n")) * 250,
        "pax-1MiB-comment-x-100": (tc.pax({"comment": "c" * ((1 << 20) - 64)}) + tc.file("n")) * 100,
        "negative-size-pax": tc.pax({"size": "-512"}) + tc.file("n"),
        "mtime-nan": tc.pax({"mtime": "nan"}) + tc.file("n"),
        "ordinary-5000-files": b"".join(tc.file(f"d{i % 50}/f{i}", b"x" * 100) for i in range(5000)),
        "ordinary-1-file-256MiB": tc.file("big", b"\0" * (256 << 20)),
    }


def vm_hwm_kib() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not carried over from the parent
    through exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(path: str, reader: str) -> None:
    """Apply (or, with ``tarfile``, list) the layer at ``path``; print outcome, seconds, peak KiB."""
    base = vm_hwm_kib()
    from moorage.core.errors import MoorageError
    from moorage.images.unpack import apply_layer

    start = time.perf_counter()
    outcome = "OK"
    if reader == "tarfile":
        import tarfile
        try:
            with tarfile.open(path, "r:") as tf:
                n = sum(1 for _ in tf)
            outcome = f"OK ({n} members)"
        except (tarfile.TarError, ValueError, EOFError, OSError, UnicodeError) as e:
            outcome = f"{type(e).__name__}"
    else:
        root = tempfile.mkdtemp(prefix="bench-tar-")
        try:
            with open(path, "rb") as f:
                apply_layer(f, root, label="bench", sync=False)
        except MoorageError as e:
            outcome = f"{e.code}"
        finally:
            shutil.rmtree(root)
    took = time.perf_counter() - start
    peak = vm_hwm_kib()
    print(f"{outcome}\t{took:.3f}\t{max(peak - base, 0)}\t{peak}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tarfile", action="store_true", help="also time CPython tarfile on each layer")
    ap.add_argument("--tarfile-timeout", type=float, default=60.0)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    tmp = tempfile.mkdtemp(prefix="bench-tar-layers-")
    try:
        print(f"{'layer':30} {'reader':9} {'outcome':18} {'seconds':>8} {'peak RSS +MiB':>14} {'peak MiB':>9}")
        for name, tar in layers().items():
            path = os.path.join(tmp, name + ".tar")
            with open(path, "wb") as f:
                f.write(tar + tc.end())
            for reader in ["tarstream"] + (["tarfile"] if args.tarfile else []):
                try:
                    out = subprocess.run([sys.executable, __file__, "--child", path, reader], capture_output=True,
                                         text=True, check=True,
                                         timeout=args.tarfile_timeout if reader == "tarfile" else None).stdout
                    outcome, took, delta, peak = out.strip().split("\t")
                    print(f"{name:30} {reader:9} {outcome:18} {float(took):8.3f} {int(delta) / 1024:14.1f} "
                          f"{int(peak) / 1024:9.1f}")
                except subprocess.TimeoutExpired:
                    print(f"{name:30} {reader:9} {'(timed out)':18} {'>' + str(args.tarfile_timeout):>8}")
            os.unlink(path)
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
