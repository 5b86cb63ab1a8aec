"""Typed pod sandbox and container records: immutable metadata, a status that moves
through one checked state machine, and the one codec that puts both in the store.

Each record is split in two (as containerd's CRI store does):

* ``SandboxMeta`` / ``ContainerMeta`` (frozen): what is fixed when the object is
  made - ids, the reserved name, the typed CRI config, handler, paths, image.
* ``SandboxStatus`` / ``ContainerStatus`` (frozen): what changes - state, pid,
  times, exit code, reason and message, network addresses.  A record changes its
  status only through ``record.update(fn)``, which checks the state transition
  against ``TRANSITIONS`` and persists the new status before it becomes visible.

Sandbox states::

        RunPodSandbox
              |
              v
        +------------+   infra started    +---------+
        |  NOTREADY  | -----------------> |  READY  |
        | phase: set |                    +---------+
        +------------+                         |
              |        infra exited,           |
              |        StopPodSandbox          v
              |                          +------------+
              +------------------------> |  NOTREADY  |  <- RemovePodSandbox deletes
                 set-up failed and its    | phase: None|
                 clean-up failed too      +------------+
                 (reason "CreateFailed")

Container states::

        CreateContainer
              |
              v
        +---------+   StartContainer   +---------+   exited, or state lost   +--------+
        | CREATED | -----------------> | RUNNING | ------------------------> | EXITED |
        +---------+                    +---------+                           +--------+
              |  start failed ("StartError"); create failed and its clean-up     ^
              |  failed too ("CreateFailed")                                    |
              +-----------------------------------------------------------------+
        +---------+
        | UNKNOWN | -------------------------------------------------------------^
        +---------+   (only decoded from a stored state this version does not know)

While ``phase`` is set an object is still being made and is hidden from List*.  A sandbox's
``teardown`` ("stop"/"remove") and a container's ``removing`` mark a teardown in progress, so
that recovery completes one a crash cut short.
Staying in the same state (updating pid, ip, phase, ...) is always allowed.

The state values are the CRI enum names: existing databases and the state metrics
hold them.  Only ``cri/`` turns them into protobuf numbers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from moorage.core.errors import Internal
from moorage.core.store import ObjectRow
from moorage.runtime.model import (
    ContainerConfig,
    LinuxContainerConfig,
    LinuxContainerResources,
    Mount,
    PodSandboxConfig,
)
from moorage.runtime.modelio import from_plain, to_plain


class SandboxState(StrEnum):
    READY = "SANDBOX_READY"
    NOTREADY = "SANDBOX_NOTREADY"


class ContainerState(StrEnum):
    CREATED = "CONTAINER_CREATED"
    RUNNING = "CONTAINER_RUNNING"
    EXITED = "CONTAINER_EXITED"
    UNKNOWN = "CONTAINER_UNKNOWN"


class SandboxPhase(StrEnum):
    """Steps of RunPodSandbox; a sandbox found in one after a crash is half-made."""

    CREATING = "creating"
    NETWORK = "network"
    INFRA = "infra"


class ContainerPhase(StrEnum):
    """Steps of CreateContainer and StartContainer."""

    CREATING = "creating"
    SPEC = "spec"
    STARTING = "starting"


State = SandboxState | ContainerState

#: Every allowed change of state, and the only place that says so.
TRANSITIONS: dict[State, frozenset[State]] = {
    SandboxState.NOTREADY: frozenset({SandboxState.READY}),
    SandboxState.READY: frozenset({SandboxState.NOTREADY}),
    ContainerState.CREATED: frozenset({ContainerState.RUNNING, ContainerState.EXITED}),
    ContainerState.RUNNING: frozenset({ContainerState.EXITED}),
    ContainerState.EXITED: frozenset(),
    ContainerState.UNKNOWN: frozenset({ContainerState.EXITED}),
}

#: Reason of an object whose creation failed and whose clean-up failed as well.
CREATE_FAILED = "CreateFailed"


class IllegalTransition(Internal):
    """A state change the state machine does not allow: a bug in the runtime (INTERNAL)."""


def check_transition(kind: str, obj_id: str, old: State, new: State) -> None:
    if old != new and new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{kind} {obj_id}: illegal state transition {old.value} -> {new.value}")


# --- sandboxes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxMeta:
    id: str
    name: str  # the reserved unique name: <name>_<namespace>_<uid>_<attempt>
    created_at: int
    config: PodSandboxConfig
    runtime_handler: str
    cgroup_parent: str = ""
    cgroups_path: str = ""  # the infra's cgroup, as given to the OCI runtime
    hostname: str = ""
    shm_path: str = ""  # the pod's /dev/shm on the host ("" = none known)
    #: Whether the pod runs an infra process; False: its namespaces are pinned files (``ns_paths``).
    infra: bool = True
    #: Pinned IPC/UTS namespaces of a pod without an infra process, by kind (``ipc``, ``uts``).
    ns_paths: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        return self.config.labels

    @property
    def annotations(self) -> dict[str, str]:
        return self.config.annotations


@dataclass(frozen=True)
class SandboxStatus:
    state: SandboxState = SandboxState.NOTREADY
    phase: SandboxPhase | None = None
    pid: int = 0
    netns_path: str = ""
    ip: str = ""
    additional_ips: tuple[str, ...] = ()
    reason: str = ""
    message: str = ""
    #: Pod-level overhead and resources set by UpdatePodSandboxResources (when ``resources_updated``).
    overhead: LinuxContainerResources | None = None
    resources: LinuxContainerResources | None = None
    resources_updated: bool = False
    #: "stop" or "remove" while StopPodSandbox / RemovePodSandbox tears the pod down; a sandbox
    #: found so after a crash has its teardown completed by recovery.
    teardown: str = ""


# --- containers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerUser:
    """The identity the container process runs as (resolved against its image at create)."""

    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ContainerMeta:
    id: str
    name: str  # reserved unique name: <name>_<sandbox name>_<attempt>
    sandbox_id: str
    created_at: int
    config: ContainerConfig  # as the caller asked for it
    image_ref: str = ""  # image id the container was created from
    image_name: str = ""  # what the caller asked for
    log_path: str = ""
    runtime_handler: str = ""
    snapshot_key: str = ""
    stop_signal: str = ""  # from the image config ("" = SIGTERM)

    @property
    def labels(self) -> dict[str, str]:
        return self.config.labels

    @property
    def annotations(self) -> dict[str, str]:
        return self.config.annotations


@dataclass(frozen=True)
class ContainerStatus:
    state: ContainerState = ContainerState.CREATED
    phase: ContainerPhase | None = None
    pid: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    user: ContainerUser | None = None
    #: The mounts as made (image volumes resolved to a host path and image id); None: as configured.
    mounts: list[Mount] | None = None
    #: Resources set by UpdateContainerResources; None: as configured.
    resources: LinuxContainerResources | None = None
    #: Set before RemoveContainer starts destroying it; recovery finishes a removal a crash cut short.
    removing: bool = False
    #: The OCI runtime's state and the cgroup were released after the exit (runc delete), so
    #: RemoveContainer has no runtime work left to wait on.
    released: bool = False


# --- the records ----------------------------------------------------------------------------

class _Meta(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...


class _Status(Protocol):
    @property
    def state(self) -> State: ...


M = TypeVar("M", bound=_Meta)
S = TypeVar("S", bound=_Status)


class Record(Generic[M, S]):
    """Immutable metadata plus a status that changes only through :meth:`update`."""

    kind = "object"

    def __init__(self, metadata: M, status: S, persist: Callable[[M, S], None] | None) -> None:
        self._metadata: M = metadata
        self._status: S = status
        self._persist: Callable[[M, S], None] | None = persist

    @property
    def metadata(self) -> M:
        return self._metadata

    @property
    def status(self) -> S:
        return self._status

    @property
    def id(self) -> str:
        return self._metadata.id

    @property
    def name(self) -> str:
        return self._metadata.name

    def update(self, fn: Callable[[S], S]) -> S:
        """Replace the status with ``fn(status)``: checked, persisted, then visible."""
        new = fn(self._status)
        check_transition(self.kind, self.id, self._status.state, new.state)
        if self._persist is None:
            raise Internal(f"{self.kind} {self.id}: a snapshot of a record cannot change")
        self._persist(self._metadata, new)
        self._status = new
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._metadata!r}, {self._status!r})"


class Sandbox(Record[SandboxMeta, SandboxStatus]):
    kind = "pod sandbox"

    def snapshot(self) -> Sandbox:
        """A read-only copy of the record as it is now (cheap: both halves are immutable)."""
        return Sandbox(self._metadata, self._status, None)

    def pod_resources(self) -> tuple[LinuxContainerResources | None, LinuxContainerResources | None]:
        """(overhead, resources) of the pod: the last UpdatePodSandboxResources, else as configured."""
        linux = self._metadata.config.linux
        if self._status.resources_updated:
            return self._status.overhead, self._status.resources
        return (linux.overhead, linux.resources) if linux else (None, None)


class Container(Record[ContainerMeta, ContainerStatus]):
    kind = "container"

    def snapshot(self) -> Container:
        return Container(self._metadata, self._status, None)

    def effective_config(self) -> ContainerConfig:
        """The config with what changed since creation applied (resolved mounts, new resources)."""
        cfg = copy.deepcopy(self._metadata.config)
        if self._status.mounts is not None:
            cfg.mounts = copy.deepcopy(self._status.mounts)
        if self._status.resources is not None:
            cfg.linux = cfg.linux or LinuxContainerConfig()
            cfg.linux.resources = copy.deepcopy(self._status.resources)
        return cfg


AnyStatus = TypeVar("AnyStatus", SandboxStatus, ContainerStatus)


def replace(status: AnyStatus, **changes: Any) -> AnyStatus:
    """``dataclasses.replace`` for statuses, for use inside ``record.update``."""
    return dataclasses.replace(status, **changes)


# --- the codec: records <-> store rows ---------------------------------------------------------
#
# A row's document is {"v": 2, "metadata": ..., "status": ...}, written with modelio.to_plain.
# Rows written before (v1) are one flat dict with the config as a plain dict and the rest in
# ``extra``; ``decode_*`` reads both.

FORMAT = 2


def sandbox_row(meta: SandboxMeta, status: SandboxStatus) -> ObjectRow:
    return ObjectRow(id=meta.id, name=meta.name, state=status.state.value, created_at=meta.created_at,
                     data={"v": FORMAT, "metadata": to_plain(meta), "status": to_plain(status)})


def container_row(meta: ContainerMeta, status: ContainerStatus) -> ObjectRow:
    return ObjectRow(id=meta.id, name=meta.name, state=status.state.value, created_at=meta.created_at,
                     data={"v": FORMAT, "metadata": to_plain(meta), "status": to_plain(status)},
                     sandbox_id=meta.sandbox_id)


def _sandbox_state(v: Any) -> SandboxState:
    s = str(v or "")
    if not s.startswith("SANDBOX_"):
        s = "SANDBOX_" + s  # very old rows said READY / NOTREADY
    try:
        return SandboxState(s)
    except ValueError:
        return SandboxState.NOTREADY


def _container_state(v: Any) -> ContainerState:
    s = str(v or "")
    if not s.startswith("CONTAINER_"):
        s = "CONTAINER_" + s
    try:
        return ContainerState(s)
    except ValueError:
        return ContainerState.UNKNOWN


def _phase(cls: type[SandboxPhase] | type[ContainerPhase], v: Any) -> Any:
    if not v:
        return None
    try:
        return cls(v)
    except ValueError:
        return cls("creating")  # an unknown step of making it: treat as half-made


def decode_sandbox(row: ObjectRow) -> tuple[SandboxMeta, SandboxStatus]:
    d = row.data
    if "status" in d:
        meta: SandboxMeta = from_plain(SandboxMeta, d["metadata"])
        status: SandboxStatus = from_plain(SandboxStatus, d["status"])
        return meta, status
    # v1: one flat SandboxRecord dict; config a plain dict, the rest in "extra".
    extra = d.get("extra") or {}
    cfg: PodSandboxConfig = from_plain(PodSandboxConfig, d.get("config") or {})
    if not cfg.metadata.name and d.get("metadata"):
        cfg.metadata = from_plain(type(cfg.metadata), d["metadata"])
    meta = SandboxMeta(id=row.id, name=row.name, created_at=int(d.get("created_at") or row.created_at),
                       config=cfg, runtime_handler=d.get("runtime_handler") or "runc",
                       cgroup_parent=d.get("cgroup_parent") or "", cgroups_path=extra.get("cgroups_path") or "",
                       hostname=extra.get("hostname") or "", shm_path=extra.get("shm") or "")
    status = SandboxStatus(state=_sandbox_state(d.get("state", row.state)), phase=_phase(SandboxPhase, extra.get("phase")),
                           pid=int(d.get("pid") or 0), netns_path=d.get("netns_path") or "", ip=d.get("ip") or "",
                           additional_ips=tuple(d.get("additional_ips") or ()))
    return meta, status


def decode_container(row: ObjectRow) -> tuple[ContainerMeta, ContainerStatus]:
    d = row.data
    if "status" in d:
        meta: ContainerMeta = from_plain(ContainerMeta, d["metadata"])
        status: ContainerStatus = from_plain(ContainerStatus, d["status"])
        return meta, status
    # v1: the config dict already holds resolved image-volume mounts and updated resources.
    extra = d.get("extra") or {}
    cfg: ContainerConfig = from_plain(ContainerConfig, d.get("config") or {})
    if not cfg.metadata.name and d.get("metadata"):
        cfg.metadata = from_plain(type(cfg.metadata), d["metadata"])
    user = extra.get("user")
    meta = ContainerMeta(id=row.id, name=row.name, sandbox_id=d.get("sandbox_id") or row.sandbox_id,
                         created_at=int(d.get("created_at") or row.created_at), config=cfg,
                         image_ref=d.get("image_ref") or "", image_name=d.get("image_name") or "",
                         log_path=d.get("log_path") or "", runtime_handler=d.get("runtime_handler") or "runc",
                         snapshot_key=d.get("snapshot_key") or "", stop_signal=extra.get("stop_signal") or "")
    status = ContainerStatus(
        state=_container_state(d.get("state", row.state)), phase=_phase(ContainerPhase, extra.get("phase")),
        pid=int(d.get("pid") or 0), started_at=int(d.get("started_at") or 0),
        finished_at=int(d.get("finished_at") or 0), exit_code=int(d.get("exit_code") or 0),
        reason=d.get("reason") or "", message=d.get("message") or "",
        user=ContainerUser(uid=int(user.get("uid", 0)), gid=int(user.get("gid", 0)),
                           additional_gids=[int(g) for g in user.get("gids") or []]) if isinstance(user, dict) else None)
    return meta, status
