"""runtime.procsig: reading signal masks from /proc and judging whether a stop signal was discarded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from moorage.runtime.procsig import SignalMasks, judge, parse_status, read_masks

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


def test_judge_each_case() -> None:
    # handler present before the send: delivered
    assert judge(TERM, masks(bit(TERM)), masks(bit(TERM))) == (True, False)
    # no handler before or after, a namespace init: discarded, resend when a handler appears
    assert judge(TERM, masks(), masks()) == (False, True)
    # a handler appeared during the send: maybe delivered; never risk a second delivery
    assert judge(TERM, masks(), masks(bit(TERM))) == (True, False)
    # not a namespace init: the default action (terminate) applies
    assert judge(TERM, masks(init=False), masks(init=False)) == (True, False)
    # ignored on purpose
    assert judge(TERM, masks(ignored=bit(TERM)), masks(ignored=bit(TERM))) == (True, False)
    # the process is gone
    assert judge(TERM, None, None) == (True, False)
    assert judge(TERM, masks(), None) == (True, False)


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
