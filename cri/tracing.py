"""OpenTelemetry tracing: off by default; a span per CRI call when on.

Configured from [tracing] or the standard OTEL_* environment variables
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME).
With tracing off the tracer is OpenTelemetry's no-op one, so the cost per call
is a few attribute look-ups.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.trace import Tracer

_provider = None


def setup(enabled: bool, endpoint: str = "", sampling_ratio: float = 1.0, service_name: str = "moorage",
          exporter=None) -> Tracer:
    """Install a tracer provider; ``exporter`` overrides OTLP (tests pass an in-memory one)."""
    global _provider
    env_on = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    if not (enabled or exporter is not None):
        return trace.NoOpTracer()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", sampling_ratio))
    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": name}), sampler=ParentBased(TraceIdRatioBased(ratio)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif endpoint or env_on:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()))
    _provider = provider
    trace.set_tracer_provider(provider)
    return provider.get_tracer("moorage")


def tracer() -> Tracer:
    return trace.get_tracer("moorage")


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()
