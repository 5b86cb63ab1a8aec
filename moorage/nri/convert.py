"""Runtime records <-> NRI protobuf messages, and NRI adjustments -> the runtime's typed value.

Plugins get pods and containers as NRI describes them (api.proto's PodSandbox and
Container), read from the runtime's records and the container's OCI spec.  What
they send back is untrusted: every path must be absolute and clean, names and
keys non-empty and free of NUL, else INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from typing import Any

from moorage.core.errors import InvalidArgument
from moorage.nri.api import api_pb2 as nri
from moorage.runtime import adjust
from moorage.runtime.model import HugepageLimit, LinuxContainerResources
from moorage.runtime.records import Container, ContainerState, Sandbox

#: NRI marks an entry for removal by prefixing its key with this
REMOVAL_MARK = "-"

_STATES = {
    ContainerState.CREATED: nri.CONTAINER_CREATED,
    ContainerState.RUNNING: nri.CONTAINER_RUNNING,
    ContainerState.EXITED: nri.CONTAINER_STOPPED,
}

_HOOKS = (("prestart", "prestart"), ("create_runtime", "createRuntime"), ("create_container", "createContainer"),
          ("start_container", "startContainer"), ("poststart", "poststart"), ("poststop", "poststop"))


def clean_text(text: str, limit: int = 512) -> str:
    """A plugin's text (error, reason) fit for a status message and a log line."""
    out = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


# --- to NRI ---------------------------------------------------------------------------------------


def pod(sb: Sandbox) -> nri.PodSandbox:
    cfg, st = sb.metadata.config, sb.status
    md = cfg.metadata
    ips = [ip for ip in (st.ip, *st.additional_ips) if ip]
    out = nri.PodSandbox(id=sb.id, name=md.name, uid=md.uid, namespace=md.namespace, labels=dict(cfg.labels),
                         annotations=dict(cfg.annotations), runtime_handler=sb.metadata.runtime_handler,
                         pid=st.pid, ips=ips)
    out.linux.cgroup_parent = sb.metadata.cgroup_parent
    out.linux.cgroups_path = sb.metadata.cgroups_path
    if st.netns_path:
        out.linux.namespaces.add(type="network", path=st.netns_path)
    for kind, path in sorted(sb.metadata.ns_paths.items()):  # a pod without an infra process: pid 0
        out.linux.namespaces.add(type=kind, path=path)
    overhead, resources = sb.pod_resources()
    if overhead is not None:
        out.linux.pod_overhead.CopyFrom(resources_from_model(overhead))
    if resources is not None:
        out.linux.pod_resources.CopyFrom(resources_from_model(resources))
    return out


def container(ctr: Container, spec: Mapping[str, Any] | None) -> nri.Container:
    """``spec``: the container's OCI spec (as built, or its bundle's), None if unreadable."""
    cfg, st = ctr.metadata.config, ctr.status
    out = nri.Container(id=ctr.id, pod_sandbox_id=ctr.metadata.sandbox_id, name=cfg.metadata.name,
                        state=_STATES.get(st.state, nri.CONTAINER_UNKNOWN), labels=dict(cfg.labels),
                        pid=st.pid, created_at=ctr.metadata.created_at, started_at=st.started_at,
                        finished_at=st.finished_at, exit_code=st.exit_code, status_reason=st.reason,
                        status_message=st.message)
    if st.user is not None:
        out.user.uid, out.user.gid = st.user.uid, st.user.gid
        out.user.additional_gids.extend(st.user.additional_gids)
    if spec is None:
        out.annotations.update(cfg.annotations)
        out.args.extend([*cfg.command, *cfg.args])
        out.env.extend(f"{k}={v}" for k, v in cfg.envs)
        return out
    out.annotations.update(spec.get("annotations", {}))
    proc = spec.get("process", {})
    out.args.extend(proc.get("args", []))
    out.env.extend(proc.get("env", []))
    for r in proc.get("rlimits", []):
        out.rlimits.add(type=r["type"], hard=r["hard"], soft=r["soft"])
    for m in spec.get("mounts", []):
        out.mounts.add(destination=m["destination"], type=m.get("type", ""), source=m.get("source", ""),
                       options=m.get("options", []))
    hooks = spec.get("hooks", {})
    for field, oci in _HOOKS:
        for h in hooks.get(oci, []):
            hk = getattr(out.hooks, field).add(path=h["path"], args=h.get("args", []), env=h.get("env", []))
            if "timeout" in h:
                hk.timeout.value = h["timeout"]
    linux = spec.get("linux", {})
    lo = out.linux
    for ns in linux.get("namespaces", []):
        lo.namespaces.add(type=ns["type"], path=ns.get("path", ""))
    for d in linux.get("devices", []):
        dev = lo.devices.add(path=d["path"], type=d["type"], major=d.get("major", 0), minor=d.get("minor", 0))
        if "fileMode" in d:
            dev.file_mode.value = d["fileMode"]
        if "uid" in d:
            dev.uid.value = d["uid"]
        if "gid" in d:
            dev.gid.value = d["gid"]
    lo.resources.CopyFrom(resources_from_oci(linux.get("resources", {})))
    if "oomScoreAdj" in proc:
        lo.oom_score_adj.value = proc["oomScoreAdj"]
    lo.cgroups_path = linux.get("cgroupsPath", "")
    lo.sysctl.update(linux.get("sysctl", {}))
    return out


def resources_from_oci(res: Mapping[str, Any]) -> nri.LinuxResources:
    out = nri.LinuxResources()
    mem = res.get("memory", {})
    for key, field in (("limit", "limit"), ("reservation", "reservation"), ("swap", "swap"),
                       ("kernel", "kernel"), ("kernelTCP", "kernel_tcp"), ("swappiness", "swappiness")):
        if key in mem:
            getattr(out.memory, field).value = mem[key]
    if "disableOOMKiller" in mem:
        out.memory.disable_oom_killer.value = mem["disableOOMKiller"]
    cpu = res.get("cpu", {})
    for key, field in (("shares", "shares"), ("quota", "quota"), ("period", "period"),
                       ("realtimeRuntime", "realtime_runtime"), ("realtimePeriod", "realtime_period")):
        if key in cpu:
            getattr(out.cpu, field).value = cpu[key]
    out.cpu.cpus, out.cpu.mems = cpu.get("cpus", ""), cpu.get("mems", "")
    for h in res.get("hugepageLimits", []):
        out.hugepage_limits.add(page_size=h["pageSize"], limit=h["limit"])
    out.unified.update(res.get("unified", {}))
    if "pids" in res:
        out.pids.limit = res["pids"].get("limit", 0)
    for d in res.get("devices", []):
        rule = out.devices.add(allow=d.get("allow", False), type=d.get("type", ""), access=d.get("access", ""))
        if d.get("major") is not None:
            rule.major.value = d["major"]
        if d.get("minor") is not None:
            rule.minor.value = d["minor"]
    return out


def resources_from_model(res: LinuxContainerResources) -> nri.LinuxResources:
    out = nri.LinuxResources()
    if res.memory_limit_in_bytes:
        out.memory.limit.value = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes:
        out.memory.swap.value = res.memory_swap_limit_in_bytes
    if res.cpu_shares:
        out.cpu.shares.value = res.cpu_shares
    if res.cpu_quota:
        out.cpu.quota.value = res.cpu_quota
    if res.cpu_period:
        out.cpu.period.value = res.cpu_period
    out.cpu.cpus, out.cpu.mems = res.cpuset_cpus, res.cpuset_mems
    for h in res.hugepage_limits:
        out.hugepage_limits.add(page_size=h.page_size, limit=h.limit)
    out.unified.update(res.unified)
    return out


# --- from NRI -------------------------------------------------------------------------------------


def _text(value: str, what: str) -> str:
    if not value or "\0" in value:
        raise InvalidArgument(f"NRI adjustment: {what} {clean_text(value, 80)!r} is empty or has a NUL byte")
    return value


def _abs_path(value: str, what: str) -> str:
    _text(value, what)
    if not os.path.isabs(value) or (value != "/" and os.path.normpath(value) != value):
        raise InvalidArgument(f"NRI adjustment: {what} {clean_text(value, 200)!r} must be a clean absolute path")
    return value


def _split_removals(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    add: list[str] = []
    remove: list[str] = []
    for k in keys:
        (remove if k.startswith(REMOVAL_MARK) else add).append(k)
    return add, [k[len(REMOVAL_MARK):] for k in remove]


def resources_to_oci(res: nri.LinuxResources) -> dict[str, Any]:
    """The fields a plugin set, as an OCI ``linux.resources`` fragment."""
    out: dict[str, Any] = {}
    if res.HasField("memory"):
        m = res.memory
        mem = {oci: getattr(m, f).value for f, oci in (("limit", "limit"), ("reservation", "reservation"),
                                                        ("swap", "swap"), ("kernel", "kernel"),
                                                        ("kernel_tcp", "kernelTCP"), ("swappiness", "swappiness"),
                                                        ("disable_oom_killer", "disableOOMKiller"))
               if m.HasField(f)}
        if mem:
            out["memory"] = mem
    if res.HasField("cpu"):
        c = res.cpu
        cpu: dict[str, Any] = {oci: getattr(c, f).value for f, oci in (
            ("shares", "shares"), ("quota", "quota"), ("period", "period"),
            ("realtime_runtime", "realtimeRuntime"), ("realtime_period", "realtimePeriod")) if c.HasField(f)}
        if c.cpus:
            cpu["cpus"] = c.cpus
        if c.mems:
            cpu["mems"] = c.mems
        if cpu:
            out["cpu"] = cpu
    if res.hugepage_limits:
        out["hugepageLimits"] = [{"pageSize": _text(h.page_size, "hugepage page size"), "limit": h.limit}
                                 for h in res.hugepage_limits]
    if res.unified:
        out["unified"] = {_text(k, "unified key"): v for k, v in res.unified.items()}
    if res.HasField("pids") and res.pids.limit:
        out["pids"] = {"limit": res.pids.limit}
    return out


def resources_to_model(res: nri.LinuxResources, base: LinuxContainerResources) -> LinuxContainerResources:
    """``base`` with what an NRI update sets (the fields the CRI's resources can carry)."""
    out = copy.deepcopy(base)
    m, c = res.memory, res.cpu
    if m.HasField("limit"):
        out.memory_limit_in_bytes = m.limit.value
    if m.HasField("swap"):
        out.memory_swap_limit_in_bytes = m.swap.value
    if c.HasField("shares"):
        out.cpu_shares = c.shares.value
    if c.HasField("quota"):
        out.cpu_quota = c.quota.value
    if c.HasField("period"):
        out.cpu_period = c.period.value
    if c.cpus:
        out.cpuset_cpus = c.cpus
    if c.mems:
        out.cpuset_mems = c.mems
    if res.hugepage_limits:
        out.hugepage_limits = [HugepageLimit(page_size=h.page_size, limit=h.limit) for h in res.hugepage_limits]
    if res.unified:
        out.unified = {**out.unified, **res.unified}
    return out


def adjustment(a: nri.ContainerAdjustment) -> adjust.ContainerAdjustment:
    """A merged NRI adjustment as the spec builder takes it; INVALID_ARGUMENT on bad data."""
    ann_add, ann_remove = _split_removals(a.annotations)
    env_add, env_remove = _split_removals(kv.key for kv in a.env)
    env_values = {kv.key: kv.value for kv in a.env}
    mnt_add, mnt_remove = _split_removals(m.destination for m in a.mounts)
    mounts = {m.destination: m for m in a.mounts}
    lin = a.linux
    dev_add, dev_remove = _split_removals(d.path for d in lin.devices)
    devices = {d.path: d for d in lin.devices}
    hooks: dict[str, tuple[adjust.AdjustHook, ...]] = {}
    for field, oci in _HOOKS:
        lst = tuple(adjust.AdjustHook(path=_abs_path(h.path, "hook path"), args=tuple(h.args), env=tuple(h.env),
                                      timeout=h.timeout.value if h.HasField("timeout") else None)
                    for h in getattr(a.hooks, field))
        if lst:
            hooks[oci] = lst
    for d in dev_add:
        if devices[d].type not in ("c", "b", "u", "p"):
            raise InvalidArgument(f"NRI adjustment: device {clean_text(d, 200)!r} has type "
                                  f"{clean_text(devices[d].type, 8)!r}; want c, b, u or p")
    rlimits = []
    for r in a.rlimits:
        kind = _text(r.type, "rlimit type").upper()
        if not kind.startswith("RLIMIT_"):
            raise InvalidArgument(f"NRI adjustment: rlimit type {clean_text(r.type, 40)!r} is not RLIMIT_*")
        rlimits.append(adjust.AdjustRlimit(type=kind, hard=r.hard, soft=r.soft))
    return adjust.ContainerAdjustment(
        annotations={_text(k, "annotation key"): a.annotations[k] for k in ann_add},
        remove_annotations=tuple(ann_remove),
        env=tuple((_text(k, "env name"), env_values[k]) for k in env_add),
        remove_env=tuple(env_remove),
        args=tuple(a.args) if a.args else None,
        mounts=tuple(adjust.AdjustMount(destination=_abs_path(d, "mount destination"), type=mounts[d].type or "bind",
                                        source=_text(mounts[d].source, "mount source"),
                                        options=tuple(mounts[d].options)) for d in mnt_add),
        remove_mounts=tuple(_abs_path(d, "mount destination") for d in mnt_remove),
        hooks=hooks,
        devices=tuple(adjust.AdjustDevice(
            path=_abs_path(d, "device path"), type=devices[d].type, major=devices[d].major, minor=devices[d].minor,
            file_mode=devices[d].file_mode.value if devices[d].HasField("file_mode") else None,
            uid=devices[d].uid.value if devices[d].HasField("uid") else None,
            gid=devices[d].gid.value if devices[d].HasField("gid") else None) for d in dev_add),
        remove_devices=tuple(_abs_path(d, "device path") for d in dev_remove),
        rlimits=tuple(rlimits),
        resources=resources_to_oci(lin.resources) if lin.HasField("resources") else {},
        cgroups_path=lin.cgroups_path or None,
        oom_score_adj=lin.oom_score_adj.value if lin.HasField("oom_score_adj") else None,
        sysctl={_text(k, "sysctl name"): v for k, v in lin.sysctl.items()},
        **extra_kinds(a),
    )


def unsupported(a: nri.ContainerAdjustment) -> list[str]:
    """Adjustments moorage does not apply (refused rather than dropped silently): a block I/O
    class needs a class configuration (containerd's blockio config file), which moorage has not."""
    return ["linux.resources.blockio_class"] if a.linux.resources.HasField("blockio_class") else []


#: the Linux namespace types an adjustment may set or remove (OCI names)
NAMESPACE_TYPES = frozenset({"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"})


def _namespaces(lin: nri.LinuxContainerAdjustment) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    add: list[tuple[str, str]] = []
    remove: list[str] = []
    for ns in lin.namespaces:
        kind = ns.type[len(REMOVAL_MARK):] if ns.type.startswith(REMOVAL_MARK) else ns.type
        if kind not in NAMESPACE_TYPES:
            raise InvalidArgument(f"NRI adjustment: namespace type {clean_text(ns.type, 40)!r} is not one of "
                                  f"{', '.join(sorted(NAMESPACE_TYPES))}")
        if ns.type.startswith(REMOVAL_MARK):
            remove.append(kind)
        else:
            add.append((kind, _abs_path(ns.path, "namespace path") if ns.path else ""))
    return tuple(add), tuple(remove)


def _seccomp(sp: nri.LinuxSeccomp) -> dict[str, Any]:
    """NRI's LinuxSeccomp as OCI ``linux.seccomp`` (the whole policy, as containerd sets it)."""
    def action(v: str, what: str) -> str:
        if not _text(v, what).startswith("SCMP_ACT_"):
            raise InvalidArgument(f"NRI adjustment: {what} {clean_text(v, 40)!r} is not SCMP_ACT_*")
        return v
    out: dict[str, Any] = {"defaultAction": action(sp.default_action, "seccomp default action")}
    if sp.HasField("default_errno"):
        out["defaultErrnoRet"] = sp.default_errno.value
    if sp.architectures:
        out["architectures"] = [_text(x, "seccomp architecture") for x in sp.architectures]
    if sp.flags:
        out["flags"] = [_text(x, "seccomp flag") for x in sp.flags]
    if sp.listener_path:
        out["listenerPath"] = _abs_path(sp.listener_path, "seccomp listener path")
    if sp.listener_metadata:
        out["listenerMetadata"] = _text(sp.listener_metadata, "seccomp listener metadata")
    calls = []
    for sc in sp.syscalls:
        c: dict[str, Any] = {"names": [_text(n, "seccomp syscall name") for n in sc.names],
                             "action": action(sc.action, "seccomp syscall action")}
        if not sc.names:
            raise InvalidArgument("NRI adjustment: a seccomp syscall rule names no syscall")
        if sc.HasField("errno_ret"):
            c["errnoRet"] = sc.errno_ret.value
        if sc.args:
            c["args"] = [{"index": x.index, "value": x.value, "valueTwo": x.value_two,
                          "op": _text(x.op, "seccomp argument op")} for x in sc.args]
        calls.append(c)
    if calls:
        out["syscalls"] = calls
    return out


def _enum_name(enum: Any, value: int, what: str, none: str | None = None) -> str:
    """The OCI spelling of an NRI enum value (the same identifiers); the unset value is refused."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        raise InvalidArgument(f"NRI adjustment: {what} {value} is not a known value") from None
    if name == none:
        raise InvalidArgument(f"NRI adjustment: {what} is {name}; name one")
    return name


def _scheduler(s: nri.LinuxScheduler) -> dict[str, Any]:
    out: dict[str, Any] = {"policy": _enum_name(nri.LinuxSchedulerPolicy, s.policy, "scheduler policy", "SCHED_NONE")}
    for key, val in (("nice", s.nice), ("priority", s.priority), ("runtime", s.runtime),
                     ("deadline", s.deadline), ("period", s.period)):
        if val:
            out[key] = val
    if s.flags:
        out["flags"] = [_enum_name(nri.LinuxSchedulerFlag, f, "scheduler flag") for f in s.flags]
    return out


def _io_priority(p: nri.LinuxIOPriority) -> dict[str, Any]:
    return {"class": _enum_name(nri.IOPrioClass, getattr(p, "class"), "I/O priority class",
                                "IOPRIO_CLASS_NONE"), "priority": p.priority}


def _memory_policy(m: nri.LinuxMemoryPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": _enum_name(nri.MpolMode, m.mode, "memory policy mode")}
    if m.nodes:
        out["nodes"] = _text(m.nodes, "memory policy nodes")
    if m.flags:
        out["flags"] = [_enum_name(nri.MpolFlag, f, "memory policy flag") for f in m.flags]
    return out


def _intel_rdt(lin: nri.LinuxContainerAdjustment) -> dict[str, Any] | None:
    """``linux.intelRdt`` keys from ``rdt`` and ``resources.rdt_class`` (the class is the CLOS id)."""
    out: dict[str, Any] = {}
    if lin.resources.HasField("rdt_class"):
        out["closID"] = _text(lin.resources.rdt_class.value, "RDT class")
    r = lin.rdt
    if lin.HasField("rdt"):
        if r.HasField("clos_id"):
            out["closID"] = _text(r.clos_id.value, "RDT CLOS id")
        if r.HasField("schemata"):
            out["schemata"] = [_text(x, "RDT schemata line") for x in r.schemata.value]
        if r.HasField("enable_monitoring"):
            out["enableMonitoring"] = r.enable_monitoring.value
    # the CLOS id names a directory under /sys/fs/resctrl: it must stay one name there
    if out.get("closID") in (".", ".."):
        raise InvalidArgument(f"NRI adjustment: RDT value {out['closID']!r} is not a class name")
    for v in (out.get("closID", ""), *out.get("schemata", ())):
        if "/" in v or "\n" in v:
            raise InvalidArgument(f"NRI adjustment: RDT value {clean_text(v, 80)!r} has a '/' or a newline")
    return out or None


def extra_kinds(a: nri.ContainerAdjustment) -> dict[str, Any]:
    """The adjustment's CDI devices, namespaces, seccomp, scheduler, I/O priority, RDT, memory policy and
    net devices, as ``adjust.ContainerAdjustment`` keyword arguments (checked)."""
    lin = a.linux
    ns_add, ns_remove = _namespaces(lin)
    nd_add, nd_remove = _split_removals(lin.net_devices)
    for d in (*nd_add, *nd_remove):
        _ifname(d, "net device host name")
    return dict(
        cdi_devices=tuple(dict.fromkeys(_text(d.name, "CDI device name") for d in a.CDI_devices)),
        namespaces=ns_add, remove_namespaces=ns_remove,
        seccomp=_seccomp(lin.seccomp_policy) if lin.HasField("seccomp_policy") else None,
        scheduler=_scheduler(lin.scheduler) if lin.HasField("scheduler") else None,
        io_priority=_io_priority(lin.io_priority) if lin.HasField("io_priority") else None,
        memory_policy=_memory_policy(lin.memory_policy) if lin.HasField("memory_policy") else None,
        intel_rdt=_intel_rdt(lin), remove_intel_rdt=lin.HasField("rdt") and lin.rdt.remove,
        net_devices={d: _ifname(lin.net_devices[d].name or d, "net device name") for d in nd_add},
        remove_net_devices=tuple(nd_remove),
    )


def _ifname(name: str, what: str) -> str:
    """A network interface name as the kernel takes it: 1-15 bytes, no '/', ':' or space."""
    if not name or len(name.encode()) > 15 or any(c in name for c in "/: \t\n\0") or name in (".", ".."):
        raise InvalidArgument(f"NRI adjustment: {what} {clean_text(name, 40)!r} is not a valid interface name")
    return name
