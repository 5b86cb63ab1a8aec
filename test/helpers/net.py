"""Host network state helpers for tests that touch CNI, iptables and links."""

from __future__ import annotations

import subprocess


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def iptables_state() -> set[str]:
    """Rules and user chains of every table (counters and comments stripped)."""
    out = set()
    table = ""
    for line in sh("iptables-save").splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            out.add(f"{table} {line}")
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy == "-":  # user chain (built-ins carry a policy)
                out.add(f"{table} :{name}")
    return out
