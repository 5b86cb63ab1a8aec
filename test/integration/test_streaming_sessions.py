"""Exec sessions across daemon restarts, and Attach refusing stdin a container does not have."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import uuid

import grpc
import pytest

from moorage.core.procs import cmdlines
from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import (
    container_config,
    pod_config,
    run_container,
    status,
    wait_for,
)
from moorage.testing.streams import WS, exec_sessions_on_host

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("conmon") or not shutil.which("runc"),
                       reason="needs root, conmon and runc"),
]


def host_pids(argv: list[str]) -> list[int]:
    """Pids on the host whose command line is exactly ``argv``."""
    want = [a.encode() for a in argv]
    return [pid for pid, args in cmdlines() if args == want]


def exec_dirs(d, cid: str) -> list[str]:
    path = os.path.join(d.state, "oci", "conmon", cid)
    return [n for n in os.listdir(path) if n.startswith("exec-")] if os.path.isdir(path) else []


def exec_links(d) -> list[str]:
    path = os.path.join(d.state, "oci", "attach")
    return [n for n in os.listdir(path) if "exec-" in os.readlink(os.path.join(path, n))] \
        if os.path.isdir(path) else []


def test_exec_sessions_left_by_a_killed_daemon_are_reaped_on_restart(daemon, registry):
    d = daemon
    image = registry.images["busybox"].ref
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    cfg = pod_config("exec-reap")
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
    cid = run_container(d.runtime, sid, cfg, container_config(image, ["sleep", "3600"]))
    interactive = str(40000 + uuid.uuid4().int % 10000)
    probe = str(int(interactive) + 10000)

    # An interactive streaming exec (stdin open: it would never end by itself) ...
    ws = WS(d.runtime.Exec(pb.ExecRequest(container_id=cid, stdin=True, stdout=True, stderr=True, cmd=[
        "sh", "-c", f"echo started; sleep {interactive} & wait"])).url)
    ws.read_until(1, b"started\n")
    # ... and an ExecSync in flight.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    sync_call = pool.submit(d.runtime.ExecSync, pb.ExecSyncRequest(container_id=cid, cmd=["sleep", probe],
                                                                   timeout=3000), timeout=3600)
    try:
        wait_for(lambda: host_pids(["sleep", interactive]) and host_pids(["sleep", probe]), 60, 0.05,
                 "both exec'd sleeps")
        sessions = exec_sessions_on_host(cid)
        assert len(sessions) == 2 and len(exec_dirs(d, cid)) == 2

        d.kill9()
        ws.ws.close()
        with pytest.raises(grpc.RpcError):
            sync_call.result(120)
        # The sessions outlive the daemon: nothing but the next daemon will end them.
        assert host_pids(["sleep", interactive]) and host_pids(["sleep", probe])
        # An ExecSync conmon may die of SIGPIPE on its dead daemon's pipes while its command lives
        # on: make that happen every time, so the restart must find the command by the session's files.
        assert set(exec_sessions_on_host(cid)) <= set(sessions)
        for pid in exec_sessions_on_host(cid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"passthrough" in f.read().split(b"\0"):
                    os.kill(pid, 9)
        wait_for(lambda: len(exec_sessions_on_host(cid)) == 1, 60, 0.05, "the ExecSync conmon to be gone")
        assert host_pids(["sleep", probe])

        d.start()
        wait_for(lambda: not host_pids(["sleep", interactive]) and not host_pids(["sleep", probe]), 60, 0.05,
                 "the leftover exec'd processes to be killed")
        wait_for(lambda: not exec_sessions_on_host(cid), 60, 0.05, "the leftover exec conmons to end")
        assert not exec_dirs(d, cid) and not exec_links(d)
        # The container and its own conmon were not touched; new execs work.
        assert status(d.runtime, cid).state == pb.CONTAINER_RUNNING
        r = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", "still-here"], timeout=30),
                               timeout=90)
        assert (r.exit_code, r.stdout) == (0, b"still-here\n")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for pid in host_pids(["sleep", interactive]) + host_pids(["sleep", probe]):
            os.kill(pid, 9)
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)


def test_attach_with_stdin_needs_a_container_created_with_stdin(module_daemon, registry):
    d = module_daemon
    image = registry.images["busybox"].ref
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    cfg = pod_config("attach-stdin")
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
    try:
        plain = run_container(d.runtime, sid, cfg, container_config(image, ["sleep", "3600"]))
        with pytest.raises(grpc.RpcError) as e:
            d.runtime.Attach(pb.AttachRequest(container_id=plain, stdin=True, stdout=True), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stdin" in e.value.details() and plain in e.value.details()
        # Without stdin it attaches; a container created with stdin takes it.
        assert d.runtime.Attach(pb.AttachRequest(container_id=plain, stdout=True), timeout=30).url
        interactive = run_container(d.runtime, sid, cfg, container_config(image, ["cat"], stdin=True))
        ws = WS(d.runtime.Attach(pb.AttachRequest(container_id=interactive, stdin=True, stdout=True),
                                 timeout=30).url)
        ws.send(0, b"echoed\n")
        ws.read_until(1, b"echoed\n")
        ws.ws.close()
    finally:
        d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
