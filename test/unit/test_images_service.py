"""ImageService without a daemon: lookup forms, tag removal, GC and what it must keep.

Images come in through the offline importer (native snapshotter, temporary root).
"""

from __future__ import annotations

import asyncio

import pytest

from moorage.core.errors import InvalidArgument
from moorage.core.store import Store
from moorage.images import archive
from moorage.images.service import ImageService, ImageSettings
from moorage.testing.layouts import tar_layout


@pytest.fixture
def svc(tmp_path):
    store = Store(str(tmp_path / "root"))
    s = ImageService(ImageSettings(root_dir=str(tmp_path / "root"), snapshotter="native",
                                   pinned_refs=["example.com/pinned/busybox:latest"]), store)
    yield s
    store.close()


@pytest.fixture
def busybox(svc, test_image_layouts, tmp_path):
    info = test_image_layouts["busybox"]
    out = archive.import_archive(svc, tar_layout(info.path, str(tmp_path / "bb.tar")),
                                 base_name="docker.io/library/busybox")
    return out[0].record


def test_lookup_forms(svc, busybox):
    iid = busybox.id
    hexid = iid.removeprefix("sha256:")
    for ref in (iid, hexid, hexid[:12], iid[:19], "busybox", "busybox:1.0", "docker.io/library/busybox:alias",
                f"busybox@{busybox.extra['root_digest']}"):
        assert svc.status(ref) is not None and svc.status(ref).id == iid, ref
    assert svc.status("busybox:nope") is None
    assert svc.status("sha256:" + "f" * 64) is None
    with pytest.raises(InvalidArgument, match="lowercase"):
        svc.status("BusyBox")
    with pytest.raises(InvalidArgument):
        svc.status("")


def test_remove_one_tag_then_the_image(svc, busybox):
    asyncio.run(svc.remove("busybox:1.0"))
    rec = svc.status(busybox.id)
    assert sorted(rec.repo_tags) == ["docker.io/library/busybox:alias", "docker.io/library/busybox:latest"]
    assert rec.repo_digests  # the repository still has tags
    asyncio.run(svc.remove(busybox.id))
    assert svc.store.list_images() == []
    assert svc.content.list() == [] and svc.store.list_snapshots() == []


def test_gc_keeps_in_flight_chains_and_leases(svc, busybox):
    chain = busybox.chain_id
    blobs = {str(b.digest) for b in svc.content.list()}
    svc.store.delete_image(busybox.id)
    with svc._hold_chains([chain]), svc.content.lease("test", blobs):
        removed = asyncio.run(svc.gc())
        assert removed == {"snapshots": [], "blobs": []}
    svc.store.add_lease("other-process", sorted(blobs) + [chain])
    assert asyncio.run(svc.gc()) == {"snapshots": [], "blobs": []}
    svc.store.release_lease("other-process")
    removed = asyncio.run(svc.gc())
    assert removed["snapshots"] == [chain] and set(removed["blobs"]) == blobs


def test_pinned_and_user(svc, test_image_layouts, tmp_path):
    info = test_image_layouts["nonroot"]
    rec = archive.import_archive(svc, tar_layout(info.path, str(tmp_path / "nr.tar")),
                                 base_name="example.com/pinned/busybox")[0].record
    assert rec.pinned
    assert rec.config["config"]["User"] == "tester"


def test_start_cleans_interrupted_work(svc, busybox):
    import os

    leftover = os.path.join(svc.content.ingest_dir, "deadbeefdeadbeef-0123")
    with open(leftover, "wb") as f:
        f.write(b"partial")
    svc.snapshots.prepare("extract-0000-sha256:x", busybox.chain_id)
    asyncio.run(svc.start())
    assert not os.path.exists(leftover)
    assert not svc.snapshots.exists("extract-0000-sha256:x")
    assert svc.status("busybox").id == busybox.id  # what is recorded stays
    asyncio.run(svc.stop())


def _chain_of(svc, top):
    out = []
    while top:
        out.append(top)
        top = svc.snapshots.stat(top).parent
    return out


@pytest.mark.parametrize("pull_done_first", [False, True], ids=["pull-still-holding", "pull-recorded-and-released"])
def test_gc_keeps_a_chain_a_pull_took_after_gc_began(svc, busybox, monkeypatch, pull_done_first):
    """GC computes its keep-set, then pauses; a pull registers the (unused) chain, reuses it and
    records its image.  GC resumes: the reused snapshots must survive."""
    import threading

    chains = _chain_of(svc, busybox.chain_id)
    blobs = sorted(str(b.digest) for b in svc.content.list())
    svc.store.delete_image(busybox.id)  # the chain and blobs are unused now: GC's to take

    paused, resume = threading.Event(), threading.Event()
    real_list = svc.store.list_snapshots

    def list_snapshots_then_pause():  # GC calls this right after computing its keep-set
        if threading.current_thread().name == "gc" and not paused.is_set():
            paused.set()
            assert resume.wait(60), "test never resumed GC"
        return real_list()

    monkeypatch.setattr(svc.store, "list_snapshots", list_snapshots_then_pause)
    result = []
    gc = threading.Thread(target=lambda: result.append(svc._gc()), name="gc")
    gc.start()
    try:
        assert paused.wait(60), "GC never reached its keep-set"
        with svc.content.lease("pull-x", blobs) as lease, svc._hold_chains(chains):
            assert all(svc.snapshots.exists(c) for c in chains)  # the pull finds them: reuses them
            lease.add(*blobs)
            svc.store.put_image(busybox)
            if not pull_done_first:
                resume.set()
                gc.join()
        resume.set()
        gc.join()
    finally:
        resume.set()
        gc.join()
    assert result and result[0] == {"snapshots": [], "blobs": []}
    assert all(svc.snapshots.exists(c) for c in chains)
    assert sorted(str(b.digest) for b in svc.content.list()) == blobs
    assert svc._gc_touched is None and svc._inflight_chains == {}
    # once nothing uses it, the next GC takes it as before
    svc.store.delete_image(busybox.id)
    removed = asyncio.run(svc.gc())
    assert sorted(removed["snapshots"]) == sorted(chains) and sorted(removed["blobs"]) == blobs


def test_gc_dry_run_says_what_gc_removes_and_changes_nothing(svc, test_image_layouts, tmp_path):
    """`moorage gc --dry-run` uses this: the same answer as the GC itself, whole chains included."""
    info = test_image_layouts["multilayer"]
    rec = archive.import_archive(svc, tar_layout(info.path, str(tmp_path / "ml.tar")), base_name="x.io/ml")[0].record
    svc.store.delete_image(rec.id)  # as if untagged elsewhere: its chain and blobs are now garbage
    blobs = sorted(str(b.digest) for b in svc.content.list())
    snaps = sorted(s.key for s in svc.store.list_snapshots())
    assert blobs and len(snaps) > 1
    plan = svc.collect_garbage(dry_run=True)
    assert sorted(plan["blobs"]) == blobs and sorted(plan["snapshots"]) == snaps
    assert sorted(str(b.digest) for b in svc.content.list()) == blobs  # nothing removed
    assert sorted(s.key for s in svc.store.list_snapshots()) == snaps
    removed = svc.collect_garbage()
    assert sorted(removed["blobs"]) == blobs and sorted(removed["snapshots"]) == snaps
    assert svc.content.list() == [] and svc.store.list_snapshots() == []
    assert svc.collect_garbage(dry_run=True) == {"snapshots": [], "blobs": []}
