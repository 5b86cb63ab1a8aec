"""cri.tracing and the child spans of RuntimeContext.timed, with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import json

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moorage.cri import tracing, tracing_sdk
from moorage.runtime.context import RuntimeContext

EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans():
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    current = trace.get_tracer_provider()
    if not getattr(current, "_moorage_test_hooked", False):
        current.add_span_processor(SimpleSpanProcessor(EXPORTER))
        current._moorage_test_hooked = True
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


class FakeRuntime:
    def __init__(self):
        self.seen = []

    def observe(self, op, secs):
        self.seen.append(op)


def test_timed_opens_a_child_span_and_records_the_duration(spans):
    rt = FakeRuntime()

    async def main():
        with trace.get_tracer("t").start_as_current_span("RuntimeService/StartContainer"):
            await RuntimeContext.timed(rt, "oci_create", asyncio.sleep(0), id="c1")
            with pytest.raises(RuntimeError):
                async def boom():
                    raise RuntimeError("runc failed")
                await RuntimeContext.timed(rt, "cni_add", boom())

    asyncio.run(main())
    got = {s.name: s for s in spans.get_finished_spans()}
    parent = got["RuntimeService/StartContainer"]
    for name in ("oci.create", "cni.add"):
        assert got[name].parent.span_id == parent.context.span_id
        assert got[name].context.trace_id == parent.context.trace_id
    assert got["oci.create"].attributes["id"] == "c1"
    assert got["oci.create"].attributes["moorage.operation"] == "oci_create"
    assert got["cni.add"].status.status_code.name == "ERROR"
    assert rt.seen == ["oci_create", "cni_add"]


def test_setup_off_is_a_noop_tracer(monkeypatch):
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    t = tracing.setup(False)
    assert isinstance(t, trace.NoOpTracer)
    with t.start_as_current_span("x") as s:
        assert not s.is_recording()


def test_json_lines_exporter(tmp_path, spans):
    path = tmp_path / "spans.jsonl"
    exp = tracing_sdk.JSONLinesFileExporter(str(path))
    with trace.get_tracer("t").start_as_current_span("outer") as outer:
        with trace.get_tracer("t").start_as_current_span("inner", attributes={"k": 1}):
            pass
    exp.export(spans.get_finished_spans())
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    by = {x["name"]: x for x in lines}
    assert by["inner"]["parent_span_id"] == format(outer.get_span_context().span_id, "016x")
    assert by["inner"]["attributes"] == {"k": 1} and by["outer"]["parent_span_id"] is None
    assert len(by["outer"]["trace_id"]) == 32
