"""Host process look-ups: who is running, by command line (/proc/<pid>/cmdline)."""

from __future__ import annotations

import os
from collections.abc import Iterator


def cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process on the host that can still be read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args[-1:] == [b""]:
            args = args[:-1]
        yield int(entry), args
