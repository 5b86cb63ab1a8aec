"""Snapshots: layered root filesystems, shared between images by chain ID.

Layout under ``root``::

    snapshots/<n>/fs     the snapshot's own files (overlay: its upper dir;
                         native: a full copy of the tree)
    snapshots/<n>/work   overlay work dir, only while the snapshot is active

``<n>`` is a short number so that overlay lowerdir lists stay short.  Metadata
(``moorage.core.store.SnapshotRecord``) lives behind the small :class:`MetaStore`
protocol: :class:`StoreMetaStore` puts it in the daemon's SQLite store,
:class:`MemoryMetaStore` and :class:`JsonFileMetaStore` are for tests and tools.

Kinds (containerd semantics):

* ``active``    writable, made by :meth:`Snapshotter.prepare`; becomes
  ``committed`` by :meth:`Snapshotter.commit` (under a new key, e.g. a chain ID)
* ``view``      read-only, made by :meth:`Snapshotter.view`
* ``committed`` immutable, may be the parent of others

Two backends (``kind``):

* ``overlay``: an active snapshot with a parent mounts as overlayfs with
  ``lowerdir`` = the parent chain (nearest first).  Without a parent it is a
  bind mount.  A read-only view of one layer is a read-only bind mount, of
  several an overlay without upper dir.  When the option string would not fit
  in the single page the kernel copies (``lowerdir`` lists of dozens of
  layers), the lower dirs are written relative to ``<root>/snapshots`` and the
  mount is made from a thread that unshared its cwd (``unshare(CLONE_FS)``) and
  chdir'ed there, as containerd does – the rest of the process keeps its cwd.
* ``native``: ``prepare`` copies the parent tree (hardlinks, owners, modes,
  xattrs, times, devices) into the new dir and mounts are bind mounts.  A view
  binds the committed parent read-only instead of copying it.

Crash safety: a snapshot dir is created (and, for native, filled) before its
record is written, and a record is deleted before its dir; :meth:`cleanup`
at start-up removes dirs that have no record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from moorage.core.errors import AlreadyExists, DiskFull, FailedPrecondition, Internal, InvalidArgument, NotFound
from moorage.core.mount import Mount, mount_points, mounts_using, unmount_all
from moorage.core.store import SnapshotRecord, Store
from moorage.images.digest import Digest
from moorage.images.unpack import _copy_fd

log = logging.getLogger(__name__)

KIND_ACTIVE = "active"
KIND_VIEW = "view"
KIND_COMMITTED = "committed"

BACKEND_OVERLAY = "overlay"
BACKEND_NATIVE = "native"

CONTAINER_ID_PREFIX = "c"  # dir ids of writable layers kept under a separate container root


def _dir_number(name: str) -> int:
    """The number in a snapshot dir id ("17" or "c17"); 0 for anything else."""
    n = name.removeprefix(CONTAINER_ID_PREFIX)
    return int(n) if n.isdigit() else 0



# --------------------------------------------------------------------------- chain id
def chain_id(diff_ids: Sequence[Digest | str]) -> Digest:
    """OCI ChainID: ChainID(L0) = DiffID(L0); ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))."""
    if not diff_ids:
        raise InvalidArgument("chain ID of an empty layer list is undefined")
    current = Digest.parse(diff_ids[0])
    for d in diff_ids[1:]:
        nxt = Digest.parse(d)
        current = Digest("sha256", hashlib.sha256(f"{current} {nxt}".encode()).hexdigest())
    return current


def chain_ids(diff_ids: Sequence[Digest | str]) -> list[Digest]:
    """Chain IDs of every prefix: [ChainID(L0), ChainID(L0..1), ...]."""
    out: list[Digest] = []
    for d in diff_ids:
        nxt = Digest.parse(d)
        out.append(nxt if not out else
                   Digest("sha256", hashlib.sha256(f"{out[-1]} {nxt}".encode()).hexdigest()))
    return out


# --------------------------------------------------------------------------- metadata
# The record is the store's own type (one definition for every backend below): its SQL
# lives with the store, and the in-memory and JSON-file backends use the same fields.


@runtime_checkable
class MetaStore(Protocol):
    """What the snapshotter needs from its metadata store.

    Every method is one transaction.  Implementations must be thread-safe.
    """

    def get(self, key: str) -> SnapshotRecord | None:
        """The record for ``key`` or None."""

    def add(self, record: SnapshotRecord) -> None:
        """Insert; raise AlreadyExists if ``record.key`` exists."""

    def commit(self, key: str, name: str, labels: dict[str, str] | None) -> SnapshotRecord:
        """Atomically turn the active ``key`` into committed ``name`` (same dir_id and
        parent; labels replaced when given); raise NotFound for ``key``,
        AlreadyExists when ``name`` exists.  Returns the new record."""

    def remove(self, key: str) -> SnapshotRecord:
        """Delete and return the record; raise NotFound."""

    def children(self, key: str) -> list[str]:
        """Keys of records whose parent is ``key``."""

    def list(self) -> list[SnapshotRecord]:
        """All records."""


class MemoryMetaStore:
    """In-memory MetaStore (tests, and a cache-less default)."""

    def __init__(self) -> None:
        self._records: dict[str, SnapshotRecord] = {}
        self._lock = threading.RLock()

    def _copy(self, r: SnapshotRecord) -> SnapshotRecord:
        return replace(r, labels=dict(r.labels))

    def get(self, key: str) -> SnapshotRecord | None:
        with self._lock:
            r = self._records.get(key)
            return self._copy(r) if r else None

    def add(self, record: SnapshotRecord) -> None:
        with self._lock:
            if record.key in self._records:
                raise AlreadyExists(f"snapshot \"{record.key}\" already exists")
            self._records[record.key] = self._copy(record)
            self._changed()

    def commit(self, key: str, name: str, labels: dict[str, str] | None) -> SnapshotRecord:
        with self._lock:
            r = self._records.get(key)
            if r is None:
                raise NotFound(f"snapshot \"{key}\" not found")
            if name in self._records:
                raise AlreadyExists(f"snapshot \"{name}\" already exists")
            new = SnapshotRecord(key=name, kind=KIND_COMMITTED, parent=r.parent, dir_id=r.dir_id,
                                 labels=dict(labels) if labels is not None else dict(r.labels),
                                 created_at=r.created_at, updated_at=time.time_ns())
            del self._records[key]
            self._records[name] = new
            self._changed()
            return self._copy(new)

    def remove(self, key: str) -> SnapshotRecord:
        with self._lock:
            r = self._records.pop(key, None)
            if r is None:
                raise NotFound(f"snapshot \"{key}\" not found")
            self._changed()
            return r

    def children(self, key: str) -> list[str]:
        with self._lock:
            return [r.key for r in self._records.values() if r.parent == key]

    def list(self) -> list[SnapshotRecord]:
        with self._lock:
            return [self._copy(r) for r in self._records.values()]

    def _changed(self) -> None:
        pass


class JsonFileMetaStore(MemoryMetaStore):
    """MetaStore persisted to one JSON file, rewritten atomically on each change."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {"snapshots": []}
        except (OSError, ValueError) as e:
            raise Internal(f"snapshot metadata {path} is unreadable: {e}") from None
        for d in data.get("snapshots", []):
            r = SnapshotRecord.from_dict(d)
            self._records[r.key] = r

    def _changed(self) -> None:
        tmp = f"{self.path}.tmp"
        payload = json.dumps({"snapshots": [r.to_dict() for r in self._records.values()]},
                             sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class StoreMetaStore:
    """MetaStore on the daemon's SQLite store: each method is one named store call (one
    transaction); the SQL stays in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, key: str) -> SnapshotRecord | None:
        return self.store.get_snapshot(key)

    def add(self, record: SnapshotRecord) -> None:
        self.store.add_snapshot(record)

    def commit(self, key: str, name: str, labels: dict[str, str] | None) -> SnapshotRecord:
        return self.store.commit_snapshot(key, name, labels)

    def remove(self, key: str) -> SnapshotRecord:
        return self.store.remove_snapshot(key)

    def children(self, key: str) -> list[str]:
        return self.store.snapshot_children(key)

    def list(self) -> list[SnapshotRecord]:
        return self.store.list_snapshots()


# --------------------------------------------------------------------------- mounts
@dataclass(frozen=True)
class Usage:
    size: int     # bytes allocated (st_blocks * 512), hardlinks counted once
    inodes: int


# --------------------------------------------------------------------------- tree copy
def copy_tree(src: str, dst: str) -> None:
    """Copy the contents of ``src`` into the existing directory ``dst``.

    Preserves file types (incl. devices and fifos), hardlinks, owners, modes
    (set-id bits too), xattrs and times.  Never follows symlinks.  Iterative,
    so deep trees cannot exhaust the interpreter stack.
    """
    links: dict[tuple[int, int], str] = {}
    dir_meta: list[tuple[str, str, os.stat_result]] = [(src, dst, os.lstat(src))]
    stack = [(src, dst)]
    while stack:
        sdir, ddir = stack.pop()
        with os.scandir(sdir) as it:
            entries = list(it)
        for e in entries:
            s = e.path
            d = os.path.join(ddir, e.name)
            st = e.stat(follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(d, 0o700)
                dir_meta.append((s, d, st))
                stack.append((s, d))
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(mode):
                first = links.get((st.st_dev, st.st_ino))
                if first is not None:
                    os.link(first, d, follow_symlinks=False)
                    continue
                links[(st.st_dev, st.st_ino)] = d
            if stat.S_ISREG(mode):
                sfd = os.open(s, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    dfd = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                    try:
                        _copy_fd(sfd, dfd, st.st_size)
                    finally:
                        os.close(dfd)
                finally:
                    os.close(sfd)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                os.mknod(d, stat.S_IFMT(mode) | 0o600, st.st_rdev)
            else:
                log.warning("copy_tree: skipping %s (unsupported file type)", s)
                continue
            _copy_meta(s, d, st)
    for s, d, st in reversed(dir_meta):  # children first, so their writes don't touch parent times
        _copy_meta(s, d, st)


def _copy_meta(src: str, dst: str, st: os.stat_result) -> None:
    if os.geteuid() == 0:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)  # before chmod: chown clears set-id
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        names = []
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as e:
            log.warning("copy_tree: cannot copy xattr %s of %s: %s", name, src, e.strerror)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


# --------------------------------------------------------------------------- snapshotter
def _overlay_index_off() -> bool:
    """containerd passes index=off when the overlay module knows the option."""
    return os.path.exists("/sys/module/overlay/parameters/index")


class Snapshotter:
    def __init__(self, root: str, meta: MetaStore | None = None, *, backend: str = BACKEND_OVERLAY,
                 container_root: str | None = None) -> None:
        if backend not in (BACKEND_OVERLAY, BACKEND_NATIVE):
            raise InvalidArgument(f"unknown snapshotter \"{backend}\" (use \"overlay\" or \"native\")")
        self.root = os.path.abspath(root)
        self.backend = backend
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        os.makedirs(self.snapshots_dir, mode=0o700, exist_ok=True)
        # Writable layers of containers (prepare(..., container=True)) may live on a filesystem
        # of their own (the kubelet's split image/container disks).  Their dir ids carry the
        # CONTAINER_ID_PREFIX, so a record alone says where its dir is.
        self.container_root = os.path.abspath(container_root) if container_root else None
        self.container_snapshots_dir = (os.path.join(self.container_root, "snapshots") if self.container_root
                                        else self.snapshots_dir)
        os.makedirs(self.container_snapshots_dir, mode=0o700, exist_ok=True)
        self.meta: MetaStore = meta if meta is not None else MemoryMetaStore()
        self._lock = threading.RLock()
        self._in_flight: set[str] = set()   # dir ids created but not yet recorded
        self._next_id = 1 + max((_dir_number(n) for d in self._snapshot_dirs() for n in os.listdir(d)), default=0)
        self._next_id = max(self._next_id, 1 + max((_dir_number(r.dir_id) for r in self.meta.list()), default=0))
        self._index_off = backend == BACKEND_OVERLAY and _overlay_index_off()

    def _snapshot_dirs(self) -> list[str]:
        return sorted({self.snapshots_dir, self.container_snapshots_dir})

    # -- paths
    @property
    def unpack_mode(self) -> str:
        """How images.unpack must write layers into this snapshotter's dirs."""
        return "overlay" if self.backend == BACKEND_OVERLAY else "copy"

    def _dir(self, dir_id: str) -> str:
        if dir_id.startswith(CONTAINER_ID_PREFIX):
            return os.path.join(self.container_snapshots_dir, dir_id)
        return os.path.join(self.snapshots_dir, dir_id)

    def container_dir(self) -> str:
        """Where containers' writable layers live (the container filesystem of ImageFsInfo)."""
        return self.container_root or self.root

    def _fs(self, rec: SnapshotRecord) -> str:
        return os.path.join(self._dir(rec.dir_id), "fs")

    def _work(self, rec: SnapshotRecord) -> str:
        return os.path.join(self._dir(rec.dir_id), "work")

    def _get(self, key: str) -> SnapshotRecord:
        rec = self.meta.get(key)
        if rec is None:
            raise NotFound(f"snapshot \"{key}\" not found")
        return rec

    def _chain(self, key: str | None) -> list[SnapshotRecord]:
        """Records from ``key`` down to the base layer (nearest first)."""
        out: list[SnapshotRecord] = []
        seen: set[str] = set()
        while key is not None:
            if key in seen:
                raise Internal(f"snapshot metadata has a parent cycle at \"{key}\"")
            seen.add(key)
            rec = self.meta.get(key)
            if rec is None:
                raise Internal(f"snapshot metadata is inconsistent: parent \"{key}\" is missing")
            out.append(rec)
            key = rec.parent
        return out

    def upper_dir(self, key: str) -> str:
        """Directory to write into for an active snapshot (overlay upper dir / native copy)."""
        rec = self._get(key)
        if rec.kind != KIND_ACTIVE:
            raise FailedPrecondition(f"snapshot \"{key}\" is {rec.kind}, not active; it cannot be written")
        return self._fs(rec)

    def parent_dirs(self, key: str) -> list[str]:
        """fs dirs of the parents of ``key``, nearest first (overlay lower dirs)."""
        rec = self._get(key)
        return [self._fs(r) for r in self._chain(rec.parent)]

    # -- queries
    def stat(self, key: str) -> SnapshotRecord:
        return self._get(key)

    def exists(self, key: str) -> bool:
        return self.meta.get(key) is not None

    def walk(self) -> Iterator[SnapshotRecord]:
        yield from sorted(self.meta.list(), key=lambda r: (r.created_at, r.key))

    # -- lifecycle
    def prepare(self, key: str, parent: str | None = None, labels: dict[str, str] | None = None, *,
                container: bool = False) -> list[Mount]:
        """Create the writable snapshot ``key`` on top of committed ``parent``; ``container``:
        a container's writable layer (under ``container_root`` when one is set), not a layer
        being unpacked."""
        return self._create(key, parent, labels, KIND_ACTIVE, container=container)

    def view(self, key: str, parent: str | None = None, labels: dict[str, str] | None = None) -> list[Mount]:
        """Create the read-only snapshot ``key`` of committed ``parent``."""
        return self._create(key, parent, labels, KIND_VIEW)

    def _create(self, key: str, parent: str | None, labels: dict[str, str] | None, kind: str, *,
                container: bool = False) -> list[Mount]:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        if self.meta.get(key) is not None:
            raise AlreadyExists(f"snapshot \"{key}\" already exists")
        self._check_parent(parent)  # fail early; checked again with the record's insertion
        prefix = CONTAINER_ID_PREFIX if container and self.container_root else ""
        with self._lock:
            while True:
                dir_id = f"{prefix}{self._next_id}"
                self._next_id += 1
                try:
                    os.mkdir(self._dir(dir_id), 0o700)
                    break
                except FileExistsError:
                    continue
            self._in_flight.add(dir_id)
        try:
            fs = os.path.join(self._dir(dir_id), "fs")
            os.mkdir(fs, 0o755)
            if kind == KIND_ACTIVE and self.backend == BACKEND_OVERLAY and parent is not None:
                os.mkdir(os.path.join(self._dir(dir_id), "work"), 0o700)
            if kind == KIND_ACTIVE and self.backend == BACKEND_NATIVE and parent is not None:
                copy_tree(self._fs(self._get(parent)), fs)
            now = time.time_ns()
            rec = SnapshotRecord(key=key, kind=kind, parent=parent, dir_id=dir_id,
                                 labels=dict(labels or {}), created_at=now, updated_at=now)
            # One step with remove()'s children check: a parent is never removed between
            # our check and the child's record (which would leave the child dangling).
            with self._lock:
                self._check_parent(parent)
                self.meta.add(rec)
        except BaseException:
            shutil.rmtree(self._dir(dir_id), ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._in_flight.discard(dir_id)
        return self._mounts(rec)

    def _check_parent(self, parent: str | None) -> None:
        if parent is None:
            return
        prec = self.meta.get(parent)
        if prec is None:
            raise NotFound(f"parent snapshot \"{parent}\" not found")
        if prec.kind != KIND_COMMITTED:
            raise FailedPrecondition(
                f"parent snapshot \"{parent}\" is {prec.kind}; only committed snapshots can be parents")

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> SnapshotRecord:
        """Turn active ``key`` into the committed, immutable snapshot ``name``.

        The snapshot must not be mounted.  AlreadyExists when ``name`` exists
        (e.g. another pull committed the same chain ID first): the caller
        removes its own ``key`` then."""
        rec = self._get(key)
        if rec.kind != KIND_ACTIVE:
            raise FailedPrecondition(f"snapshot \"{key}\" is {rec.kind}; only active snapshots can be committed")
        if self.meta.get(name) is not None:
            raise AlreadyExists(f"snapshot \"{name}\" already exists")
        self._refuse_if_mounted(rec)
        new = self.meta.commit(key, name, labels)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._work(rec))
        return new

    def remove(self, key: str) -> None:
        """Remove a snapshot that has no children (unmount it first)."""
        try:
            d = self.remove_record(key)
        except DiskFull:
            # Even the store's reserve is gone: free what this snapshot holds first (it goes
            # anyway; a crash now leaves a record over an empty dir, which GC removes), then
            # drop the record, which now has room.
            if not self._empty(key):
                raise
            d = self.remove_record(key)
        self.remove_dir(key, d)

    def _empty(self, key: str) -> bool:
        """Delete an unmounted active snapshot's contents (not its record); False if not such a one."""
        with self._lock:
            rec = self._get(key)
            if rec.kind != KIND_ACTIVE or mounts_using([self._dir(rec.dir_id)]):
                return False
            for d in (self._fs(rec), self._work(rec)):
                shutil.rmtree(d, ignore_errors=True)
            return True

    def remove_record(self, key: str) -> str:
        """The first half of remove(): check and drop the record (atomically with _create's
        parent check, so no child appears meanwhile); returns the dir for remove_dir()."""
        with self._lock:
            rec = self._get(key)
            children = self.meta.children(key)
            if children:
                shown = ", ".join(f"\"{c}\"" for c in sorted(children)[:5])
                raise FailedPrecondition(
                    f"snapshot \"{key}\" is the parent of {len(children)} other snapshot(s) ({shown}); "
                    "remove those first")
            self._refuse_if_mounted(rec)
            self.meta.remove(key)
            return self._dir(rec.dir_id)

    def remove_dir(self, key: str, d: str) -> None:
        """The second half of remove(): delete the dir of a record already removed."""
        shutil.rmtree(d, ignore_errors=True)
        if os.path.lexists(d):
            log.warning("snapshot %s: could not remove %s; cleanup() will retry", key, d)

    def _refuse_if_mounted(self, rec: SnapshotRecord) -> None:
        users = mounts_using([self._dir(rec.dir_id)])
        if users:
            raise FailedPrecondition(
                f"snapshot \"{rec.key}\" is mounted at {', '.join(users[:3])}; unmount it first")

    def usage(self, key: str) -> Usage:
        """Space used by the snapshot's own dir (overlay: this layer only)."""
        rec = self._get(key)
        return disk_usage(self._fs(rec))

    def cleanup(self) -> list[str]:
        """Remove snapshot dirs without a metadata record (interrupted work); return their ids."""
        removed = []
        with self._lock:
            known = {r.dir_id for r in self.meta.list()} | set(self._in_flight)
            names = [n for d in self._snapshot_dirs() for n in os.listdir(d)]
            for name in names:
                path = self._dir(name)
                if name in known or not os.path.lexists(path):  # (a name in the wrong dir: not ours)
                    continue
                for mp in mount_points():
                    if mp == path or mp.startswith(path + "/"):
                        unmount_all(mp, detach=True)
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.lexists(path):
                    removed.append(name)
        if removed:
            log.info("snapshotter: removed %d orphaned snapshot dir(s)", len(removed))
        return removed

    # -- mounts
    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self._get(key))

    def _mounts(self, rec: SnapshotRecord) -> list[Mount]:
        if self.backend == BACKEND_NATIVE:
            if rec.kind == KIND_ACTIVE:
                return [Mount("bind", self._fs(rec), ["rbind", "rw"])]
            src = self._fs(rec)
            if rec.kind == KIND_VIEW and rec.parent is not None:
                src = self._fs(self._get(rec.parent))  # committed trees are immutable: no copy
            return [Mount("bind", src, ["rbind", "ro"])]

        if rec.kind == KIND_ACTIVE:
            if rec.parent is None:
                return [Mount("bind", self._fs(rec), ["rbind", "rw"])]
            lowers = [self._fs(r) for r in self._chain(rec.parent)]
            opts = []
            if self._index_off:
                opts.append("index=off")
            opts += [f"workdir={self._work(rec)}", f"upperdir={self._fs(rec)}",
                     "lowerdir=" + ":".join(lowers)]
            return [Mount("overlay", "overlay", opts)]
        # read-only: a view shows its parent chain; a committed snapshot shows itself and below
        chain = self._chain(rec.parent) if rec.kind == KIND_VIEW else self._chain(rec.key)
        if not chain:
            return [Mount("bind", self._fs(rec), ["rbind", "ro"])]
        if len(chain) == 1:
            return [Mount("bind", self._fs(chain[0]), ["rbind", "ro"])]
        opts = ["index=off"] if self._index_off else []
        opts.append("lowerdir=" + ":".join(self._fs(r) for r in chain))
        return [Mount("overlay", "overlay", opts)]


def disk_usage(path: str) -> Usage:
    size = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    stack = [path]
    while stack:
        p = stack.pop()
        st = os.lstat(p)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        inodes += 1
        size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(p) as it:
                stack.extend(e.path for e in it)
    return Usage(size=size, inodes=inodes)
