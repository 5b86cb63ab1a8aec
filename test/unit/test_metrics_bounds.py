"""The metrics/debug HTTP server stays usable whatever idle, slow or large clients do (issue #14)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from moorage.cri import metrics as metricsmod
from moorage.cri.metrics import Metrics


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Metrics, int]]:
    monkeypatch.setattr(metricsmod._Server, "idle_timeout", 1.0)
    monkeypatch.setattr(metricsmod._Server, "max_waiting", 20)
    m = Metrics()
    port = m.serve("127.0.0.1:0")
    try:
        yield m, port
    finally:
        m.close()


def _scrape(port: int) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body: bytes = resp.read()
        return body


def _idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
    return socks



@pytest.mark.parametrize("n", [0, 1, 12])
def test_idle_connections_hold_no_thread_and_a_scrape_answers(server: tuple[Metrics, int], n: int) -> None:
    _, port = server
    before = threading.active_count()
    socks = _idle(port, n)
    try:
        body = _scrape(port)
        assert b"moorage_grpc_requests_in_flight" in body
        # Idle sockets wait in the one selector thread: no thread each.
        assert threading.active_count() <= before + 1
    finally:
        for s in socks:
            s.close()


def test_idle_connection_is_closed_after_the_idle_timeout(server: tuple[Metrics, int]) -> None:
    _, port = server
    (s,) = _idle(port, 1)
    with s:
        assert s.recv(1) == b""  # closed by the server (the 10 s socket timeout would raise instead)


def test_more_idle_clients_than_the_waiting_room_drop_the_oldest(server: tuple[Metrics, int]) -> None:
    _, port = server
    socks = _idle(port, 25)  # max_waiting is 20
    try:
        assert socks[0].recv(1) == b""  # the oldest was closed to make room
        assert b"moorage_grpc_requests" in _scrape(port)
    finally:
        for s in socks:
            s.close()


def test_a_client_stalling_mid_request_is_dropped(server: tuple[Metrics, int]) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never end
        data = s.recv(65536)
        assert b"200 OK" not in data  # the server gave up on it (408 or a close)
    assert b"moorage_grpc_requests" in _scrape(port)


@pytest.mark.parametrize("header_bytes", [100, 200_000])
def test_request_size_is_bounded(server: tuple[Metrics, int], header_bytes: int) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        hdrs = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 900) for i in range(header_bytes // 1000 + 1))
        try:
            s.sendall(b"GET /metrics HTTP/1.0\r\n" + hdrs + b"\r\n")
        except OSError:
            pass  # the server may close while we still send
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        reply = b"".join(chunks)
    if header_bytes > metricsmod.MAX_REQUEST_BYTES:
        assert not reply.startswith(b"HTTP/1.0 200")
    else:
        assert reply.startswith(b"HTTP/1.0 200") and b"moorage_grpc_requests" in reply


def test_requests_over_the_handler_cap_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metricsmod._Server, "max_handlers", 1)
    m = Metrics()
    entered, release = threading.Event(), threading.Event()

    def slow() -> object:
        entered.set()
        release.wait(10)
        return {}

    m.json_routes["/debug/slow"] = slow
    port = m.serve("127.0.0.1:0")
    try:
        def hold() -> None:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://127.0.0.1:{port}/debug/slow", timeout=10) as resp:
                resp.read()

        holder = threading.Thread(target=hold)
        holder.start()
        assert entered.wait(10)
        with pytest.raises(urllib.error.HTTPError) as e:
            _scrape(port)
        e.value.close()
        assert e.value.code == 503
        release.set()
        holder.join(10)
        # The slot frees when the slow handler's thread ends, which may be just after its client
        # has read the answer: a scrape then gets 503 for a moment, then the metrics.
        deadline = time.monotonic() + 10
        while True:
            try:
                body = _scrape(port)
                break
            except urllib.error.HTTPError as err:
                err.close()
                if err.code != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert b"moorage_grpc_requests" in body
    finally:
        release.set()
        m.close()
