"""Prometheus metrics for the daemon, in one registry served at /metrics.

The same HTTP server answers a few read-only JSON debug routes (``json_routes``, e.g.
``/debug/pulls``) that other parts register; every other path is the metrics page.

The server is bounded (see ``_WaitingRoom``): a connection gets a thread only once it sends
its request, requests are limited in size and time, and at most ``MAX_HANDLERS`` are served
at once, so idle or slow clients can neither hold threads nor starve a real scrape.
"""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _StateCollector:
    """Sandboxes and containers by state, read from the runtime's caches at scrape time."""

    def __init__(self) -> None:
        self.sandbox_states: Callable[[], dict[str, int]] = dict
        self.container_states: Callable[[], dict[str, int]] = dict

    def collect(self) -> Iterable[GaugeMetricFamily]:
        sb = GaugeMetricFamily("moorage_sandboxes", "Pod sandboxes by state", labels=["state"])
        for state, n in sorted(self.sandbox_states().items()):
            sb.add_metric([state], n)
        yield sb
        ct = GaugeMetricFamily("moorage_containers", "Containers by state", labels=["state"])
        for state, n in sorted(self.container_states().items()):
            ct.add_metric([state], n)
        yield ct


# Bounds of the metrics/debug HTTP server, so idle or slow clients cannot exhaust the daemon.
IDLE_TIMEOUT = 10.0  # seconds a connection may wait before its request, or between reads of it
MAX_WAITING = 256  # connections accepted and not yet sending: the oldest is closed beyond this
MAX_HANDLERS = 8  # requests served at once (one thread each); more get 503 at once
MAX_REQUEST_BYTES = 64 * 1024  # request line and headers; a scrape is a few hundred bytes


class _WaitingRoom:
    """Accepted connections wait here, in one selector thread, until their request starts.

    Only a connection that has sent something gets a handler thread, so idle clients cost an
    fd each (up to ``MAX_WAITING``, each for at most ``IDLE_TIMEOUT``), never a thread.
    """

    def __init__(self, dispatch: Callable[[socket.socket, Any], None], idle_timeout: float, max_waiting: int) -> None:
        self.dispatch = dispatch
        self.idle_timeout = idle_timeout
        self.max_waiting = max_waiting
        self.sel = selectors.DefaultSelector()
        self.waiting: dict[socket.socket, tuple[float, Any]] = {}  # insertion order: oldest first
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="metrics-waiting", daemon=True)
        self.thread.start()

    def add(self, sock: socket.socket, addr: Any) -> None:
        with self.lock:
            if self.closed:
                sock.close()
                return
            if len(self.waiting) >= self.max_waiting:
                oldest = next(iter(self.waiting))
                self._drop(oldest)
            self.waiting[sock] = (time.monotonic() + self.idle_timeout, addr)
            self.sel.register(sock, selectors.EVENT_READ)
        self.wake_w.send(b"\0")

    def _drop(self, sock: socket.socket) -> None:
        # Under self.lock.
        self.waiting.pop(sock, None)
        self.sel.unregister(sock)
        sock.close()

    def _run(self) -> None:
        while True:
            with self.lock:
                if self.closed:
                    return
                now = time.monotonic()
                for sock, (deadline, _) in list(self.waiting.items()):
                    if deadline <= now:
                        self._drop(sock)
                nearest = min((d for d, _ in self.waiting.values()), default=now + self.idle_timeout)
            events = self.sel.select(max(nearest - now, 0.01))
            ready: list[tuple[socket.socket, Any]] = []
            with self.lock:
                for key, _ in events:
                    if key.fileobj is self.wake_r:
                        try:
                            self.wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                        continue
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    entry = self.waiting.pop(conn, None)
                    if entry is not None:
                        self.sel.unregister(conn)
                        ready.append((conn, entry[1]))
            for sock, addr in ready:
                self.dispatch(sock, addr)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for sock in list(self.waiting):
                self._drop(sock)
        self.wake_w.send(b"\0")
        self.thread.join(timeout=5)
        self.sel.close()
        self.wake_r.close()
        self.wake_w.close()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown
    idle_timeout = IDLE_TIMEOUT
    max_waiting = MAX_WAITING
    max_handlers = MAX_HANDLERS

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_handlers)
        self._room = _WaitingRoom(self._dispatch, self.idle_timeout, self.max_waiting)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._room.add(request, client_address)  # no thread until the client speaks

    def _dispatch(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
            request.close()
            return
        try:
            super().process_request(request, client_address)  # a thread that releases the slot when done
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        room = getattr(self, "_room", None)
        if room is not None:
            room.close()


class _LimitedReader:
    """A request's input stream that ends after ``MAX_REQUEST_BYTES`` (a larger request fails to parse)."""

    def __init__(self, raw: Any, limit: int) -> None:
        self.raw = raw
        self.left = limit

    def readline(self, size: int = -1) -> bytes:
        if self.left <= 0:  # http.server answers 431 to this
            raise http.client.LineTooLong(f"request over {MAX_REQUEST_BYTES} bytes")
        n = self.left if size < 0 else min(size, self.left)
        line: bytes = self.raw.readline(n)
        self.left -= len(line)
        return line

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if size < 0 else min(size, self.left)
        data: bytes = self.raw.read(n)
        self.left -= len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        # Per read: a client that stalls mid-request is dropped.
        self.connection.settimeout(getattr(self.server, "idle_timeout", IDLE_TIMEOUT))
        self.rfile = _LimitedReader(self.rfile, MAX_REQUEST_BYTES)  # type: ignore[assignment]

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per scrape would drown the daemon's log


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self.states = _StateCollector()
        r.register(self.states)
        self.rpc_total = Counter(
            "moorage_grpc_requests", "CRI calls by method and gRPC code", ["service", "method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "moorage_grpc_request_duration_seconds", "CRI call latency", ["service", "method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.rpc_in_flight = Gauge("moorage_grpc_requests_in_flight", "CRI calls being served", registry=r)
        self.image_pulls = Counter("moorage_image_pulls", "Image pulls by result", ["result"], registry=r)
        self.image_pull_bytes = Counter("moorage_image_pull_bytes", "Bytes downloaded by image pulls", registry=r)
        self.image_pull_seconds = Histogram(
            "moorage_image_pull_duration_seconds", "Image pull duration", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.cni_seconds = Histogram(
            "moorage_cni_operation_duration_seconds", "CNI plugin calls", ["operation"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.oci_seconds = Histogram(
            "moorage_oci_operation_duration_seconds", "runc/crun and conmon calls", ["operation"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        # path -> a function returning something JSON-serialisable; read at request time
        self.json_routes: dict[str, Callable[[], object]] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _app(self) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            route = self.json_routes.get(environ.get("PATH_INFO", ""))
            if route is None:
                return metrics_app(environ, start_response)
            body = json.dumps(route(), sort_keys=True).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]

        return app

    def serve(self, address: str) -> int:
        """Serve /metrics (and the JSON routes) on ``host:port``; returns the bound port."""
        host, _, port = address.rpartition(":")
        family, *_, sockaddr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]

        class Server(_Server):
            address_family = family  # an IPv6 host needs an AF_INET6 socket

        server = make_server(str(sockaddr[0]), int(port), self._app(), Server, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


METRICS = Metrics()
