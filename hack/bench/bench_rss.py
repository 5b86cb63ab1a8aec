#!/usr/bin/env python3
"""Daemon RSS at a fresh start, and what each import adds to it (prints figures; issue #16).

``start``: a real daemon (moorage.testing.daemon), VmRSS one second after it answers Version.
``imports``: in a fresh interpreter, VmRSS added by each module of the daemon's import chain,
in the order given (each one's figure excludes what the ones before it already loaded).

    .venv/bin/python hack/bench/bench_rss.py [--runs 3] [--env KEY=VALUE ...]
    .venv/bin/python hack/bench/bench_rss.py --imports asyncio grpc.aio moorage.cri.server
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

_IMPORTS = r"""
import importlib, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
print(f"{'python itself':40s} {rss():6.1f} MiB")
for m in sys.argv[1:]:
    before = rss()
    importlib.import_module(m)
    print(f"{m:40s} +{rss() - before:5.1f} MiB  (total {rss():.1f})")
"""


def _vmrss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def fresh_start(runs: int, env: dict[str, str]) -> list[float]:
    from moorage.testing.daemon import DaemonProcess, new_base, teardown

    figures = []
    for _ in range(runs):
        d = DaemonProcess(base=new_base(), env=env)
        try:
            d.start()
            time.sleep(1)  # as compare.py: what start-up leaves, once its threads settle
            assert d.proc is not None
            figures.append(_vmrss_mib(d.proc.pid))
        finally:
            teardown(d)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for the daemon's environment")
    ap.add_argument("--imports", nargs="*", help="measure these imports instead of a daemon")
    args = ap.parse_args()
    if args.imports is not None:
        return subprocess.call([sys.executable, "-c", _IMPORTS,
                                *(args.imports or ["asyncio", "grpc.aio", "moorage.cri.server", "moorage.cri.cli"])])
    env = dict(kv.split("=", 1) for kv in args.env)
    figures = fresh_start(args.runs, env)
    print(f"daemon RSS fresh start: median {statistics.median(figures):.1f} MiB "
          f"(runs: {', '.join(f'{v:.1f}' for v in figures)}){' env ' + str(env) if env else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
