import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from moorage.core.errors import AlreadyExists, NotFound
from moorage.core.store import (
    SCHEMA_VERSION,
    ImageRecord,
    ObjectRow,
    SchemaTooNew,
    SnapshotRecord,
    Store,
)


def _row(sid: str, name: str) -> ObjectRow:
    return ObjectRow(id=sid, name=name, state="SANDBOX_NOTREADY", created_at=0, data={})


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_round_trip_every_record(tmp_path):
    s = Store(str(tmp_path))
    sb = ObjectRow(id="s1", name="web_default_uid_0", state="READY", created_at=5,
                   data={"metadata": {"name": "web"}, "labels": {"app": "x"}, "netns_path": "/run/x"})
    s.add_sandbox(sb)
    c = ObjectRow(id="c1", name="app_web_0", state="CREATED", created_at=6, data={"config": {"image": "busybox"}},
                  sandbox_id="s1")
    s.add_container(c)
    img = ImageRecord(id="sha256:aa", repo_tags=["docker.io/library/busybox:latest"], size=10)
    s.put_image(img)
    s.put_snapshot(SnapshotRecord(key="k", kind="committed", parent="", dir_id="1"))
    s.close()

    s = Store(str(tmp_path))
    assert s.get_sandbox("s1") == sb
    assert s.get_container("c1") == c
    assert s.list_containers("s1") == [c] and s.list_containers("other") == []
    assert s.image_by_ref("docker.io/library/busybox:latest") == img
    assert s.get_snapshot("k").dir_id == "1"
    c = dataclasses.replace(c, state="RUNNING", data={"config": {"image": "busybox"}, "pid": 7})
    s.update_container(c)
    assert s.get_container("c1") == c
    assert s.get_container("c1").state == "RUNNING"
    assert s.delete_container("c1") and not s.delete_container("c1")
    with pytest.raises(NotFound, match="container c1 not found"):
        s.get_container("c1")


def test_names_are_unique_and_name_the_holder(tmp_path):
    s = Store(str(tmp_path))
    s.add_sandbox(_row("s1", "n"))
    with pytest.raises(AlreadyExists, match="in use by sandbox s1"):
        s.add_sandbox(_row("s2", "n"))
    assert [r.id for r in s.list_sandboxes()] == ["s1"]


def test_namespaces_are_separate(tmp_path):
    a = Store(str(tmp_path), namespace="k8s.io")
    b = Store(str(tmp_path), namespace="other")
    a.add_sandbox(_row("s1", "n"))
    b.add_sandbox(_row("s1", "n"))
    assert len(a.list_sandboxes()) == 1 and len(b.list_sandboxes()) == 1
    a.delete_sandbox("s1")
    assert b.get_sandbox("s1").id == "s1"


def test_moving_a_tag_keeps_the_other_image_consistent(tmp_path):
    s = Store(str(tmp_path))
    s.put_image(ImageRecord(id="sha256:old", repo_tags=["r:latest", "r:1"]))
    s.put_image(ImageRecord(id="sha256:new", repo_tags=["r:latest"]))
    assert s.image_by_ref("r:latest").id == "sha256:new"
    assert s.get_image("sha256:old").repo_tags == ["r:1"]


def test_failed_transaction_leaves_nothing(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(RuntimeError):
        with s.transaction() as db:
            db.execute("INSERT INTO images (namespace, id, data) VALUES ('k8s.io', 'x', '{\"id\": \"x\"}')")
            raise RuntimeError("boom")
    assert s.list_images() == []


def test_kill9_mid_transaction_loses_nothing_committed(tmp_path):
    # A writer commits 50 sandboxes, starts a 51st in an open transaction and
    # is SIGKILLed.  The committed ones survive; the open one never appears.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from moorage.core.store import Store, ObjectRow
        s = Store({str(tmp_path)!r})
        for i in range(50):
            s.add_sandbox(ObjectRow(id=f"s{{i}}", name=f"n{{i}}", state="READY", created_at=0, data={{}}))
        with s.transaction() as db:
            db.execute("INSERT INTO sandboxes (namespace,id,name,state,created_at,data) "
                       "VALUES ('k8s.io','half','half','READY',0,'{{\\"id\\":\\"half\\",\\"name\\":\\"half\\"}}')")
            print("ready", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "ready" in p.stdout
    s = Store(str(tmp_path))
    ids = {r.id for r in s.list_sandboxes()}
    assert ids == {f"s{i}" for i in range(50)}


def test_writes_without_fsync_are_visible_at_once_and_on_disk_after_sync(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    s.add_sandbox(_row("s1", "n1"))  # an insert is durable at once
    assert not s.unsynced()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    s.sync()
    assert synced == []  # nothing pending: no fsync at all
    # zero, one and many deferred writes: each is visible at once, one fsync covers them all
    for n in (1, 5):
        for i in range(n):
            s.update_sandbox(dataclasses.replace(_row("s1", "n1"), state=f"S{n}-{i}"), durable=False)
            assert s.get_sandbox("s1").state == f"S{n}-{i}"
        assert s.unsynced()
        s.sync()
        assert not s.unsynced()
        s.sync()
    assert len(synced) == 2
    # a durable commit puts the deferred ones before it on disk too (the WAL is ordered)
    s.update_sandbox(_row("s1", "n1"), durable=False)
    s.add_sandbox(_row("s2", "n2"))
    assert not s.unsynced() and len(synced) == 3
    # a failed deferred write leaves nothing pending, and the next durable write still syncs
    with pytest.raises(NotFound):
        s.update_sandbox(_row("nope", "x"), durable=False)
    assert not s.unsynced()
    s.update_sandbox(_row("s2", "n2"))
    assert not s.unsynced() and len(synced) == 4
    assert s.delete_sandbox("s2", durable=False) and s.unsynced()
    s.close()
    s = Store(str(tmp_path))
    assert [r.id for r in s.list_sandboxes()] == ["s1"]


def test_a_durable_commit_does_not_hold_the_lock_through_its_fsync(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # another thread reads meanwhile: the row is committed and the lock is free
        t = threading.Thread(target=lambda: seen.append([r.id for r in s.list_sandboxes()]))
        t.start()
        t.join(10)
        assert not t.is_alive(), "a reader waited for the lock through the fsync"
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    s.add_sandbox(_row("s1", "n1"))
    assert seen == [["s1"]] and not s.unsynced()
    with s.transaction() as db:  # zero rows changed: still one commit, synced before return
        db.execute("DELETE FROM sandboxes WHERE id='nope'")
    assert len(seen) == 2 and not s.unsynced()
    s.close()


def test_migration_from_schema_1(tmp_path):
    old = Store(str(tmp_path), target_version=1)
    assert old.schema_version() == 1
    with old.transaction() as db:
        db.execute(
            "INSERT INTO images (namespace, id, data) VALUES ('k8s.io', 'sha256:aa', ?)",
            ('{"id": "sha256:aa", "repo_tags": ["busybox:latest"], "repo_digests": ["busybox@sha256:bb"]}',),
        )
    old.close()
    s = Store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION
    assert s.image_by_ref("busybox:latest").id == "sha256:aa"
    assert s.image_by_ref("busybox@sha256:bb").id == "sha256:aa"
    s.put_snapshot(SnapshotRecord(key="k", kind="committed"))  # tables of schema 2 exist


def test_newer_schema_is_refused(tmp_path):
    Store(str(tmp_path)).close()
    db = sqlite3.connect(str(tmp_path / "meta.db"))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaTooNew, match="run a newer moorage"):
        Store(str(tmp_path))


def test_leases(tmp_path):
    s = Store(str(tmp_path))
    s.add_lease("pull-1", ["sha256:a", "sha256:b"])
    s.add_lease("pull-2", ["sha256:b"])
    s.release_lease("pull-1")
    assert s.leased_resources() == {"sha256:b"}
    assert s.clear_leases() == 1 and s.leased_resources() == set()


def test_snapshot_add_commit_remove(tmp_path):
    s = Store(str(tmp_path))
    s.add_snapshot(SnapshotRecord(key="base", kind="committed", dir_id="1", created_at=5))
    with pytest.raises(AlreadyExists, match="'base' already exists"):
        s.add_snapshot(SnapshotRecord(key="base", kind="active", dir_id="9"))
    assert s.get_snapshot("base").dir_id == "1"  # the refused insert changed nothing
    s.add_snapshot(SnapshotRecord(key="x-active", kind="active", parent="base", dir_id="2",
                                  labels={"a": "b"}, created_at=7))
    assert s.snapshot_children("base") == ["x-active"]

    with pytest.raises(AlreadyExists):
        s.commit_snapshot("x-active", "base", None)
    with pytest.raises(NotFound):
        s.commit_snapshot("missing", "new", None)
    new = s.commit_snapshot("x-active", "x", None)
    assert (new.key, new.kind, new.parent, new.dir_id, new.labels, new.created_at) == \
        ("x", "committed", "base", "2", {"a": "b"}, 7)
    assert new.updated_at > 0
    assert s.get_snapshot("x-active") is None and s.get_snapshot("x") == new
    assert s.snapshot_children("base") == ["x"]

    assert s.remove_snapshot("x") == new
    with pytest.raises(NotFound):
        s.remove_snapshot("x")
    assert [r.key for r in s.list_snapshots()] == ["base"]


def test_snapshot_rows_of_older_writers_read_back(tmp_path):
    # Before the snapshotter and the store shared one record, "no parent" was "" in the JSON.
    s = Store(str(tmp_path))
    with s.transaction() as db:
        db.execute("INSERT INTO snapshots (namespace, key, kind, parent, data) VALUES ('k8s.io', 'k', 'committed',"
                   " '', '{\"key\": \"k\", \"kind\": \"committed\", \"parent\": \"\", \"dir_id\": \"3\","
                   " \"labels\": {}, \"created_at\": 1, \"from_the_future\": 1}')")
    rec = s.get_snapshot("k")
    assert rec is not None and rec.parent is None and rec.dir_id == "3" and rec.updated_at == 0


def test_update_image_reads_and_writes_in_one_transaction(tmp_path):
    s = Store(str(tmp_path))
    seen = []

    def add_tag(tag):
        def change(old):
            seen.append(None if old is None else list(old.repo_tags))
            rec = old if old is not None else ImageRecord(id="sha256:aa")
            rec.repo_tags.append(tag)
            return rec
        return change

    s.update_image("sha256:aa", add_tag("x:1"))
    s.update_image("sha256:aa", add_tag("x:2"))
    assert seen == [None, ["x:1"]]
    assert s.image_by_ref("x:1").repo_tags == ["x:1", "x:2"] and s.image_by_ref("x:2").id == "sha256:aa"
    with pytest.raises(ValueError):
        s.update_image("sha256:bb", lambda old: ImageRecord(id="sha256:cc"))
    assert [i.id for i in s.list_images()] == ["sha256:aa"]
