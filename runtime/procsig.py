"""Whether a stop signal can reach a container's process, read from /proc.

A container's first process is the init of its PID namespace. The kernel
discards a signal sent to a namespace init from outside (``runc kill``) unless
that process has installed a handler for it; only SIGKILL and SIGSTOP are
forced through. A StopContainer that lands in the few milliseconds between
``runc start`` and the moment the program installs its SIGTERM handler is
therefore lost, and the caller waits out the whole grace period before
SIGKILL.

So the stop path reads the process's masks first (``would_be_dropped``): if the
signal would be discarded (a namespace init, no handler, not ignored on
purpose), it is not sent yet; the stop path watches ``SigCgt`` and sends it
once the handler exists, exactly once. Reading after the send could not tell a
signal that arrived a moment before the handler from one that arrived after.

Before all that, the process must be the program at all: ``runc start`` returns
once it has told the container's init to go on, and the init (``runc:[2:INIT]``,
a Go program with handlers for every signal) execs the program a moment later.
A signal in that moment is taken by runc's init and gone after the exec.
``wait_exec`` lets StartContainer return only once the exec happened, so a stop
issued after StartContainer always meets the program itself.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SignalMasks:
    caught: int   # SigCgt: signals with a handler
    ignored: int  # SigIgn
    ns_init: bool  # pid 1 of its innermost PID namespace (last NSpid entry)

    def catches(self, sig: int) -> bool:
        return bool(self.caught >> (sig - 1) & 1)

    def ignores(self, sig: int) -> bool:
        return bool(self.ignored >> (sig - 1) & 1)


def parse_status(text: str) -> SignalMasks:
    """The signal masks and namespace position from the text of /proc/<pid>/status."""
    caught = ignored = 0
    ns_init = False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "SigCgt":
            caught = int(value, 16)
        elif key == "SigIgn":
            ignored = int(value, 16)
        elif key == "NSpid":
            ns_init = value.split()[-1:] == ["1"]
    return SignalMasks(caught, ignored, ns_init)


def read_masks(pid: int) -> SignalMasks | None:
    """None when the process is gone (or not ours to read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return parse_status(f.read())
    except (OSError, ValueError):
        return None


def would_be_dropped(sig: int, masks: SignalMasks | None) -> bool:
    """True when the kernel would discard ``sig`` sent now from outside the process's PID namespace."""
    if masks is None or not masks.ns_init:
        return False  # gone (its exit is on the way), or the default action applies
    return not masks.catches(sig) and not masks.ignores(sig)


def exe_identity(pid: int) -> tuple[int, int] | None:
    """(device, inode) of the executable ``pid`` runs; None when the process is gone."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def wait_exec(pid: int, before: tuple[int, int] | None, timeout: float = 2.0) -> bool:
    """Wait until ``pid`` no longer runs the executable it ran when ``before`` was read (it has
    exec'd the container's program), or is gone. False if it still had not after ``timeout``."""
    if before is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.001
    while exe_identity(pid) == before:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True
