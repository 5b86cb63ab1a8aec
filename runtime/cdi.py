"""CDI, the Container Device Interface: device specs → container edits for the OCI spec.

A device vendor describes its devices in spec files (JSON or YAML) under the CDI spec
directories; a container asks for devices by fully-qualified name,
``vendor.com/class=name``, through ``ContainerConfig.CDI_devices`` or ``cdi.k8s.io/<key>``
annotations (comma-separated names).  This module is the core: parse and validate spec
files (CDI spec 1.1.0 and older), index their devices (a spec directory later in the list
overrides an earlier one for the same device; two files of one directory defining the same
device conflict and neither is used), resolve requested names and merge their edits,
refusing edits that contradict each other.  Applying the merged edits to the OCI spec is
the spec builder's job (runtime/spec.py, ``build_container_spec(cdi=...)``), which alone
asks the host about device nodes.  ``SpecDirs`` is the only part that reads the disk: it
re-reads the directories when a cheap stat of them says something changed.

Errors: a malformed name or annotation, and edits of the requested devices that conflict,
are INVALID_ARGUMENT (the request is wrong whatever this node has).  An unknown device is
FAILED_PRECONDITION: the name may be right and this node simply lacks the spec (a driver
not installed yet), so the same request can succeed later here or on another node.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from moorage.core.errors import FailedPrecondition, InvalidArgument

ANNOTATION_PREFIX = "cdi.k8s.io/"
SPEC_EXTENSIONS = (".json", ".yaml")
DEFAULT_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")

#: Spec versions this parser knows, oldest first (the CDI spec's released versions).
KNOWN_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0")
CURRENT_VERSION = KNOWN_VERSIONS[-1]

#: OCI hook lists a CDI hook may name (runtime-spec ``hooks``).
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
DEVICE_TYPES = ("c", "b", "u", "p")

_SEGMENT = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?$")
_ENV = re.compile(r"^[^=\x00]+=[^\x00]*$")


# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceNode:
    """A ``deviceNodes`` entry; unset numbers come from the host node when applied."""

    path: str
    host_path: str = ""  # empty: ``path``
    type: str = ""  # c, b, u or p; empty: the host node's
    major: int | None = None
    minor: int | None = None
    file_mode: int | None = None
    permissions: str = ""  # cgroup access; empty: rwm; "none": no access rule
    uid: int | None = None
    gid: int | None = None
    #: Where it came from, for messages: ``vendor.com/class=name (/etc/cdi/x.yaml)``.
    origin: str = ""

    @property
    def source(self) -> str:
        return self.host_path or self.path


@dataclass(frozen=True)
class CdiMount:
    host_path: str
    container_path: str
    type: str = ""
    options: tuple[str, ...] = ()
    origin: str = ""


@dataclass(frozen=True)
class Hook:
    hook_name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None
    origin: str = ""


@dataclass(frozen=True)
class NetDevice:
    host_interface_name: str
    name: str
    origin: str = ""


@dataclass(frozen=True)
class ContainerEdits:
    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[CdiMount, ...] = ()
    hooks: tuple[Hook, ...] = ()
    additional_gids: tuple[int, ...] = ()
    net_devices: tuple[NetDevice, ...] = ()
    #: Origins of the ``intelRdt`` edits met (moorage does not apply them: see spec.py).
    intel_rdt: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not any((self.env, self.device_nodes, self.mounts, self.hooks, self.additional_gids,
                        self.net_devices, self.intel_rdt))


@dataclass(frozen=True)
class Device:
    name: str
    edits: ContainerEdits = ContainerEdits()
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    """One spec file: a vendor's device class and its devices."""

    path: str
    version: str
    kind: str  # vendor.com/class
    devices: tuple[Device, ...]
    edits: ContainerEdits = ContainerEdits()
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: The index of its directory in the configured list: a higher one wins.
    priority: int = 0

    @property
    def vendor(self) -> str:
        return self.kind.split("/", 1)[0]

    @property
    def device_class(self) -> str:
        return self.kind.split("/", 1)[1]

    def qualified(self, device: str) -> str:
        return f"{self.kind}={device}"


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


# --- names ----------------------------------------------------------------------------------------


def parse_qualified_name(name: str) -> tuple[str, str, str]:
    """``vendor.com/class=name`` → (vendor, class, name); ValueError saying what is wrong."""
    kind, sep, dev = name.partition("=")
    vendor, slash, cls = kind.partition("/")
    if not sep or not slash:
        raise ValueError(f"{name!r} is not a fully-qualified CDI device name (vendor.com/class=name)")
    _check_kind(vendor, cls)
    if not _DEVICE_NAME.match(dev):
        raise ValueError(f"invalid device name {dev!r} in {name!r}: letters, digits and - _ . : between "
                         "an alphanumeric first and last character")
    return vendor, cls, dev


def _check_kind(vendor: str, cls: str) -> None:
    kind = f"{vendor}/{cls}"
    if not vendor or len(vendor) > 253 or not all(_SEGMENT.match(label) for label in vendor.split(".")):
        raise ValueError(f"invalid vendor {vendor!r} in {kind!r}: a DNS subdomain such as vendor.com")
    if not cls or len(cls) > 63 or not _SEGMENT.match(cls):
        raise ValueError(f"invalid class {cls!r} in {kind!r}: at most 63 letters, digits and - _ . between "
                         "an alphanumeric first and last character")


def requested_devices(cdi_devices: Iterable[str], annotations: Mapping[str, str]) -> list[str]:
    """The CDI devices a container asks for: ``CDI_devices`` first, then the ``cdi.k8s.io/``
    annotations (by key; each value is a comma-separated list of names); once each, in order."""
    out: list[str] = []
    for name in cdi_devices:
        try:
            parse_qualified_name(name)
        except ValueError as e:
            raise InvalidArgument(f"CDI_devices: {e}") from None
        out.append(name)
    for key in sorted(k for k in annotations if k.startswith(ANNOTATION_PREFIX)):
        for name in annotations[key].split(","):
            try:
                parse_qualified_name(name.strip())
            except ValueError as e:
                raise InvalidArgument(f"annotation {key}: {e}") from None
            out.append(name.strip())
    return list(dict.fromkeys(out))


# --- parsing and validation ------------------------------------------------------------------------


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


class _Reader:
    """Walks one decoded spec document, checking types and keys, and notes the newest spec
    version the fields it met need (the spec requires loading to fail below that)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.needs = "0.3.0"
        self.why = ""

    def fail(self, where: str, message: str) -> SpecError:
        return SpecError(self.path, f"{where}: {message}" if where else message)

    def need(self, version: str, why: str) -> None:
        if _version_key(version) > _version_key(self.needs):
            self.needs, self.why = version, why

    def obj(self, v: Any, where: str, keys: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(where, f"must be an object, got {_kind_of(v)}")
        unknown = [k for k in v if k not in keys]
        if unknown:
            raise self.fail(where, f"unknown field {unknown[0]!r} (known: {', '.join(keys)})")
        for k in required:
            if v.get(k) in (None, ""):
                raise self.fail(where, f"{k!r} is required")
        return v

    def string(self, v: Any, where: str) -> str:
        if v is None:
            return ""
        if not isinstance(v, str):
            raise self.fail(where, f"must be a string, got {_kind_of(v)}")
        return v

    def strings(self, v: Any, where: str) -> tuple[str, ...]:
        if v is None:
            return ()
        if not isinstance(v, list):
            raise self.fail(where, f"must be a list of strings, got {_kind_of(v)}")
        return tuple(self.string(x, f"{where}[{i}]") for i, x in enumerate(v))

    def integer(self, v: Any, where: str, lo: int, hi: int) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(where, f"must be an integer, got {_kind_of(v)}")
        if not lo <= v <= hi:
            raise self.fail(where, f"{v} is out of range {lo}..{hi}")
        return v

    def annotations(self, v: Any, where: str) -> dict[str, str]:
        if v is None:
            return {}
        self.need("0.6.0", "annotations")
        if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise self.fail(where, "must be an object of string values")
        return dict(v)

    def env(self, v: Any, where: str) -> tuple[str, ...]:
        out = self.strings(v, where)
        for i, e in enumerate(out):
            if not _ENV.match(e):
                raise self.fail(f"{where}[{i}]", f"{e!r} is not NAME=value")
        return out

    def abs_path(self, v: Any, where: str) -> str:
        p = self.string(v, where)
        if not p.startswith("/"):
            raise self.fail(where, f"{p!r} must be an absolute path")
        return p

    def edits(self, v: Any, where: str) -> ContainerEdits:
        if v is None:
            return ContainerEdits()
        e = self.obj(v, where, ("env", "deviceNodes", "mounts", "hooks", "intelRdt", "additionalGids", "netDevices"))
        nodes = tuple(self.device_node(x, f"{where}.deviceNodes[{i}]") for i, x in enumerate(self.list(e, "deviceNodes", where)))
        mounts = tuple(self.mount(x, f"{where}.mounts[{i}]") for i, x in enumerate(self.list(e, "mounts", where)))
        hooks = tuple(self.hook(x, f"{where}.hooks[{i}]") for i, x in enumerate(self.list(e, "hooks", where)))
        gids: list[int] = []
        for i, g in enumerate(self.list(e, "additionalGids", where)):
            self.need("0.7.0", "additionalGids")
            gid = self.integer(g, f"{where}.additionalGids[{i}]", 0, 0xFFFFFFFF)
            if gid:  # 0 is ignored, as the spec says
                gids.append(gid)
        nets = tuple(self.net_device(x, f"{where}.netDevices[{i}]") for i, x in enumerate(self.list(e, "netDevices", where)))
        rdt: tuple[str, ...] = ()
        if e.get("intelRdt") is not None:
            self.need("0.7.0", "intelRdt")
            r = self.obj(e["intelRdt"], f"{where}.intelRdt",
                         ("closID", "l3CacheSchema", "memBwSchema", "schemata", "enableMonitoring",
                          "enableCMT", "enableMBM"))
            if "schemata" in r or "enableMonitoring" in r:
                self.need("1.1.0", "intelRdt.schemata/enableMonitoring")
            rdt = ("",)
        return ContainerEdits(env=self.env(e.get("env"), f"{where}.env"), device_nodes=nodes, mounts=mounts,
                              hooks=hooks, additional_gids=tuple(gids), net_devices=nets, intel_rdt=rdt)

    def list(self, obj: dict[str, Any], key: str, where: str) -> list[Any]:
        v = obj.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.fail(f"{where}.{key}", f"must be a list, got {_kind_of(v)}")
        return v

    def device_node(self, v: Any, where: str) -> DeviceNode:
        d = self.obj(v, where, ("path", "hostPath", "type", "major", "minor", "fileMode", "permissions", "uid", "gid"),
                     ("path",))
        if d.get("hostPath"):
            self.need("0.5.0", "deviceNodes hostPath")
        typ = self.string(d.get("type"), f"{where}.type")
        if typ and typ not in DEVICE_TYPES:
            raise self.fail(f"{where}.type", f"{typ!r} is not one of {', '.join(DEVICE_TYPES)}")
        perms = self.string(d.get("permissions"), f"{where}.permissions")
        if perms and perms != "none" and (not set(perms) <= set("rwm") or len(set(perms)) != len(perms)):
            raise self.fail(f"{where}.permissions", f"{perms!r} must be a combination of r, w and m (or none)")
        major = self.integer(d.get("major"), f"{where}.major", 0, 0xFFFFFFFF) or 0
        minor = self.integer(d.get("minor"), f"{where}.minor", 0, 0xFFFFFFFF) or 0
        # Go's zero values: 0:0 and omitted numbers mean the same, "take the host node's".
        given = bool(major or minor)
        return DeviceNode(
            path=self.abs_path(d["path"], f"{where}.path"),
            host_path=self.abs_path(d["hostPath"], f"{where}.hostPath") if d.get("hostPath") else "",
            type=typ,
            major=major if given else None, minor=minor if given else None,
            file_mode=self.integer(d.get("fileMode"), f"{where}.fileMode", 0, 0o7777),
            permissions=perms,
            uid=self.integer(d.get("uid"), f"{where}.uid", 0, 0xFFFFFFFF),
            gid=self.integer(d.get("gid"), f"{where}.gid", 0, 0xFFFFFFFF),
        )

    def mount(self, v: Any, where: str) -> CdiMount:
        m = self.obj(v, where, ("hostPath", "containerPath", "type", "options"), ("hostPath", "containerPath"))
        if m.get("type"):
            self.need("0.4.0", "mounts type")
        return CdiMount(host_path=self.string(m["hostPath"], f"{where}.hostPath"),
                        container_path=self.abs_path(m["containerPath"], f"{where}.containerPath"),
                        type=self.string(m.get("type"), f"{where}.type"),
                        options=self.strings(m.get("options"), f"{where}.options"))

    def hook(self, v: Any, where: str) -> Hook:
        h = self.obj(v, where, ("hookName", "path", "args", "env", "timeout"), ("hookName", "path"))
        name = self.string(h["hookName"], f"{where}.hookName")
        if name not in HOOK_NAMES:
            raise self.fail(f"{where}.hookName", f"{name!r} is not one of {', '.join(HOOK_NAMES)}")
        timeout = self.integer(h.get("timeout"), f"{where}.timeout", 1, 2**31 - 1)
        return Hook(hook_name=name, path=self.abs_path(h["path"], f"{where}.path"),
                    args=self.strings(h.get("args"), f"{where}.args"), env=self.env(h.get("env"), f"{where}.env"),
                    timeout=timeout)

    def net_device(self, v: Any, where: str) -> NetDevice:
        self.need("1.1.0", "netDevices")
        n = self.obj(v, where, ("hostInterfaceName", "name"), ("hostInterfaceName", "name"))
        return NetDevice(host_interface_name=self.string(n["hostInterfaceName"], f"{where}.hostInterfaceName"),
                         name=self.string(n["name"], f"{where}.name"))


def _kind_of(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def decode(text: str | bytes, path: str) -> Any:
    """The document of a spec file: JSON for ``.json``, YAML (a superset) otherwise."""
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise SpecError(path, f"not valid JSON: {e}") from None
    import yaml  # only when a YAML spec file exists: most nodes have none, or JSON ones

    try:
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SpecError(path, f"not valid YAML: {e}") from None


def parse_spec(text: str | bytes, path: str, priority: int = 0) -> Spec:
    """Parse and validate one spec file's content; SpecError naming the file and field."""
    return spec_from_document(decode(text, path), path, priority)


def spec_from_document(doc: Any, path: str, priority: int = 0) -> Spec:
    r = _Reader(path)
    d = r.obj(doc, "", ("cdiVersion", "kind", "annotations", "devices", "containerEdits"),
              ("cdiVersion", "kind", "devices"))
    version = r.string(d["cdiVersion"], "cdiVersion").removeprefix("v")
    if version not in KNOWN_VERSIONS:
        raise r.fail("cdiVersion", f"unknown version {version!r}; moorage reads {KNOWN_VERSIONS[0]}..{CURRENT_VERSION}")
    kind = r.string(d["kind"], "kind")
    vendor, slash, cls = kind.partition("/")
    if not slash:
        raise r.fail("kind", f"{kind!r} must be vendor.com/class")
    try:
        _check_kind(vendor, cls)
    except ValueError as e:
        raise r.fail("kind", str(e)) from None
    if "." in cls:
        r.need("0.6.0", "a dot in the kind's class")
    annotations = r.annotations(d.get("annotations"), "annotations")
    edits = r.edits(d.get("containerEdits"), "containerEdits")
    raw = r.list(d, "devices", "")
    if not raw:
        raise r.fail("devices", "must list at least one device")
    devices: list[Device] = []
    seen: set[str] = set()
    for i, x in enumerate(raw):
        where = f"devices[{i}]"
        dv = r.obj(x, where, ("name", "annotations", "containerEdits"), ("name",))
        name = r.string(dv["name"], f"{where}.name")
        if not _DEVICE_NAME.match(name):
            raise r.fail(f"{where}.name", f"invalid device name {name!r}: letters, digits and - _ . : between an "
                                          "alphanumeric first and last character")
        if name[0].isdigit():
            r.need("0.5.0", "a device name starting with a digit")
        if name in seen:
            raise r.fail(f"{where}.name", f"device {name!r} is defined twice")
        seen.add(name)
        origin = f"{kind}={name} ({path})"
        devices.append(Device(name=name, edits=_with_origin(r.edits(dv.get("containerEdits"), f"{where}.containerEdits"),
                                                             origin),
                              annotations=r.annotations(dv.get("annotations"), f"{where}.annotations")))
    if _version_key(version) < _version_key(r.needs):
        raise r.fail("cdiVersion", f"{version} is too old for the fields used: {r.why} needs at least {r.needs}")
    return Spec(path=path, version=version, kind=kind, devices=tuple(devices),
                edits=_with_origin(edits, f"{kind} ({path})"), annotations=annotations, priority=priority)


def _with_origin(e: ContainerEdits, origin: str) -> ContainerEdits:
    return replace(
        e,
        device_nodes=tuple(replace(x, origin=origin) for x in e.device_nodes),
        mounts=tuple(replace(x, origin=origin) for x in e.mounts),
        hooks=tuple(replace(x, origin=origin) for x in e.hooks),
        net_devices=tuple(replace(x, origin=origin) for x in e.net_devices),
        intel_rdt=tuple(origin for _ in e.intel_rdt),
    )


# --- the registry: every device of every spec -------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    """The devices of the spec directories, after precedence; what failed to load, and why."""

    dirs: tuple[str, ...] = ()
    specs: tuple[Spec, ...] = ()
    #: qualified name → (spec, device) that wins.
    devices: Mapping[str, tuple[Spec, Device]] = field(default_factory=dict)
    #: qualified name → the spec files (of one directory) that all define it: unusable.
    conflicts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: spec file → why it was not loaded.
    errors: Mapping[str, str] = field(default_factory=dict)


def build_registry(dirs: Sequence[str], loaded: Iterable[Spec | SpecError]) -> Registry:
    """Index loaded specs: a higher priority (later directory) overrides a lower one for the same
    device; two definitions at the same priority conflict and the device is left out."""
    specs: list[Spec] = []
    errors: dict[str, str] = {}
    devices: dict[str, tuple[Spec, Device]] = {}
    conflicts: dict[str, list[str]] = {}
    for item in loaded:
        if isinstance(item, SpecError):
            errors[item.path] = item.message
            continue
        specs.append(item)
        for dev in item.devices:
            q = item.qualified(dev.name)
            old = devices.get(q)
            if q in conflicts:
                if item.priority == devices[q][0].priority:
                    conflicts[q].append(item.path)
                    continue
                if item.priority < devices[q][0].priority:
                    continue
                del conflicts[q]
            elif old is not None:
                if item.priority < old[0].priority:
                    continue
                if item.priority == old[0].priority:
                    conflicts[q] = [old[0].path, item.path]
                    continue
            devices[q] = (item, dev)
    for q in conflicts:
        del devices[q]
    return Registry(dirs=tuple(dirs), specs=tuple(specs), devices=devices,
                    conflicts={q: tuple(p) for q, p in conflicts.items()}, errors=errors)


# --- resolving a request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Injection:
    """What a container's CDI request comes to: the devices, and their merged edits."""

    devices: tuple[str, ...] = ()
    #: The spec file of each device, for messages.
    spec_files: Mapping[str, str] = field(default_factory=dict)
    edits: ContainerEdits = ContainerEdits()


def resolve(registry: Registry, names: Sequence[str]) -> Injection:
    """The merged edits of ``names``: each device's own, and its spec's common edits once per spec.

    FAILED_PRECONDITION for a device no spec defines (naming the directories and any spec file of
    that kind or that failed to load); INVALID_ARGUMENT for a device two spec files conflict on,
    or for edits that contradict each other (naming both devices and their files).
    """
    if not names:
        return Injection()
    merged = _Merger()
    used_specs: set[str] = set()
    files: dict[str, str] = {}
    for name in names:
        hit = registry.devices.get(name)
        if hit is None:
            raise _unknown(registry, name)
        spec, dev = hit
        files[name] = spec.path
        if spec.path not in used_specs:
            used_specs.add(spec.path)
            merged.add(spec.edits, f"{spec.kind} ({spec.path})")
        merged.add(dev.edits, f"{name} ({spec.path})")
    return Injection(devices=tuple(names), spec_files=files, edits=merged.result())


def _unknown(registry: Registry, name: str) -> Exception:
    if name in registry.conflicts:
        files = registry.conflicts[name]
        return InvalidArgument(f"CDI device {name!r} is defined by more than one spec file of the same directory "
                               f"({', '.join(files)}); remove all but one")
    try:
        vendor, cls, _dev = parse_qualified_name(name)
    except ValueError as e:
        return InvalidArgument(str(e))
    kind = f"{vendor}/{cls}"
    same_kind = [s for s in registry.specs if s.kind == kind]
    where = ", ".join(registry.dirs) or "(no spec directories)"
    msg = f"unknown CDI device {name!r}: no spec file in {where} defines it"
    if same_kind:
        known = sorted({s.qualified(d.name) for s in same_kind for d in s.devices})
        msg += (f"; {kind} is defined by {', '.join(sorted({s.path for s in same_kind}))} with devices "
                f"{', '.join(known[:10])}{' ...' if len(known) > 10 else ''}")
    if registry.errors:
        bad = sorted(registry.errors.items())
        msg += "; spec files that failed to load: " + "; ".join(f"{p}: {m}" for p, m in bad[:3])
        if len(bad) > 3:
            msg += f" (and {len(bad) - 3} more)"
    return FailedPrecondition(msg)


class _Merger:
    """Accumulates edits; the same edit twice is kept once, two that disagree are a conflict."""

    def __init__(self) -> None:
        self.env: dict[str, tuple[str, str]] = {}  # name -> (entry, origin)
        self.nodes: dict[str, DeviceNode] = {}
        self.mounts: dict[str, CdiMount] = {}
        self.hooks: list[Hook] = []
        self.gids: list[int] = []
        self.nets: dict[str, NetDevice] = {}
        self.rdt: list[str] = []

    def add(self, e: ContainerEdits, origin: str) -> None:
        for entry in e.env:
            key = entry.split("=", 1)[0]
            old = self.env.get(key)
            if old is not None and old[0] != entry:
                raise _conflict(f"environment variable {key}", old[1], origin, f"{old[0]!r} and {entry!r}")
            if old is None:
                self.env[key] = (entry, origin)
        for n in e.device_nodes:
            prev = self.nodes.get(n.path)
            if prev is not None and _node_identity(prev) != _node_identity(n):
                raise _conflict(f"device node {n.path}", prev.origin, n.origin,
                                f"{_describe_node(prev)} and {_describe_node(n)}")
            self.nodes.setdefault(n.path, n)
        for m in e.mounts:
            prev_m = self.mounts.get(m.container_path)
            if prev_m is not None and (prev_m.host_path, prev_m.type, prev_m.options) != (m.host_path, m.type, m.options):
                raise _conflict(f"mount at {m.container_path}", prev_m.origin, m.origin,
                                f"{prev_m.host_path} and {m.host_path}" if prev_m.host_path != m.host_path
                                else "different types or options")
            self.mounts.setdefault(m.container_path, m)
        for h in e.hooks:
            if not any(_hook_identity(h) == _hook_identity(x) for x in self.hooks):
                self.hooks.append(h)
        for g in e.additional_gids:
            if g not in self.gids:
                self.gids.append(g)
        for nd in e.net_devices:
            for key, val in ((f"host:{nd.host_interface_name}", nd), (f"name:{nd.name}", nd)):
                prev_n = self.nets.get(key)
                if prev_n is not None and (prev_n.host_interface_name, prev_n.name) != (nd.host_interface_name, nd.name):
                    raise _conflict(f"network device {key.split(':', 1)[1]}", prev_n.origin, nd.origin,
                                    f"{prev_n.host_interface_name}→{prev_n.name} and {nd.host_interface_name}→{nd.name}")
                self.nets.setdefault(key, val)
        self.rdt.extend(e.intel_rdt)

    def result(self) -> ContainerEdits:
        nets = list(dict.fromkeys(n for k, n in self.nets.items() if k.startswith("host:")))
        return ContainerEdits(env=tuple(v[0] for v in self.env.values()), device_nodes=tuple(self.nodes.values()),
                              mounts=tuple(self.mounts.values()), hooks=tuple(self.hooks),
                              additional_gids=tuple(self.gids), net_devices=tuple(nets), intel_rdt=tuple(self.rdt))


def _node_identity(n: DeviceNode) -> tuple[object, ...]:
    return (n.source, n.type, n.major, n.minor)


def _hook_identity(h: Hook) -> tuple[object, ...]:
    return (h.hook_name, h.path, h.args, h.env, h.timeout)


def _describe_node(n: DeviceNode) -> str:
    nums = f" {n.major}:{n.minor}" if n.major is not None else ""
    return f"{n.source}{nums}"


def _conflict(what: str, a: str, b: str, detail: str) -> InvalidArgument:
    return InvalidArgument(f"conflicting CDI edits for {what}: {a} and {b} disagree ({detail})")


# --- the spec directories on disk ------------------------------------------------------------------


def _dir_stamp(dirs: Sequence[str]) -> tuple[object, ...]:
    """What changes when a spec file is added, removed, replaced or rewritten: a cheap stat of each
    directory and of its spec files."""
    out: list[object] = []
    for d in dirs:
        try:
            st = os.stat(d)
            names = sorted(n for n in os.listdir(d) if n.endswith(SPEC_EXTENSIONS))
        except OSError:
            out.append((d, None))
            continue
        files = []
        for n in names:
            try:
                fst = os.stat(os.path.join(d, n))
            except OSError:
                continue
            files.append((n, fst.st_mtime_ns, fst.st_size, fst.st_ino))
        out.append((d, st.st_mtime_ns, tuple(files)))
    return tuple(out)


def load_dirs(dirs: Sequence[str]) -> Registry:
    """Read every spec file (``*.json``, ``*.yaml``, not recursing) of ``dirs``; a missing directory
    has no specs, a file that fails to load is recorded, the others still count."""

    def each() -> Iterable[Spec | SpecError]:
        for prio, d in enumerate(dirs):
            try:
                names = sorted(n for n in os.listdir(d) if n.endswith(SPEC_EXTENSIONS))
            except FileNotFoundError:
                continue
            except OSError as e:
                yield SpecError(d, f"cannot list the directory: {e.strerror or e}")
                continue
            for n in names:
                path = os.path.join(d, n)
                if not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        text = f.read()
                except OSError as e:
                    yield SpecError(path, f"cannot read: {e.strerror or e}")
                    continue
                try:
                    yield parse_spec(text, path, prio)
                except SpecError as e:
                    yield e

    return build_registry(dirs, each())


class SpecDirs:
    """The spec directories, re-read when they change (checked on each ``registry()`` call by a
    stat of the directories and files, cheap next to creating a container)."""

    def __init__(self, dirs: Sequence[str]) -> None:
        self.dirs = tuple(dirs)
        self._stamp: tuple[object, ...] | None = None
        self._registry = Registry(dirs=self.dirs)

    def registry(self) -> Registry:
        stamp = _dir_stamp(self.dirs)
        if stamp != self._stamp:
            self._registry = load_dirs(self.dirs)
            self._stamp = stamp
        return self._registry
