"""Content-addressed blob store.

Layout under ``root``::

    blobs/<algorithm>/<hex>   verified blobs, read-only (0444)
    ingest/<random>           partial downloads; never read as content

A blob becomes visible only after its size (when known) and digest were
verified, the data fsync'd, and the file atomically renamed into ``blobs/``
(the directory is fsync'd too).  Anything left in ``ingest/`` after a crash is
removed by :meth:`ContentStore.clean_ingests` at start-up.

Concurrency: :meth:`ContentStore.ingest_lock` (async) and
:meth:`ContentStore.ingest_lock_sync` (threads) serialise work on one digest,
so two pulls that share a layer download it once: take the lock, check
:meth:`exists`, write only if missing.  Both forms exclude each other.

Leases: an in-flight pull holds a :class:`Lease` naming the digests it has
written or is about to use; garbage collection must skip
:meth:`leased_digests` (and :meth:`delete` refuses them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from moorage.core.errors import DataLoss, FailedPrecondition, Internal, InvalidArgument, NotFound
from moorage.images.digest import ALGORITHMS, Digest

log = logging.getLogger(__name__)



class DigestMismatch(DataLoss):
    """Downloaded or supplied data does not hash to the digest it was announced with."""


class SizeMismatch(DataLoss):
    """Data is longer or shorter than the size its descriptor announced."""


class BlobTooLarge(InvalidArgument):
    """A bounded read found a blob larger than allowed."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: Digest
    size: int


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """Streams data into an ingest file; :meth:`commit` verifies and publishes.

    Use as a context manager: leaving the block without a successful commit
    removes the temporary file.  Writing more than the expected size fails at
    once (the stream is bounded by its descriptor).
    """

    def __init__(self, store: ContentStore, expected: Digest, size: int | None, *,
                 source_verified: bool = False) -> None:
        self._store = store
        self.expected = expected
        self.size = size
        # A source that checks the digest itself before it ends (the registry client's blob
        # stream) needs no second sha256 pass here: commit then checks the size only.
        self._hasher = None if source_verified else expected.hasher()
        self.written = 0
        self.committed = False
        self._closed = False
        self.ingest_path = os.path.join(store.ingest_dir, f"{expected.hex[:16]}-{secrets.token_hex(8)}")
        fd = os.open(self.ingest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb")
        store._active_ingests.add(self.ingest_path)

    def write(self, data: bytes) -> int:
        if self._closed:
            raise Internal(f"writer for {self.expected} is closed")
        n = len(data)
        if self.size is not None and self.written + n > self.size:
            self.abort()
            raise SizeMismatch(
                f"blob {self.expected}: received more than the expected {self.size} bytes; "
                "the source sent different content than its descriptor describes"
            )
        self._file.write(data)
        if self._hasher is not None:
            self._hasher.update(data)
        self.written += n
        return n

    def digest(self) -> Digest:
        if self._hasher is None:
            raise Internal(f"writer for {self.expected} does not hash: its source verifies the digest")
        return Digest(self.expected.algorithm, self._hasher.hexdigest())

    def commit(self) -> BlobInfo:
        """Verify size and digest, fsync and publish. Idempotent if the blob already exists."""
        if self.committed:
            return BlobInfo(self.expected, self.written)
        if self._closed:
            raise Internal(f"writer for {self.expected} was aborted")
        try:
            if self.size is not None and self.written != self.size:
                raise SizeMismatch(
                    f"blob {self.expected}: size mismatch: expected {self.size} bytes, got {self.written}"
                )
            if self._hasher is not None:
                actual = self.digest()
                if actual != self.expected:
                    raise DigestMismatch(f"digest mismatch: expected {self.expected} got {actual}")
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), 0o444)
            self._file.close()
            final = self._store.path(self.expected)
            os.rename(self.ingest_path, final)  # atomic; replaces an identical blob if one raced in
            _fsync_dir(os.path.dirname(final))
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.committed = True
        self._store._active_ingests.discard(self.ingest_path)
        return BlobInfo(self.expected, self.written)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ingest_path)
        self._store._active_ingests.discard(self.ingest_path)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()


class Lease:
    """Digests an in-flight operation needs; GC must not remove them."""

    def __init__(self, store: ContentStore, name: str) -> None:
        self._store = store
        self.name = name
        self.digests: set[Digest] = set()

    def add(self, *digests: Digest | str) -> None:
        with self._store._lease_guard:
            parsed = [Digest.parse(d) for d in digests]
            self.digests.update(parsed)
            if self._store._lease_watch is not None:  # a GC is running: it must see these too
                self._store._lease_watch.update(parsed)


class _DigestLock:
    __slots__ = ("tlock", "alock", "users")

    def __init__(self) -> None:
        self.tlock = threading.Lock()
        self.alock: asyncio.Lock | None = None
        self.users = 0


class ContentStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.blobs_dir = os.path.join(self.root, "blobs")
        self.ingest_dir = os.path.join(self.root, "ingest")
        for algo in ALGORITHMS:
            os.makedirs(os.path.join(self.blobs_dir, algo), mode=0o700, exist_ok=True)
        os.makedirs(self.ingest_dir, mode=0o700, exist_ok=True)
        self._active_ingests: set[str] = set()
        self._locks: dict[Digest, _DigestLock] = {}
        self._locks_guard = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._lease_watch: set[Digest] | None = None
        self._lease_guard = threading.Lock()

    # ---- paths and reads -------------------------------------------------
    def path(self, digest: Digest | str) -> str:
        d = Digest.parse(digest)
        return os.path.join(self.blobs_dir, d.algorithm, d.hex)

    def exists(self, digest: Digest | str) -> bool:
        return os.path.isfile(self.path(digest))

    def info(self, digest: Digest | str) -> int:
        """Size in bytes of a stored blob."""
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found in the content store") from None

    def open(self, digest: Digest | str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found in the content store") from None

    def read_bytes(self, digest: Digest | str, max_size: int) -> bytes:
        """Whole blob, refusing blobs larger than ``max_size`` (for manifests and configs)."""
        with self.open(digest) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_size:
                raise BlobTooLarge(
                    f"blob {digest} is {size} bytes, larger than the limit of {max_size} bytes"
                )
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise BlobTooLarge(f"blob {digest} is larger than the limit of {max_size} bytes")
        return data

    # ---- writes ----------------------------------------------------------
    def writer(self, expected: Digest | str, size: int | None = None, *, source_verified: bool = False) -> Writer:
        """``source_verified``: the caller commits only after its source proved the digest."""
        if size is not None and size < 0:
            raise InvalidArgument(f"blob {expected}: negative size {size}")
        return Writer(self, Digest.parse(expected), size, source_verified=source_verified)

    def write_blob(self, data: bytes, expected: Digest | str | None = None,
                   algorithm: str = "sha256") -> Digest:
        """Store a small in-memory blob (verifying it when ``expected`` is given)."""
        d = Digest.parse(expected) if expected is not None else Digest.from_bytes(data, algorithm)
        if self.exists(d):
            return d
        with self.writer(d, len(data)) as w:
            w.write(data)
            w.commit()
        return d

    def ingest(self, expected: Digest | str, size: int | None, chunks: Iterable[bytes]) -> BlobInfo:
        """Write ``chunks`` under the per-digest thread lock unless the blob already exists."""
        d = Digest.parse(expected)
        with self.ingest_lock_sync(d):
            if self.exists(d):
                return BlobInfo(d, self.info(d))
            with self.writer(d, size) as w:
                for chunk in chunks:
                    w.write(chunk)
                return w.commit()

    def delete(self, digest: Digest | str, *, missing_ok: bool = False) -> None:
        """Remove a blob nobody leases (checked atomically with the removal).  While a
        :meth:`lease_watch` is open, a blob leased since it opened is refused too."""
        d = Digest.parse(digest)
        with self._lease_guard:
            holders = {name for name, lease in self._leases.items() if d in lease.digests}
            if holders or (self._lease_watch is not None and d in self._lease_watch):
                raise FailedPrecondition(
                    f"blob {d} is in use by in-flight operation(s) {', '.join(sorted(holders)) or '(since GC began)'}"
                    "; retry later")
            try:
                os.unlink(self.path(d))
            except FileNotFoundError:
                if not missing_ok:
                    raise NotFound(f"blob {d} not found in the content store") from None

    @contextlib.contextmanager
    def lease_watch(self) -> Iterator[None]:
        """For GC: from here on, remember every digest leased (even if released again), so
        a blob a pull took after GC computed what to keep is not deleted under it."""
        with self._lease_guard:
            self._lease_watch = set()
        try:
            yield
        finally:
            with self._lease_guard:
                self._lease_watch = None

    def stamp(self) -> tuple[int, ...]:
        """Changes when a blob is added or removed (the blob dirs' mtimes): cached sums compare it."""
        out = []
        for algo in ALGORITHMS:
            try:
                out.append(os.stat(os.path.join(self.blobs_dir, algo)).st_mtime_ns)
            except FileNotFoundError:
                out.append(0)
        return tuple(out)

    def list(self) -> list[BlobInfo]:
        out = []
        for algo, n in ALGORITHMS.items():
            adir = os.path.join(self.blobs_dir, algo)
            try:
                entries = list(os.scandir(adir))
            except FileNotFoundError:
                continue
            for e in entries:
                if len(e.name) != n or not e.is_file(follow_symlinks=False):
                    continue
                try:
                    d = Digest.parse(f"{algo}:{e.name}")
                    out.append(BlobInfo(d, e.stat(follow_symlinks=False).st_size))
                except (InvalidArgument, FileNotFoundError):
                    continue
        return out

    def usage(self) -> int:
        """Bytes used by committed blobs plus ingests in progress."""
        total = sum(b.size for b in self.list())
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.ingest_dir):
                with contextlib.suppress(FileNotFoundError):
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        return total

    def clean_ingests(self) -> int:
        """Remove leftovers of interrupted ingests (writers of this process are kept)."""
        removed = 0
        for e in os.scandir(self.ingest_dir):
            if e.path in self._active_ingests:
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            log.info("content store: removed %d interrupted ingest(s)", removed)
        return removed

    # ---- per-digest locks ----------------------------------------------------
    def _lock_ref(self, d: Digest) -> _DigestLock:
        with self._locks_guard:
            lk = self._locks.get(d)
            if lk is None:
                lk = self._locks[d] = _DigestLock()
            lk.users += 1
            return lk

    def _lock_unref(self, d: Digest, lk: _DigestLock) -> None:
        with self._locks_guard:
            lk.users -= 1
            if lk.users == 0 and self._locks.get(d) is lk:
                del self._locks[d]

    @contextlib.contextmanager
    def ingest_lock_sync(self, digest: Digest | str) -> Iterator[None]:
        """Blocking per-digest lock for executor threads."""
        d = Digest.parse(digest)
        lk = self._lock_ref(d)
        try:
            with lk.tlock:
                yield
        finally:
            self._lock_unref(d, lk)

    @contextlib.asynccontextmanager
    async def ingest_lock(self, digest: Digest | str) -> AsyncIterator[None]:
        """Per-digest lock for coroutines; also excludes :meth:`ingest_lock_sync` holders.

        Coroutines queue on an asyncio.Lock (no thread per waiter); the holder
        then takes the thread lock, off the event loop if it is contended.
        """
        d = Digest.parse(digest)
        lk = self._lock_ref(d)
        try:
            with self._locks_guard:
                if lk.alock is None:
                    lk.alock = asyncio.Lock()
                alock = lk.alock
            async with alock:
                if not lk.tlock.acquire(blocking=False):
                    loop = asyncio.get_running_loop()
                    fut = loop.run_in_executor(None, lk.tlock.acquire)
                    try:
                        await asyncio.shield(fut)
                    except asyncio.CancelledError:
                        # the acquire still completes in its thread: give the lock back then
                        def give_back(f: asyncio.Future[bool], tlock: threading.Lock = lk.tlock) -> None:
                            if not f.cancelled() and f.result():
                                tlock.release()

                        fut.add_done_callback(give_back)
                        raise
                try:
                    yield
                finally:
                    lk.tlock.release()
        finally:
            self._lock_unref(d, lk)

    # ---- leases ---------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, name: str, digests: Iterable[Digest | str] = ()) -> Iterator[Lease]:
        """Hold ``digests`` (and any added later via ``Lease.add``) until the block ends."""
        with self._lease_guard:
            if name in self._leases:
                raise FailedPrecondition(f"lease \"{name}\" is already held")
            lease = self._leases[name] = Lease(self, name)
        try:
            lease.add(*digests)
            yield lease
        finally:
            with self._lease_guard:
                self._leases.pop(name, None)

    def leased_digests(self) -> set[Digest]:
        with self._lease_guard:
            out: set[Digest] = set()
            for lease in self._leases.values():
                out |= lease.digests
            return out

    def leases_holding(self, digest: Digest | str) -> set[str]:
        d = Digest.parse(digest)
        with self._lease_guard:
            return {name for name, lease in self._leases.items() if d in lease.digests}
