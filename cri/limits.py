"""Size limits at the CRI edge: what one request may carry and what one response may weigh.

Why: the kubelet's CRI client refuses any message over 16 MiB, so a ListPodSandbox that
grows past it breaks pod listing for the whole node, and one huge request makes the daemon
do work proportional to it on the event loop.  So:

- ``check_metadata`` refuses a RunPodSandbox/CreateContainer whose labels and annotations
  together exceed ``limits.max_labels_annotations_bytes`` (sum of the UTF-8 bytes of every key
  and value, as the Kubernetes API counts its 256 KiB annotation limit).  It stops counting at
  the limit, so a 12 MB request costs no more than a request at the limit.
- ``response_too_large`` is checked by the edge on every unary response: over
  ``max_response_bytes()`` the call answers RESOURCE_EXHAUSTED naming the size and pointing
  to filters and the Stream* RPCs, instead of a message the kubelet cannot read.

``MOORAGE_MAX_RESPONSE_BYTES`` in the daemon's environment lowers the 16 MiB response cap:
tests use it to cross the cap with a handful of pods (as ``MOORAGE_STREAM_BATCH_SIZE`` for
batches); it is not meant for production tuning.
"""

from __future__ import annotations

from collections.abc import Mapping

from moorage.core.errors import InvalidArgument, ResourceExhausted

KUBELET_MAX_MESSAGE = 16 * 1024 * 1024  # the kubelet's CRI client max receive size
MAX_RESPONSE_ENV = "MOORAGE_MAX_RESPONSE_BYTES"
# Room left in an ExecSync response for the protobuf framing and the truncation marker.
EXEC_SYNC_RESERVE = 4096

# List RPCs whose answer can be had in pieces instead.
_STREAMED = {
    "ListPodSandbox": "StreamPodSandboxes", "ListContainers": "StreamContainers", "ListImages": "StreamImages",
    "ListContainerStats": "StreamContainerStats", "ListPodSandboxStats": "StreamPodSandboxStats",
    "ListPodSandboxMetrics": "StreamPodSandboxMetrics",
}


def max_response_bytes(env: Mapping[str, str]) -> int:
    """The response cap: 16 MiB, or the (smaller) test override from the environment."""
    raw = env.get(MAX_RESPONSE_ENV, "").strip()
    if not raw:
        return KUBELET_MAX_MESSAGE
    try:
        n = int(raw)
    except ValueError:
        raise InvalidArgument(f"{MAX_RESPONSE_ENV}={raw[:32]!r} is not a whole number") from None
    if not EXEC_SYNC_RESERVE * 2 <= n <= KUBELET_MAX_MESSAGE:
        raise InvalidArgument(f"{MAX_RESPONSE_ENV} must be between {EXEC_SYNC_RESERVE * 2} and {KUBELET_MAX_MESSAGE}")
    return n


def response_too_large(method: str, size: int, limit: int) -> ResourceExhausted:
    """The error for a response of ``size`` bytes over ``limit``: what to do instead."""
    hint = "narrow it with a filter"
    if method in _STREAMED:
        hint += f" or use {_STREAMED[method]}, which sends the list in batches"
    return ResourceExhausted(
        f"{method} response would be {size} bytes, over the {limit}-byte limit of CRI clients "
        f"(the kubelet refuses larger messages); {hint}")


def check_metadata(what: str, labels: Mapping[str, str], annotations: Mapping[str, str], limit: int) -> None:
    """Refuse labels plus annotations over ``limit`` bytes (keys and values, UTF-8).

    Counting stops as soon as the limit is passed: the cost is bounded by the limit, not by
    the request.  The message names the object and the limit, never the (unbounded) content.
    """
    total = 0
    for entries in (labels, annotations):
        for k, v in entries.items():
            total += len(k.encode()) + len(v.encode())
            if total > limit:
                raise ResourceExhausted(
                    f"{what}: labels and annotations together exceed the limit of {limit} bytes (keys and values); "
                    "keep large data out of them (limits.max_labels_annotations_bytes)")
