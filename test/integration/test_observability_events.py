"""GetContainerEvents: the evented-PLEG stream, several subscribers, and a subscriber that never reads."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.testing.cri import container_config, pod_config, run_container, wait_exited

E = pb.ContainerEventType
LIFECYCLE = [E.CONTAINER_CREATED_EVENT, E.CONTAINER_STARTED_EVENT, E.CONTAINER_STOPPED_EVENT,
             E.CONTAINER_DELETED_EVENT]


def pull(daemon, registry) -> str:
    ref = registry.images["busybox"].ref
    daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
    return ref


class Reader:
    """Reads one GetContainerEvents stream in a thread into a queue (the error, if any, last)."""

    def __init__(self, daemon) -> None:
        self.call = daemon.runtime.GetContainerEvents(pb.GetEventsRequest())
        self.call.initial_metadata()  # the server has subscribed
        self.q: queue.Queue = queue.Queue()
        self.seen: list = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        try:
            for ev in self.call:
                self.q.put(ev)
        except grpc.RpcError as e:
            self.q.put(e)

    def events_for(self, cid: str, n: int, timeout: float = 60) -> list:
        """The first ``n`` events of container ``cid`` (events of others are kept for later calls)."""
        while len([e for e in self.seen if e.container_id == cid]) < n:
            ev = self.q.get(timeout=timeout)
            assert not isinstance(ev, grpc.RpcError), ev
            self.seen.append(ev)
        return [e for e in self.seen if e.container_id == cid][:n]

    def close(self) -> None:
        self.call.cancel()
        self.t.join(10)


def test_one_lifecycle_arrives_complete_and_in_order_to_every_subscriber(daemon, registry):
    image = pull(daemon, registry)
    readers = [Reader(daemon) for _ in range(3)]
    try:
        pcfg = pod_config()
        sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg)).pod_sandbox_id
        cid = run_container(daemon.runtime, sid, pcfg, container_config(image, ["sleep", "3600"], name="life"))
        daemon.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
        wait_exited(daemon.runtime, cid)
        daemon.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        for r in readers:
            evs = r.events_for(cid, 4)
            assert [e.container_event_type for e in evs] == LIFECYCLE
            times = [e.created_at for e in evs]
            assert times == sorted(times) and times[0] > 0
            for e in evs:
                assert e.pod_sandbox_status.id == sid
                assert e.pod_sandbox_status.metadata.name == pcfg.metadata.name
                assert e.pod_sandbox_status.state == pb.SANDBOX_READY
            created, started, stopped, deleted = evs
            assert [c.id for c in created.containers_statuses] == [cid]
            assert created.containers_statuses[0].metadata.name == "life"
            assert started.containers_statuses[0].state == pb.CONTAINER_RUNNING  # as at event time
            assert stopped.containers_statuses[0].state == pb.CONTAINER_EXITED
            assert cid not in [c.id for c in deleted.containers_statuses]
        # The sandbox's own lifecycle, with its id as container_id (as containerd does).
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
        for r in readers:
            evs = r.events_for(sid, 4)
            assert [e.container_event_type for e in evs] == LIFECYCLE
            times = [e.created_at for e in evs]
            assert times == sorted(times)
            created, started, stopped, deleted = evs
            for e in (created, started):
                assert e.pod_sandbox_status.id == sid and e.pod_sandbox_status.state == pb.SANDBOX_READY
            assert stopped.pod_sandbox_status.id == sid
            assert stopped.pod_sandbox_status.state == pb.SANDBOX_NOTREADY
            # The sandbox's events come before its first container's, its deletion after the last.
            order = [(e.container_id, e.container_event_type) for e in r.seen]
            assert order.index((sid, E.CONTAINER_STARTED_EVENT)) < order.index((cid, E.CONTAINER_CREATED_EVENT))
            assert order.index((sid, E.CONTAINER_DELETED_EVENT)) > order.index((cid, E.CONTAINER_DELETED_EVENT))
    finally:
        for r in readers:
            r.close()


def test_a_subscriber_that_never_reads_does_not_block_and_is_ended_with_an_error(daemon_factory, registry):
    d = daemon_factory(start=False)
    d.env["MOORAGE_EVENT_BUFFER"] = "8"
    d.start()
    image = pull(d, registry)
    # Its own connection, as another client would have.
    chan = grpc.insecure_channel(f"unix://{d.socket}")
    stuck = pbg.RuntimeServiceStub(chan).GetContainerEvents(pb.GetEventsRequest())
    stuck.initial_metadata()  # subscribed; from here on it never reads
    reader = Reader(d)
    try:
        pcfg = pod_config()
        sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg)).pod_sandbox_id
        # Big annotations make every event (which carries all the pod's container statuses) large, so the
        # stuck stream's HTTP/2 window fills after a few messages and its bounded queue overflows.
        big = {"pad": "x" * 16384}
        cids = [run_container(d.runtime, sid, pcfg, container_config(image, ["true"], annotations=big),
                              start=False) for _ in range(40)]
        for cid in cids:
            d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
        # The reading subscriber saw every event of every container.
        for cid in cids:
            assert [e.container_event_type for e in reader.events_for(cid, 2)] == [
                E.CONTAINER_CREATED_EVENT, E.CONTAINER_DELETED_EVENT]
        # The stuck one gets what was buffered, then an error saying it was dropped (not a silent end).
        with pytest.raises(grpc.RpcError) as e:
            for _ in stuck:
                pass
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "resubscribe" in e.value.details()
        # The runtime still works.
        run_container(d.runtime, sid, pcfg, container_config(image, ["true"]), start=False)
    finally:
        stuck.cancel()
        chan.close()
        reader.close()


def test_a_late_reader_sees_each_event_with_the_state_at_event_time(daemon, registry):
    """A subscriber that reads only after the whole lifecycle still gets, with each event, the pod's
    container statuses as they were when it happened (not as they are when the event is sent)."""
    image = pull(daemon, registry)
    # A small receive window and no window growth: a reader that does not read soon stalls the
    # server's writes, so the later events wait in the server's queue.
    chan = grpc.insecure_channel(f"unix://{daemon.socket}",
                                 options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)])
    late = pbg.RuntimeServiceStub(chan).GetContainerEvents(pb.GetEventsRequest())
    late.initial_metadata()  # subscribed; not reading yet
    try:
        pcfg = pod_config()
        sid = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg)).pod_sandbox_id
        pad = {"pad": "x" * 8192}  # statuses big enough to fill the small window
        fillers = [run_container(daemon.runtime, sid, pcfg, container_config(image, ["true"], annotations=pad),
                                 start=False) for _ in range(4)]
        cid = run_container(daemon.runtime, sid, pcfg, container_config(image, ["sleep", "3600"], name="late"))
        daemon.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
        wait_exited(daemon.runtime, cid)
        daemon.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        seen = []
        for ev in late:
            if ev.container_id == cid:
                seen.append(ev)
                if len(seen) == 4:
                    break
        assert [e.container_event_type for e in seen] == LIFECYCLE
        mine = [{c.id: c.state for c in e.containers_statuses}.get(cid) for e in seen]
        assert mine == [pb.CONTAINER_CREATED, pb.CONTAINER_RUNNING, pb.CONTAINER_EXITED, None]
        for e in seen:
            assert e.pod_sandbox_status.id == sid and e.pod_sandbox_status.state == pb.SANDBOX_READY
            assert set(fillers) <= {c.id for c in e.containers_statuses}
    finally:
        late.cancel()
        chan.close()
