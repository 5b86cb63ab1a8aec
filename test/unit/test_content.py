import asyncio
import hashlib
import os
import threading

import pytest

from moorage.core.errors import FailedPrecondition, Internal, NotFound
from moorage.images.content import (
    BlobTooLarge,
    ContentStore,
    DigestMismatch,
    SizeMismatch,
)
from moorage.images.digest import Digest


def dg(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@pytest.fixture
def store(tmp_path):
    return ContentStore(str(tmp_path / "content"))


def ingest_files(store):
    return os.listdir(store.ingest_dir)


def test_write_and_read(store):
    data = b"hello world" * 1000
    d = dg(data)
    assert not store.exists(d)
    with store.writer(d, len(data)) as w:
        w.write(data[:10])
        w.write(data[10:])
        info = w.commit()
    assert info.size == len(data) and info.digest == d
    assert store.exists(d) and store.exists(str(d))
    assert store.path(d) == os.path.join(store.root, "blobs", "sha256", d.hex)
    assert store.info(d) == len(data)
    with store.open(d) as f:
        assert f.read() == data
    assert store.read_bytes(d, len(data)) == data
    assert [b.digest for b in store.list()] == [d]
    assert store.usage() == len(data)
    assert ingest_files(store) == []
    assert os.stat(store.path(d)).st_mode & 0o777 == 0o444


def test_sha512(store):
    data = b"x"
    d = Digest("sha512", hashlib.sha512(data).hexdigest())
    assert store.write_blob(data, d) == d
    assert store.read_bytes(d, 10) == data


def test_digest_mismatch_leaves_nothing(store):
    good = b"good"
    with pytest.raises(DigestMismatch) as ei:
        with store.writer(dg(good), 4) as w:
            w.write(b"evil")
            w.commit()
    assert ei.value.message == f"digest mismatch: expected {dg(good)} got {dg(b'evil')}"
    assert not store.exists(dg(good)) and not store.exists(dg(b"evil"))
    assert ingest_files(store) == [] and store.list() == []


def test_size_mismatch_short_and_long(store):
    data = b"abcdef"
    with pytest.raises(SizeMismatch, match="expected 7 bytes, got 6"):
        with store.writer(dg(data), 7) as w:
            w.write(data)
            w.commit()
    with pytest.raises(SizeMismatch, match="more than the expected 3"):
        with store.writer(dg(data), 3) as w:
            w.write(data)
    assert ingest_files(store) == [] and store.list() == []


def test_source_verified_writer_checks_size_but_does_not_hash(store):
    """For a source that proves the digest itself (the registry stream): one sha256 pass, not two."""
    data = b"verified upstream"
    with store.writer(dg(data), len(data), source_verified=True) as w:
        w.write(data)
        with pytest.raises(Internal, match="does not hash"):
            w.digest()
        w.commit()
    assert store.read_bytes(dg(data), 100) == data
    for size, written, msg in ((5, b"abcdef", "more than the expected 5"), (7, b"abcdef", "expected 7 bytes, got 6")):
        with pytest.raises(SizeMismatch, match=msg):
            with store.writer(dg(written), size, source_verified=True) as w:
                w.write(written)
                w.commit()
    assert ingest_files(store) == [] and [b.digest for b in store.list()] == [dg(data)]


def test_unknown_size(store):
    data = os.urandom(3 * 1024 * 1024)
    with store.writer(dg(data), None) as w:
        for i in range(0, len(data), 65536):
            w.write(data[i:i + 65536])
        w.commit()
    assert store.info(dg(data)) == len(data)


def test_exception_in_block_removes_temp(store):
    with pytest.raises(RuntimeError):
        with store.writer(dg(b"x"), 1) as w:
            w.write(b"x")
            raise RuntimeError("network went away")
    assert ingest_files(store) == [] and not store.exists(dg(b"x"))


def test_not_found_and_bounded_read(store):
    d = dg(b"nope")
    with pytest.raises(NotFound):
        store.info(d)
    with pytest.raises(NotFound):
        store.open(d)
    with pytest.raises(NotFound):
        store.delete(d)
    store.delete(d, missing_ok=True)
    big = store.write_blob(b"z" * 100)
    with pytest.raises(BlobTooLarge, match="larger than the limit of 99 bytes"):
        store.read_bytes(big, 99)


def test_delete(store):
    d = store.write_blob(b"bye")
    store.delete(d)
    assert not store.exists(d) and store.list() == []


def test_clean_ingests_keeps_active_writers(store):
    for i in range(3):
        with open(os.path.join(store.ingest_dir, f"stale{i}"), "wb") as f:
            f.write(b"partial")
    os.mkdir(os.path.join(store.ingest_dir, "staledir"))
    w = store.writer(dg(b"live"), 4)
    try:
        w.write(b"li")
        assert 3 * 7 <= store.usage() <= 3 * 7 + 2  # the writer may still buffer
        assert store.clean_ingests() == 4
        assert ingest_files(store) == [os.path.basename(w.ingest_path)]
        w.write(b"ve")
        w.commit()
    finally:
        w.abort()
    assert store.exists(dg(b"live")) and ingest_files(store) == []
    # a fresh store on the same root (daemon restart) cleans everything left
    with open(os.path.join(store.ingest_dir, "left"), "wb"):
        pass
    assert ContentStore(store.root).clean_ingests() == 1


def test_concurrent_threads_write_once(store):
    data = os.urandom(256 * 1024)
    d = dg(data)
    writes = []
    barrier = threading.Barrier(8)
    orig_writer = store.writer

    def counting_writer(*a, **kw):
        writes.append(1)
        return orig_writer(*a, **kw)

    store.writer = counting_writer

    def worker():
        barrier.wait()
        store.ingest(d, len(data), [data[i:i + 4096] for i in range(0, len(data), 4096)])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 1
    assert store.read_bytes(d, len(data)) == data
    assert ingest_files(store) == []
    assert store._locks == {}


def test_concurrent_async_ingest_write_once(store):
    data = os.urandom(100_000)
    d = dg(data)
    writes = []

    async def pull():
        async with store.ingest_lock(d):
            if store.exists(d):
                return
            writes.append(1)
            w = store.writer(d, len(data))
            with w:
                for i in range(0, len(data), 10_000):
                    w.write(data[i:i + 10_000])
                    await asyncio.sleep(0)  # let the other pulls run and queue up
                await asyncio.get_running_loop().run_in_executor(None, w.commit)

    async def main():
        await asyncio.gather(*(pull() for _ in range(10)))

    asyncio.run(main())
    assert writes == [1]
    assert store.exists(d) and ingest_files(store) == []
    assert store._locks == {}


def test_async_lock_excludes_thread_lock(store):
    d = dg(b"shared")
    order = []
    held = threading.Event()
    release = threading.Event()

    def thread_holder():
        with store.ingest_lock_sync(d):
            order.append("thread-in")
            held.set()
            release.wait()
            order.append("thread-out")

    t = threading.Thread(target=thread_holder)
    t.start()
    held.wait()

    async def main():
        async def coro():
            async with store.ingest_lock(d):
                order.append("coro-in")

        task = asyncio.create_task(coro())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == ["thread-in"]  # still blocked behind the thread
        release.set()
        await task

    asyncio.run(main())
    t.join()
    assert order == ["thread-in", "thread-out", "coro-in"]


def test_async_lock_cancel_while_waiting_releases(store):
    d = dg(b"c")
    held = threading.Event()
    release = threading.Event()

    def thread_holder():
        with store.ingest_lock_sync(d):
            held.set()
            release.wait()

    t = threading.Thread(target=thread_holder)
    t.start()
    held.wait()

    async def main():
        async def coro():
            async with store.ingest_lock(d):
                pass

        task = asyncio.create_task(coro())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        # the lock must become free again
        async with store.ingest_lock(d):
            pass

    asyncio.run(main())
    t.join()
    with store.ingest_lock_sync(d):
        pass


def test_lease(store):
    a = store.write_blob(b"a")
    b = store.write_blob(b"b")
    with store.lease("pull-1", [a]) as lease:
        assert store.leased_digests() == {a}
        lease.add(str(b))
        with store.lease("pull-2", [b]):
            assert store.leased_digests() == {a, b}
            assert store.leases_holding(b) == {"pull-1", "pull-2"}
        with pytest.raises(FailedPrecondition, match="pull-1"):
            store.delete(a)
        with pytest.raises(FailedPrecondition, match="already held"):
            with store.lease("pull-1"):
                pass
    assert store.leased_digests() == set()
    store.delete(a)
    assert not store.exists(a)


def test_lease_released_on_error(store):
    with pytest.raises(ValueError):
        with store.lease("x", [dg(b"q")]):
            raise ValueError
    assert store.leased_digests() == set()
