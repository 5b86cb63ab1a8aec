"""Whether a stop signal can reach a container's process, read from /proc.

A container's first process is the init of its PID namespace. The kernel
discards a signal sent to a namespace init from outside (``runc kill``) unless
that process has installed a handler for it; only SIGKILL and SIGSTOP are
forced through. A StopContainer that lands in the few milliseconds between
``runc start`` and the moment the program installs its SIGTERM handler is
therefore lost, and the caller waits out the whole grace period before
SIGKILL.

``StopWatch`` lets the stop path tell the cases apart without ever delivering
the signal twice to a handler:

* caught before the send: delivered, nothing more to do;
* not caught before and not caught after the send, process is a namespace
  init: discarded; send again once a handler appears (poll ``SigCgt``);
* not caught before but caught after: a handler appeared during the send; it
  may or may not have received it, and a second delivery could make a program
  treat it as "stop now, forcefully", so it is not sent again;
* explicitly ignored (``SigIgn``) or not a namespace init: the kernel's default
  action applies, nothing to watch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


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


class SendOutcome(NamedTuple):
    delivered: bool  # the kernel took it (or may have): do not send again
    resend_when_caught: bool  # it was discarded: send again once a handler exists


def judge(sig: int, before: SignalMasks | None, after: SignalMasks | None) -> SendOutcome:
    """What a send of ``sig`` did, from the masks read just before and just after it."""
    if before is None or after is None or not before.ns_init:
        return SendOutcome(True, False)  # gone, or default action applies: nothing to watch
    if before.catches(sig) or after.catches(sig):
        return SendOutcome(True, False)
    if before.ignores(sig):
        return SendOutcome(True, False)  # the program ignores it on purpose
    return SendOutcome(False, True)
