"""runtime.events: statuses captured at publish time, several subscribers, the overflow rule."""

from __future__ import annotations

import asyncio

import pytest

from moorage.core.errors import ResourceExhausted
from moorage.core.store import Store
from moorage.runtime import events
from moorage.runtime.events import EventType
from moorage.runtime.records import Container, ContainerState, SandboxState, replace
from moorage.runtime.service import Runtime, RuntimeSettings
from moorage.testing import records


def make_runtime(tmp_path) -> Runtime:
    settings = RuntimeSettings(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"),
                               handlers={"runc": "/bin/true"})
    rt = Runtime(settings, Store(str(tmp_path / "root")), None, None)  # type: ignore[arg-type]  # no images needed
    for sid in ("s1", "s10"):
        sb = records.sandbox(sid, name=f"pod_{sid}")
        rt.ctx.add_sandbox(sb.metadata, sb.status)
    return rt


def add_container(rt: Runtime, cid: str, sid: str) -> Container:
    c = records.container(cid, sid, ContainerState.CREATED, name=f"{cid}_{sid}")
    return rt.ctx.add_container(c.metadata, c.status)


def drain(sub) -> list:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


def test_a_late_reader_sees_the_state_at_event_time(tmp_path):
    async def main():
        rt = make_runtime(tmp_path)
        hub = rt.events
        slow, other = hub.subscribe(), hub.subscribe()
        add_container(rt, "x", "s10")  # another pod whose id starts with "s1": not ours
        c = add_container(rt, "c1", "s1")
        hub.publish("c1", EventType.CREATED, "s1")
        c.update(lambda s: replace(s, state=ContainerState.RUNNING, pid=7))
        hub.publish("c1", EventType.STARTED, "s1")
        c.update(lambda s: replace(s, state=ContainerState.EXITED, exit_code=3))
        hub.publish("c1", EventType.STOPPED, "s1")
        rt.ctx.forget_container("c1")
        hub.publish("c1", EventType.DELETED, "s1")
        # after the events: must not show in them
        rt.sandboxes["s1"].update(lambda s: replace(s, state=SandboxState.NOTREADY))
        evs = [await slow.next() for _ in range(4)]
        assert [e.type for e in evs] == [EventType.CREATED, EventType.STARTED, EventType.STOPPED, EventType.DELETED]
        assert all(e.captured and e.sandbox.status.state == SandboxState.READY for e in evs)
        assert [[x.status.state for x in e.containers] for e in evs] == [
            [ContainerState.CREATED], [ContainerState.RUNNING], [ContainerState.EXITED], []]
        assert evs[1].containers[0].status.exit_code == 0 and evs[2].containers[0].status.exit_code == 3  # copies
        with pytest.raises(Exception, match="snapshot"):  # a snapshot is read-only
            evs[2].containers[0].update(lambda s: s)
        assert [e.seq for e in evs] == sorted(e.seq for e in evs)
        # One copy per event, shared by every subscriber.
        assert [e.sandbox for e in drain(other)] == [e.sandbox for e in evs]

    asyncio.run(main())


def test_sandbox_gone_and_nobody_listening():
    hub = events.EventHub(buffer=10)
    calls = []
    hub.bind(lambda sid: calls.append(sid) or (None, ()))
    ev = hub.publish("c1", EventType.CREATED, "s1")
    assert not ev.captured and calls == []  # no subscriber: no copies made
    sub = hub.subscribe()
    hub.publish("c1", EventType.DELETED, "gone")
    [ev] = drain(sub)
    assert ev.captured and ev.sandbox is None and ev.containers == () and calls == ["gone"]


def test_unbound_hub_still_publishes():
    hub = events.EventHub(buffer=10)
    sub = hub.subscribe()
    hub.publish("c1", EventType.CREATED, "s1")
    [ev] = drain(sub)
    assert not ev.captured and ev.container_id == "c1"


def test_overflow_drops_only_the_slow_subscriber_with_an_error(tmp_path):
    async def main():
        rt = make_runtime(tmp_path)
        add_container(rt, "c1", "s1")
        hub = rt.events
        slow = hub.subscribe(size=2)
        fast = hub.subscribe()
        for _ in range(3):
            hub.publish("c1", EventType.CREATED, "s1")
        assert slow.overflowed and hub.subscribers == 1
        with pytest.raises(ResourceExhausted, match="resubscribe"):
            await slow.next()
        assert len([await fast.next() for _ in range(3)]) == 3
        hub.publish("c1", EventType.STARTED, "s1")  # publishing goes on for the others
        assert (await fast.next()).type == EventType.STARTED

    asyncio.run(main())


def test_a_failing_capture_does_not_fail_the_publish():
    def broken(sandbox_id: str) -> tuple[None, tuple[()]]:
        raise RuntimeError("boom")

    hub = events.EventHub(buffer=10)
    hub.bind(broken)
    sub = hub.subscribe()
    hub.publish("c1", EventType.CREATED, "s1")
    [ev] = drain(sub)
    assert not ev.captured
