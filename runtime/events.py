"""Container lifecycle events for GetContainerEvents (the kubelet's evented PLEG).

Each subscriber has a bounded queue.  Publishing never waits: a subscriber
whose queue is full is dropped, and its stream ends with an error saying so,
so a slow reader can never stall the runtime and never silently misses events.

An event carries the pod sandbox record and its container records *as they were
when it was published* (read-only snapshots, taken once per event and shared by
all subscribers, and only while someone is subscribed), so a reader that falls
behind still reports the state at event time, as the kubelet's evented PLEG
expects.  The runtime binds a capture function with :meth:`EventHub.bind`; the
CRI layer turns the snapshots into statuses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from moorage.core.errors import ResourceExhausted
from moorage.runtime.records import Container, Sandbox

log = logging.getLogger("moorage.events")



class EventType(StrEnum):
    """Lifecycle events (values: the CRI enum names; cri/ maps them to proto numbers)."""

    CREATED = "CONTAINER_CREATED_EVENT"
    STARTED = "CONTAINER_STARTED_EVENT"
    STOPPED = "CONTAINER_STOPPED_EVENT"
    DELETED = "CONTAINER_DELETED_EVENT"


#: Snapshots of a sandbox's record (None: it is gone) and of its listable containers' records.
PodCapture = Callable[[str], tuple[Sandbox | None, tuple[Container, ...]]]


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    type: EventType
    created_at: int  # ns
    sandbox_id: str
    seq: int
    captured: bool = False  # True: sandbox/containers below are the state at publish time
    sandbox: Sandbox | None = None  # a snapshot of the sandbox record (None: the sandbox is gone)
    containers: tuple[Container, ...] = field(default_factory=tuple)  # snapshots of its containers


class Subscription:
    def __init__(self, hub: EventHub, size: int) -> None:
        self._hub = hub
        self.queue: asyncio.Queue[ContainerEvent | None] = asyncio.Queue(size)
        self.overflowed = False

    async def next(self) -> ContainerEvent:
        ev = await self.queue.get()
        if ev is None:
            raise ResourceExhausted(
                f"event subscriber fell more than {self.queue.maxsize} events behind and was dropped; resubscribe"
            )
        return ev

    def close(self) -> None:
        self._hub._subs.discard(self)


class EventHub:
    def __init__(self, buffer: int | None = None) -> None:
        # MOORAGE_EVENT_BUFFER: per-subscriber queue size (tests make it small to force overflow).
        self.buffer = buffer or int(os.environ.get("MOORAGE_EVENT_BUFFER") or 1000)
        self._subs: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._capture: PodCapture | None = None

    def bind(self, capture: PodCapture) -> None:
        """Events published from now on carry ``capture(sandbox_id)``: the pod state at publish time."""
        self._capture = capture

    def subscribe(self, size: int | None = None) -> Subscription:
        sub = Subscription(self, size or self.buffer)
        self._subs.add(sub)
        return sub

    def publish(self, container_id: str, type_: EventType, sandbox_id: str) -> ContainerEvent:
        ts, seq = time.time_ns(), next(self._seq)
        ev = ContainerEvent(container_id, type_, ts, sandbox_id, seq)
        if self._subs and self._capture is not None:
            try:
                sb, ctrs = self._capture(sandbox_id)
                ev = ContainerEvent(container_id, type_, ts, sandbox_id, seq, True, sb, ctrs)
            except Exception:
                log.exception("capturing pod state for event %s of %s", type_, container_id)
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(ev)
            except asyncio.QueueFull:
                # Make room for the end-of-stream marker, then drop the subscriber.
                sub.overflowed = True
                self._subs.discard(sub)
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)
        return ev

    @property
    def subscribers(self) -> int:
        return len(self._subs)
