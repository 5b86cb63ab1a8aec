"""A full disk: the error mapping, and the store's reserve that keeps clean-up writable."""

from __future__ import annotations

import errno
import os
import sqlite3
from contextlib import contextmanager

import grpc
import pytest

from moorage.core.errors import DiskFull, Internal, is_disk_full
from moorage.core.store import ObjectRow, Store
from moorage.cri.errors import status_for


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device", "/var/lib/moorage/x"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    sqlite3.OperationalError("database or disk is full"),
])
def test_disk_full_is_resource_exhausted(exc):
    assert is_disk_full(exc)
    code, msg = status_for(exc)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Error" not in msg and len(msg) < 512
    assert ("quota" in msg) == (getattr(exc, "errno", None) == errno.EDQUOT)


def test_cause_chain_and_other_errors():
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EIO, "io"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert status_for(Internal("bug"))[0] == grpc.StatusCode.INTERNAL


def row(i: int) -> ObjectRow:
    return ObjectRow(id=f"s{i}", name=f"n{i}", state="SANDBOX_READY", created_at=i, data={"x": i})


class FullDisk:
    """Make the store's commits fail as SQLite fails on a full disk, ``fails`` times."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fails = 0
        self.store = store
        real = store.transaction

        @contextmanager
        def transaction(releasing: bool = False, durable: bool = True):  # type: ignore[no-untyped-def]
            with real(releasing, durable) as db:
                yield db
                if self.fails:
                    self.fails -= 1
                    raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store, "transaction", transaction)


def test_new_records_fail_but_deletes_use_the_reserve(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    assert os.path.getsize(store.reserve_path) == store.reserve_bytes
    store.add_sandbox(row(1))
    full = FullDisk(store, monkeypatch)
    full.fails = 1
    with pytest.raises(DiskFull):
        store.add_sandbox(row(2))  # new work: refused, the reserve is kept for clean-up
    assert os.path.exists(store.reserve_path)
    assert [r.id for r in store.list_sandboxes()] == ["s1"]
    full.fails = 1
    assert store.delete_sandbox("s1")  # clean-up: the reserve is given back and it commits
    assert not os.path.exists(store.reserve_path) and not store.list_sandboxes()


def test_without_a_reserve_no_new_work_starts(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.add_sandbox(row(1))
    full = FullDisk(store, monkeypatch)
    full.fails = 1
    store.delete_sandbox("s1")  # spends the reserve
    assert not os.path.exists(store.reserve_path)

    def no_space(fd: int, off: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DiskFull, match="reserve"):
        store.add_sandbox(row(2))  # refused before it begins: the next clean-up would find no room
    assert not store.list_sandboxes()
    monkeypatch.undo()  # space is back
    store.add_sandbox(row(2))
    assert os.path.getsize(store.reserve_path) == store.reserve_bytes
    assert [r.id for r in store.list_sandboxes()] == ["s2"]


def test_reserve_spent_and_still_full_is_resource_exhausted(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.add_sandbox(row(1))
    full = FullDisk(store, monkeypatch)
    full.fails = 5  # neither the reserve nor a WAL restart helps
    with pytest.raises(DiskFull):
        store.delete_sandbox("s1")
    full.fails = 0
    assert store.delete_sandbox("s1")
