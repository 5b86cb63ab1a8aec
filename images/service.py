"""The image service: pull, list, status, remove, GC, and container root filesystems.

Pull = resolve (registry) → fetch blobs into the content store (verified) →
unpack layers into snapshots keyed by chain ID (shared between images) →
record the image in the metadata store.  Nothing is recorded until every piece
it needs is verified and committed, so a crash mid-pull leaves only leftovers
that start-up cleans (temp ingests, half-extracted snapshots, unreferenced blobs).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from moorage.core import idmap
from moorage.core import mount as mountmod
from moorage.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, MoorageError, NotFound
from moorage.core.fs import private_dir
from moorage.core.idmap import UserNS
from moorage.core.store import ImageRecord, Store, now_ns
from moorage.images import content as contentmod
from moorage.images import oci
from moorage.images import snapshotter as snapmod
from moorage.images.auth import NodeCredentials
from moorage.images.credentials import Credentials
from moorage.images.progress import PullProgress, PullTracker
from moorage.images.reference import Reference, parse_reference
from moorage.images.unpack import MODE_OVERLAY, apply_layer

if TYPE_CHECKING:
    from moorage.images.registry import RegistryClient

log = logging.getLogger("moorage.images")


#: A pull's error message is cut to this many characters: it may quote what a registry sent.
MAX_PULL_ERROR = 2048


def _pull_error(e: MoorageError, shown: str) -> MoorageError:
    """*e* naming the reference pulled, bounded in length (a new error of the same class
    when its message has to change)."""
    msg = e.message
    if shown not in msg:
        msg = f"pulling {shown}: {msg}"
    if len(msg) > MAX_PULL_ERROR:
        msg = f"{msg[:MAX_PULL_ERROR]}... ({len(msg) - MAX_PULL_ERROR} more characters cut)"
    if msg == e.message:
        return e
    try:
        return type(e)(msg)
    except TypeError:  # a subclass with another constructor: keep it as it is
        return e


def _span(name: str, **attrs: Any) -> contextlib.AbstractContextManager[trace.Span]:
    """A child span of the current one (a no-op one when tracing is off)."""
    return trace.get_tracer("moorage").start_as_current_span(name, attributes=attrs)

EXTRACT_PREFIX = "extract-"
GC_LOCK = "gc.lock"
_HEX64 = set("0123456789abcdef")


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
    pinned_refs: list[str] = field(default_factory=list)  # the sandbox image and images.pinned_images
    auth_file: str = ""  # Docker-style config.json with the node's registry credentials; "" = none
    credential_helper_timeout: float = 10.0
    container_root: str = ""  # writable layers of containers; "" = beside the image snapshots
    sync_snapshots: bool = True  # syncfs each unpacked layer before its snapshot is committed
    # Writable layers are re-measured in the background this often (ImageFsInfo's staleness bound
    # for a running container's writes); 0: measured on every ImageFsInfo.
    fs_usage_period: float = 10.0


@dataclass(slots=True)
class _Measured:
    usage: snapmod.Usage
    token: object  # the owner's state when measured (a container's status object)
    at: float  # time.monotonic()


class ImageService:
    def __init__(self, settings: ImageSettings, store: Store, metrics: Any = None) -> None:
        self.s = settings
        self.store = store
        self.metrics = metrics
        self.root = os.path.join(settings.root_dir, "images")
        # Root-only, as containerd's root: blobs of private images, and the snapshots' upper dirs
        # (a container's writes).  Containers reach their layers only through their own mounts.
        private_dir(self.root)
        self.content = contentmod.ContentStore(os.path.join(self.root, "content"))
        backend = snapmod.BACKEND_OVERLAY if settings.snapshotter == "overlayfs" else snapmod.BACKEND_NATIVE
        self.snapshots = snapmod.Snapshotter(os.path.join(self.root, "snapshotter"), snapmod.StoreMetaStore(store),
                                             backend=backend, container_root=settings.container_root or None)
        self.node_credentials = NodeCredentials(settings.auth_file, settings.credential_helper_timeout)
        self._client: RegistryClient | None = None  # made at the first pull: see ``client``
        self._pulls: dict[str, asyncio.Future] = {}
        self._chain_locks: dict[str, asyncio.Lock] = {}
        self._inflight_chains: dict[str, int] = {}  # chain IDs a pull or import in flight stands on
        # Guards _inflight_chains and _gc_touched: pulls register chains on the event loop while
        # GC decides, per snapshot and under this lock, whether it is still unused (in a thread).
        self._chains_lock = threading.Lock()
        self._gc_touched: set[str] | None = None  # chains registered since a running GC began
        self._usage_cache: dict[str, snapmod.Usage] = {}
        # Writable layers' usage for ImageFsInfo (see "Disk usage accounting" below).
        self._layers: dict[str, _Measured] = {}
        self._layers_lock = threading.Lock()
        self._refresher: asyncio.Task | None = None
        self._layers_gen = 0  # bumped when the background refresh changes an account
        self._fs_rows: tuple[object, builtins.list[tuple[str, int, int]]] | None = None  # (stamp, rows)
        self.in_use: Callable[[], set[str]] = set  # image ids used by containers (set by the runtime)
        #: snapshot key -> its container's state token (set by the runtime); a changed token re-measures
        self.layer_tokens: Callable[[], Mapping[str, object]] = dict
        self.pulls = PullTracker()  # per-pull progress, served by the daemon at /debug/pulls
        self._pinned: frozenset[str] = frozenset()
        self.set_pinned(settings.pinned_refs)

    # -- pinned images ------------------------------------------------------------------------
    #
    # Pinned is decided from the configured references every time an image is shown, not
    # stored: a reference dropped from the list (or a new sandbox image) takes effect at once.

    def set_pinned(self, refs: Sequence[str]) -> None:
        """Replace the pinned references (the sandbox image and ``images.pinned_images``)."""
        pinned = set()
        for ref in refs:
            if ref.startswith("sha256:"):
                pinned.add(ref)
                continue
            try:
                pinned.add(str(parse_reference(ref)))
            except InvalidArgument:
                log.warning("ignoring invalid pinned image reference %r", ref)
        self._pinned = frozenset(pinned)

    def view_version(self) -> tuple[object, ...]:
        """Changes whenever what ``status``/``list`` show may have changed (records or pins):
        callers keep ready-made answers while it stays the same."""
        return (*self.store.images_version(), self._pinned)

    def is_pinned(self, rec: ImageRecord) -> bool:
        """Whether a configured pinned reference names this image (by tag, digest or id)."""
        return rec.id in self._pinned or any(t in self._pinned for t in rec.repo_tags + rec.repo_digests)

    def _shown(self, rec: ImageRecord | None) -> ImageRecord | None:
        if rec is not None:
            rec.pinned = self.is_pinned(rec)
        return rec

    # -- cross-process coordination ---------------------------------------------------------
    #
    # The daemon and an offline ``moorage images import`` may work on one root at the same
    # time.  Start-up cleaning and GC take ``gc.lock`` exclusively; an import holds it shared
    # (and its blobs and snapshots under a store lease) until its image is recorded.

    @contextlib.contextmanager
    def gc_lock(self, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
        path = os.path.join(self.root, GC_LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Clean what interrupted pulls left: temp ingests, half-extracted snapshots, orphans."""
        removed = await asyncio.to_thread(self._start_clean)
        if removed is not None and any(removed.values()):
            log.info("cleaned leftovers of interrupted pulls", extra={"fields": removed})
        if self.s.fs_usage_period > 0:
            self._refresher = asyncio.create_task(self._refresh_layers_loop(), name="fs-usage")

    def _start_clean(self) -> dict[str, int] | None:
        with self.gc_lock(blocking=False) as got:
            if not got:
                log.warning("an offline image import is running on this root; start-up cleaning skipped")
                return None
            n = self.content.clean_ingests()
            extracts = 0
            for rec in self.store.list_snapshots():
                if rec.key.startswith(EXTRACT_PREFIX):
                    self._remove_snapshot_quietly(rec.key)
                    extracts += 1
            orphans = self.snapshots.cleanup()
            self.store.clear_leases()
            removed = self._gc_locked()
        return {"ingests": n, "extractions": extracts, "orphan_snapshot_dirs": len(orphans),
                **{k: len(v) for k, v in removed.items()}}

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._client is not None:
            await self._client.aclose()

    @property
    def client(self) -> RegistryClient:
        """The registry client, made on first use: its HTTP stack is imported only then (a node
        that never pulls, or not yet, does not pay for it in start-up time and memory)."""
        if self._client is None:
            from moorage.images.registry import RegistryClient

            self._client = RegistryClient(hosts_dir=self.s.hosts_dir, insecure_hosts=self.s.insecure_registries,
                                          retries=self.s.retries, stall_timeout=self.s.stall_timeout,
                                          node_credentials=self.node_credentials.lookup)
        return self._client

    @client.setter
    def client(self, client: RegistryClient) -> None:
        """Another client (tests fake the registry with one)."""
        self._client = client

    async def reconfigure_registries(self, hosts_dir: str, insecure_registries: Sequence[str]) -> None:
        """Re-read the registry hosts config (a daemon reload): hosts.toml, certificates, insecure hosts.

        Pulls in flight finish with what they resolved; the next request uses the new config.
        """
        self.s.hosts_dir = hosts_dir
        self.s.insecure_registries = list(insecure_registries)
        if self._client is not None:  # else the client is made with these when first needed
            await self._client.reconfigure(hosts_dir, self.s.insecure_registries, idle=not self._pulls)

    # -- lookup ---------------------------------------------------------------------------

    def _lookup(self, ref: str) -> ImageRecord | None:
        if not ref:
            raise InvalidArgument("image reference is empty")
        bare_hex = len(ref) == 64 and set(ref) <= _HEX64
        if bare_hex or ref.startswith("sha256:"):
            full = ref if ref.startswith("sha256:") else f"sha256:{ref}"
            if len(full) == 71:
                try:
                    return self.store.get_image(full)
                except NotFound:
                    return None
            if len(full) < 7 + 3 or not set(full[7:]) <= _HEX64:
                raise InvalidArgument(f"invalid image id {ref!r}: want sha256:<hex>")
            matches = [r for r in self.store.list_images() if r.id.startswith(full)]
            return matches[0] if len(matches) == 1 else None
        r = parse_reference(ref)
        if r.digest:
            return self.store.image_by_ref(f"{r.name}@{r.digest}")
        rec = self.store.image_by_ref(f"{r.name}:{r.tag}")
        if rec is None and len(ref) >= 3 and set(ref) <= _HEX64:
            matches = [i for i in self.store.list_images() if i.id.removeprefix("sha256:").startswith(ref)]
            rec = matches[0] if len(matches) == 1 else None
        return rec

    def get_local(self, ref: str) -> ImageRecord:
        rec = self._lookup(ref)
        if rec is None:
            raise NotFound(f"image {ref!r} is not present on this node; pull it first")
        return rec

    def status(self, ref: str) -> ImageRecord | None:
        return self._shown(self._lookup(ref))

    def list(self, ref: str | None = None) -> list[ImageRecord]:
        if ref:
            rec = self._shown(self._lookup(ref))
            return [rec] if rec else []
        return [r for r in map(self._shown, self.store.list_images()) if r is not None]

    def verbose_info(self, rec: ImageRecord) -> str:
        return json.dumps({"id": rec.id, "repoTags": rec.repo_tags, "repoDigests": rec.repo_digests,
                           "chainID": rec.chain_id, "manifestDigest": rec.manifest_digest,
                           "rootDigest": rec.extra.get("root_digest", ""), "layers": rec.layers,
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

    @contextlib.contextmanager
    def _hold_chains(self, chains: builtins.list[str]) -> Iterator[None]:
        """Keep GC off these snapshots while a pull may reuse or create them.  A GC that began
        earlier and has not reached them yet sees them (live) before it removes anything."""
        with self._chains_lock:
            for c in chains:
                self._inflight_chains[c] = self._inflight_chains.get(c, 0) + 1
            if self._gc_touched is not None:
                self._gc_touched.update(chains)
        try:
            yield
        finally:
            with self._chains_lock:
                for c in chains:
                    n = self._inflight_chains.get(c, 0) - 1
                    if n <= 0:
                        self._inflight_chains.pop(c, None)
                    else:
                        self._inflight_chains[c] = n

    async def _pull(self, r: Reference, creds: Credentials | None) -> ImageRecord:
        t0 = time.monotonic()
        lease_name = f"pull-{secrets.token_hex(8)}"
        shown = str(r)
        downloaded: list[int] = []
        prog = self.pulls.begin(shown)
        try:
            with self.content.lease(lease_name) as lease:
                async def read_config(repo: Any, desc: Any) -> bytes:
                    lease.add(desc.digest)
                    return await self._fetch_config(repo, desc, creds)

                with _span("image.resolve", **{"image.ref": shown}):
                    resolved = await self.client.resolve_image(shown, credentials=creds, read_config=read_config)
                manifest = resolved.manifest
                config = json.loads(resolved.config_bytes)
                diff_ids = [str(d) for d in (config.get("rootfs") or {}).get("diff_ids") or []]
                if len(diff_ids) != len(manifest.layers):
                    raise InvalidArgument(f"image {shown}: config lists {len(diff_ids)} diff_ids for "
                                          f"{len(manifest.layers)} layers")
                chains = [str(c) for c in snapmod.chain_ids(diff_ids)] if diff_ids else []
                prog.set_layers([(str(layer.digest), int(layer.size)) for layer in manifest.layers])
                with self._hold_chains(chains):
                    for data, desc in ((resolved.root_bytes, resolved.root), (resolved.manifest_bytes,
                                        resolved.manifest_descriptor), (resolved.config_bytes, manifest.config)):
                        if data:
                            lease.add(desc.digest)
                            await asyncio.to_thread(self.content.write_blob, data, desc.digest)
                    for layer in manifest.layers:
                        lease.add(layer.digest)
                    # Downloads run in parallel; layer i is unpacked as soon as it and layer i-1 are
                    # done, so unpacking overlaps the remaining downloads.
                    # images.max_concurrent_downloads bounds each pull (as its doc and containerd
                    # say); tasks queue on the slots in layer order, so the first layers come first.
                    slots = asyncio.Semaphore(self.s.max_concurrent_downloads)
                    tasks = [asyncio.ensure_future(self._fetch_layer_traced(resolved.repo, l, creds, prog, slots))
                             for l in manifest.layers]
                    try:
                        with _span("image.unpack", **{"image.ref": shown, "image.layers": len(manifest.layers)}):
                            top = await self._unpack(shown, manifest.layers, diff_ids, tasks)
                        downloaded = list(await asyncio.gather(*tasks))
                    except BaseException:
                        for t in tasks:
                            t.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                        raise
                    rec = self._record(r, str(resolved.digest), str(resolved.root.digest),
                                       str(resolved.manifest_descriptor.digest), manifest, config, top)
        except MoorageError as e:
            err = _pull_error(e, shown)
            self.pulls.finish(prog, error=err.message)
            if self.metrics is not None:
                self.metrics.image_pulls.labels("failure").inc()
            await self._cleanup_failed(shown)
            if err is e:
                raise
            raise err from e
        except BaseException as e:
            self.pulls.finish(prog, error=str(e) or type(e).__name__)
            if self.metrics is not None:
                self.metrics.image_pulls.labels("failure").inc()
            if not isinstance(e, (KeyboardInterrupt, SystemExit)):
                await self._cleanup_failed(shown)
            raise
        self.pulls.finish(prog)
        if self.metrics is not None:
            self.metrics.image_pulls.labels("success").inc()
            self.metrics.image_pull_bytes.inc(sum(downloaded))
            self.metrics.image_pull_seconds.observe(time.monotonic() - t0)
        log.info("pulled image", extra={"fields": {"ref": shown, "id": rec.id, "bytes": sum(downloaded),
                                                    "seconds": round(time.monotonic() - t0, 3)}})
        return rec

    async def _cleanup_failed(self, shown: str) -> None:
        """A failed pull leaves nothing behind: what no image (or other pull) needs goes."""
        try:
            removed = await asyncio.shield(self.gc())
            if any(removed.values()):
                log.info("removed what a failed pull left", extra={"fields": {
                    "ref": shown, **{k: len(v) for k, v in removed.items()}}})
        except Exception as e:  # noqa: BLE001 -- the pull's own error is what the caller needs to see
            log.warning("cleaning up after a failed pull of %s: %s", shown, e)

    async def _fetch_config(self, repo: Any, desc: Any, creds: Credentials | None) -> bytes:
        """The config blob from the content store, downloading it (once) when missing."""
        if desc.size > oci.MAX_CONFIG_SIZE:
            raise InvalidArgument(f"image config {desc.digest} is {desc.size} bytes, over the "
                                  f"{oci.MAX_CONFIG_SIZE} byte limit")
        async with self.content.ingest_lock(desc.digest):
            if not self.content.exists(desc.digest):
                data = await self.client.read_blob(repo, desc, max_size=oci.MAX_CONFIG_SIZE, credentials=creds)
                await asyncio.to_thread(self.content.write_blob, data, desc.digest)
                return data
        return await asyncio.to_thread(self.content.read_bytes, desc.digest, oci.MAX_CONFIG_SIZE)

    async def _fetch_layer_traced(self, repo: Any, desc: Any, creds: Credentials | None,
                                  prog: PullProgress | None, slots: asyncio.Semaphore) -> int:
        with _span("image.fetch_layer", **{"image.layer.digest": str(desc.digest),
                                           "image.layer.size": int(desc.size)}) as span:
            n = await self._fetch_layer(repo, desc, creds, prog, slots)
            span.set_attribute("image.layer.downloaded_bytes", n)
            return n

    async def _fetch_layer(self, repo: Any, desc: Any, creds: Credentials | None,
                           prog: PullProgress | None, slots: asyncio.Semaphore) -> int:
        """Download one blob unless present, holding one of *slots* meanwhile; returns the
        bytes downloaded."""
        digest = str(desc.digest)
        if self.content.exists(desc.digest):
            if prog is not None:
                prog.layer_finished(digest, present=True)
            return 0
        async with self.content.ingest_lock(desc.digest):
            if self.content.exists(desc.digest):
                if prog is not None:  # a concurrent pull fetched it while we waited
                    prog.layer_finished(digest, present=True)
                return 0
            async with slots:
                # fetch_blob checks size and digest before its stream ends, and the commit
                # follows the stream's end: hashing the bytes again here would double the cost.
                w = self.content.writer(desc.digest, desc.size, source_verified=True)
                n = 0
                try:
                    async for chunk in self.client.fetch_blob(repo, desc, credentials=creds):
                        w.write(chunk)
                        n += len(chunk)
                        if prog is not None:
                            prog.layer_bytes(digest, n)
                    await asyncio.to_thread(w.commit)
                    if prog is not None:
                        prog.layer_finished(digest)
                except BaseException:
                    w.abort()
                    raise
                return n

    async def _unpack(self, shown: str, layers: Sequence[Any], diff_ids: Sequence[str],
                      ready: Sequence[asyncio.Future[int]] | None = None) -> str:
        """Apply layers into snapshots keyed by chain ID; returns the top chain ID.

        ``ready[i]`` (optional) is awaited before layer i is applied (its download).
        """
        if not layers:
            raise InvalidArgument(f"image {shown} has no layers")
        chains = [str(c) for c in snapmod.chain_ids(diff_ids)]
        parent: str | None = None
        for i, (layer, diff_id, chain) in enumerate(zip(layers, diff_ids, chains)):
            if ready is not None:
                pending = [t for t in ready if not t.done()]
                if not ready[i].done():
                    # wait for this layer, but fail fast when any other download fails
                    while not ready[i].done():
                        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        for t in done:
                            exc = t.exception()
                            if exc is not None:
                                raise exc
                        pending = [t for t in pending if not t.done()]
                ready[i].result()
            lock = self._chain_locks.setdefault(chain, asyncio.Lock())
            async with lock:
                if not self.snapshots.exists(chain):
                    with _span("image.unpack_layer", **{"image.layer.digest": str(layer.digest),
                                                        "snapshot.key": chain}):
                        await asyncio.to_thread(self._apply, layer.digest, diff_id, chain, parent)
            parent = chain
        return chains[-1]

    def _apply(self, layer_digest: str, diff_id: str, chain: str, parent: str | None) -> None:
        key = f"{EXTRACT_PREFIX}{secrets.token_hex(6)}-{chain}"
        self.snapshots.prepare(key, parent)
        try:
            with self.content.open(layer_digest) as src:
                mode = self.snapshots.unpack_mode
                apply_layer(src, self.snapshots.upper_dir(key), mode=mode,
                            parents=self.snapshots.parent_dirs(key) if mode == MODE_OVERLAY else (),
                            label=str(layer_digest),
                            expected_diff_id=diff_id, sync=self.s.sync_snapshots)
            try:
                self.snapshots.commit(chain, key)
            except AlreadyExists:
                # another process (an offline import) committed the same chain first: use its
                self._remove_snapshot_quietly(key)
        except BaseException:
            self._remove_snapshot_quietly(key)
            raise

    def _remove_snapshot_quietly(self, key: str) -> None:
        try:
            self.snapshots.remove(key)
        except NotFound:
            pass

    def _record(self, r: Reference | None, repo_digest: str, root_digest: str, manifest_digest: str,
                manifest: Any, config: dict, top: str, *, tags: Sequence[str] = ()) -> ImageRecord:
        """Record (or update) the image whose config is ``manifest.config``.

        ``r`` is the reference pulled: its tag (when it has no digest) and ``name@repo_digest``
        point at the image; ``tags`` are extra full ``name:tag`` references (archive import).
        """
        iid = str(manifest.config.digest)
        new_tags = list(tags)
        if r is not None and r.tag and r.digest is None:
            new_tags.append(f"{r.name}:{r.tag}")
        names = {t.rsplit(":", 1)[0] for t in new_tags}
        if r is not None:
            names.add(r.name)

        def change(old: ImageRecord | None) -> ImageRecord:
            # Runs inside the store's transaction, so a concurrent pull's tags are kept.
            rec = old if old is not None else ImageRecord(id=iid, created_at=now_ns())
            for t in new_tags:
                if t not in rec.repo_tags:
                    rec.repo_tags.append(t)
            for name in sorted(names):
                if repo_digest and f"{name}@{repo_digest}" not in rec.repo_digests:
                    rec.repo_digests.append(f"{name}@{repo_digest}")
            rec.manifest_digest = manifest_digest
            rec.config = config
            rec.chain_id = top
            rec.layers = [str(layer.digest) for layer in manifest.layers]
            rec.size = sum(layer.size for layer in manifest.layers) + manifest.config.size
            rec.extra = {**rec.extra, "root_digest": root_digest, "manifest_digest": manifest_digest,
                         "manifest_media_type": manifest.media_type}
            rec.pinned = self.is_pinned(rec)  # as recorded; what is shown is recomputed (_shown)
            return rec

        return self.store.update_image(iid, change)

    # -- remove and GC --------------------------------------------------------------------------

    async def remove(self, ref: str) -> None:
        rec = self._lookup(ref)
        if rec is None:
            return  # removing what is not there succeeds, as the CRI asks
        bare_hex = len(ref) == 64 and set(ref) <= _HEX64
        by_tag = not (ref.startswith("sha256:") or bare_hex) and not parse_reference(ref).digest
        if by_tag:
            r = parse_reference(ref)
            tag = f"{r.name}:{r.tag}"
            if len(rec.repo_tags) > 1 and tag in rec.repo_tags and tag not in self._pinned:
                def untag(cur: ImageRecord | None) -> ImageRecord:
                    # on the stored record, in the store's transaction: tags added meanwhile stay
                    cur = cur if cur is not None else rec
                    cur.repo_tags = [t for t in cur.repo_tags if t != tag]
                    # the repo digest goes with the last tag of its repository
                    if not any(t.rsplit(":", 1)[0] == r.name for t in cur.repo_tags):
                        cur.repo_digests = [d for d in cur.repo_digests if d.split("@", 1)[0] != r.name]
                    return cur

                self.store.update_image(rec.id, untag)
                log.info("untagged image", extra={"fields": {"id": rec.id, "tag": tag}})
                return
        if self.is_pinned(rec):
            # The node's config pins it (the sandbox image, images.pinned_images): a pod start
            # must never find it gone. containerd and CRI-O leave this to their clients; a node
            # is safer when the runtime itself keeps what its config says to keep.
            raise FailedPrecondition(
                f"image {rec.id} ({', '.join(rec.repo_tags[:3]) or 'untagged'}) is pinned by the node's config "
                "(runtime.sandbox_image or images.pinned_images); unpin it there (and reload) to remove it")
        self.store.delete_image(rec.id)
        log.info("removed image", extra={"fields": {"id": rec.id, "tags": rec.repo_tags}})
        if self.s.gc_on_remove:
            await self.gc()

    async def gc(self) -> dict[str, builtins.list[str]]:
        """Remove blobs and committed snapshots that no image (or pull in flight) needs."""
        return await asyncio.to_thread(self._gc)

    def _gc(self) -> dict[str, builtins.list[str]]:
        with self.gc_lock():
            return self._gc_locked()

    def collect_garbage(self, dry_run: bool = False) -> dict[str, builtins.list[str]]:
        """GC for ``moorage gc`` (blocking): the same rules as the daemon's, under the GC lock
        (shared for a dry run, which only says what would go and changes nothing)."""
        with self.gc_lock(shared=dry_run):
            return self._gc_locked(dry_run)

    def clean_leftovers(self) -> dict[str, int] | None:
        """What start-up does (ingests, extractions, orphan snapshot dirs, leases, then GC); only
        safe while no daemon runs on this root.  None if an offline import holds the GC lock."""
        return self._start_clean()

    def _gc_locked(self, dry_run: bool = False) -> dict[str, builtins.list[str]]:
        with self._chains_lock:
            # In-flight chains first, images after: a pull records its image before it lets go
            # of its chains.  Chains registered from here on are collected in _gc_touched and
            # checked, with the live set, right before each removal (_gc_remove_snapshot).
            keep_snaps: set[str] = set(self._inflight_chains)
            self._gc_touched = set()
        try:
            with self.content.lease_watch():  # the same for blobs: leased since now -> kept
                return self._gc_collect(keep_snaps, dry_run)
        finally:
            with self._chains_lock:
                self._gc_touched = None

    def _gc_remove_snapshot(self, key: str) -> bool:
        """Remove an unused committed snapshot unless a pull took hold of it since GC began.
        Returns whether it is gone."""
        with self._chains_lock:
            if key in self._inflight_chains or (self._gc_touched is not None and key in self._gc_touched):
                return False
            try:
                d = self.snapshots.remove_record(key)
            except NotFound:
                return True
        self.snapshots.remove_dir(key, d)
        return True

    def _gc_collect(self, keep_snaps: set[str], dry_run: bool = False) -> dict[str, builtins.list[str]]:
        keep_blobs = {str(d) for d in self.content.leased_digests()}
        for res in self.store.leased_resources():  # other processes' work (offline imports)
            keep_blobs.add(res)
            keep_snaps.add(res)
        images = self.store.list_images()
        for img in images:
            keep_blobs.update([img.id, img.manifest_digest, *img.layers, img.extra.get("root_digest", "")])
            keep_snaps.add(img.chain_id)
        records = {r.key: r for r in self.store.list_snapshots()}
        # Whatever an active snapshot (a container, an extraction) stands on stays.
        for rec in records.values():
            if rec.kind != "committed":
                keep_snaps.add(rec.key)
        for top in list(keep_snaps):
            key: str | None = top
            while key and key in records:
                keep_snaps.add(key)
                key = records[key].parent
        removed_snaps: list[str] = []
        progress = True
        while progress:
            progress = False
            for key in list(records):
                if key in keep_snaps:
                    continue
                # A dry run removes nothing from the store: children are judged on its own view.
                if (any(r.parent == key for r in records.values()) if dry_run
                        else self.store.snapshot_children(key)):
                    continue
                if dry_run:  # as if removed: its parent may go in the next round
                    removed_snaps.append(key)
                    records.pop(key)
                    progress = True
                    continue
                try:
                    gone = self._gc_remove_snapshot(key)
                except MoorageError as e:  # e.g. still mounted somewhere: keep it, say why
                    log.warning("gc: keeping snapshot %s: %s", key, e.message)
                    keep_snaps.add(key)
                    continue
                if not gone:  # a pull started using it: it stays, and so does what is below it
                    below: str | None = key
                    while below and below in records:
                        keep_snaps.add(below)
                        below = records[below].parent
                    continue
                self._usage_cache.pop(key, None)
                removed_snaps.append(key)
                records.pop(key)
                progress = True
        removed_blobs = []
        for info in self.content.list():
            if str(info.digest) not in keep_blobs:
                if dry_run:
                    removed_blobs.append(str(info.digest))
                    continue
                try:
                    self.content.delete(info.digest, missing_ok=True)
                except MoorageError:  # leased meanwhile
                    continue
                removed_blobs.append(str(info.digest))
        return {"snapshots": removed_snaps, "blobs": removed_blobs}

    # -- offline import support ------------------------------------------------------------------

    def import_image(self, refs: builtins.list[Reference], root_digest: str, manifest_digest: str,
                     manifest: Any, config_bytes: bytes) -> ImageRecord:
        """Unpack an image whose blobs are all in the content store, then record it.

        Blocking (runs in a thread or the CLI).  The caller holds the blobs under a lease.
        """
        oci.parse_config(config_bytes, f"image config {manifest.config.digest}")
        config = json.loads(config_bytes)  # checked (size, depth, fields) just above
        diff_ids = [str(d) for d in (config.get("rootfs") or {}).get("diff_ids") or []]
        if len(diff_ids) != len(manifest.layers):
            raise InvalidArgument(f"image {manifest_digest}: config lists {len(diff_ids)} diff_ids for "
                                  f"{len(manifest.layers)} layers")
        if not manifest.layers:
            raise InvalidArgument(f"image {manifest_digest} has no layers")
        chains = [str(c) for c in snapmod.chain_ids(diff_ids)]
        lease_id = f"import-{secrets.token_hex(8)}"
        self.store.add_lease(lease_id, chains)
        made: list[str] = []
        try:
            parent: str | None = None
            for layer, diff_id, chain in zip(manifest.layers, diff_ids, chains):
                if not self.snapshots.exists(chain):
                    self._apply(layer.digest, diff_id, chain, parent)
                    made.append(chain)
                parent = chain
            tags = [f"{r.name}:{r.tag}" for r in refs if r.tag and r.digest is None]
            return self._record(None, root_digest if tags else "", root_digest, manifest_digest, manifest,
                                config, chains[-1], tags=tags)
        except BaseException:
            # drop the snapshots this import committed, top first, unless something uses them now
            used = {img.chain_id for img in self.store.list_images()}
            for chain in reversed(made):
                if chain in used or self.store.snapshot_children(chain):
                    break
                with contextlib.suppress(MoorageError):
                    self._remove_snapshot_quietly(chain)
            raise
        finally:
            self.store.release_lease(lease_id)

    # -- container root filesystems --------------------------------------------------------------

    async def _mount_snapshot(self, key: str, image: ImageRecord, target: str, writable: bool,
                              userns: UserNS | None = None) -> None:
        """Mount snapshot ``key`` over ``image``'s layers at ``target``, making it on first use:
        an active (writable) snapshot for a container's rootfs, a view for an image volume.
        With ``userns`` the mount is id-mapped into it (see moorage/core/idmap.py)."""
        def work() -> None:
            os.makedirs(target, mode=0o755, exist_ok=True)
            if self.snapshots.exists(key):
                mounts = self.snapshots.mounts(key)
            elif writable:  # a container's writable layer: on the container filesystem
                mounts = self.snapshots.prepare(key, image.chain_id or None, container=True)
            else:
                mounts = self.snapshots.view(key, image.chain_id or None)
            try:
                if userns is None:
                    mountmod.mount(mounts, target)
                else:
                    if writable and mounts[0].type == "overlay":
                        # The merged root dir is the upper dir's: the pod's root must own it, as it
                        # owns the (id-mapped) image dirs below.
                        os.chown(self.snapshots.upper_dir(key), userns.uid, userns.gid)
                    idmap.mount_idmapped(mounts, target, userns, target.rstrip("/") + ".idmap")
            except BaseException:
                self._remove_snapshot_quietly(key)
                raise

        with _span("snapshot.mount", **{"snapshot.key": key, "snapshot.backend": self.snapshots.backend}):
            await asyncio.to_thread(work)

    async def prepare_rootfs(self, key: str, image: ImageRecord, target: str, *,
                             userns: UserNS | None = None) -> None:
        await self._mount_snapshot(key, image, target, writable=True, userns=userns)

    async def release_rootfs(self, key: str, target: str) -> None:
        def work() -> None:
            if os.path.isdir(target):
                mountmod.unmount_all(target)
            if self.snapshots.exists(key):
                self._remove_snapshot_quietly(key)

        await asyncio.to_thread(work)

    # -- image volumes ----------------------------------------------------------------------------

    async def mount_image_volume(self, key: str, image: ImageRecord, target: str) -> None:
        """Mount a read-only view (snapshot ``key``) of ``image``'s layers at ``target``."""
        await self._mount_snapshot(key, image, target, writable=False)

    async def unmount_image_volume(self, key: str, target: str) -> None:
        """Undo ``mount_image_volume``; a no-op for what is not there."""
        await self.release_rootfs(key, target)

    def container_usage(self, key: str) -> snapmod.Usage | None:
        """Bytes and inodes of a container's writable layer."""
        try:
            return self.snapshots.usage(key)
        except NotFound:
            return None

    # -- disk usage accounting (ImageFsInfo) -------------------------------------------------------
    #
    # A walk of every writable layer per call grew with the containers and their files (seconds for
    # a layer of 300 000 files).  As containerd's snapshot syncer, usage is accounted instead:
    # committed layers never change and are measured once; a writable layer is measured when it is
    # first seen and again whenever its container changes state (the token ``layer_tokens`` gives,
    # so the final size of an exited container shows at once), and in the background every
    # ``fs_usage_period`` seconds while it runs.  A running container's writes therefore show
    # within one period (plus the walk's own time); a call only sums.

    async def fs_info(self) -> builtins.list[tuple[str, int, int]]:
        """[(mountpoint, bytes, inodes)] for the image filesystem, then the container one."""
        # Nothing the sums depend on moved (records, the containers' states - ids of live token
        # objects, which the accounts keep alive -, the background accounts, the blobs): the last
        # answer stands.
        tokens = self.layer_tokens()
        stamp = (self.store.version(), tuple(map(id, tokens.values())), self._layers_gen, self.content.stamp())
        if self._fs_rows is not None and self._fs_rows[0] == stamp and self.s.fs_usage_period > 0:
            return self._fs_rows[1]
        rows = self._fs_info(tokens, measure=False)
        if rows is None:  # a layer to measure first: not on the event loop
            rows = await asyncio.to_thread(self._fs_info, tokens, True)
            assert rows is not None  # measuring never gives up
        self._fs_rows = (stamp, rows)
        return rows

    def _fs_info(self, tokens: Mapping[str, object] | None = None,
                 measure: bool = True) -> builtins.list[tuple[str, int, int]] | None:
        """The sums from the accounts; None if a layer needs measuring and ``measure`` is false."""
        tokens = tokens or {}
        img_bytes = img_inodes = ctr_bytes = ctr_inodes = 0
        always = self.s.fs_usage_period <= 0
        active = set()
        # On the event loop (not measuring) never wait for a thread that is measuring.
        if not self._layers_lock.acquire(blocking=measure):
            return None
        try:
            for rec in self.store.list_snapshots():
                try:
                    if rec.kind == "committed":
                        u = self._usage_cache.get(rec.key)
                        if u is None:
                            if not measure:
                                return None
                            u = self.snapshots.usage(rec.key)
                            self._usage_cache[rec.key] = u  # committed snapshots never change
                        img_bytes += u.size
                        img_inodes += u.inodes
                    elif not rec.key.startswith(EXTRACT_PREFIX):
                        active.add(rec.key)
                        token = tokens.get(rec.key)
                        m = self._layers.get(rec.key)
                        if m is None or m.token is not token or always:
                            if not measure:
                                return None
                            m = _Measured(self.snapshots.usage(rec.key), token, time.monotonic())
                            self._layers[rec.key] = m
                        ctr_bytes += m.usage.size
                        ctr_inodes += m.usage.inodes
                except (NotFound, FileNotFoundError):
                    continue  # removed while we looked
            for key in [k for k in self._layers if k not in active]:
                del self._layers[key]
        finally:
            self._layers_lock.release()
        for info in self.content.list():
            img_bytes += info.size
            img_inodes += 1
        # The image filesystem is the snapshotter root (content and committed layers); the
        # container one is where writable layers live: the same dir unless container_root is set.
        return [(self.snapshots.root, img_bytes, img_inodes), (self.snapshots.container_dir(), ctr_bytes, ctr_inodes)]

    async def _refresh_layers_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.fs_usage_period)
            try:
                await asyncio.to_thread(self._refresh_layers)
            except Exception:  # the accounting must outlive one bad walk
                log.exception("refreshing the writable layers' disk usage failed")

    def _refresh_layers(self) -> None:
        """Re-measure the writable layers measured longer than a period ago (the walks run
        outside the lock: a call meanwhile sums the previous figures)."""
        cutoff = time.monotonic() - self.s.fs_usage_period
        with self._layers_lock:
            due = [(k, m.token) for k, m in self._layers.items() if m.at <= cutoff]
        for key, token in due:
            try:
                u = self.snapshots.usage(key)
            except (NotFound, FileNotFoundError):
                continue
            with self._layers_lock:
                m = self._layers.get(key)
                if m is not None and m.token is token:  # not re-measured for a state change meanwhile
                    self._layers[key] = _Measured(u, token, time.monotonic())
                    self._layers_gen += 1
