"""Container lifecycle events for GetContainerEvents (the kubelet's evented PLEG).

Each subscriber has a bounded queue.  Publishing never waits: a subscriber
whose queue is full is dropped, and its stream ends with an error saying so,
so a slow reader can never stall the runtime and never silently misses events.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass

from runtime.errors import ResourceExhausted

CREATED, STARTED, STOPPED, DELETED = "CONTAINER_CREATED_EVENT", "CONTAINER_STARTED_EVENT", "CONTAINER_STOPPED_EVENT", "CONTAINER_DELETED_EVENT"


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    type: str
    created_at: int  # ns
    sandbox_id: str
    seq: int


class Subscription:
    def __init__(self, hub: "EventHub", size: int) -> None:
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

    def subscribe(self, size: int | None = None) -> Subscription:
        sub = Subscription(self, size or self.buffer)
        self._subs.add(sub)
        return sub

    def publish(self, container_id: str, type_: str, sandbox_id: str) -> ContainerEvent:
        ev = ContainerEvent(container_id, type_, time.time_ns(), sandbox_id, next(self._seq))
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
