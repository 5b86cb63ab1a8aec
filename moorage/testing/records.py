"""Real sandbox and container records for tests that need no store (stats, events, CRI status)."""

from __future__ import annotations

from moorage.runtime.model import ContainerConfig, ContainerMetadata, PodSandboxConfig, PodSandboxMetadata
from moorage.runtime.records import (
    Container,
    ContainerMeta,
    ContainerState,
    ContainerStatus,
    Sandbox,
    SandboxMeta,
    SandboxState,
    SandboxStatus,
)


def _discard(meta: object, status: object) -> None:
    """A persist that keeps nothing: these records live in memory only."""


def sandbox(sid: str, state: SandboxState = SandboxState.READY, *, pid: int = 0, name: str = "pod_ns_uid_0",
            cgroup_parent: str = "/kubepods/podA", netns_path: str = "",
            pod: PodSandboxMetadata | None = None, labels: dict[str, str] | None = None,
            created_at: int = 0) -> Sandbox:
    cfg = PodSandboxConfig(metadata=pod or PodSandboxMetadata(name="pod", uid="u", namespace="ns"),
                           labels=dict(labels or {}))
    meta = SandboxMeta(id=sid, name=name, created_at=created_at, config=cfg, runtime_handler="runc",
                       cgroup_parent=cgroup_parent)
    return Sandbox(meta, SandboxStatus(state=state, pid=pid, netns_path=netns_path), _discard)


def container(cid: str, sandbox_id: str, state: ContainerState = ContainerState.RUNNING, *, pid: int = 0,
              name: str = "c_pod_0", ctr: ContainerMetadata | None = None, image: str = "busybox",
              image_ref: str = "sha256:x", snapshot_key: str = "", started_at: int = 0,
              labels: dict[str, str] | None = None, created_at: int = 0) -> Container:
    cfg = ContainerConfig(metadata=ctr or ContainerMetadata(name="c", attempt=1), image=image,
                          labels=dict(labels or {}))
    meta = ContainerMeta(id=cid, name=name, sandbox_id=sandbox_id, created_at=created_at, config=cfg,
                         image_ref=image_ref, image_name=image, runtime_handler="runc", snapshot_key=snapshot_key)
    return Container(meta, ContainerStatus(state=state, pid=pid, started_at=started_at), _discard)
