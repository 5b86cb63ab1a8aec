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

Two more ways a stop used to be lost or delayed:

* ``/proc/<pid>/exe`` changes in the middle of execve(2), before the kernel resets
  the old program's handlers to the default: a signal sent in that window finds
  runc's init handlers (so it is not refused) and is then discarded on the way out
  of execve (a namespace init, no handler any more).  So the stop path also
  compares the handler mask with the runtime init's (``ExecProbe``): while they
  are equal the exec may still be under way, and the signal waits (briefly: a Go
  program installs the same mask again, and then it is safe to send).
* A blocked signal is never discarded on sending (it is queued, and a program
  that blocks signals reads them with signalfd, as catatonit does); treating it as
  "no handler" held such a stop until SIGKILL at the end of the grace period.
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
    blocked: int = 0  # SigBlk: signals queued until unblocked (or read through a signalfd)

    def catches(self, sig: int) -> bool:
        return bool(self.caught >> (sig - 1) & 1)

    def ignores(self, sig: int) -> bool:
        return bool(self.ignored >> (sig - 1) & 1)

    def blocks(self, sig: int) -> bool:
        return bool(self.blocked >> (sig - 1) & 1)


def parse_status(text: str) -> SignalMasks:
    """The signal masks and namespace position from the text of /proc/<pid>/status."""
    caught = ignored = blocked = 0
    ns_init = False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "SigCgt":
            caught = int(value, 16)
        elif key == "SigIgn":
            ignored = int(value, 16)
        elif key == "SigBlk":
            blocked = int(value, 16)
        elif key == "NSpid":
            ns_init = value.split()[-1:] == ["1"]
    return SignalMasks(caught, ignored, ns_init, blocked)


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
    return not masks.catches(sig) and not masks.ignores(sig) and not masks.blocks(sig)


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


@dataclass(frozen=True)
class ExecProbe:
    """What the runtime's init looked like before ``runc start`` (exe and handler mask), to tell
    whether the container's process is still it, or still inside its execve."""

    exe: tuple[int, int] | None
    caught: int

    @classmethod
    def read(cls, pid: int) -> ExecProbe | None:
        masks = read_masks(pid)
        return None if masks is None else cls(exe_identity(pid), masks.caught)

    def settled(self, pid: int) -> bool:
        """True once ``pid`` runs another executable with another handler mask (or is gone)."""
        exe = exe_identity(pid)
        if exe is None:
            return True
        masks = read_masks(pid)
        return exe != self.exe and (masks is None or masks.caught != self.caught)


async def wait_settled(pid: int, probe: ExecProbe, timeout: float, same_mask_grace: float = 0.05) -> None:
    """Wait until ``probe.settled(pid)``: at most ``timeout`` while the runtime's init has not
    exec'd, and ``same_mask_grace`` once it has but the mask is still the init's (an execve under
    way, or a program that installs the very same handlers, which then take the signal)."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    deadline, exec_deadline = now + timeout, None
    delay = 0.001
    while not probe.settled(pid):
        now = loop.time()
        if exec_deadline is None and exe_identity(pid) != probe.exe:
            exec_deadline = now + same_mask_grace
        if now >= deadline or (exec_deadline is not None and now >= exec_deadline):
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
