"""runtime.events: statuses captured at publish time, several subscribers, the overflow rule."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from moorage.core.errors import ResourceExhausted
from moorage.runtime import events


@dataclass
class Sb:
    id: str
    state: str = "SANDBOX_READY"
    extra: dict = field(default_factory=dict)


@dataclass
class Ctr:
    id: str
    sandbox_id: str
    state: str = "CONTAINER_CREATED"
    extra: dict = field(default_factory=dict)


class FakeRuntime:
    def __init__(self) -> None:
        self.sandboxes = {"s1": Sb("s1"), "s10": Sb("s10")}
        self.containers: dict[str, Ctr] = {}

    def list_containers(self, sandbox_id: str = ""):
        return [c for c in self.containers.values() if c.sandbox_id.startswith(sandbox_id)]


def drain(sub) -> list:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


def test_a_late_reader_sees_the_state_at_event_time():
    async def main():
        rt = FakeRuntime()
        hub = events.EventHub(buffer=100)
        hub.bind(rt)
        slow, other = hub.subscribe(), hub.subscribe()
        rt.containers["x"] = Ctr("x", "s10")  # another pod whose id starts with "s1": not ours
        c = rt.containers["c1"] = Ctr("c1", "s1")
        hub.publish("c1", events.CREATED, "s1")
        c.state = "CONTAINER_RUNNING"
        hub.publish("c1", events.STARTED, "s1")
        c.state = "CONTAINER_EXITED"
        c.extra["exit"] = 0
        hub.publish("c1", events.STOPPED, "s1")
        del rt.containers["c1"]
        hub.publish("c1", events.DELETED, "s1")
        rt.sandboxes["s1"].state = "SANDBOX_NOTREADY"  # after the events: must not show in them
        evs = [await slow.next() for _ in range(4)]
        assert [e.type for e in evs] == [events.CREATED, events.STARTED, events.STOPPED, events.DELETED]
        assert all(e.captured and e.sandbox.state == "SANDBOX_READY" for e in evs)
        assert [[x.state for x in e.containers] for e in evs] == [
            ["CONTAINER_CREATED"], ["CONTAINER_RUNNING"], ["CONTAINER_EXITED"], []]
        assert evs[1].containers[0].extra == {} and evs[2].containers[0].extra == {"exit": 0}  # copies
        assert [e.seq for e in evs] == sorted(e.seq for e in evs)
        # One copy per event, shared by every subscriber.
        assert [e.sandbox for e in drain(other)] == [e.sandbox for e in evs]

    asyncio.run(main())


def test_sandbox_gone_and_nobody_listening():
    rt = FakeRuntime()
    hub = events.EventHub(buffer=10)
    hub.bind(rt)
    calls = []
    rt.list_containers = lambda sandbox_id="": calls.append(sandbox_id) or []  # type: ignore[method-assign]
    ev = hub.publish("c1", events.CREATED, "s1")
    assert not ev.captured and calls == []  # no subscriber: no copies made
    sub = hub.subscribe()
    hub.publish("c1", events.DELETED, "gone")
    [ev] = drain(sub)
    assert ev.captured and ev.sandbox is None and ev.containers == ()


def test_unbound_hub_still_publishes():
    hub = events.EventHub(buffer=10)
    sub = hub.subscribe()
    hub.publish("c1", events.CREATED, "s1")
    [ev] = drain(sub)
    assert not ev.captured and ev.container_id == "c1"


def test_overflow_drops_only_the_slow_subscriber_with_an_error():
    async def main():
        rt = FakeRuntime()
        rt.containers["c1"] = Ctr("c1", "s1")
        hub = events.EventHub(buffer=100)
        hub.bind(rt)
        slow = hub.subscribe(size=2)
        fast = hub.subscribe()
        for _ in range(3):
            hub.publish("c1", events.CREATED, "s1")
        assert slow.overflowed and hub.subscribers == 1
        with pytest.raises(ResourceExhausted, match="resubscribe"):
            await slow.next()
        assert len([await fast.next() for _ in range(3)]) == 3
        hub.publish("c1", events.STARTED, "s1")  # publishing goes on for the others
        assert (await fast.next()).type == events.STARTED

    asyncio.run(main())


def test_a_failing_capture_does_not_fail_the_publish():
    class Broken(FakeRuntime):
        def list_containers(self, sandbox_id: str = ""):
            raise RuntimeError("boom")

    hub = events.EventHub(buffer=10)
    hub.bind(Broken())
    sub = hub.subscribe()
    hub.publish("c1", events.CREATED, "s1")
    [ev] = drain(sub)
    assert not ev.captured
