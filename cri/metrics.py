"""Prometheus metrics for the daemon, in one registry served at /metrics.

The same HTTP server answers a few read-only JSON debug routes (``json_routes``, e.g.
``/debug/pulls``) that other parts register; every other path is the metrics page.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
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


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown


class _QuietHandler(WSGIRequestHandler):
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
