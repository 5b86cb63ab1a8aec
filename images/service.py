"""The image service: pull, list, status, remove, GC, and container root filesystems.

Pull = resolve (registry) → fetch blobs into the content store (verified) →
unpack layers into snapshots keyed by chain ID (shared between images) →
record the image in the metadata store.  Nothing is recorded until every piece
it needs is verified and committed, so a crash mid-pull leaves only leftovers
that start-up cleans (temp ingests, half-extracted snapshots, unreferenced blobs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from images import content as contentmod
from images import snapshotter as snapmod
from images.digest import Digest
from images.reference import Reference, is_image_id, parse_reference
from images.registry import Credentials, RegistryClient
from images.unpack import apply_layer
from runtime.errors import AlreadyExists, InvalidArgument, NotFound
from runtime.store import ImageRecord, SnapshotRecord, Store, now_ns

log = logging.getLogger("moorage.images")

EXTRACT_PREFIX = "extract-"


@dataclass
class ImageSettings:
    root_dir: str
    snapshotter: str = "overlayfs"  # overlayfs | native
    hosts_dir: str = "/etc/moorage/certs.d"
    insecure_registries: list[str] = field(default_factory=list)
    retries: int = 3
    stall_timeout: float = 60.0
    max_concurrent_downloads: int = 3
    gc_on_remove: bool = True


class StoreSnapshotMeta:
    """The snapshotter's metadata protocol on the daemon's SQLite store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _to(rec: SnapshotRecord) -> snapmod.SnapshotRecord:
        return snapmod.SnapshotRecord(key=rec.key, kind=rec.kind, parent=rec.parent or None, dir_id=rec.dir_id,
                                      labels=dict(rec.labels), created=rec.created_at / 1e9)

    @staticmethod
    def _from(rec: snapmod.SnapshotRecord) -> SnapshotRecord:
        return SnapshotRecord(key=rec.key, kind=rec.kind, parent=rec.parent or "", dir_id=rec.dir_id,
                              labels=dict(rec.labels), created_at=int((rec.created or time.time()) * 1e9))

    def get(self, key: str) -> snapmod.SnapshotRecord | None:
        rec = self.store.get_snapshot(key)
        return self._to(rec) if rec else None

    def add(self, record: snapmod.SnapshotRecord) -> None:
        if self.store.get_snapshot(record.key) is not None:
            raise AlreadyExists(f"snapshot {record.key!r} already exists")
        self.store.put_snapshot(self._from(record))

    def commit(self, key: str, name: str, labels: dict[str, str] | None) -> snapmod.SnapshotRecord:
        from runtime.store import _to_json  # one transaction for delete + insert

        with self.store.transaction() as db:
            ns = self.store.namespace
            row = db.execute("SELECT data FROM snapshots WHERE namespace=? AND key=?", (ns, key)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key!r} not found")
            if db.execute("SELECT 1 FROM snapshots WHERE namespace=? AND key=?", (ns, name)).fetchone():
                raise AlreadyExists(f"snapshot {name!r} already exists")
            old = json.loads(row[0])
            new = SnapshotRecord(key=name, kind="committed", parent=old.get("parent", ""), dir_id=old["dir_id"],
                                 labels=dict(labels if labels is not None else old.get("labels") or {}),
                                 created_at=now_ns())
            db.execute("DELETE FROM snapshots WHERE namespace=? AND key=?", (ns, key))
            db.execute("INSERT INTO snapshots (namespace, key, kind, parent, data) VALUES (?,?,?,?,?)",
                       (ns, name, new.kind, new.parent, _to_json(new)))
        return self._to(new)

    def remove(self, key: str) -> snapmod.SnapshotRecord:
        rec = self.store.get_snapshot(key)
        if rec is None:
            raise NotFound(f"snapshot {key!r} not found")
        self.store.delete_snapshot(key)
        return self._to(rec)

    def children(self, key: str) -> list[str]:
        return self.store.snapshot_children(key)

    def list(self) -> list[snapmod.SnapshotRecord]:
        return [self._to(r) for r in self.store.list_snapshots()]


class ImageService:
    def __init__(self, settings: ImageSettings, store: Store, metrics: Any = None) -> None:
        self.s = settings
        self.store = store
        self.metrics = metrics
        self.root = os.path.join(settings.root_dir, "images")
        self.content = contentmod.ContentStore(os.path.join(self.root, "content"))
        backend = snapmod.BACKEND_OVERLAY if settings.snapshotter == "overlayfs" else snapmod.BACKEND_NATIVE
        self.snapshots = snapmod.Snapshotter(os.path.join(self.root, "snapshotter"), StoreSnapshotMeta(store),
                                             backend=backend)
        self.client = RegistryClient(hosts_dir=settings.hosts_dir, insecure_hosts=settings.insecure_registries,
                                     retries=settings.retries, stall_timeout=settings.stall_timeout)
        self._pulls: dict[str, asyncio.Future] = {}
        self._chain_locks: dict[str, asyncio.Lock] = {}
        self._download_slots = asyncio.Semaphore(settings.max_concurrent_downloads)
        self._usage_cache: dict[str, snapmod.Usage] = {}
        self.in_use: Callable[[], set[str]] = set  # image ids used by containers (set by the runtime)
        self.progress: Callable[[str, int, int], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Clean what interrupted pulls left: temp ingests, half-extracted snapshots, orphans."""
        n = await asyncio.to_thread(self.content.clean_ingests)
        for rec in self.store.list_snapshots():
            if rec.key.startswith(EXTRACT_PREFIX):
                await asyncio.to_thread(self._remove_snapshot_quietly, rec.key)
        orphans = await asyncio.to_thread(self.snapshots.cleanup)
        self.store.clear_leases()
        removed = await self.gc()
        if n or orphans or any(removed.values()):
            log.info("cleaned leftovers of interrupted pulls", extra={"fields": {
                "ingests": n, "orphan_snapshot_dirs": len(orphans), **{k: len(v) for k, v in removed.items()}}})

    async def stop(self) -> None:
        await self.client.aclose()

    # -- lookup ---------------------------------------------------------------------------

    def _lookup(self, ref: str) -> ImageRecord | None:
        if not ref:
            raise InvalidArgument("image reference is empty")
        if is_image_id(ref) or ref.startswith("sha256:"):
            full = ref if ref.startswith("sha256:") else f"sha256:{ref}"
            if len(full) == 71:
                try:
                    return self.store.get_image(full)
                except NotFound:
                    return None
            matches = [r for r in self.store.list_images() if r.id.startswith(full)]
            return matches[0] if len(matches) == 1 else None
        r = parse_reference(ref)
        if r.digest:
            return self.store.image_by_ref(f"{r.name}@{r.digest}")
        rec = self.store.image_by_ref(f"{r.name}:{r.tag}")
        if rec is None and len(ref) >= 3 and all(c in "0123456789abcdef" for c in ref):
            matches = [i for i in self.store.list_images() if i.id.removeprefix("sha256:").startswith(ref)]
            rec = matches[0] if len(matches) == 1 else None
        return rec

    def get_local(self, ref: str) -> ImageRecord:
        rec = self._lookup(ref)
        if rec is None:
            raise NotFound(f"image {ref!r} is not present on this node; pull it first")
        return rec

    def status(self, ref: str) -> ImageRecord | None:
        return self._lookup(ref)

    def list(self, ref: str | None = None) -> list[ImageRecord]:
        if ref:
            rec = self._lookup(ref)
            return [rec] if rec else []
        return self.store.list_images()

    def verbose_info(self, rec: ImageRecord) -> str:
        return json.dumps({"chainID": rec.chain_id, "manifestDigest": rec.manifest_digest, "layers": rec.layers,
                           "imageSpec": rec.config, "snapshotter": self.snapshots.backend,
                           "size": rec.size, "pinned": rec.pinned})

    # -- pull ---------------------------------------------------------------------------------

    async def pull(self, ref: str, creds: Credentials | None = None) -> ImageRecord:
        if not ref:
            raise InvalidArgument("image reference is empty")
        r = parse_reference(ref)
        key = str(r)
        fut = self._pulls.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._pull(r, creds))
            self._pulls[key] = fut
            fut.add_done_callback(lambda _f: self._pulls.pop(key, None))
        return await asyncio.shield(fut)

    async def _pull(self, r: Reference, creds: Credentials | None) -> ImageRecord:
        t0 = time.monotonic()
        lease_name = f"pull-{secrets.token_hex(8)}"
        shown = str(r)
        try:
            with self.content.lease(lease_name) as lease:
                resolved = await self.client.resolve_image(shown, credentials=creds)
                manifest = resolved.manifest
                for data, desc in ((resolved.root_bytes, resolved.root), (resolved.manifest_bytes,
                                    resolved.manifest_descriptor), (resolved.config_bytes, manifest.config)):
                    if data:
                        lease.add(desc.digest)
                        await asyncio.to_thread(self.content.write_blob, data, desc.digest)
                for layer in manifest.layers:
                    lease.add(layer.digest)
                downloaded = await asyncio.gather(*(self._fetch_layer(resolved.repo, l, creds) for l in manifest.layers))
                config = json.loads(resolved.config_bytes)
                diff_ids = [d for d in (config.get("rootfs") or {}).get("diff_ids") or []]
                if len(diff_ids) != len(manifest.layers):
                    raise InvalidArgument(f"image {shown}: config lists {len(diff_ids)} diff_ids for "
                                          f"{len(manifest.layers)} layers")
                top = await self._unpack(shown, manifest.layers, diff_ids)
                rec = self._record(r, resolved, config, top)
        except BaseException:
            if self.metrics is not None:
                self.metrics.image_pulls.labels("failure").inc()
            raise
        if self.metrics is not None:
            self.metrics.image_pulls.labels("success").inc()
            self.metrics.image_pull_bytes.inc(sum(downloaded))
            self.metrics.image_pull_seconds.observe(time.monotonic() - t0)
        log.info("pulled image", extra={"fields": {"ref": shown, "id": rec.id, "bytes": sum(downloaded),
                                                    "seconds": round(time.monotonic() - t0, 3)}})
        return rec

    async def _fetch_layer(self, repo: Any, desc: Any, creds: Credentials | None) -> int:
        """Download one blob unless present; returns the bytes downloaded."""
        if self.content.exists(desc.digest):
            return 0
        async with self.content.ingest_lock(desc.digest):
            if self.content.exists(desc.digest):
                return 0  # a concurrent pull fetched it while we waited
            async with self._download_slots:
                w = self.content.writer(desc.digest, desc.size)
                n = 0
                try:
                    async for chunk in self.client.fetch_blob(repo, desc, credentials=creds):
                        w.write(chunk)
                        n += len(chunk)
                        if self.progress is not None:
                            self.progress(str(desc.digest), n, desc.size)
                    await asyncio.to_thread(w.commit)
                except BaseException:
                    w.abort()
                    raise
                return n

    async def _unpack(self, shown: str, layers: list, diff_ids: list[str]) -> str:
        """Apply layers into snapshots keyed by chain ID; returns the top chain ID."""
        chains = [str(c) for c in snapmod.chain_ids(diff_ids)]
        parent: str | None = None
        for layer, diff_id, chain in zip(layers, diff_ids, chains):
            lock = self._chain_locks.setdefault(chain, asyncio.Lock())
            async with lock:
                if not self.snapshots.exists(chain):
                    await asyncio.to_thread(self._apply, layer.digest, diff_id, chain, parent)
            parent = chain
        return chains[-1]

    def _apply(self, layer_digest: str, diff_id: str, chain: str, parent: str | None) -> None:
        key = f"{EXTRACT_PREFIX}{secrets.token_hex(6)}-{chain}"
        self.snapshots.prepare(key, parent)
        try:
            with self.content.open(layer_digest) as src:
                apply_layer(src, self.snapshots.upper_dir(key), mode=self.snapshots.unpack_mode,
                            parents=self.snapshots.parent_dirs(key), label=str(layer_digest),
                            expected_diff_id=diff_id)
            self.snapshots.commit(chain, key)
        except BaseException:
            self._remove_snapshot_quietly(key)
            raise

    def _remove_snapshot_quietly(self, key: str) -> None:
        try:
            self.snapshots.remove(key)
        except NotFound:
            pass

    def _record(self, r: Reference, resolved: Any, config: dict, top: str) -> ImageRecord:
        iid = str(resolved.manifest.config.digest)
        try:
            rec = self.store.get_image(iid)
        except NotFound:
            rec = ImageRecord(id=iid, created_at=now_ns())
        if r.tag and f"{r.name}:{r.tag}" not in rec.repo_tags:
            rec.repo_tags.append(f"{r.name}:{r.tag}")
        repo_digest = f"{r.name}@{resolved.digest}"
        if repo_digest not in rec.repo_digests:
            rec.repo_digests.append(repo_digest)
        rec.manifest_digest = str(resolved.manifest_descriptor.digest)
        rec.config = config
        rec.chain_id = top
        rec.layers = [str(l.digest) for l in resolved.manifest.layers]
        rec.size = sum(l.size for l in resolved.manifest.layers) + resolved.manifest.config.size
        rec.extra = {"root_digest": str(resolved.root.digest), "manifest_digest": rec.manifest_digest}
        self.store.put_image(rec)
        return rec

    # -- remove and GC --------------------------------------------------------------------------

    async def remove(self, ref: str) -> None:
        rec = self._lookup(ref)
        if rec is None:
            return  # removing what is not there succeeds, as the CRI asks
        by_tag = not (ref.startswith("sha256:") or is_image_id(ref)) and not parse_reference(ref).digest
        if by_tag:
            r = parse_reference(ref)
            tag = f"{r.name}:{r.tag}"
            if len(rec.repo_tags) > 1 and tag in rec.repo_tags:
                rec.repo_tags = [t for t in rec.repo_tags if t != tag]
                self.store.put_image(rec)
                return
        self.store.delete_image(rec.id)
        log.info("removed image", extra={"fields": {"id": rec.id, "tags": rec.repo_tags}})
        if self.s.gc_on_remove:
            await self.gc()

    async def gc(self) -> dict[str, list[str]]:
        """Remove blobs and committed snapshots that no image (or pull in flight) needs."""
        return await asyncio.to_thread(self._gc)

    def _gc(self) -> dict[str, list[str]]:
        images = self.store.list_images()
        keep_blobs = {str(d) for d in self.content.leased_digests()}
        keep_snaps: set[str] = set()
        for img in images:
            keep_blobs.update([img.id, img.manifest_digest, *img.layers, img.extra.get("root_digest", "")])
            keep_snaps.add(img.chain_id)
        records = {r.key: r for r in self.store.list_snapshots()}
        # Whatever an active snapshot (a container, an extraction) stands on stays.
        for rec in records.values():
            if rec.kind != "committed":
                keep_snaps.add(rec.key)
        for key in list(keep_snaps):
            while key and key in records:
                keep_snaps.add(key)
                key = records[key].parent
        removed_snaps: list[str] = []
        progress = True
        while progress:
            progress = False
            for key, rec in list(records.items()):
                if key in keep_snaps or self.store.snapshot_children(key):
                    continue
                self._remove_snapshot_quietly(key)
                self._usage_cache.pop(key, None)
                removed_snaps.append(key)
                records.pop(key)
                progress = True
        removed_blobs = []
        for info in self.content.list():
            if str(info.digest) not in keep_blobs:
                self.content.delete(info.digest, missing_ok=True)
                removed_blobs.append(str(info.digest))
        return {"snapshots": removed_snaps, "blobs": removed_blobs}

    # -- container root filesystems --------------------------------------------------------------

    async def prepare_rootfs(self, key: str, image: ImageRecord, target: str) -> None:
        def work() -> None:
            if self.snapshots.exists(key):
                mounts = self.snapshots.mounts(key)
            else:
                mounts = self.snapshots.prepare(key, image.chain_id or None)
            try:
                snapmod.mount(mounts, target)
            except BaseException:
                self._remove_snapshot_quietly(key)
                raise

        await asyncio.to_thread(work)

    async def release_rootfs(self, key: str, target: str) -> None:
        def work() -> None:
            if os.path.isdir(target):
                snapmod.unmount_all(target)
            if self.snapshots.exists(key):
                self._remove_snapshot_quietly(key)

        await asyncio.to_thread(work)

    def container_usage(self, key: str) -> snapmod.Usage | None:
        """Bytes and inodes of a container's writable layer."""
        try:
            return self.snapshots.usage(key)
        except NotFound:
            return None

    # -- fs info -----------------------------------------------------------------------------------

    async def fs_info(self) -> list[tuple[str, int, int]]:
        """[(mountpoint, bytes, inodes)] for the image filesystem, then the container one."""
        return await asyncio.to_thread(self._fs_info)

    def _fs_info(self) -> list[tuple[str, int, int]]:
        img_bytes = img_inodes = ctr_bytes = ctr_inodes = 0
        for rec in self.store.list_snapshots():
            if rec.kind == "committed":
                u = self._usage_cache.get(rec.key)
                if u is None:
                    u = self.snapshots.usage(rec.key)
                    self._usage_cache[rec.key] = u  # committed snapshots never change
                img_bytes += u.size
                img_inodes += u.inodes
            else:
                try:
                    u = self.snapshots.usage(rec.key)
                except NotFound:
                    continue
                ctr_bytes += u.size
                ctr_inodes += u.inodes
        for info in self.content.list():
            img_bytes += info.size
            img_inodes += 1
        mp = os.path.join(self.root, "snapshotter")
        return [(mp, img_bytes, img_inodes), (mp, ctr_bytes, ctr_inodes)]


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
