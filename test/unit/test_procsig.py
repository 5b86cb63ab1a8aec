"""runtime.procsig: reading signal masks from /proc and judging whether a stop signal was discarded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from moorage.runtime.procsig import SignalMasks, parse_status, read_masks, would_be_dropped

TERM = int(signal.SIGTERM)
STATUS = """Name:\tsh
SigQ:\t0/127
SigPnd:\t0000000000000000
ShdPnd:\t0000000000000000
SigBlk:\t0000000000000000
SigIgn:\t0000000000000004
SigCgt:\t0000000000004002
NSpid:\t4242\t1
"""


def test_parse_status_reads_the_masks_and_the_innermost_pid() -> None:
    m = parse_status(STATUS)
    assert m.catches(TERM) and m.catches(int(signal.SIGINT)) and not m.catches(int(signal.SIGHUP))
    assert m.ignores(int(signal.SIGQUIT)) and m.ns_init
    assert not parse_status(STATUS.replace("NSpid:\t4242\t1", "NSpid:\t4242\t7")).ns_init
    assert not parse_status("Name:\tx\n").ns_init


def masks(caught: int = 0, ignored: int = 0, init: bool = True) -> SignalMasks:
    return SignalMasks(caught, ignored, init)


def bit(sig: int) -> int:
    return 1 << (sig - 1)


def test_would_be_dropped_in_each_case() -> None:
    # no handler, a namespace init: the kernel discards it
    assert would_be_dropped(TERM, masks())
    # a handler: delivered
    assert not would_be_dropped(TERM, masks(bit(TERM)))
    # a handler for another signal only
    assert would_be_dropped(TERM, masks(bit(int(signal.SIGINT))))
    # not a namespace init: the default action (terminate) applies
    assert not would_be_dropped(TERM, masks(init=False))
    # ignored on purpose: sending is harmless, nothing to wait for
    assert not would_be_dropped(TERM, masks(ignored=bit(TERM)))
    # the process is gone
    assert not would_be_dropped(TERM, None)


def test_read_masks_of_a_real_process_sees_its_handler_appear() -> None:
    code = "import signal, sys, time; sys.stdin.readline(); signal.signal(signal.SIGTERM, lambda *a: None); " \
           "print('ok', flush=True); time.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        m = read_masks(p.pid)
        assert m is not None and not m.catches(TERM) and not m.ns_init
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        m = read_masks(p.pid)
        assert m is not None and m.catches(TERM)
    finally:
        p.kill()
        p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()
    deadline = time.monotonic() + 5
    while read_masks(p.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert read_masks(p.pid) is None or not os.path.exists(f"/proc/{p.pid}/status")


def test_wait_exec_returns_once_the_process_runs_another_program() -> None:
    import asyncio

    from moorage.runtime.procsig import exe_identity, wait_exec

    code = "import os, sys, time; sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '5'])"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    try:
        before = exe_identity(p.pid)
        assert before is not None
        assert not asyncio.run(wait_exec(p.pid, before, timeout=0.1))  # still python: not exec'd yet
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        assert asyncio.run(wait_exec(p.pid, before, timeout=5))
        assert exe_identity(p.pid) != before
    finally:
        p.kill()
        p.wait()
        if p.stdin is not None:
            p.stdin.close()
    assert asyncio.run(wait_exec(p.pid, before, timeout=1))  # gone counts as done
    assert asyncio.run(wait_exec(p.pid, None))
