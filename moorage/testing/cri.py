"""Small builders and waiters for CRI integration tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.testing.daemon import DaemonProcess

T = TypeVar("T")


def runtime_client(d: DaemonProcess) -> pbg.RuntimeServiceStub:
    """The daemon's RuntimeService stub; the daemon must have been started."""
    if d.runtime is None:
        raise RuntimeError(f"daemon in {d.base} was never started")
    return d.runtime


def image_client(d: DaemonProcess) -> pbg.ImageServiceStub:
    """The daemon's ImageService stub; the daemon must have been started."""
    if d.images is None:
        raise RuntimeError(f"daemon in {d.base} was never started")
    return d.images


def pod_config(name: str = "", namespace: str = "default", log_dir: str = "", **kw: Any) -> pb.PodSandboxConfig:
    name = name or f"pod-{uuid.uuid4().hex[:8]}"
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uuid.uuid4().hex, attempt=0),
        hostname=kw.pop("hostname", name), log_directory=log_dir, **kw)


def with_infra(**kw: Any) -> pb.LinuxPodSandboxConfig:
    """A pod's Linux config with a shared PID namespace: such a pod keeps its infra process (the
    PID 1 the namespace needs), where others run none (``runtime.drop_infra``)."""
    return pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pb.NamespaceOption(pid=pb.POD)), **kw)


def container_config(image: str, command: list[str] | None = None, name: str = "", log_path: str = "",
                     **kw: Any) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name or f"c-{uuid.uuid4().hex[:6]}"),
        image=pb.ImageSpec(image=image), command=command or [], log_path=log_path, **kw)


def wait_for(fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def run_container(rt: pbg.RuntimeServiceStub, sandbox_id: str, sandbox_cfg: pb.PodSandboxConfig, cfg: pb.ContainerConfig,
                  start: bool = True) -> str:
    cid: str = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=cfg,
                                                            sandbox_config=sandbox_cfg)).container_id
    if start:
        rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


def status(rt: pbg.RuntimeServiceStub, cid: str) -> pb.ContainerStatus:
    st: pb.ContainerStatus = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
    return st


def wait_exited(rt: pbg.RuntimeServiceStub, cid: str, timeout: float = 30.0) -> pb.ContainerStatus:
    def exited() -> pb.ContainerStatus | None:
        s = status(rt, cid)
        return s if s.state == pb.CONTAINER_EXITED else None

    return wait_for(exited, timeout, what=f"container {cid[:12]} to exit")
