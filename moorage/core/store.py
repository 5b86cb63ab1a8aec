"""The metadata store: one SQLite database, every row under a namespace.

Everything the runtime knows (sandboxes, containers, images, snapshots, leases)
lives here; in-memory indexes elsewhere are caches rebuilt from it.  The
database runs in WAL mode with ``synchronous=FULL``: a transaction is on disk
when its call returns, so it survives an OS crash or power loss too.  The
on-disk protocols depend on that order (a snapshot's data is synced before its
record is written; a record is deleted before its dir is): with ``NORMAL`` an OS
crash could bring back a deleted record whose files were already gone.  The
price is one fsync of the WAL per transaction (about 0.5 ms on the test VM).

The runtime's status updates and deletes may instead be written with
``durable=False`` (``synchronous=NORMAL`` for that transaction: no fsync) and made
durable together by :meth:`Store.sync` (one fsync of the WAL, off the event loop,
shared by every caller waiting at that moment) before the call that wrote them
returns.  WAL commits are ordered, so a power loss keeps a prefix of them: what is
lost is a step inside a call that had not returned, of objects whose processes
and state dir (a tmpfs) a power loss takes anyway.  Inserts stay durable at once:
the runtime makes an insert durable with :meth:`sync` before it writes files under
the root dir for it.  A durable commit is a commit without an fsync followed by that
same :meth:`sync` before it returns: the store's lock is not held through the fsync,
so a snapshot commit in a worker thread does not stall the event loop's status writes
and reads for the length of an fsync (tens of ms while a pull writes layers).

Image and snapshot records are dataclasses; sandbox and container rows are
``ObjectRow``s whose document the runtime encodes (this floor does not import
it).  Each table keeps the columns it is queried by and a
JSON ``data`` column holding the whole record, so adding a field to a record
does not need a migration; changing what is indexed does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from moorage.core.errors import AlreadyExists, DiskFull, FailedPrecondition, NotFound, disk_full, is_disk_full
from moorage.core.fs import restrict_file

DEFAULT_NAMESPACE = "k8s.io"
DB_NAME = "meta.db"
#: Space kept aside next to the database so that releasing writes (deletes and state changes)
#: still commit on a full disk: SQLite appends even a DELETE to the WAL.
RESERVE_NAME = "meta.db-reserve"
RESERVE_BYTES = 2 << 20


def now_ns() -> int:
    return time.time_ns()


@dataclass(frozen=True)
class ObjectRow:
    """One pod sandbox or container row: the columns it is queried by, and its JSON document.

    The store does not know what the document means: the runtime encodes and decodes it
    (``moorage.runtime.records``), so this floor never imports the layer above.
    """

    id: str
    name: str  # the reserved unique name
    state: str
    created_at: int
    data: dict[str, Any]
    sandbox_id: str = ""  # containers only


@dataclass
class ImageRecord:
    id: str  # config digest, "sha256:..."
    repo_tags: list = field(default_factory=list)
    repo_digests: list = field(default_factory=list)
    size: int = 0
    manifest_digest: str = ""
    config: dict = field(default_factory=dict)  # the OCI image config
    chain_id: str = ""  # top snapshot
    layers: list = field(default_factory=list)  # layer digests (content refs)
    pinned: bool = False
    created_at: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class SnapshotRecord:
    """One snapshot, the only record type for it: the snapshotter and every metadata
    backend (this store, the snapshotter's in-memory and JSON-file ones) share it."""

    key: str
    kind: str  # committed | active | view
    parent: str | None = None  # None: a base layer
    dir_id: str = ""  # name of the snapshot's directory under the snapshotter's root
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0  # ns
    updated_at: int = 0  # ns

    def __post_init__(self) -> None:
        # Rows written before the record was shared spell "no parent" as "".
        if not self.parent:
            self.parent = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnapshotRecord:
        """Tolerant of keys this version does not know (a newer writer's)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


R = TypeVar("R")

# Each migration takes the schema from version i to i+1.  Never edit one that
# has shipped; append a new one.
MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE sandboxes (
        namespace TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL,
        state TEXT NOT NULL, created_at INTEGER NOT NULL, data TEXT NOT NULL,
        PRIMARY KEY (namespace, id), UNIQUE (namespace, name));
    CREATE TABLE containers (
        namespace TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL,
        sandbox_id TEXT NOT NULL, state TEXT NOT NULL, created_at INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (namespace, id), UNIQUE (namespace, name));
    CREATE INDEX containers_by_sandbox ON containers (namespace, sandbox_id);
    CREATE TABLE images (
        namespace TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL,
        PRIMARY KEY (namespace, id));
    """,
    # 1 -> 2: image references get their own table (one tag or digest points at
    # one image), snapshots and leases join the store.
    """
    CREATE TABLE image_refs (
        namespace TEXT NOT NULL, ref TEXT NOT NULL, image_id TEXT NOT NULL,
        PRIMARY KEY (namespace, ref));
    CREATE INDEX image_refs_by_image ON image_refs (namespace, image_id);
    CREATE TABLE snapshots (
        namespace TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL,
        parent TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (namespace, key));
    CREATE INDEX snapshots_by_parent ON snapshots (namespace, parent);
    CREATE TABLE leases (
        namespace TEXT NOT NULL, id TEXT NOT NULL, resource TEXT NOT NULL,
        created_at INTEGER NOT NULL, PRIMARY KEY (namespace, id, resource));
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(FailedPrecondition):
    pass


def _to_json(rec: Any) -> str:
    return json.dumps(dataclasses.asdict(rec), separators=(",", ":"), sort_keys=True)


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def _row(r: tuple) -> ObjectRow:
    return ObjectRow(id=r[0], name=r[1], state=r[2], created_at=r[3], data=json.loads(r[4]),
                     sandbox_id=r[5] if len(r) > 5 else "")


def _from_json(cls: type[R], data: str) -> R:
    raw = json.loads(data)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in raw.items() if k in names})


class Store:
    """Typed access to the metadata database.  Thread-safe; calls are short."""

    def __init__(self, root: str, namespace: str = DEFAULT_NAMESPACE, *, target_version: int = SCHEMA_VERSION,
                 reserve_bytes: int = RESERVE_BYTES):
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.path = os.path.join(root, DB_NAME)
        self.namespace = namespace
        self._lock = threading.RLock()
        # Root-only: rows hold every container's environment.  SQLite gives the -wal and -shm
        # files the database's mode when it makes them; older versions left all three 0644.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for suffix in ("", "-wal", "-shm"):
            restrict_file(self.path + suffix)
        # Commits so far, and how many of them are known to be on disk (see sync()).
        self._written = 0
        self._synced = 0
        self._sync_lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # the migrations: durable on return
        self._db.execute("PRAGMA foreign_keys=ON")
        self._image_writes = 0  # see images_version()
        self._writes = 0  # see version()
        self._migrate(target_version)
        # From here every commit is fsynced by sync(), outside the lock: see the module docstring.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self.reserve_path = os.path.join(root, RESERVE_NAME)
        self.reserve_bytes = reserve_bytes
        self._reserve_released = True
        self._make_reserve()  # (a full disk: the first write that needs it says so)

    # -- the space reserve: cleanup never depends on free space --------------------------

    def _make_reserve(self) -> None:
        """Set the reserve aside (again) if it is not; quietly left undone while the disk is full."""
        if self.reserve_bytes <= 0 or not self._reserve_released:
            return
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)
                except OSError as e:
                    if is_disk_full(e):
                        raise
                    os.pwrite(fd, b"\0" * self.reserve_bytes, 0)  # a filesystem without fallocate
            finally:
                os.close(fd)
            self._reserve_released = False
        except OSError as e:
            self._release_reserve()  # no half reserve holding what little space is left
            if not is_disk_full(e):  # a filesystem where no reserve can be made: do without
                self.reserve_bytes = 0

    def _release_reserve(self) -> bool:
        """Give the reserve back to the filesystem; False if there was none to give."""
        try:
            had = os.stat(self.reserve_path).st_blocks > 0
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            had = False
        self._reserve_released = True
        return had

    def _releasing(self, fn: Callable[[sqlite3.Connection], R], durable: bool = True) -> R:
        """A write that frees or settles things (a delete, a state change).  On a full disk it
        gets room the way that costs least and is tried again: first the reserve is given back,
        then the WAL is checkpointed and restarted, so the write reuses the WAL file's own
        space instead of growing it.  Teardown and rollback thus never depend on free space;
        new records do not get this (they answer RESOURCE_EXHAUSTED)."""
        attempt = 0
        while True:
            try:
                with self.transaction(releasing=True, durable=durable) as db:
                    return fn(db)
            except DiskFull:
                with self._lock:
                    if attempt >= 2 or not ((attempt == 0 and self._release_reserve()) or self._restart_wal()):
                        raise
                attempt += 1

    def _restart_wal(self) -> bool:
        """Copy the WAL into the database and let the next write start the WAL over."""
        try:
            busy = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
        except sqlite3.Error:
            return False
        return busy == 0

    # -- schema -------------------------------------------------------------------

    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self, target: int) -> None:
        with self._lock:
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"metadata store {self.path} has schema version {current}, but this moorage "
                    f"understands up to {SCHEMA_VERSION}; run a newer moorage or move the root dir aside"
                )
            for version in range(current, target):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in MIGRATIONS[version].split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    if version == 1:
                        self._migrate_image_refs()
                    self._db.execute(f"PRAGMA user_version = {version + 1}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def _migrate_image_refs(self) -> None:
        # Schema 1 kept tags and digests only inside the image's JSON.
        for ns, iid, data in self._db.execute("SELECT namespace, id, data FROM images").fetchall():
            rec = _from_json(ImageRecord, data)
            for ref in list(rec.repo_tags) + list(rec.repo_digests):
                self._db.execute(
                    "INSERT OR REPLACE INTO image_refs (namespace, ref, image_id) VALUES (?,?,?)", (ns, ref, iid)
                )

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()

    @contextmanager
    def transaction(self, releasing: bool = False, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; everything inside commits or nothing does.

        Only a ``releasing`` write (see ``_releasing``) may run while the reserve is spent and
        cannot be set aside again: new work on a full disk is refused before it starts, so the
        clean-up of whatever fails next still finds room.  ``durable=False``: committed without
        an fsync; on disk after the next :meth:`sync` (or durable commit).  Durable: that
        :meth:`sync` runs before this returns, after the lock is released.
        """
        with self._lock:
            if not releasing and self._reserve_released and self.reserve_bytes > 0:
                self._make_reserve()
                if self._reserve_released:
                    raise DiskFull(f"no space left on device for the metadata store's reserve "
                                   f"({self.reserve_bytes >> 10} KiB) next to {self.path}; free space on "
                                   "that filesystem and retry")
            self._writes += 1  # see version()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL)
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if is_disk_full(e):
                    raise disk_full(e, f"the metadata store {self.path}") from e
                raise
            self._written += 1
        if durable:
            self.sync()

    def unsynced(self) -> bool:
        """True while some commit made with ``durable=False`` may not be on disk yet."""
        with self._lock:
            return self._synced < self._written

    def sync(self) -> None:
        """Make every commit so far durable: one fsync of the WAL, shared by concurrent callers (a
        caller whose commits a sync that started after them covered returns at once).  Blocking."""
        with self._lock:
            want = self._written
        with self._sync_lock:
            with self._lock:
                if self._synced >= want:
                    return
                upto = self._written
            try:
                fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1  # checkpointed and removed: everything is in the database file, synced
            if fd >= 0:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            with self._lock:
                self._synced = max(self._synced, upto)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- sandboxes ------------------------------------------------------------------

    def add_sandbox(self, row: ObjectRow, durable: bool = True) -> None:
        """Insert a sandbox; ALREADY_EXISTS naming the holder if its name is taken."""
        with self.transaction(durable=durable) as db:
            holder = db.execute(
                "SELECT id FROM sandboxes WHERE namespace=? AND name=?", (self.namespace, row.name)
            ).fetchone()
            if holder:
                raise AlreadyExists(f"pod sandbox name {row.name!r} is already in use by sandbox {holder[0]}")
            try:
                db.execute(
                    "INSERT INTO sandboxes (namespace, id, name, state, created_at, data) VALUES (?,?,?,?,?,?)",
                    (self.namespace, row.id, row.name, row.state, row.created_at, _dumps(row.data)),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"pod sandbox id {row.id} already exists") from None

    def update_sandbox(self, row: ObjectRow, durable: bool = True) -> None:
        def write(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "UPDATE sandboxes SET state=?, data=? WHERE namespace=? AND id=?",
                (row.state, _dumps(row.data), self.namespace, row.id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"pod sandbox {row.id} not found")

        self._releasing(write, durable)

    def get_sandbox(self, sid: str) -> ObjectRow:
        rows = self._query("SELECT id, name, state, created_at, data FROM sandboxes WHERE namespace=? AND id=?",
                           (self.namespace, sid))
        if not rows:
            raise NotFound(f"pod sandbox {sid} not found")
        return _row(rows[0])

    def list_sandboxes(self) -> list[ObjectRow]:
        rows = self._query("SELECT id, name, state, created_at, data FROM sandboxes WHERE namespace=? "
                           "ORDER BY created_at", (self.namespace,))
        return [_row(r) for r in rows]

    def delete_sandbox(self, sid: str, durable: bool = True) -> bool:
        return self._releasing(lambda db: db.execute(
            "DELETE FROM sandboxes WHERE namespace=? AND id=?", (self.namespace, sid)).rowcount > 0, durable)

    # -- containers ---------------------------------------------------------------------

    def add_container(self, row: ObjectRow, durable: bool = True) -> None:
        """Insert a container; ALREADY_EXISTS naming the holder if its name is taken."""
        with self.transaction(durable=durable) as db:
            holder = db.execute(
                "SELECT id FROM containers WHERE namespace=? AND name=?", (self.namespace, row.name)
            ).fetchone()
            if holder:
                raise AlreadyExists(f"container name {row.name!r} is already in use by container {holder[0]}")
            db.execute(
                "INSERT INTO containers (namespace, id, name, sandbox_id, state, created_at, data)"
                " VALUES (?,?,?,?,?,?,?)",
                (self.namespace, row.id, row.name, row.sandbox_id, row.state, row.created_at, _dumps(row.data)),
            )

    def update_container(self, row: ObjectRow, durable: bool = True) -> None:
        def write(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "UPDATE containers SET state=?, data=? WHERE namespace=? AND id=?",
                (row.state, _dumps(row.data), self.namespace, row.id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"container {row.id} not found")

        self._releasing(write, durable)

    _CONTAINER_COLUMNS = "id, name, state, created_at, data, sandbox_id"

    def get_container(self, cid: str) -> ObjectRow:
        rows = self._query(f"SELECT {self._CONTAINER_COLUMNS} FROM containers WHERE namespace=? AND id=?",
                           (self.namespace, cid))
        if not rows:
            raise NotFound(f"container {cid} not found")
        return _row(rows[0])

    def list_containers(self, sandbox_id: str | None = None) -> list[ObjectRow]:
        if sandbox_id is None:
            rows = self._query(f"SELECT {self._CONTAINER_COLUMNS} FROM containers WHERE namespace=? "
                               "ORDER BY created_at", (self.namespace,))
        else:
            rows = self._query(
                f"SELECT {self._CONTAINER_COLUMNS} FROM containers WHERE namespace=? AND sandbox_id=? "
                "ORDER BY created_at", (self.namespace, sandbox_id),
            )
        return [_row(r) for r in rows]

    def delete_container(self, cid: str, durable: bool = True) -> bool:
        return self._releasing(lambda db: db.execute(
            "DELETE FROM containers WHERE namespace=? AND id=?", (self.namespace, cid)).rowcount > 0, durable)

    # -- images ----------------------------------------------------------------------

    def version(self) -> tuple[int, int]:
        """Changes when anything in the store may have changed (any write of ours, or a commit by
        another connection): cached views of several tables compare it."""
        with self._lock:
            return self._writes, self._db.execute("PRAGMA data_version").fetchone()[0]

    def images_version(self) -> tuple[int, int]:
        """Changes when an image or image reference may have changed: cached views of images
        compare it.  Our own writes bump the counter; SQLite's ``data_version`` moves when another
        connection (an offline ``moorage images import``) commits anything."""
        with self._lock:
            return self._image_writes, self._db.execute("PRAGMA data_version").fetchone()[0]

    def put_image(self, rec: ImageRecord) -> None:
        """Insert or replace an image and point its tags and digests at it.

        A tag that pointed at another image moves here; that image keeps its
        other references (an image left with none is the caller's to remove).
        """
        with self.transaction() as db:
            self._image_writes += 1
            self._put_image(db, rec)

    def update_image(self, iid: str, change: Callable[[ImageRecord | None], ImageRecord]) -> ImageRecord:
        """Read image ``iid`` (None when absent), let ``change`` return its new state and
        store that (with its refs, as put_image), all in one transaction: two pulls that add
        different tags to one image both keep theirs.  ``change`` must be quick and pure."""
        with self.transaction() as db:
            self._image_writes += 1
            rec = change(self._get_image(db, iid))
            if rec.id != iid:
                raise ValueError(f"update_image({iid!r}) returned image {rec.id!r}")
            self._put_image(db, rec)
        return rec

    def _put_image(self, db: sqlite3.Connection, rec: ImageRecord) -> None:
        ns = self.namespace
        for ref in list(rec.repo_tags) + list(rec.repo_digests):
            row = db.execute("SELECT image_id FROM image_refs WHERE namespace=? AND ref=?", (ns, ref)).fetchone()
            if row and row[0] != rec.id:
                other = self._get_image(db, row[0])
                if other is not None:
                    other.repo_tags = [t for t in other.repo_tags if t != ref]
                    other.repo_digests = [d for d in other.repo_digests if d != ref]
                    db.execute("UPDATE images SET data=? WHERE namespace=? AND id=?", (_to_json(other), ns, other.id))
        db.execute("DELETE FROM image_refs WHERE namespace=? AND image_id=?", (ns, rec.id))
        for ref in list(rec.repo_tags) + list(rec.repo_digests):
            db.execute("INSERT OR REPLACE INTO image_refs (namespace, ref, image_id) VALUES (?,?,?)", (ns, ref, rec.id))
        db.execute("INSERT OR REPLACE INTO images (namespace, id, data) VALUES (?,?,?)", (ns, rec.id, _to_json(rec)))

    def _get_image(self, db: sqlite3.Connection, iid: str) -> ImageRecord | None:
        row = db.execute("SELECT data FROM images WHERE namespace=? AND id=?", (self.namespace, iid)).fetchone()
        return _from_json(ImageRecord, row[0]) if row else None

    def get_image(self, iid: str) -> ImageRecord:
        with self._lock:
            rec = self._get_image(self._db, iid)
        if rec is None:
            raise NotFound(f"image {iid} not found")
        return rec

    def image_by_ref(self, ref: str) -> ImageRecord | None:
        rows = self._query("SELECT image_id FROM image_refs WHERE namespace=? AND ref=?", (self.namespace, ref))
        if not rows:
            return None
        with self._lock:
            return self._get_image(self._db, rows[0][0])

    def list_images(self) -> list[ImageRecord]:
        rows = self._query("SELECT data FROM images WHERE namespace=? ORDER BY id", (self.namespace,))
        return [_from_json(ImageRecord, r[0]) for r in rows]

    def delete_image(self, iid: str) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            self._image_writes += 1
            db.execute("DELETE FROM image_refs WHERE namespace=? AND image_id=?", (self.namespace, iid))
            return db.execute("DELETE FROM images WHERE namespace=? AND id=?", (self.namespace, iid)).rowcount > 0

        return self._releasing(write)

    # -- snapshots (the snapshotter's metadata protocol is a thin adapter over these) -------

    def put_snapshot(self, rec: SnapshotRecord) -> None:
        """Insert or replace."""
        with self.transaction() as db:
            self._insert_snapshot(db, rec, replace=True)

    def _insert_snapshot(self, db: sqlite3.Connection, rec: SnapshotRecord, *, replace: bool) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        # The parent column is NOT NULL: "" stands for a base layer there (never a key).
        db.execute(
            f"{verb} INTO snapshots (namespace, key, kind, parent, data) VALUES (?,?,?,?,?)",
            (self.namespace, rec.key, rec.kind, rec.parent or "", _to_json(rec)),
        )

    def add_snapshot(self, rec: SnapshotRecord) -> None:
        """Insert; AlreadyExists when ``rec.key`` is taken (checked and inserted atomically)."""
        with self.transaction() as db:
            try:
                self._insert_snapshot(db, rec, replace=False)
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"snapshot {rec.key!r} already exists") from None

    def commit_snapshot(self, key: str, name: str, labels: dict[str, str] | None) -> SnapshotRecord:
        """In one transaction, turn ``key`` into the committed ``name``: same dir and parent,
        labels replaced when given.  NotFound for ``key``, AlreadyExists for ``name``."""
        with self.transaction() as db:
            old = self._get_snapshot(db, key)
            if old is None:
                raise NotFound(f"snapshot {key!r} not found")
            if self._get_snapshot(db, name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            new = SnapshotRecord(key=name, kind="committed", parent=old.parent, dir_id=old.dir_id,
                                 labels=dict(labels if labels is not None else old.labels),
                                 created_at=old.created_at, updated_at=now_ns())
            db.execute("DELETE FROM snapshots WHERE namespace=? AND key=?", (self.namespace, key))
            self._insert_snapshot(db, new, replace=False)
        return new

    def remove_snapshot(self, key: str) -> SnapshotRecord:
        """Delete and return the record, in one transaction; NotFound when absent."""
        def write(db: sqlite3.Connection) -> SnapshotRecord:
            rec = self._get_snapshot(db, key)
            if rec is None:
                raise NotFound(f"snapshot {key!r} not found")
            db.execute("DELETE FROM snapshots WHERE namespace=? AND key=?", (self.namespace, key))
            return rec

        return self._releasing(write)

    def _get_snapshot(self, db: sqlite3.Connection, key: str) -> SnapshotRecord | None:
        row = db.execute("SELECT data FROM snapshots WHERE namespace=? AND key=?", (self.namespace, key)).fetchone()
        return _from_json(SnapshotRecord, row[0]) if row else None

    def get_snapshot(self, key: str) -> SnapshotRecord | None:
        with self._lock:
            return self._get_snapshot(self._db, key)

    def list_snapshots(self) -> list[SnapshotRecord]:
        rows = self._query("SELECT data FROM snapshots WHERE namespace=?", (self.namespace,))
        return [_from_json(SnapshotRecord, r[0]) for r in rows]

    def snapshot_children(self, key: str) -> list[str]:
        rows = self._query("SELECT key FROM snapshots WHERE namespace=? AND parent=?", (self.namespace, key))
        return [r[0] for r in rows]

    def delete_snapshot(self, key: str) -> bool:
        return self._releasing(lambda db: db.execute(
            "DELETE FROM snapshots WHERE namespace=? AND key=?", (self.namespace, key)).rowcount > 0)

    # -- leases: resources (blob digests, snapshot keys) held by work in flight ----------------

    def add_lease(self, lease_id: str, resources: list[str]) -> None:
        with self.transaction() as db:
            for r in resources:
                db.execute(
                    "INSERT OR IGNORE INTO leases (namespace, id, resource, created_at) VALUES (?,?,?,?)",
                    (self.namespace, lease_id, r, now_ns()),
                )

    def release_lease(self, lease_id: str) -> None:
        self._releasing(lambda db: db.execute("DELETE FROM leases WHERE namespace=? AND id=?",
                                              (self.namespace, lease_id)))

    def leased_resources(self) -> set[str]:
        return {r[0] for r in self._query("SELECT resource FROM leases WHERE namespace=?", (self.namespace,))}

    def clear_leases(self) -> int:
        """Drop every lease: at start-up no pull is in flight any more."""
        with self.transaction() as db:
            return db.execute("DELETE FROM leases WHERE namespace=?", (self.namespace,)).rowcount
