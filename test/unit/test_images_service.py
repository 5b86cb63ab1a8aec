"""ImageService without a daemon: lookup forms, tag removal, GC and what it must keep.

Images come in through the offline importer (native snapshotter, temporary root).
"""

from __future__ import annotations

import asyncio

import pytest

from images import archive
from images.service import ImageService, ImageSettings
from runtime.errors import InvalidArgument
from runtime.store import Store
from test.unit.test_archive import tar_layout


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
