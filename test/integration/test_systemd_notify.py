"""systemd readiness of the real daemon: the test is the service manager, listening on its own
unix datagram socket named by ``NOTIFY_SOCKET``.

What a ``Type=notify`` unit relies on: ``STATUS=`` lines through start-up, ``READY=1`` only once
the gRPC socket answers and recovery has finished, ``WATCHDOG=1`` at half of ``WATCHDOG_USEC``,
and ``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.testing.cri import pod_config, runtime_client, wait_for
from moorage.testing.daemon import DaemonProcess
from moorage.testing.runtime_env import make_daemon, remove_cgroup_tree


@dataclass
class Received:
    at: float
    fields: dict[str, str]
    probe: object = None  # what on_ready saw, for READY=1


@dataclass
class ServiceManager:
    """A stand-in for systemd's notify socket; on READY=1 it asks the daemon at once (``on_ready``)."""

    path: str
    on_ready: Callable[[], object] | None = None
    got: list[Received] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        assert self._sock is not None
        while self._sock.fileno() >= 0:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            r = Received(time.monotonic(), fields)
            if fields.get("READY") == "1" and self.on_ready is not None:
                r.probe = self.on_ready()
            with self._lock:
                self.got.append(r)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self.got)

    def statuses(self) -> list[str]:
        return [m.fields["STATUS"] for m in self.messages() if "STATUS" in m.fields]

    def first(self, key: str) -> int:
        """Index of the first message setting ``key``, or -1."""
        return next((i for i, m in enumerate(self.messages()) if key in m.fields), -1)


def _wait_index(sm: ServiceManager, key: str, timeout: float = 10) -> int:
    i: int = wait_for(lambda: sm.first(key) + 1, timeout=timeout, what=f"{key}=") - 1
    return i


def _channel(d: DaemonProcess) -> grpc.Channel:
    # A subchannel of its own: the shared one may still be backing off from the fixture's
    # attempts before the socket existed, and would answer UNAVAILABLE without trying.
    return grpc.insecure_channel(f"unix://{d.socket}", options=[("grpc.use_local_subchannel_pool", 1)])


def _version_answers(d: DaemonProcess) -> Callable[[], object]:
    def probe() -> object:
        with _channel(d) as ch:
            try:
                return pbg.RuntimeServiceStub(ch).Version(pb.VersionRequest(), timeout=2).runtime_name
            except grpc.RpcError as e:
                return (e.code(), e.details())
    return probe


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone (ENOENT), or going between the open and the read (ESRCH)
        return False


@pytest.fixture
def manager_for() -> Iterator[Callable[[DaemonProcess], ServiceManager]]:
    made: list[ServiceManager] = []

    def make(d: DaemonProcess) -> ServiceManager:
        m = ServiceManager(os.path.join(d.base, "notify.sock"))
        m.start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def test_status_ready_watchdog_and_stopping(daemon_factory: Callable[..., DaemonProcess],
                                           manager_for: Callable[[DaemonProcess], ServiceManager]) -> None:
    d = daemon_factory(start=False)
    os.makedirs(d.base, exist_ok=True)
    sm = manager_for(d)
    sm.on_ready = _version_answers(d)
    d.env = {"NOTIFY_SOCKET": sm.path, "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
    d.start()

    ready = _wait_index(sm, "READY")
    msgs = sm.messages()
    assert msgs[ready].probe == "moorage", "READY=1 came before the gRPC socket answered"
    statuses = sm.statuses()
    assert statuses[0].startswith("starting"), statuses
    assert any(s.startswith("recovering") for s in statuses[:ready + 1]), statuses
    assert msgs[ready].fields["STATUS"] == f"serving on {d.socket}: 0 pods (0 ready), 0 containers (0 running)"
    assert sm.first("STOPPING") == -1

    # pings at about half of WATCHDOG_USEC, for as long as the daemon serves
    def pings() -> list[float]:
        return [m.at for m in sm.messages() if m.fields == {"WATCHDOG": "1"}]

    wait_for(lambda: len([t for t in pings() if t > msgs[ready].at]) >= 5, timeout=10, what="5 pings after READY=1")
    gaps = [b - a for a, b in zip(pings(), pings()[1:])]
    assert all(0.1 < g < 0.6 for g in gaps), gaps
    assert 0.15 < sum(gaps) / len(gaps) < 0.35, gaps

    assert d.proc is not None
    assert d.stop(signal.SIGTERM) == 0
    stopping = sm.first("STOPPING")
    assert stopping > ready, [m.fields for m in sm.messages()]
    assert sm.messages()[stopping].fields["STATUS"].startswith("stopping")
    time.sleep(0.6)  # the process is gone: no more pings
    last_ping = pings()[-1]
    assert last_ping < time.monotonic() - 0.5


def test_watchdog_for_another_pid_is_not_ours(daemon_factory: Callable[..., DaemonProcess],
                                              manager_for: Callable[[DaemonProcess], ServiceManager]) -> None:
    d = daemon_factory(start=False)
    os.makedirs(d.base, exist_ok=True)
    sm = manager_for(d)
    d.env = {"NOTIFY_SOCKET": sm.path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    d.start()
    _wait_index(sm, "READY")
    time.sleep(0.5)
    assert not [m for m in sm.messages() if "WATCHDOG" in m.fields]


def test_ready_only_after_recovery(daemon_factory: Callable[..., DaemonProcess],
                                  manager_for: Callable[[DaemonProcess], ServiceManager]) -> None:
    """A pod whose infra died while the daemon was down is NOTREADY already when READY=1 arrives."""
    d, parent = make_daemon(daemon_factory)
    try:
        rt = runtime_client(d)
        host_net = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.NODE)))
        sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config(linux=host_net)), timeout=120).pod_sandbox_id
        infra = json.loads(rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True),
                                               timeout=30).info["info"])["pid"]
        d.kill9()
        os.kill(infra, signal.SIGKILL)
        wait_for(lambda: not _alive(infra), what="the infra process to die")

        sm = manager_for(d)

        def pod_state() -> object:
            with _channel(d) as ch:
                try:
                    return pbg.RuntimeServiceStub(ch).PodSandboxStatus(
                        pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=2).status.state
                except grpc.RpcError as e:
                    return e.code()

        sm.on_ready = pod_state
        d.env = {"NOTIFY_SOCKET": sm.path}
        d.start()
        ready = _wait_index(sm, "READY")
        m = sm.messages()[ready]
        assert m.probe == pb.SANDBOX_NOTREADY
        assert m.fields["STATUS"] == f"serving on {d.socket}: 1 pods (0 ready), 0 containers (0 running)"
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.cleanup_pods()  # before the cgroup parent can go
        remove_cgroup_tree(parent)



def test_a_failed_start_says_why_and_never_ready(daemon_factory: Callable[..., DaemonProcess],
                                                manager_for: Callable[[DaemonProcess], ServiceManager]) -> None:
    first = daemon_factory()
    sm = manager_for(first)
    # a second daemon on the same root dir is refused by the daemon lock
    p = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "serve", "--config", first.config_path],
                       env={**os.environ, "NOTIFY_SOCKET": sm.path}, capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode != 0, p.stderr[-2000:]
    wait_for(lambda: sm.statuses(), timeout=5, what="a STATUS line")
    time.sleep(0.2)  # anything the exiting process sent has been received by now
    assert [s for s in sm.statuses() if s.startswith("failed to start: another moorage daemon")], sm.statuses()
    assert sm.first("READY") == -1
