"""OpenTelemetry spans of the daemon: RPC spans continuing a traceparent, child spans of pulls,
snapshot mounts and runc/conmon calls; OTLP/HTTP export; sampling; nothing when tracing is off.

The daemon is another process, so spans are taken two ways: MOORAGE_TRACE_FILE (a JSON-lines
file exporter, synchronous) and a tiny OTLP/HTTP receiver on 127.0.0.1 decoding the protobuf.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import threading

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config, run_container


class OTLPReceiver:
    """POST /v1/traces bodies (ExportTraceServiceRequest) decoded into span dicts."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.spans: list[dict] = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    svc = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            outer.spans.append({"name": s.name, "trace_id": s.trace_id.hex(),
                                                "span_id": s.span_id.hex(),
                                                "parent_span_id": s.parent_span_id.hex() or None,
                                                "service": svc, "path": self.path})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def read_spans(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def traced_daemon(daemon_factory, extra: str = "", env: dict | None = None):
    d = daemon_factory(extra_config=extra, start=False)
    d.env["MOORAGE_TRACE_FILE"] = os.path.join(d.base, "spans.jsonl")
    d.env.update(env or {})
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
              "OTEL_TRACES_SAMPLER_ARG", "OTEL_TRACES_EXPORTER"):
        d.env.setdefault(k, "")
    d.start()
    return d, d.env["MOORAGE_TRACE_FILE"]


def traceparent() -> tuple[str, str, str]:
    tid, sid = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{tid}-{sid}-01", tid, sid


def test_spans_of_a_pull_and_a_pod_with_parents_attributes_and_otlp_export(daemon_factory, registry):
    rx = OTLPReceiver()
    try:
        d, path = traced_daemon(daemon_factory, f'[tracing]\nenabled = true\nendpoint = "http://127.0.0.1:{rx.port}"\n'
                                                f'service_name = "moorage-test"\n')
        ref = registry.images["busybox"].ref
        tp, tid, parent = traceparent()
        d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), metadata=[("traceparent", tp)],
                           timeout=120)
        spans = read_spans(path)
        [pull] = [s for s in spans if s["name"] == "ImageService/PullImage"]
        assert pull["trace_id"] == tid and pull["parent_span_id"] == parent and pull["kind"] == "SERVER"
        assert pull["attributes"]["rpc.method"] == "PullImage" and pull["service"] == "moorage-test"
        kids = {s["name"]: s for s in spans if s["parent_span_id"] == pull["span_id"]}
        assert {"image.resolve", "image.fetch_layer", "image.unpack"} <= set(kids)
        assert kids["image.resolve"]["attributes"]["image.ref"].endswith("test/busybox:latest")
        fetches = [s for s in spans if s["name"] == "image.fetch_layer"]
        assert fetches and all(s["trace_id"] == tid for s in fetches)
        assert fetches[0]["attributes"]["image.layer.digest"].startswith("sha256:")
        assert fetches[0]["attributes"]["image.layer.downloaded_bytes"] > 0
        layers = [s for s in spans if s["name"] == "image.unpack_layer"]
        assert layers and all(s["parent_span_id"] == kids["image.unpack"]["span_id"] for s in layers)

        pcfg = pod_config()
        sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg)).pod_sandbox_id
        cid = run_container(d.runtime, sid, pcfg, container_config(ref, ["sleep", "3600"]))
        spans = read_spans(path)
        by_name: dict[str, list[dict]] = {}
        for s in spans:
            by_name.setdefault(s["name"], []).append(s)
        [run] = by_name["RuntimeService/RunPodSandbox"]
        assert run["parent_span_id"] is None  # no traceparent sent: a new trace
        run_kids = [s["name"] for s in spans if s["parent_span_id"] == run["span_id"]]
        # No infra process (its namespaces are pinned), so no runc call under RunPodSandbox.
        assert not [k for k in run_kids if k.startswith("oci.")]
        [create] = by_name["RuntimeService/CreateContainer"]
        assert [s["name"] for s in spans if s["parent_span_id"] == create["span_id"]] == ["snapshot.mount"]
        assert by_name["snapshot.mount"][0]["attributes"]["snapshot.key"] == cid
        [start] = by_name["RuntimeService/StartContainer"]
        start_kids = {s["name"]: s for s in spans if s["parent_span_id"] == start["span_id"]}
        assert {"oci.create", "oci.start"} <= set(start_kids)
        assert start_kids["oci.create"]["attributes"]["moorage.operation"] == "oci_create"
        assert all(s["status"] == "UNSET" for s in spans if s["name"].startswith("oci."))

        # Logs carry the ids of the span they were written in.
        lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
        ready = [x for x in lines if x.get("msg") == "pod sandbox ready"]
        assert ready and ready[0]["trace_id"] == run["trace_id"] and ready[0]["span_id"] == run["span_id"]
        calls = [x for x in lines if x.get("msg") == "cri call" and x.get("method") == "ImageService/PullImage"]
        assert calls and calls[0]["trace_id"] == tid and calls[0]["span_id"] == pull["span_id"]

        # The same spans went out over OTLP/HTTP (flushed at shutdown at the latest).
        d.cleanup_pods()
        assert d.stop() == 0
        got = {s["span_id"]: s for s in rx.spans}
        assert pull["span_id"] in got and got[pull["span_id"]]["parent_span_id"] == parent
        assert got[pull["span_id"]]["service"] == "moorage-test" and got[pull["span_id"]]["path"] == "/v1/traces"
        assert {s["span_id"] for s in read_spans(path)} <= set(got)
    finally:
        rx.close()


def test_tracing_off_makes_no_spans_and_no_ids_in_logs(daemon_factory, registry):
    d, path = traced_daemon(daemon_factory)  # tracing off is the default
    tp, tid, _ = traceparent()
    d.runtime.Version(pb.VersionRequest(), metadata=[("traceparent", tp)])
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=registry.images["busybox"].ref)), timeout=120)
    d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config()))
    assert read_spans(path) == []
    assert "trace_id" not in d.log()


def test_sampling_ratio_zero_keeps_only_sampled_parents(daemon_factory):
    d, path = traced_daemon(daemon_factory, "[tracing]\nenabled = true\nsampling_ratio = 0.0\n",
                            env={"OTEL_TRACES_EXPORTER": "none"})
    for _ in range(5):
        d.runtime.Version(pb.VersionRequest())
    assert read_spans(path) == []
    tp, tid, parent = traceparent()
    d.runtime.Version(pb.VersionRequest(), metadata=[("traceparent", tp)])
    [s] = read_spans(path)
    assert s["trace_id"] == tid and s["parent_span_id"] == parent


def test_otel_env_endpoint_turns_tracing_on(daemon_factory):
    rx = OTLPReceiver()
    try:
        d, path = traced_daemon(daemon_factory, env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rx.port}",
                                                     "OTEL_SERVICE_NAME": "from-env"})
        before = len(read_spans(path))  # the fixture's readiness probes (Version) are traced too
        d.runtime.Version(pb.VersionRequest())
        spans = read_spans(path)
        assert len(spans) == before + 1
        s = spans[-1]
        assert s["name"] == "RuntimeService/Version" and s["service"] == "from-env"
        assert d.stop() == 0
        assert sorted(x["span_id"] for x in rx.spans) == sorted(x["span_id"] for x in spans)
    finally:
        rx.close()


@pytest.mark.parametrize("disabled", ["true"])
def test_otel_sdk_disabled_wins(daemon_factory, disabled):
    d, path = traced_daemon(daemon_factory, "[tracing]\nenabled = true\n", env={"OTEL_SDK_DISABLED": disabled})
    d.runtime.Version(pb.VersionRequest())
    assert read_spans(path) == []
