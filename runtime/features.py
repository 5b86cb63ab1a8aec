"""What this node can really do, per runtime handler: the features ``Status`` advertises.

The kubelet only uses a feature the runtime advertises (``RuntimeHandlerFeatures``
per handler, ``RuntimeFeatures`` for the runtime), and trusts what it is told, so
each feature here is computed from three facts and advertised only when all hold:

* the OCI runtime binary says it can (``<binary> features``: its JSON lists the
  mount options it knows, e.g. ``rro``, the namespaces, idmap mount support);
* the kernel can (``rro`` needs ``mount_setattr(2)`` with ``AT_RECURSIVE``: 5.12;
  ``user_namespaces`` needs an idmapped mount of the filesystem holding the image
  layers, tried once on that directory);
* moorage implements it end to end.  For ``user_namespaces`` moorage makes the
  idmapped rootfs itself (moorage/core/idmap.py), so the runtime only has to know
  the user namespace; its own idmap mount support is not needed.

A feature is ``available``, ``unavailable`` (with why) or ``disabled`` (by
``runtime.disabled_features``).  Probing runs each handler binary once; the
result is cached for the daemon's life (the kubelet calls Status every few
seconds), so a runtime upgrade is seen after a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from moorage.core import idmap as idmapmod

log = logging.getLogger("moorage.features")

#: The kernel release that added mount_setattr(2), which recursive read-only mounts need.
RRO_KERNEL = (5, 12)

# Feature names, as the CRI spells the fields (and ``runtime.disabled_features`` takes them).
RECURSIVE_READ_ONLY_MOUNTS = "recursive_read_only_mounts"
USER_NAMESPACES = "user_namespaces"
SUPPLEMENTAL_GROUPS_POLICY = "supplemental_groups_policy"
MOUNT_OPTIONS = "mount_options"
USER_NAMESPACES_HOST_NETWORK = "user_namespaces_host_network"
HANDLER_FEATURES = (RECURSIVE_READ_ONLY_MOUNTS, USER_NAMESPACES)
RUNTIME_FEATURES = (SUPPLEMENTAL_GROUPS_POLICY, MOUNT_OPTIONS, USER_NAMESPACES_HOST_NETWORK)
ALL_FEATURES = HANDLER_FEATURES + RUNTIME_FEATURES

_NO_USERNS_HOST_NETWORK = ("not supported: a user-namespaced pod on the host network cannot mount a sysfs "
                           "(the host's user namespace owns that network namespace); moorage would only "
                           "bind the host's /sys read-only, and no test runs that")


class State(StrEnum):
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Feature:
    name: str
    state: State
    why: str = ""

    @property
    def advertised(self) -> bool:
        return self.state == State.AVAILABLE

    def describe(self) -> str:
        return f"{self.state.value} ({self.why})" if self.why else self.state.value


@dataclass(frozen=True)
class BinaryFeatures:
    """What ``<runtime> features`` said (``error`` set when it could not be asked)."""

    path: str
    error: str = ""
    mount_options: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()
    idmap_mounts: bool = False
    version: str = ""

    @classmethod
    def parse(cls, path: str, text: str) -> BinaryFeatures:
        try:
            doc = json.loads(text)
        except ValueError as e:
            return cls(path, error=f"`{path} features` printed no JSON: {e}")
        if not isinstance(doc, dict):
            return cls(path, error=f"`{path} features` printed no JSON object")
        linux = _obj(doc, "linux")
        idmap = _obj(_obj(linux, "mountExtensions"), "idmap")
        ann = _obj(doc, "annotations")
        version = next((str(v) for k, v in ann.items() if k.endswith(".version") and "seccomp" not in k), "")
        return cls(path, mount_options=frozenset(str(o) for o in doc.get("mountOptions") or ()),
                   namespaces=frozenset(str(n) for n in linux.get("namespaces") or ()),
                   idmap_mounts=bool(idmap.get("enabled")), version=version)


def _obj(doc: dict[str, Any], key: str) -> dict[str, Any]:
    v = doc.get(key)
    return v if isinstance(v, dict) else {}


def run_features(path: str, timeout: float = 10.0) -> BinaryFeatures:
    """Ask the runtime binary at ``path`` what it supports (``runc features``; crun >= 1.10 too)."""
    try:
        p = subprocess.run([path, "features"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return BinaryFeatures(path, error=f"cannot run `{path} features`: {e}")
    if p.returncode != 0:
        said = (p.stderr or p.stdout).strip().splitlines()
        error = (f"`{path} features` failed ({said[-1] if said else f'exit {p.returncode}'})"
                 "; this runtime does not report what it supports")
        return _crun_without_features(path, error, timeout) or BinaryFeatures(path, error=error)
    return BinaryFeatures.parse(path, p.stdout)


#: The namespaces every crun release knows (it has had all of them since before 1.0).
CRUN_NAMESPACES = frozenset({"cgroup", "ipc", "mount", "network", "pid", "user", "uts"})


def _crun_without_features(path: str, error: str, timeout: float) -> BinaryFeatures | None:
    """crun before 1.10 has no ``features`` command, but every release knows all namespaces: a
    binary whose ``--version`` says crun gets those (its mount options stay unknown, ``error`` kept)."""
    try:
        p = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    first = p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else ""
    if not first.startswith("crun version "):
        return None
    return BinaryFeatures(path, error=error, namespaces=CRUN_NAMESPACES, version=first.split()[2])


def kernel_release() -> tuple[int, int]:
    """(major, minor) of the running kernel; (0, 0) if unreadable."""
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


@dataclass(frozen=True)
class HandlerFeatures:
    name: str  # "" is the default handler
    binary: BinaryFeatures
    recursive_read_only_mounts: Feature
    user_namespaces: Feature

    def features(self) -> tuple[Feature, ...]:
        return self.recursive_read_only_mounts, self.user_namespaces


@dataclass(frozen=True)
class FeatureReport:
    #: Every configured handler by name, plus "" for the default handler.
    handlers: dict[str, HandlerFeatures]
    supplemental_groups_policy: Feature
    mount_options: Feature
    user_namespaces_host_network: Feature
    kernel: tuple[int, int] = (0, 0)

    def runtime_features(self) -> tuple[Feature, ...]:
        return self.supplemental_groups_policy, self.mount_options, self.user_namespaces_host_network

    def handler(self, name: str) -> HandlerFeatures | None:
        return self.handlers.get(name)


def _feature(name: str, disabled: Collection[str], why_not: list[str], why: str = "") -> Feature:
    if why_not:
        return Feature(name, State.UNAVAILABLE, "; ".join(why_not))
    if name in disabled:
        return Feature(name, State.DISABLED, "runtime.disabled_features")
    return Feature(name, State.AVAILABLE, why)


def _handler_features(name: str, b: BinaryFeatures, kernel: tuple[int, int],
                      disabled: Collection[str], idmap_why: str = "") -> HandlerFeatures:
    label = os.path.basename(b.path) + (f" {b.version}" if b.version else "")
    rro_why: list[str] = []
    userns_why: list[str] = []
    if b.error:
        rro_why.append(b.error)
    elif "rro" not in b.mount_options:
        rro_why.append(f"{label} does not list the rro mount option")
    if "user" not in b.namespaces:  # known without `features` for crun (_crun_without_features)
        userns_why.append(b.error or f"{label} does not list the user namespace")
    if kernel < RRO_KERNEL:
        rro_why.append(f"kernel {kernel[0]}.{kernel[1]} has no mount_setattr (needs {RRO_KERNEL[0]}.{RRO_KERNEL[1]})")
    if idmap_why:
        userns_why.append(idmap_why)
    return HandlerFeatures(
        name, b,
        recursive_read_only_mounts=_feature(RECURSIVE_READ_ONLY_MOUNTS, disabled, rro_why,
                                            f"{label}, kernel {kernel[0]}.{kernel[1]}"),
        user_namespaces=_feature(USER_NAMESPACES, disabled, userns_why,
                                 f"{label}; rootfs id-mapped by moorage (idmapped image layers)"))


def idmap_why_not(path: str) -> str:
    """Why this host cannot id-map the image layers under ``path`` ("" if it can)."""
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    return idmapmod.idmap_unsupported(path or "/")


def compute(handlers: Mapping[str, str], default_handler: str, disabled: Collection[str] = (), *,
            probe: Callable[[str], BinaryFeatures] = run_features,
            kernel: tuple[int, int] | None = None, idmap_path: str = "/",
            idmap_probe: Callable[[str], str] = idmap_why_not) -> FeatureReport:
    """The features of ``handlers`` (name → binary path); ``probe`` asks one binary;
    ``idmap_probe`` says why ``idmap_path`` (where image layers live) cannot be id-mapped."""
    k = kernel if kernel is not None else kernel_release()
    idmap_why = idmap_probe(idmap_path) if USER_NAMESPACES not in disabled else ""
    by_path: dict[str, BinaryFeatures] = {}
    out: dict[str, HandlerFeatures] = {}
    for name, path in sorted(handlers.items()):
        b = by_path.get(path) or probe(path)
        by_path[path] = b
        out[name] = _handler_features(name, b, k, disabled, idmap_why)
    if default_handler in out:
        d = out[default_handler]
        out[""] = HandlerFeatures("", d.binary, d.recursive_read_only_mounts, d.user_namespaces)
    return FeatureReport(
        handlers=out,
        # Merge and Strict are both honoured: Strict leaves out the groups of the image's /etc/group.
        supplemental_groups_policy=_feature(SUPPLEMENTAL_GROUPS_POLICY, disabled, [], "Merge and Strict"),
        # CRI Mount.mount_options reach the OCI bind mount (runtime/spec.py BIND_MOUNT_OPTIONS).
        mount_options=_feature(MOUNT_OPTIONS, disabled, [], "bind mount flags such as noexec, nosuid, nodev"),
        user_namespaces_host_network=_feature(USER_NAMESPACES_HOST_NETWORK, disabled, [_NO_USERNS_HOST_NETWORK]),
        kernel=k,
    )


@dataclass
class FeatureProbe:
    """``compute`` once, on first use; every later call answers from the cache."""

    handlers: Mapping[str, str]
    default_handler: str
    disabled: Collection[str] = ()
    probe: Callable[[str], BinaryFeatures] = run_features
    #: Where the image layers live (the idmapped-mount probe tries that filesystem).
    idmap_path: str = "/"
    _report: FeatureReport | None = field(default=None, init=False, repr=False)
    _lock: asyncio.Lock | None = field(default=None, init=False, repr=False)

    def report(self) -> FeatureReport:
        if self._report is None:
            self._report = compute(self.handlers, self.default_handler, self.disabled, probe=self.probe,
                                   idmap_path=self.idmap_path)
            for h in self._report.handlers.values():
                if h.name and h.binary.error:
                    log.info("runtime handler %s: %s", h.name, h.binary.error)
        return self._report

    async def areport(self) -> FeatureReport:
        """As :meth:`report`, probing in a thread the first time (it execs each handler binary)."""
        if self._report is not None:
            return self._report
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._report is None:
                await asyncio.to_thread(self.report)
        assert self._report is not None
        return self._report
