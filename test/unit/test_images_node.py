"""Images on the node without a daemon: pinned references, synced snapshots, a durable store."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os

import pytest

from moorage.core.errors import FailedPrecondition, Unavailable
from moorage.core.store import Store
from moorage.images import archive
from moorage.images import unpack as unpackmod
from moorage.images.service import ImageService, ImageSettings
from moorage.testing.layouts import tar_layout


def _service(tmp_path, **kw) -> ImageService:
    root = str(tmp_path / "root")
    return ImageService(ImageSettings(root_dir=root, snapshotter="native", **kw), Store(root))


def _import(svc, layouts, tmp_path, name="busybox", base="docker.io/library/busybox"):
    tar = tar_layout(layouts[name].path, str(tmp_path / f"{name}.tar"))
    return archive.import_archive(svc, tar, base_name=base)[0].record


def test_pinned_follows_the_configured_references(tmp_path, test_image_layouts):
    svc = _service(tmp_path, pinned_refs=["busybox:latest"])
    try:
        rec = _import(svc, test_image_layouts, tmp_path)
        other = _import(svc, test_image_layouts, tmp_path, "nonroot", "example.com/other/nonroot")
        assert svc.status(rec.id).pinned and not svc.status(other.id).pinned
        assert [i.pinned for i in svc.list("busybox")] == [True]
        # pinned by image id, then unpinned: what is shown follows the list, not what was stored
        svc.set_pinned([other.id])
        assert not svc.status("busybox").pinned and svc.status("example.com/other/nonroot").pinned
        svc.set_pinned(["docker.io/library/busybox@" + rec.extra["root_digest"]])
        assert svc.status("busybox").pinned
    finally:
        svc.store.close()


def test_pinned_image_survives_gc_and_remove_until_unpinned(tmp_path, test_image_layouts):
    svc = _service(tmp_path, pinned_refs=["busybox:latest"])
    try:
        rec = _import(svc, test_image_layouts, tmp_path)
        blobs = {str(b.digest) for b in svc.content.list()}
        snaps = {s.key for s in svc.store.list_snapshots()}
        assert asyncio.run(svc.gc()) == {"snapshots": [], "blobs": []}
        assert {str(b.digest) for b in svc.content.list()} == blobs
        assert {s.key for s in svc.store.list_snapshots()} == snaps and svc.status(rec.id).pinned
        with pytest.raises(FailedPrecondition, match="pinned by the node's config"):
            asyncio.run(svc.remove(rec.id))
        with pytest.raises(FailedPrecondition):
            asyncio.run(svc.remove("busybox:latest"))
        assert svc.status(rec.id) is not None and {str(b.digest) for b in svc.content.list()} == blobs
        svc.set_pinned([])  # unpinned (a config reload): now it goes
        asyncio.run(svc.remove(rec.id))
        assert svc.status(rec.id) is None and svc.content.list() == []
    finally:
        svc.store.close()


class _Libc:
    """Stands in for libc's syncfs (the boundary): counts calls, optionally fails with ``err``."""

    def __init__(self, err: int = 0) -> None:
        self.calls = 0
        self.err = err

    def syncfs(self, fd: int) -> int:
        self.calls += 1
        if self.err:
            ctypes.set_errno(self.err)
            return -1
        return 0


@pytest.mark.parametrize("sync", [True, False])
def test_each_layer_is_synced_before_commit_unless_disabled(tmp_path, test_image_layouts, monkeypatch, sync):
    fake = _Libc()
    monkeypatch.setattr(unpackmod, "_libc", fake)
    svc = _service(tmp_path, sync_snapshots=sync)
    try:
        rec = _import(svc, test_image_layouts, tmp_path)
        assert fake.calls == (len(rec.layers) if sync else 0)
    finally:
        svc.store.close()


def test_a_failed_sync_commits_nothing(tmp_path, test_image_layouts, monkeypatch):
    monkeypatch.setattr(unpackmod, "_libc", _Libc(errno.EIO))
    svc = _service(tmp_path)
    try:
        with pytest.raises(Unavailable, match="syncing the unpacked layer to disk failed"):
            _import(svc, test_image_layouts, tmp_path)
        assert svc.store.list_images() == [] and svc.store.list_snapshots() == []
    finally:
        svc.store.close()


def test_store_transactions_are_durable_on_return(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    try:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with store.transaction() as db:
            db.execute("INSERT INTO leases (namespace, id, resource, created_at) VALUES ('k8s.io', 'l1', 'r', 0)")
        assert synced == [store.path + "-wal"] and not store.unsynced()
    finally:
        store.close()
