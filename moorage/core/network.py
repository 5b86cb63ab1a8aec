"""Pod network request types shared by the runtime (which asks) and CNI (which does).

They live on the ground floor so that ``moorage.runtime`` and ``moorage.cni``
can both name them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"  # tcp | udp | sctp (any case)
    host_ip: str = ""


@dataclass(frozen=True)
class Bandwidth:
    """Traffic shaping in bits per second (rates) and bits (bursts); 0 = unlimited."""

    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0


@dataclass(frozen=True)
class DNSConfig:
    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
