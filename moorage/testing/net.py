"""Host network state helpers for tests that touch CNI, iptables and links."""

from __future__ import annotations

import ipaddress
import os
import random
import shlex
import subprocess


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def iptables_state() -> set[str]:
    """Rules and user chains of every table (counters and comments stripped)."""
    out: set[str] = set()
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


# portmap's shared top chain and the jumps into it (it never deletes them itself).
PORTMAP_TOP = "CNI-HOSTPORT-DNAT"
PORTMAP_JUMP = ["-m", "addrtype", "--dst-type", "LOCAL", "-j", PORTMAP_TOP]


def remove_portmap_scaffolding_if_ours(before: set[str]) -> None:
    """Remove portmap's top chain if this test created it (absent in ``before``) and it is empty."""
    if f"nat :{PORTMAP_TOP}" in before:
        return
    state = iptables_state()
    if f"nat :{PORTMAP_TOP}" not in state:
        return
    if any(line.startswith(f"nat -A {PORTMAP_TOP} ") for line in state):
        return  # somebody else's pod still uses it
    for chain in ("PREROUTING", "OUTPUT"):
        while f"nat -A {chain} {' '.join(PORTMAP_JUMP)}" in iptables_state():
            sh("iptables", "-t", "nat", "-D", chain, *PORTMAP_JUMP)
    sh("iptables", "-t", "nat", "-X", PORTMAP_TOP, check=False)


def remove_rules_of_network(network: str) -> None:
    """Safety net for a failed test: delete nat rules naming ``network`` and the per-pod chains they jump to."""
    chains: set[str] = set()
    for line in sorted(iptables_state()):
        table, _, rule = line.partition(" ")
        if table == "nat" and rule.startswith("-A ") and f'name: \\"{network}\\"' in rule:
            args = shlex.split(rule)
            if "-j" in args:
                chains.add(args[args.index("-j") + 1])
            sh("iptables", "-t", "nat", "-D", *args[1:], check=False)
    for c in chains:
        if c.startswith("CNI-DN-"):
            sh("iptables", "-t", "nat", "-F", c, check=False)
            sh("iptables", "-t", "nat", "-X", c, check=False)


def free_subnet(second_octet: int) -> ipaddress.IPv4Network:
    """A 10.<second_octet>.x.0/24 that no address or route on the host uses."""
    used = sh("ip", "-4", "-o", "addr") + sh("ip", "-4", "route")
    for _ in range(200):
        third = random.randint(1, 254)
        if f"10.{second_octet}.{third}." not in used:
            return ipaddress.IPv4Network(f"10.{second_octet}.{third}.0/24")
    raise RuntimeError(f"no free 10.{second_octet}.x.0/24 subnet")


def reservations(data_dir: str, network: str) -> list[str]:
    """The addresses host-local holds for ``network`` under ``data_dir`` (one file per address), sorted."""
    d = os.path.join(data_dir, network)
    out = []
    for n in os.listdir(d) if os.path.isdir(d) else []:
        try:
            ipaddress.ip_address(n)
            out.append(n)
        except ValueError:
            pass
    return sorted(out)
