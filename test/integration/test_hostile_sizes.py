"""Hostile sizes over the real socket (issue #14, part 6): one large request, one large pod or one
idle metrics client must not stall or break the daemon, and no response may exceed what the
kubelet can read (16 MiB).

The stall figures (how long a concurrent Version call waited) are printed, not asserted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.cri.limits import EXEC_SYNC_RESERVE, KUBELET_MAX_MESSAGE, MAX_RESPONSE_ENV
from moorage.testing import registry as registrymod
from moorage.testing.cri import pod_config
from moorage.testing.daemon import DaemonProcess, new_base, teardown
from moorage.testing.runtime_env import RuntimeEnv, own_cgroup_parent, remove_cgroup_tree

LIMIT = 512 * 1024  # limits.max_labels_annotations_bytes, default
SMALL_CAP = 1024 * 1024  # the lowered response cap of the second daemon


def _kubelet_channel(d: DaemonProcess) -> grpc.Channel:
    """A client that, like the kubelet, reads messages up to 16 MiB (gRPC's default is 4 MiB)."""
    return grpc.insecure_channel(f"unix://{d.socket}", options=[
        ("grpc.max_receive_message_length", KUBELET_MAX_MESSAGE),
        ("grpc.max_send_message_length", 64 * 1024 * 1024)])


_PROBE = r"""
import select, sys, time, grpc
from moorage.cri.api import api_pb2 as pb, api_pb2_grpc as pbg
stub = pbg.RuntimeServiceStub(grpc.insecure_channel("unix://" + sys.argv[1]))
stub.Version(pb.VersionRequest(), timeout=10)
print("ready", flush=True)
longest, calls, failures = 0.0, 0, 0
while not select.select([sys.stdin], [], [], 0.005)[0]:
    t = time.perf_counter()
    try:
        stub.Version(pb.VersionRequest(), timeout=30)
    except grpc.RpcError:
        failures += 1
    longest = max(longest, time.perf_counter() - t)
    calls += 1
print(longest, calls, failures, flush=True)
"""


class _VersionProbe:
    """Calls Version back to back from another process (so this one's GIL is not measured) while a
    hostile call runs; records the longest wait."""

    def __init__(self, d: DaemonProcess) -> None:
        self.socket = d.socket
        self.longest, self.calls, self.failures = 0.0, 0, 0

    def __enter__(self) -> _VersionProbe:
        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE, self.socket], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.proc.communicate("stop\n", timeout=60)
        longest, calls, failures = out.split()
        self.longest, self.calls, self.failures = float(longest), int(calls), int(failures)


@pytest.fixture(scope="module")
def small_env(registry: registrymod.TestRegistry) -> Iterator[RuntimeEnv]:
    """A daemon whose response cap is lowered to 1 MiB, so three pods can cross it."""
    parent, runtime_table = own_cgroup_parent()
    d = DaemonProcess(base=new_base(), extra_config=runtime_table, env={MAX_RESPONSE_ENV: str(SMALL_CAP)})
    try:
        d.start()
        env = RuntimeEnv(d, registry, parent)
        env.pull("busybox")
        yield env
    finally:
        teardown(d)
        remove_cgroup_tree(parent)


@pytest.fixture
def senv(small_env: RuntimeEnv) -> Iterator[RuntimeEnv]:
    small_env.begin()
    yield small_env
    small_env.cleanup()
    small_env.check_no_leaks()


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value.code(), e.value.details() or ""


def _sized(total: int, n: int = 4) -> dict[str, str]:
    """``n`` annotations whose keys and values come to exactly ``total`` bytes."""
    keys = [f"example.com/a{i}" for i in range(n)]
    room = total - sum(len(k) for k in keys)
    out = {}
    for i, k in enumerate(keys):
        out[k] = "v" * (room // n + (room % n if i == 0 else 0))
    assert sum(len(k) + len(v) for k, v in out.items()) == total
    return out


# -- one large request ------------------------------------------------------------------------------

def test_12mb_of_labels_is_refused_first_and_version_keeps_answering(env: RuntimeEnv) -> None:
    labels = {f"k{i:06d}": "v" * 50 for i in range(200_000)}
    cfg = pod_config(labels=labels)
    assert 11_000_000 < cfg.ByteSize() < 16 * 1024 * 1024
    with _VersionProbe(env.d) as probe:
        t = time.perf_counter()
        code, msg = _code(lambda: env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60))
        refused_in = time.perf_counter() - t
        # CreateContainer is refused before the (missing) sandbox is even looked up.
        ccode, cmsg = _code(lambda: env.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id="0" * 64, config=pb.ContainerConfig(metadata=pb.ContainerMetadata(name="big"),
                                                              image=pb.ImageSpec(image=env.busybox),
                                                              labels=labels)), timeout=60))
        time.sleep(0.2)  # a few probes after the refusals too
    print(f"\n12 MB RunPodSandbox refused in {refused_in * 1000:.0f} ms; longest concurrent Version call "
          f"{probe.longest * 1000:.0f} ms over {probe.calls} calls")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    assert f"exceed the limit of {LIMIT} bytes" in msg and len(msg) < 400
    assert ccode == grpc.StatusCode.RESOURCE_EXHAUSTED and "container 'big'" in cmsg
    assert probe.failures == 0 and probe.calls > 0
    assert env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items == []


def test_request_over_the_receive_limit_is_refused_by_grpc(env: RuntimeEnv) -> None:
    cfg = pod_config(annotations={"example.com/big": "x" * (17 * 1024 * 1024)})
    ch = _kubelet_channel(env.d)
    try:
        code, msg = _code(lambda: pbg.RuntimeServiceStub(ch).RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                                                           timeout=60))
    finally:
        ch.close()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    env.rt.Version(pb.VersionRequest(), timeout=10)


@pytest.mark.parametrize("raw", [b"\x0a\x05\x12\x03\xff\xfe\xfd", b"\x0a\xff\xff\xff\x7f"],
                         ids=["invalid-utf8", "truncated"])
def test_undecodable_request_is_invalid_argument(env: RuntimeEnv, raw: bytes) -> None:
    ch = grpc.insecure_channel(f"unix://{env.d.socket}")
    try:
        call = ch.unary_unary("/runtime.v1.RuntimeService/RunPodSandbox")  # bytes in and out, unparsed
        code, msg = _code(lambda: call(raw, timeout=10))
    finally:
        ch.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
    assert "not a valid runtime.v1.RunPodSandboxRequest" in msg


# -- labels and annotations at the limit --------------------------------------------------------------

@pytest.mark.parametrize("over", [0, 1])
def test_annotations_just_under_and_over_the_limit(env: RuntimeEnv, over: int) -> None:
    labels = {"app": "sizes"}
    ann = _sized(LIMIT - len("app") - len("sizes") + over)
    cfg = pod_config(labels=labels, annotations=ann)
    if over:
        code, msg = _code(lambda: env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(LIMIT) in msg
        assert env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items == []
        return
    sid, _ = env.run_pod(cfg)
    items = env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
    assert [(p.id, dict(p.annotations)) for p in items] == [(sid, ann)]
    # A container of that pod with its own annotations at the limit is created too.
    cid = env.create(sid, cfg, ["true"], annotations=_sized(LIMIT))
    code, _ = _code(lambda: env.create(sid, cfg, ["true"], annotations=_sized(LIMIT + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [c.id for c in env.rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers] == [cid]


# -- responses over the cap ---------------------------------------------------------------------------

def test_list_over_the_response_cap_is_refused_and_stream_or_filter_answer(senv: RuntimeEnv) -> None:
    rt = senv.rt
    assert rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items == []  # zero
    ann = _sized(400 * 1024)
    tags = [uuid.uuid4().hex[:8] for _ in range(3)]
    pods = [senv.run_pod(pod_config(labels={"tag": t}, annotations=ann)) for t in tags[:1]]
    assert [p.id for p in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items] == [pods[0][0]]  # one
    pods += [senv.run_pod(pod_config(labels={"tag": t}, annotations=ann)) for t in tags[1:]]
    sids = [sid for sid, _ in pods]
    code, msg = _code(lambda: rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10))  # many: > 1 MiB
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over the {SMALL_CAP}-byte limit" in msg and "StreamPodSandboxes" in msg
    streamed = [p.id for r in rt.StreamPodSandboxes(pb.StreamPodSandboxesRequest(), timeout=10)
                for p in r.pod_sandboxes]
    assert sorted(streamed) == sorted(sids)
    one = rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(label_selector={"tag": tags[1]})),
                            timeout=10).items
    assert [p.id for p in one] == [sids[1]]
    # Containers carry their own annotations: the same for ListContainers.
    cids = [senv.create(sid, pcfg, ["true"], annotations=ann) for sid, pcfg in pods]
    code, msg = _code(lambda: rt.ListContainers(pb.ListContainersRequest(), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "StreamContainers" in msg
    streamed = [c.id for r in rt.StreamContainers(pb.StreamContainersRequest(), timeout=10) for c in r.containers]
    assert sorted(streamed) == sorted(cids)


def test_exec_sync_output_is_capped_with_a_marker(env: RuntimeEnv) -> None:
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sleep", "3600"])
    ch = _kubelet_channel(env.d)
    try:
        rt = pbg.RuntimeServiceStub(ch)
        small = rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo out; echo err >&2"],
                                               timeout=60), timeout=90)
        assert (small.stdout, small.stderr, small.exit_code) == (b"out\n", b"err\n", 0)  # nothing cut, no marker
        script = "head -c 20000000 /dev/zero; head -c 20000000 /dev/zero | tr '\\0' e >&2; exit 3"
        big = rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=120), timeout=180)
    finally:
        ch.close()
    cap = KUBELET_MAX_MESSAGE - EXEC_SYNC_RESERVE
    assert big.exit_code == 3
    assert big.ByteSize() < KUBELET_MAX_MESSAGE
    marker = big.stderr[big.stderr.rindex(b"\n[moorage: ExecSync output truncated"):]
    assert marker.endswith(f"over the {cap}-byte limit were dropped]\n".encode())
    kept = len(big.stdout) + len(big.stderr) - len(marker)
    assert kept == cap
    assert set(big.stdout) <= {0} and set(big.stderr[:-len(marker)]) <= {ord("e")}
    dropped = int(marker.split(b"truncated: ")[1].split(b" ")[0])
    assert kept + dropped == 40_000_000
    assert "ExecSync output truncated" in env.d.log()


# -- the metrics endpoint -----------------------------------------------------------------------------

def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize("n", [0, 1, 100])
def test_idle_metrics_clients_hold_no_thread_and_a_scrape_answers(env: RuntimeEnv, n: int) -> None:
    d = env.d
    assert d.proc is not None
    before = _threads(d.proc.pid)
    socks = [socket.create_connection(("127.0.0.1", d.metrics_port), timeout=10) for _ in range(n)]
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10) as resp:
            assert b"moorage_grpc_requests_in_flight" in resp.read()
        # Other daemon threads come and go (executors): a thread per idle client would add n.
        assert _threads(d.proc.pid) < before + 8
    finally:
        for s in socks:
            s.close()
    env.rt.Version(pb.VersionRequest(), timeout=10)
