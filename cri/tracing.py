"""OpenTelemetry tracing: off by default; a span per CRI call and child spans when on.

Configured from [tracing] (enabled, endpoint, sampling_ratio, service_name) or the
standard environment variables: OTEL_EXPORTER_OTLP_ENDPOINT /
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (setting one turns tracing on),
OTEL_TRACES_SAMPLER_ARG (ratio), OTEL_SERVICE_NAME, OTEL_SDK_DISABLED=true and
OTEL_TRACES_EXPORTER=none (spans are made but not exported).  Export is OTLP over
HTTP/protobuf in batches.

With tracing off no tracer provider is installed: ``trace.get_tracer`` hands out
OpenTelemetry's no-op tracer, whose spans cost a function call and record nothing, and the SDK
is not even imported (``cri/tracing_sdk.py`` holds what needs it at module level).

``MOORAGE_TRACE_FILE=<path>`` (for tests) also writes every finished span as one
JSON line to that file, synchronously.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Tracer

from moorage.cri import logs

if TYPE_CHECKING:  # the SDK is imported only when tracing is on (it costs start-up time and memory)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_provider: TracerProvider | None = None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def setup(enabled: bool, endpoint: str = "", sampling_ratio: float = 1.0, service_name: str = "moorage",
          exporter: SpanExporter | None = None) -> Tracer:
    """Install a tracer provider; ``exporter`` overrides OTLP (tests pass an in-memory one)."""
    global _provider
    env_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    trace_file = os.environ.get("MOORAGE_TRACE_FILE", "")
    if _env_true("OTEL_SDK_DISABLED") or not (enabled or env_endpoint or exporter is not None):
        return trace.NoOpTracer()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    try:
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG") or sampling_ratio)
    except ValueError:
        ratio = sampling_ratio
    ratio = min(1.0, max(0.0, ratio))
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}),
                              sampler=ParentBased(TraceIdRatioBased(ratio)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() != "none":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if endpoint:
            # A base URL like http://collector:4318 gets the standard traces path.
            url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
            otlp = OTLPSpanExporter(endpoint=url)
        else:
            otlp = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_* or http://localhost:4318/v1/traces
        provider.add_span_processor(BatchSpanProcessor(otlp))
    if trace_file:
        from moorage.cri.tracing_sdk import JSONLinesFileExporter

        provider.add_span_processor(SimpleSpanProcessor(JSONLinesFileExporter(trace_file)))
    _provider = provider
    trace.set_tracer_provider(provider)
    logs.TRACE_IDS = True
    return provider.get_tracer("moorage")


def tracer() -> Tracer:
    return trace.get_tracer("moorage")


def shutdown() -> None:
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None
