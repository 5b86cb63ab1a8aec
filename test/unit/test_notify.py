"""The sd_notify datagram protocol of moorage.cri.notify, against real unix datagram sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.cri.notify import Notifier, socket_address, watchdog_interval


def _listener(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    where = str(tmp_path / "notify.sock")
    with _listener(where) as s:
        yield where, s


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"moorage-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with _listener("\0" + name) as s:
        yield "@" + name, s


def _messages(s: socket.socket, n: int) -> list[str]:
    return [s.recv(4096).decode() for _ in range(n)]


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_arrive_as_one_datagram_each(kind: str, request: pytest.FixtureRequest) -> None:
    value, listener = request.getfixturevalue(f"{kind}_socket")
    env = {"NOTIFY_SOCKET": value}
    n = Notifier.from_env(env, pid=1234)
    assert n.enabled
    assert n.status("recovering:  two\nlines")
    assert n.ready("serving 1 pod")
    assert n.ping()
    assert n.stopping()
    assert _messages(listener, 4) == [
        "STATUS=recovering: two lines",  # STATUS is one line: newlines would start a new assignment
        "READY=1\nSTATUS=serving 1 pod",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_reloading_carries_the_monotonic_clock(path_socket: tuple[str, socket.socket]) -> None:
    value, listener = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading("reloading config")
    lines = listener.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[2] == "STATUS=reloading config"
    key, usec = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and int(usec) >= before


def test_the_variables_leave_the_environment_so_children_do_not_inherit_them() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7", "PATH": "/bin"}
    n = Notifier.from_env(env, pid=7)
    assert env == {"PATH": "/bin"}
    assert n.address == "/run/systemd/notify" and n.watchdog == 0.5
    kept = {"NOTIFY_SOCKET": "@x"}
    Notifier.from_env(kept, unset=False)
    assert kept == {"NOTIFY_SOCKET": "@x"}


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog is None
    assert not n.ready("x") and not n.ping() and not n.stopping() and not n.status("y")
    asyncio.run(asyncio.wait_for(n.heartbeat(lambda: "s"), 1))  # returns at once


def test_a_dead_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert n.enabled
    assert not n.ready()
    assert "cannot notify" in caplog.text


def test_addresses() -> None:
    assert socket_address("@sd") == "\0sd"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("relative/path") is None
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None
    assert not Notifier.from_env({"NOTIFY_SOCKET": "relative"}).enabled


@pytest.mark.parametrize(("usec", "pid", "want"), [
    ("", "", None),
    ("0", "", None),
    ("junk", "", None),
    ("-5", "", None),
    ("30000000", "", 15.0),
    ("30000000", "42", 15.0),   # meant for us
    ("30000000", "43", None),   # meant for another process
    ("30000000", "x", None),
])
def test_watchdog_interval(usec: str, pid: str, want: float | None) -> None:
    env = {k: v for k, v in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)) if v}
    assert watchdog_interval(env, 42) == want


def test_invalid_assignments_are_refused(path_socket: tuple[str, socket.socket]) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": path_socket[0]})
    with pytest.raises(ValueError):
        n.send("READY")
    with pytest.raises(ValueError):
        n.send("STATUS=a\nREADY=1")


def test_heartbeat_pings_at_the_interval_and_resends_a_changed_status(path_socket: tuple[str, socket.socket]) -> None:
    value, listener = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    assert n.watchdog == 0.05
    texts = iter(["", "a", "a", "a", "b"])

    def status() -> str:
        return next(texts, "b")

    async def run() -> None:
        task = asyncio.create_task(n.heartbeat(status, refresh=0.05))
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    listener.settimeout(0.2)
    got: list[str] = []
    try:
        while True:
            got.append(listener.recv(4096).decode())
    except TimeoutError:
        pass
    pings = got.count("WATCHDOG=1")
    assert 5 <= pings <= 12, got
    assert [m for m in got if m.startswith("STATUS=")] == ["STATUS=a", "STATUS=b"]


def test_a_failing_status_does_not_stop_the_pings(path_socket: tuple[str, socket.socket]) -> None:
    value, listener = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "100000"})

    def broken() -> str:
        raise RuntimeError("no counts")

    async def run() -> None:
        task = asyncio.create_task(n.heartbeat(broken))
        await asyncio.sleep(0.18)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert _messages(listener, 3) == ["WATCHDOG=1"] * 3
