"""runtime.procsig: reading signal masks from /proc and judging whether a stop signal was discarded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from moorage.runtime.procsig import (
    ExecProbe,
    SignalMasks,
    parse_status,
    read_masks,
    would_be_dropped,
)

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


def test_a_blocked_signal_is_not_dropped() -> None:
    # catatonit blocks every signal and reads them from a signalfd: the kernel queues them
    assert parse_status(STATUS.replace("SigBlk:\t0000000000000000", "SigBlk:\t0000000000004000")).blocks(TERM)
    assert not would_be_dropped(TERM, SignalMasks(0, 0, True, blocked=bit(TERM)))
    assert would_be_dropped(TERM, SignalMasks(0, 0, True, blocked=bit(int(signal.SIGINT))))


def test_exec_probe_settles_only_once_the_program_replaced_the_runtime_init() -> None:
    # a stand-in for runc's init: handlers installed, waits, then execs a program without handlers
    code = ("import os, signal, sys; signal.signal(signal.SIGTERM, lambda *a: None); "
            "signal.signal(signal.SIGUSR1, lambda *a: None); print('ready', flush=True); sys.stdin.readline(); "
            "os.execv('/bin/sleep', ['sleep', '30'])")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdin is not None and p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        probe = ExecProbe.read(p.pid)
        assert probe is not None and probe.caught & bit(TERM)
        assert not probe.settled(p.pid)
        # the same executable with another mask is not settled either (it has not exec'd)
        assert not ExecProbe(probe.exe, 0).settled(p.pid)
        p.stdin.write("go\n")
        p.stdin.flush()
        deadline = time.monotonic() + 10
        while not probe.settled(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert probe.settled(p.pid)
        # an exec'd program that still shows the init's mask is not settled (execve under way)
        masks = read_masks(p.pid)
        assert masks is not None and not ExecProbe(probe.exe, masks.caught).settled(p.pid)
    finally:
        p.kill()
        p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()
    assert ExecProbe((0, 0), 0).settled(p.pid)  # gone

