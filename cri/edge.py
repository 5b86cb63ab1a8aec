"""The gRPC edge: every CRI call passes through ``instrument`` exactly once.

It gates on readiness, opens a span (continuing a ``traceparent`` sent in the
call's metadata), records the latency and result metric, writes one structured
log line, and maps domain errors to gRPC status codes (via ``cri.errors``).
Handlers below it raise typed errors only.

Services are registered from the proto's descriptors, so an RPC no servicer
implements still answers, with UNIMPLEMENTED naming it.  A service may be
served by several RPC groups (the RuntimeService by the runtime, streaming and
stats servicers); each RPC must be found on exactly one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from moorage.core.errors import InvalidArgument
from moorage.cri import wire
from moorage.cri.api import api_pb2
from moorage.cri.encoded import serialize
from moorage.cri.errors import status_for
from moorage.cri.limits import KUBELET_MAX_MESSAGE, response_too_large
from moorage.cri.metrics import METRICS

log = logging.getLogger("moorage.cri")

Ctx: TypeAlias = grpc.aio.ServicerContext  # Any to mypy: grpc ships no stubs
Unary: TypeAlias = Callable[[Any, Ctx], Awaitable[Any]]
Streaming: TypeAlias = Callable[[Any, Ctx], AsyncIterator[Any]]

# Calls the kubelet makes every second or so: logged at debug level only.
_POLLED = ("List", "Status", "Version", "ImageFsInfo", "ContainerStats", "PodSandboxStats", "RuntimeConfig")


class _Unimplemented:
    def __init__(self, service: str, method: str) -> None:
        self.what = f"{service}/{method}"

    async def __call__(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"moorage does not implement {self.what} yet")


def _carrier(context: grpc.aio.ServicerContext) -> dict[str, str]:
    md = context.invocation_metadata() or ()
    return {k: v for k, v in md if isinstance(v, str)}


class Edge:
    def __init__(self, ready: Callable[[], str | None], max_response: int = KUBELET_MAX_MESSAGE) -> None:
        # ready() returns None when calls may proceed, else the reason they may not.
        self.ready = ready
        # No message larger than this leaves: the kubelet could not read it (see cri/limits.py).
        self.max_response = max_response

    def _checked(self, method: str, resp: Any) -> Any:
        # Ready-made bytes (cri/encoded.py) have their size; a message's is computed in C.
        size = len(resp) if isinstance(resp, bytes) else resp.ByteSize()
        if size > self.max_response:
            raise response_too_large(method, size, self.max_response)
        return resp

    def _begin(self, service: str, method: str, context: grpc.aio.ServicerContext) -> trace.Span:
        tracer = trace.get_tracer("moorage")
        ctx = propagate.extract(_carrier(context))
        span = tracer.start_span(f"{service}/{method}", context=ctx, kind=SpanKind.SERVER,
                                 attributes={"rpc.system": "grpc", "rpc.service": f"runtime.v1.{service}",
                                             "rpc.method": method})
        return span

    def _finish(self, service: str, method: str, span: trace.Span, start: float, code: grpc.StatusCode, msg: str) -> None:
        elapsed = time.perf_counter() - start
        METRICS.rpc_seconds.labels(service, method).observe(elapsed)
        METRICS.rpc_total.labels(service, method, code.name).inc()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, msg))
        span.end()
        level = logging.DEBUG if method.startswith(_POLLED) and code is grpc.StatusCode.OK else logging.INFO
        if code is grpc.StatusCode.INTERNAL:
            level = logging.ERROR  # a bug in moorage
        elif code is grpc.StatusCode.UNKNOWN:
            level = logging.WARNING  # runc/crun/conmon refused: the runtime's own message says why
        if log.isEnabledFor(level):
            fields = {"method": f"{service}/{method}", "code": code.name, "ms": round(elapsed * 1000, 3)}
            if msg:
                fields["error"] = msg
            with trace.use_span(span, end_on_exit=False):  # the line carries the call's trace/span ids
                log.log(level, "cri call", extra={"fields": fields})

    @contextlib.asynccontextmanager
    async def _call(self, service: str, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Readiness, span, metrics, log line and error mapping around one call."""
        not_ready = self.ready()
        if not_ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, not_ready)
        start = time.perf_counter()
        span = self._begin(service, method, context)
        code, msg = grpc.StatusCode.OK, ""
        METRICS.rpc_in_flight.inc()
        try:
            with trace.use_span(span, end_on_exit=False):
                yield
        except asyncio.CancelledError:
            code, msg = grpc.StatusCode.CANCELLED, "call cancelled by the client"
            raise
        except grpc.aio.AbortError:
            code, msg = context.code() or grpc.StatusCode.UNKNOWN, context.details() or ""
            raise
        except Exception as exc:
            code, msg = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s/%s", service, method)
            await context.abort(code, msg)
        finally:
            METRICS.rpc_in_flight.dec()
            self._finish(service, method, span, start, code, msg)

    def unary(self, service: str, method: str, fn: Unary, req: Any = None) -> Unary:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(service, method, context):
                if req is not None:
                    request = await _parse(req, request)
                return self._checked(method, await fn(request, context))

        return handler

    def stream(self, service: str, method: str, fn: Streaming, req: Any = None) -> Streaming:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._call(service, method, context):
                if req is not None:
                    request = await _parse(req, request)
                async for item in fn(request, context):
                    yield self._checked(method, item)

        return handler

    def service_handler(self, service: str, *impls: object) -> grpc.GenericRpcHandler:
        """A generic handler for ``runtime.v1.<service>`` backed by the methods of ``impls``.

        A method returns its response message, or the message already serialized (``cri.wire``)."""
        desc = api_pb2.DESCRIPTOR.services_by_name[service]
        handlers = {}
        for m in desc.methods:
            req = getattr(api_pb2, m.input_type.name)
            found = [getattr(impl, m.name) for impl in impls if hasattr(impl, m.name)]
            if len(found) > 1:
                raise TypeError(f"{service}/{m.name} is implemented by more than one servicer")
            fn = found[0] if found else None
            # Requests arrive as bytes and are parsed inside the call (see _parse).
            if m.server_streaming:
                handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                    self.stream(service, m.name, fn or _unimplemented_stream(service, m.name), req),
                    request_deserializer=None, response_serializer=serialize,
                )
            else:
                handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                    self.unary(service, m.name, fn or _Unimplemented(service, m.name), req),
                    request_deserializer=None, response_serializer=serialize,
                )
        return grpc.method_handlers_generic_handler(desc.full_name, handlers)


# Requests larger than this are parsed in a worker thread: the protobuf parser does not hold
# the GIL throughout, so the event loop keeps serving other calls while a 12 MB request is read
# (parsed on the loop, such a request stalled every call for the length of the parse).
PARSE_IN_THREAD_BYTES = 256 * 1024


def _decode(req: Any, raw: bytes) -> Any:
    try:
        return req.FromString(raw)
    except DecodeError:
        # Name the field when the encoding lets us (cri/wire.py walks it without decoding strings).
        why = wire.explain(raw, req.DESCRIPTOR) or "malformed protobuf or invalid UTF-8 in a string field"
        raise InvalidArgument(f"the request is not a valid {req.DESCRIPTOR.full_name} message: {why}") from None


async def _parse(req: Any, raw: bytes) -> Any:
    """The request message from its wire bytes; undecodable bytes are the caller's fault."""
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(_decode, req, raw)
    return _decode(req, raw)


def _unimplemented_stream(service: str, method: str) -> Streaming:
    unimpl = _Unimplemented(service, method)

    async def fn(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await unimpl(request, context)
        yield  # pragma: no cover - abort raised above; the yield makes this an async generator

    return fn
