"""Merging what several NRI plugins ask, in plugin order, with conflict detection (pure).

As NRI specifies, plugins are consulted in ascending index order and each
adjustable field belongs to the first plugin that touches it: a second plugin
touching the same field -- the same annotation key, env name, mount destination,
device path, rlimit type, sysctl, resource value, CDI device, namespace type, net
device, the args, the cgroups path or a whole object (seccomp policy, scheduler, I/O
priority, RDT, memory policy) --
is a conflict, and the request fails naming both plugins.  Removing an entry
(NRI's "-key" mark) touches it too.  OCI hooks only accumulate.  Once the
claims are checked, protobuf's own MergeFrom unions the messages: no two of
them set the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable

from moorage.core.errors import FailedPrecondition
from moorage.nri.api import api_pb2 as nri
from moorage.nri.convert import REMOVAL_MARK, clean_text


def _key(k: str) -> str:
    return k[len(REMOVAL_MARK):] if k.startswith(REMOVAL_MARK) else k


def resource_fields(res: nri.LinuxResources) -> list[str]:
    """Names of the values a LinuxResources sets (what a plugin claims with it)."""
    out: list[str] = []
    for part, fields in (("memory", ("limit", "reservation", "swap", "kernel", "kernel_tcp", "swappiness",
                                     "disable_oom_killer", "use_hierarchy")),
                         ("cpu", ("shares", "quota", "period", "realtime_runtime", "realtime_period"))):
        msg = getattr(res, part)
        out += [f"{part}.{f}" for f in fields if msg.HasField(f)]
    out += [f"cpu.{f}" for f in ("cpus", "mems") if getattr(res.cpu, f)]
    out += [f"hugepage limit {h.page_size}" for h in res.hugepage_limits]
    out += [f"unified {k}" for k in res.unified]
    out += [f for f in ("blockio_class", "rdt_class", "pids") if res.HasField(f)]
    return out


def adjustment_fields(a: nri.ContainerAdjustment) -> list[str]:
    """Names of everything an adjustment touches, hooks aside (they accumulate)."""
    lin = a.linux
    out = [f"annotation {_key(k)}" for k in a.annotations]
    out += [f"mount {_key(m.destination)}" for m in a.mounts]
    out += [f"env {_key(e.key)}" for e in a.env]
    out += [f"rlimit {r.type}" for r in a.rlimits]
    out += [f"CDI device {d.name}" for d in a.CDI_devices]
    out += ["args"] if a.args else []
    out += [f"device {_key(d.path)}" for d in lin.devices]
    out += [f"sysctl {_key(k)}" for k in lin.sysctl]
    out += [f"namespace {_key(n.type)}" for n in lin.namespaces]
    out += [f"net device {k}" for k in lin.net_devices]
    out += ["cgroups path"] if lin.cgroups_path else []
    out += [f for f in ("oom_score_adj", "io_priority", "seccomp_policy", "scheduler", "rdt", "memory_policy")
            if lin.HasField(f)]
    # an RDT class is the CLOS id: one owner for both ways of setting it
    out += ["rdt"] if lin.resources.HasField("rdt_class") and not lin.HasField("rdt") else []
    if lin.HasField("resources"):
        out += resource_fields(lin.resources)
    return out


class Result:
    """What the plugins asked for one request, merged as they answer (call in plugin order)."""

    def __init__(self, container_id: str = "") -> None:
        self.container_id = container_id
        self.adjust = nri.ContainerAdjustment()
        self.updates: dict[str, nri.ContainerUpdate] = {}  # container id -> merged update
        self.evictions: list[nri.ContainerEviction] = []
        self._owners: dict[tuple[str, str], str] = {}

    def _claim(self, cid: str, fields: Iterable[str], plugin: str) -> None:
        fields = list(fields)
        for f in fields:
            owner = self._owners.get((cid, f))
            if owner is not None and owner != plugin:
                raise FailedPrecondition(
                    f"NRI plugins {owner} and {plugin} conflict: both adjust {clean_text(f, 200)} of container {cid}")
        for f in fields:
            self._owners[(cid, f)] = plugin

    def adjust_with(self, plugin: str, a: nri.ContainerAdjustment) -> None:
        self._claim(self.container_id, adjustment_fields(a), plugin)
        self.adjust.MergeFrom(a)

    def update_with(self, plugin: str, updates: Iterable[nri.ContainerUpdate]) -> None:
        for u in updates:
            cid = u.container_id
            self._claim(cid, resource_fields(u.linux.resources), plugin)
            merged = self.updates.setdefault(cid, nri.ContainerUpdate(container_id=cid))
            merged.MergeFrom(u)

    def evict_with(self, plugin: str, evictions: Iterable[nri.ContainerEviction]) -> None:
        self.evictions.extend(evictions)


def merge(answers: Iterable[tuple[str, nri.ContainerAdjustment]], container_id: str = "") -> nri.ContainerAdjustment:
    """The adjustments of ``(plugin, adjustment)`` pairs, in the order given; FAILED_PRECONDITION on a conflict."""
    r = Result(container_id)
    for plugin, a in answers:
        r.adjust_with(plugin, a)
    return r.adjust
