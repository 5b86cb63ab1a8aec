"""Adjustments to a container being created, as the runtime takes them.

NRI plugins (moorage.nri) may change a container before it is created; the NRI
layer merges what its plugins ask and converts it to this typed value, which
the pure spec builder applies (``spec.build_container_spec(adjust=...)``).  The
runtime never sees NRI's protobuf.  Every path and name here has been checked by
the NRI layer (absolute paths, no NUL); the builder checks again what it writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AdjustMount:
    destination: str
    type: str = "bind"
    source: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdjustHook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True)
class AdjustDevice:
    path: str
    type: str  # "c", "b", "u" or "p"
    major: int
    minor: int
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class AdjustRlimit:
    type: str  # "RLIMIT_NOFILE", ...
    hard: int
    soft: int


#: OCI hook lists an adjustment may append to
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


@dataclass(frozen=True)
class ContainerAdjustment:
    """What to change; ``remove_*`` name entries (keys, env names, mount destinations, device
    paths) to drop from what the CRI config and image gave, before the additions."""

    annotations: Mapping[str, str] = field(default_factory=dict)
    remove_annotations: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    remove_env: tuple[str, ...] = ()
    args: tuple[str, ...] | None = None
    mounts: tuple[AdjustMount, ...] = ()
    remove_mounts: tuple[str, ...] = ()
    hooks: Mapping[str, tuple[AdjustHook, ...]] = field(default_factory=dict)  # HOOK_NAMES -> hooks
    devices: tuple[AdjustDevice, ...] = ()
    remove_devices: tuple[str, ...] = ()
    rlimits: tuple[AdjustRlimit, ...] = ()
    #: an OCI ``linux.resources`` fragment (memory, cpu, pids, hugepageLimits, unified), merged per key
    resources: Mapping[str, Any] = field(default_factory=dict)
    cgroups_path: str | None = None
    oom_score_adj: int | None = None
    sysctl: Mapping[str, str] = field(default_factory=dict)
    #: CDI devices to inject (fully qualified names), resolved by the runtime as CRI ``cdi_devices``
    cdi_devices: tuple[str, ...] = ()
    #: ``linux.namespaces`` entries (type, path; path "" for a new one) replacing those of their type
    namespaces: tuple[tuple[str, str], ...] = ()
    remove_namespaces: tuple[str, ...] = ()
    #: whole OCI objects, each replacing what the spec had: ``linux.seccomp``, ``process.scheduler``,
    #: ``process.ioPriority``, ``linux.memoryPolicy``; ``linux.intelRdt`` is merged per key
    seccomp: Mapping[str, Any] | None = None
    scheduler: Mapping[str, Any] | None = None
    io_priority: Mapping[str, Any] | None = None
    memory_policy: Mapping[str, Any] | None = None
    intel_rdt: Mapping[str, Any] | None = None
    remove_intel_rdt: bool = False
    #: ``linux.netDevices``: host interface name -> name in the container
    net_devices: Mapping[str, str] = field(default_factory=dict)
    remove_net_devices: tuple[str, ...] = ()

    def empty(self) -> bool:
        return self == ContainerAdjustment()
