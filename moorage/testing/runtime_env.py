"""Shared set-up for the runtime integration tests (test/integration/test_runtime_*.py).

``RuntimeEnv`` wraps a real daemon (own temp dirs, socket and a cgroup parent of
its own) with the busybox test images pulled, keeps track of the pods a test
makes, removes them afterwards and then checks that nothing leaked: no mounts,
network namespaces, processes (conmon, runc, catatonit, container processes) or
cgroups that were not there before the test.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.testing.cri import container_config, image_client, pod_config, runtime_client, wait_for
from moorage.testing.daemon import DaemonProcess, new_base, teardown
from moorage.testing.registry import TestRegistry

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_v2() -> bool:
    return os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers"))


def cgroup_dirs(path: str) -> list[str]:
    """Every host directory of cgroup ``path`` (one per v1 controller hierarchy, or the v2 one)."""
    path = path.lstrip("/")
    if cgroup_v2():
        return [os.path.join(CGROUP_ROOT, path)]
    out: list[str] = []
    for name in sorted(os.listdir(CGROUP_ROOT)):
        d = os.path.join(CGROUP_ROOT, name)
        if os.path.isdir(d) and not os.path.islink(d):
            out.append(os.path.join(d, path))
    return out


def remove_cgroup_tree(path: str) -> None:
    for d in cgroup_dirs(path):
        for dirpath, _, _ in sorted(os.walk(d, topdown=False), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


def memory_limit_file(cgroup_dir_of: dict[str, str]) -> str:
    """The memory limit file of a container given its /proc/<pid>/cgroup map."""
    if cgroup_v2():
        return os.path.join(CGROUP_ROOT, cgroup_dir_of[""].lstrip("/"), "memory.max")
    return os.path.join(CGROUP_ROOT, "memory", cgroup_dir_of["memory"].lstrip("/"), "memory.limit_in_bytes")


def proc_cgroups(pid: int) -> dict[str, str]:
    """controller → path from /proc/<pid>/cgroup ("" for the v2 entry)."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in (ctrls.split(",") if ctrls else [""]):
                out[c] = path
    return out


class RuntimeEnv:
    """A started daemon whose configured ``default_cgroup_parent`` is ``cgroup_parent``, and its leak checks."""

    def __init__(self, daemon: DaemonProcess, registry: TestRegistry, cgroup_parent: str) -> None:
        if not cgroup_parent.strip("/"):
            # the leak check lists the cgroups under it: the host's root would never be quiet
            raise ValueError("RuntimeEnv needs a cgroup parent of the daemon's own")
        self.d = daemon
        self.reg = registry
        self.cgroup_parent = cgroup_parent
        self.rt: pbg.RuntimeServiceStub = runtime_client(daemon)
        self.busybox = registry.images["busybox"].ref
        self.pods: list[str] = []
        self._baseline: dict[str, set[str]] = {}

    # -- images ------------------------------------------------------------------------------

    def pull(self, name: str) -> str:
        ref = self.reg.images[name].ref
        image_client(self.d).PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
        return ref

    # -- pods and containers -----------------------------------------------------------------

    def run_pod(self, cfg: pb.PodSandboxConfig | None = None, handler: str = "", **kw: Any) -> tuple[str, pb.PodSandboxConfig]:
        cfg = cfg or pod_config(name=f"p-{uuid.uuid4().hex[:8]}", **kw)
        sid: str = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler),
                                    timeout=120).pod_sandbox_id
        self.pods.append(sid)
        return sid, cfg

    def create(self, sid: str, pcfg: pb.PodSandboxConfig, command: list[str] | None = None,
               image: str = "", **kw: Any) -> str:
        cfg = container_config(image or self.busybox, command, **kw)
        r: pb.CreateContainerResponse = self.rt.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=pcfg), timeout=120)
        return r.container_id

    def start(self, cid: str) -> None:
        self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)

    def run(self, sid: str, pcfg: pb.PodSandboxConfig, command: list[str] | None = None, **kw: Any) -> str:
        cid = self.create(sid, pcfg, command, **kw)
        self.start(cid)
        return cid

    def status(self, cid: str, verbose: bool = False) -> pb.ContainerStatusResponse:
        r: pb.ContainerStatusResponse = self.rt.ContainerStatus(
            pb.ContainerStatusRequest(container_id=cid, verbose=verbose), timeout=30)
        return r

    def wait_exited(self, cid: str, timeout: float = 60) -> pb.ContainerStatus:
        def exited() -> pb.ContainerStatus | None:
            s = self.status(cid).status
            return s if s.state == pb.CONTAINER_EXITED else None

        return wait_for(exited, timeout, what=f"container {cid[:12]} to exit")

    def exec(self, cid: str, cmd: list[str], timeout: int = 30) -> pb.ExecSyncResponse:
        r: pb.ExecSyncResponse = self.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
                                                  timeout=timeout + 60)
        return r

    def sh(self, cid: str, script: str) -> str:
        r = self.exec(cid, ["sh", "-c", script])
        assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
        return r.stdout.decode()

    def wait_file(self, cid: str, path: str) -> None:
        wait_for(lambda: self.exec(cid, ["test", "-e", path]).exit_code == 0, what=f"{path} in {cid[:12]}")

    def pid(self, cid: str) -> int:
        return int(json.loads(self.status(cid, verbose=True).info["info"])["pid"])

    def log_dir(self) -> str:
        d = os.path.join(self.d.base, "logs", uuid.uuid4().hex[:8])
        os.makedirs(d, exist_ok=True)
        return d

    # -- clean-up and leak checks -----------------------------------------------------------------

    def cleanup(self) -> None:
        try:
            pods = [p.id for p in self.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items]
        except grpc.RpcError:
            pods = []
        for sid in dict.fromkeys(self.pods + pods):
            for call, req in ((self.rt.StopPodSandbox, pb.StopPodSandboxRequest),
                              (self.rt.RemovePodSandbox, pb.RemovePodSandboxRequest)):
                try:
                    call(req(pod_sandbox_id=sid), timeout=120)
                except grpc.RpcError:
                    pass
        self.pods.clear()

    def snapshot(self) -> dict[str, set[str]]:
        base = self.d.base
        with open("/proc/self/mountinfo") as f:
            mnts = {line.split()[4] for line in f if base in line.split()[4] or base in line}
        netns_dir = os.path.join(self.d.state, "netns")
        netns = set(os.listdir(netns_dir)) if os.path.isdir(netns_dir) else set()
        procs: set[str] = set()
        me = os.getpid()
        daemon_pid = self.d.proc.pid if self.d.proc else -1
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) in (me, daemon_pid):
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                root = os.readlink(f"/proc/{p}/root")
            except OSError:
                continue
            if base in cmd or base in root:
                procs.add(f"{p}:{cmd[:120]}:{root}")
        cgroups: set[str] = set()
        for d in cgroup_dirs(self.cgroup_parent):
            if os.path.isdir(d):
                cgroups |= {os.path.join(d, n) for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))}
        return {"mounts": mnts, "netns": netns, "processes": procs, "cgroups": cgroups}

    def begin(self) -> None:
        self._baseline = self.snapshot()

    def leaks(self) -> dict[str, set[str]]:
        now = self.snapshot()
        return {k: v - self._baseline.get(k, set()) for k, v in now.items() if v - self._baseline.get(k, set())}

    def check_no_leaks(self) -> None:
        try:
            wait_for(lambda: not self.leaks(), timeout=30, interval=0.2, what="leftovers to go away")
        except AssertionError:
            raise AssertionError(
                f"leftovers after the test: {self.leaks()}\n--- daemon log ---\n{self.d.log()[-4000:]}") from None


def own_cgroup_parent() -> tuple[str, str]:
    """A fresh cgroup parent and the daemon config lines that make it the default one."""
    parent = f"/moorage-test-{uuid.uuid4().hex[:10]}"
    return parent, f'[runtime]\ndefault_cgroup_parent = "{parent}"\n'


def make_daemon(factory: Callable[..., DaemonProcess], extra_config: str = "", base: str | None = None,
                start: bool = True) -> tuple[DaemonProcess, str]:
    """A daemon with a cgroup parent of its own (so cgroup leak checks see only its cgroups), and that parent.

    ``extra_config`` lines go into the daemon's [runtime] table.
    """
    parent, runtime_table = own_cgroup_parent()
    d = factory(extra_config=runtime_table + extra_config, start=start, base=base)
    return d, parent


@pytest.fixture(scope="module")
def module_env(registry: TestRegistry) -> Iterator[RuntimeEnv]:
    """One daemon per test module, busybox and nonroot pulled."""
    parent, runtime_table = own_cgroup_parent()
    d = DaemonProcess(base=new_base(), extra_config=runtime_table)
    try:
        d.start()
        env = RuntimeEnv(d, registry, parent)
        env.pull("busybox")
        env.pull("nonroot")
        yield env
    finally:
        teardown(d)
        remove_cgroup_tree(parent)


@pytest.fixture
def env(module_env: RuntimeEnv) -> Iterator[RuntimeEnv]:
    """The module daemon; the test's pods are removed after it and leaks are checked."""
    module_env.begin()
    yield module_env
    module_env.cleanup()
    module_env.check_no_leaks()
