"""Small builders and waiters for CRI integration tests."""

from __future__ import annotations

import time
import uuid

from moorage.cri.api import api_pb2 as pb


def pod_config(name: str = "", namespace: str = "default", log_dir: str = "", **kw) -> pb.PodSandboxConfig:
    name = name or f"pod-{uuid.uuid4().hex[:8]}"
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uuid.uuid4().hex, attempt=0),
        hostname=kw.pop("hostname", name), log_directory=log_dir, **kw)


def container_config(image: str, command: list[str] | None = None, name: str = "", log_path: str = "",
                     **kw) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name or f"c-{uuid.uuid4().hex[:6]}"),
        image=pb.ImageSpec(image=image), command=command or [], log_path=log_path, **kw)


def wait_for(fn, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def run_container(rt, sandbox_id: str, sandbox_cfg: pb.PodSandboxConfig, cfg: pb.ContainerConfig,
                  start: bool = True) -> str:
    cid = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=cfg,
                                                       sandbox_config=sandbox_cfg)).container_id
    if start:
        rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


def status(rt, cid: str) -> pb.ContainerStatus:
    return rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status


def wait_exited(rt, cid: str, timeout: float = 30.0) -> pb.ContainerStatus:
    return wait_for(lambda: (s := status(rt, cid)).state == pb.CONTAINER_EXITED and s, timeout,
                    what=f"container {cid[:12]} to exit")
