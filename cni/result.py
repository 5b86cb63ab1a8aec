"""CNI results: parsing (0.2.0 ... 1.1.0) and pod IP selection.  Pure."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moorage.core.errors import Internal


class ResultError(Internal):
    """A plugin printed a result we cannot use."""


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""  # netns path when the interface is inside the pod
    mtu: int | None = None


@dataclass(frozen=True)
class IPConfig:
    address: str  # CIDR form, e.g. "10.88.0.5/16"
    gateway: str = ""
    interface: int | None = None  # index into Result.interfaces

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)

    @property
    def version(self) -> int:
        return ipaddress.ip_interface(self.address).version


@dataclass(frozen=True)
class Route:
    dst: str
    gw: str = ""
    mtu: int | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _err(where: str, problem: str) -> ResultError:
    return ResultError(f"invalid CNI result from {where}: {problem}")


def _str(v: Any, what: str, where: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _err(where, f"{what} must be a string, got {v!r}")
    return v


def _strs(v: Any, what: str, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _err(where, f"{what} must be a list of strings")
    return tuple(v)


def _cidr(v: Any, what: str, where: str) -> str:
    s = _str(v, what, where)
    try:
        ipaddress.ip_interface(s)
    except ValueError:
        raise _err(where, f"{what} {s!r} is not an address in CIDR form") from None
    if "/" not in s:
        raise _err(where, f"{what} {s!r} lacks a prefix length")
    return s


def _legacy_to_current(obj: dict[str, Any]) -> dict[str, Any]:
    """Map a 0.1.0/0.2.0 result (``ip4``/``ip6`` blocks) to the 0.3+ shape."""
    ips: list[dict[str, Any]] = []
    routes: list[Any] = []  # the plugin's route objects, checked later with the 0.3+ ones
    for key in ("ip4", "ip6"):
        blk = obj.get(key)
        if isinstance(blk, dict):
            ips.append({"address": blk.get("ip"), "gateway": blk.get("gateway")})
            routes.extend(blk.get("routes") or [])
    return {"cniVersion": obj.get("cniVersion", "0.2.0"), "ips": ips, "routes": routes, "dns": obj.get("dns")}


def parse_result(data: bytes | str | Mapping[str, Any], where: str = "plugin") -> Result:
    """Parse a result document; ``where`` names its origin in error messages."""
    if isinstance(data, (bytes, str)):
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _err(where, f"not JSON ({exc})") from None
    elif isinstance(data, Mapping):
        obj = dict(data)
    else:
        obj = data
    if not isinstance(obj, dict):
        raise _err(where, "expected a JSON object")
    raw = obj
    if "ip4" in obj or "ip6" in obj:
        obj = _legacy_to_current(obj)
    version = _str(obj.get("cniVersion"), "cniVersion", where)

    interfaces = []
    for i, it in enumerate(obj.get("interfaces") or []):
        if not isinstance(it, dict):
            raise _err(where, f"interfaces[{i}] must be an object")
        mtu = it.get("mtu")
        interfaces.append(
            Interface(
                name=_str(it.get("name"), f"interfaces[{i}].name", where),
                mac=_str(it.get("mac"), f"interfaces[{i}].mac", where),
                sandbox=_str(it.get("sandbox"), f"interfaces[{i}].sandbox", where),
                mtu=mtu if isinstance(mtu, int) else None,
            )
        )

    ips = []
    for i, ip in enumerate(obj.get("ips") or []):
        if not isinstance(ip, dict):
            raise _err(where, f"ips[{i}] must be an object")
        idx = ip.get("interface")
        if idx is not None:
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(interfaces):
                raise _err(where, f"ips[{i}].interface {idx!r} does not index interfaces")
        gw = _str(ip.get("gateway"), f"ips[{i}].gateway", where)
        if gw:
            try:
                ipaddress.ip_address(gw)
            except ValueError:
                raise _err(where, f"ips[{i}].gateway {gw!r} is not an IP address") from None
        ips.append(IPConfig(address=_cidr(ip.get("address"), f"ips[{i}].address", where), gateway=gw, interface=idx))

    routes = []
    for i, r in enumerate(obj.get("routes") or []):
        if not isinstance(r, dict):
            raise _err(where, f"routes[{i}] must be an object")
        mtu = r.get("mtu")
        routes.append(
            Route(
                dst=_str(r.get("dst"), f"routes[{i}].dst", where),
                gw=_str(r.get("gw"), f"routes[{i}].gw", where),
                mtu=mtu if isinstance(mtu, int) else None,
            )
        )

    d = obj.get("dns")
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise _err(where, "dns must be an object")
    dns = DNS(
        nameservers=_strs(d.get("nameservers"), "dns.nameservers", where),
        domain=_str(d.get("domain"), "dns.domain", where),
        search=_strs(d.get("search"), "dns.search", where),
        options=_strs(d.get("options"), "dns.options", where),
    )
    return Result(
        cni_version=version,
        interfaces=tuple(interfaces),
        ips=tuple(ips),
        routes=tuple(routes),
        dns=dns,
        raw=raw,
    )


def pod_ips(result: Result, ifname: str = "eth0", prefer: int = 4) -> list[str]:
    """The pod's IPs, primary first.

    Only addresses on the pod-side interface count: an IP whose ``interface``
    points at an entry with a ``sandbox`` (or named ``ifname``) is kept, host-
    side ones (the bridge, the host veth) are skipped; IPs without interface
    information are kept.  The primary is the first address of family
    ``prefer`` (IPv4 by default) and the rest follow in result order, so a
    dual-stack pod gets ``[v4, v6]``.  Duplicates are dropped.
    """
    picked: list[IPConfig] = []
    for ip in result.ips:
        if ip.interface is not None:
            itf = result.interfaces[ip.interface]
            if not (itf.sandbox or itf.name == ifname):
                continue
        picked.append(ip)
    seen: set[str] = set()
    ordered: list[str] = []
    primary = next((ip for ip in picked if ip.version == prefer), picked[0] if picked else None)
    for ip in ([primary] if primary else []) + picked:
        addr = ip.ip
        if addr not in seen:
            seen.add(addr)
            ordered.append(addr)
    return ordered
