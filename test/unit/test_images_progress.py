"""Per-pull progress bookkeeping (images/progress.py) and the JSON route that serves it."""

from __future__ import annotations

import json
import threading
import urllib.request

from moorage.cri.metrics import Metrics
from moorage.images import progress as pr


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_pull_from_resolving_to_done():
    t = pr.PullTracker()
    p = t.begin("example.com/a:1")
    [shown] = t.snapshot()
    assert (shown["ref"], shown["state"], shown["layers"], shown["total_bytes"]) == ("example.com/a:1", "resolving",
                                                                                     [], 0)
    p.set_layers([("sha256:aa", 100), ("sha256:bb", 50), ("sha256:cc", 10)])
    p.layer_finished("sha256:cc", present=True)  # already in the content store
    p.layer_bytes("sha256:aa", 40)
    p.layer_bytes("sha256:aa", 30)   # a resent range never moves it backwards
    p.layer_bytes("sha256:bb", 500)  # nor past the size
    p.layer_bytes("sha256:zz", 5)    # not one of ours: ignored
    [shown] = t.snapshot()
    assert shown["state"] == "pulling"
    assert {x["digest"]: (x["done"], x["state"]) for x in shown["layers"]} == {
        "sha256:aa": (40, "downloading"), "sha256:bb": (50, "downloading"), "sha256:cc": (10, "present")}
    assert (shown["done_bytes"], shown["total_bytes"]) == (100, 160)
    p.layer_finished("sha256:aa")
    p.layer_finished("sha256:bb")
    t.finish(p)
    [shown] = t.snapshot()
    assert shown["state"] == "done" and shown["done_bytes"] == shown["total_bytes"] == 160
    assert shown["finished_at"] >= shown["started_at"] > 0 and shown["error"] == ""
    json.dumps(t.snapshot())  # what the endpoint serves


def test_failed_pulls_say_why_and_finished_ones_expire():
    clock = FakeClock()
    t = pr.PullTracker(keep_finished=30, clock=clock)
    a = t.begin("a")
    b = t.begin("b")
    t.finish(a, error="blob sha256:aa: verification failed")
    assert [(x["ref"], x["state"], x["error"]) for x in t.snapshot()] == [
        ("a", "failed", "blob sha256:aa: verification failed"), ("b", "resolving", "")]
    assert a.id != b.id
    clock.now += 31
    assert [x["ref"] for x in t.snapshot()] == ["b"]  # in flight: shown however long it takes
    clock.now += 1000
    assert [x["ref"] for x in t.snapshot()] == ["b"]


def test_only_the_newest_finished_pulls_are_kept():
    t = pr.PullTracker(keep_finished=3600)
    for i in range(pr.MAX_FINISHED + 5):
        t.finish(t.begin(f"r{i}"))
    live = t.begin("live")
    refs = [x["ref"] for x in t.snapshot()]
    assert len(refs) == pr.MAX_FINISHED + 1 and refs[0] == "r5" and refs[-1] == live.ref


def test_readers_in_other_threads_see_consistent_totals():
    t = pr.PullTracker()
    p = t.begin("r")
    p.set_layers([(f"sha256:{i:02x}", 1000) for i in range(4)])
    stop = threading.Event()
    bad: list[dict] = []

    def read() -> None:
        while not stop.is_set():
            for s in t.snapshot():
                if s["done_bytes"] != sum(x["done"] for x in s["layers"]):
                    bad.append(s)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 1001):
            for i in range(4):
                p.layer_bytes(f"sha256:{i:02x}", n)
    finally:
        stop.set()
        reader.join()
    assert not bad
    assert t.snapshot()[0]["done_bytes"] == 4000


def test_metrics_server_serves_json_routes_next_to_metrics():
    m = Metrics()
    t = pr.PullTracker()
    t.begin("example.com/a:1").set_layers([("sha256:aa", 7)])
    m.json_routes["/debug/pulls"] = lambda: {"pulls": t.snapshot()}
    port = m.serve("127.0.0.1:0")
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/debug/pulls", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            body = json.loads(resp.read())
        assert [(p["ref"], p["total_bytes"]) for p in body["pulls"]] == [("example.com/a:1", 7)]
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"moorage_image_pulls" in resp.read()
    finally:
        m.close()
