"""Structured logging: one line per event, JSON or logfmt.

Extra fields go in ``extra={"fields": {...}}``; when tracing is on, the
current trace and span ids are added to every line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

from opentelemetry import trace

# Set by cri.tracing.setup when tracing is on.  With tracing off the ids are left out even when a
# caller sent a traceparent (the no-op tracer would otherwise hand its ids to every line).
TRACE_IDS = False


def _trace_ids() -> dict:
    if not TRACE_IDS:
        return {}
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def _record_fields(record: logging.LogRecord) -> dict:
    out = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    out.update(getattr(record, "fields", None) or {})
    out.update(_trace_ids())
    if record.exc_info:
        out["error"] = logging.Formatter().formatException(record.exc_info)
    return out


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_record_fields(record), default=str, separators=(",", ":"))


def _logfmt_value(v: object) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if s == "" or any(c in s for c in ' ="\n\t'):
        return json.dumps(s)
    return s


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _record_fields(record).items())


def setup(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pyroute2", "httpx", "httpcore", "asyncio", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
