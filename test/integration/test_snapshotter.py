"""Snapshotter with real overlay and bind mounts (root only)."""

import errno
import hashlib
import io
import os
import tarfile

import pytest

from moorage.core.errors import AlreadyExists, FailedPrecondition, NotFound
from moorage.core.mount import PAGE_SIZE, compact_lowerdirs, mount, unmount, unmount_all
from moorage.images.digest import Digest
from moorage.images.snapshotter import (
    BACKEND_NATIVE,
    BACKEND_OVERLAY,
    JsonFileMetaStore,
    MemoryMetaStore,
    MetaStore,
    Snapshotter,
    chain_id,
    chain_ids,
)
from moorage.images.unpack import LayerError, unpack_to_snapshot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mounts"),
]


def _mounted_under(path):
    path = str(path)
    with open("/proc/self/mounts") as f:
        return [line for line in f if path in line]


@pytest.fixture
def base(tmp_path):
    """A per-test dir; at the end everything mounted under it is unmounted and checked."""
    yield tmp_path
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if str(tmp_path) in line.split()[4]]
    for p in reversed(points):
        unmount_all(p, detach=True)
    leftover = _mounted_under(tmp_path)
    assert not leftover, f"mounts left behind: {leftover}"
    assert not points, f"test left mounts behind: {points}"


def tar_of(*entries):
    """entries: (name, bytes) files, (name, None) dirs, (name, ('link', target)) hardlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif isinstance(data, tuple):
                ti.type, ti.linkname = tarfile.LNKTYPE, data[1]
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def diff_id(tar):
    return Digest("sha256", hashlib.sha256(tar).hexdigest())


def unpack_chain(sn, tars):
    """Unpack layers; return the chain IDs (committed snapshot keys)."""
    ids = [diff_id(t) for t in tars]
    chains = chain_ids(ids)
    for i, t in enumerate(tars):
        unpack_to_snapshot(sn, io.BytesIO(t), chain_id=chains[i], parent=chains[i - 1] if i else None,
                           expected_diff_id=ids[i], label=f"layer{i}")
    return [str(c) for c in chains]


LAYER1 = tar_of(("etc", None), ("etc/a", b"a"), ("etc/b", b"b"), ("d", None), ("d/x", b"x"),
                ("bin", None), ("bin/busybox", b"bb"))
LAYER2 = tar_of(("etc/.wh.a", b""), ("d", None), ("d/.wh..wh..opq", b""), ("d/y", b"y"),
                ("bin/sh", ("link", "bin/busybox")))


def test_chain_id():
    a, b, c = (Digest.from_bytes(x) for x in (b"a", b"b", b"c"))
    assert chain_id([a]) == a
    ab = Digest("sha256", hashlib.sha256(f"{a} {b}".encode()).hexdigest())
    assert chain_id([a, b]) == ab
    assert chain_id([a, b, c]) == Digest("sha256", hashlib.sha256(f"{ab} {c}".encode()).hexdigest())
    assert chain_ids([a, b, c]) == [a, ab, chain_id([a, b, c])]


def test_meta_stores_satisfy_protocol(tmp_path):
    assert isinstance(MemoryMetaStore(), MetaStore)
    assert isinstance(JsonFileMetaStore(str(tmp_path / "m.json")), MetaStore)


@pytest.mark.parametrize("backend", [BACKEND_OVERLAY, BACKEND_NATIVE])
def test_two_layers_whiteout_and_writable_active(base, backend):
    sn = Snapshotter(str(base / "sn"), backend=backend)
    c1, c2 = unpack_chain(sn, [LAYER1, LAYER2])
    assert {r.key for r in sn.walk()} == {c1, c2}
    assert all(r.kind == "committed" for r in sn.walk())

    mounts = sn.prepare("ctr", c2)
    if backend == BACKEND_OVERLAY:
        assert mounts[0].type == "overlay"
        opts = ",".join(mounts[0].options)
        assert f"lowerdir={sn.parent_dirs('ctr')[0]}:{sn.parent_dirs('ctr')[1]}" in opts
    else:
        assert mounts[0].type == "bind" and "rw" in mounts[0].options
    target = base / "rootfs"
    target.mkdir()
    mount(mounts, str(target))
    try:
        assert not (target / "etc/a").exists()           # whited out by layer 2
        assert (target / "etc/b").read_bytes() == b"b"
        assert sorted(os.listdir(target / "d")) == ["y"]  # opaque dir hides x
        assert os.stat(target / "bin/sh").st_ino == os.stat(target / "bin/busybox").st_ino
        (target / "etc/new").write_bytes(b"written by the container")
        os.unlink(target / "etc/b")
        with pytest.raises(FailedPrecondition, match="mounted"):
            sn.remove("ctr")
    finally:
        unmount(str(target))
    assert not _mounted_under(base)
    # the write landed in the active snapshot only
    assert (base / "sn/snapshots" / sn.stat("ctr").dir_id / "fs/etc/new").exists()
    for c in (c1, c2):
        fs = base / "sn/snapshots" / sn.stat(c).dir_id / "fs"
        assert not (fs / "etc/new").exists()
    # committed layers are unchanged: a fresh view still shows etc/b
    vm = sn.view("v", c2)
    mount(vm, str(target))
    try:
        assert (target / "etc/b").read_bytes() == b"b"
        with pytest.raises(OSError) as ei:
            (target / "etc/nope").write_bytes(b"x")
        assert ei.value.errno == errno.EROFS
    finally:
        unmount(str(target))

    with pytest.raises(FailedPrecondition, match="parent of"):
        sn.remove(c2)
    sn.remove("ctr")
    sn.remove("v")
    sn.remove(c2)
    sn.remove(c1)
    assert list(sn.walk()) == []
    assert os.listdir(base / "sn/snapshots") == []


def test_overlay_layout_and_views(base):
    sn = Snapshotter(str(base / "sn"))
    (c1,) = unpack_chain(sn, [LAYER1])
    d1 = sn.stat(c1).dir_id
    assert sorted(os.listdir(base / "sn/snapshots" / d1)) == ["fs"]  # work removed on commit
    m = sn.view("v1", c1)
    assert m[0].type == "bind" and m[0].readonly and m[0].source.endswith(f"/{d1}/fs")
    m = sn.prepare("base-active")  # no parent: a writable bind of its own dir
    assert m[0].type == "bind" and "rw" in m[0].options
    act = sn.prepare("a1", c1)
    d = sn.stat("a1").dir_id
    assert sorted(os.listdir(base / "sn/snapshots" / d)) == ["fs", "work"]
    assert act[0].options[-1] == f"lowerdir={base}/sn/snapshots/{d1}/fs"
    with pytest.raises(AlreadyExists):
        sn.prepare("a1", c1)
    with pytest.raises(NotFound):
        sn.prepare("a2", "missing")
    with pytest.raises(FailedPrecondition, match="only committed"):
        sn.prepare("a3", "a1")
    with pytest.raises(FailedPrecondition, match="only active"):
        sn.commit("x", "v1")
    u = sn.usage(c1)
    assert u.inodes >= 7 and u.size > 0


def test_sixty_layer_chain(base):
    long_root = base / ("r" * 120) / "snapshotter-with-a-long-root-path"
    sn = Snapshotter(str(long_root))
    tars = [tar_of((f"l{i:02d}", f"{i}".encode())) for i in range(59)]
    tars.append(tar_of(("l59", b"59"), (".wh.l00", b"")))
    chains = unpack_chain(sn, tars)
    mounts = sn.prepare("ctr", chains[-1])
    data = ",".join(mounts[0].options)
    assert len(data) > PAGE_SIZE, "the test must exceed a page to exercise compaction"
    chdir, compacted = compact_lowerdirs(list(mounts[0].options))
    assert chdir == str(long_root / "snapshots")
    assert len(",".join(compacted)) < PAGE_SIZE - 512
    cwd = os.getcwd()
    target = base / "rootfs"
    target.mkdir()
    mount(mounts, str(target))
    try:
        assert os.getcwd() == cwd  # the chdir happened in a private fs context only
        names = sorted(os.listdir(target))
        assert names == [f"l{i:02d}" for i in range(1, 60)]
        assert (target / "l30").read_bytes() == b"30"
        (target / "written").write_bytes(b"ok")
    finally:
        unmount(str(target))
    assert not _mounted_under(base)
    # a read-only view of the whole chain (overlay without upper) mounts too
    vm = sn.view("v", chains[-1])
    mount(vm, str(target))
    try:
        assert len(os.listdir(target)) == 59
    finally:
        unmount(str(target))
    sn.remove("v")
    sn.remove("ctr")
    for c in reversed(chains):
        sn.remove(c)
    assert os.listdir(long_root / "snapshots") == []


def test_native_copy_preserves_hardlinks_owner_xattrs(base):
    sn = Snapshotter(str(base / "sn"), backend=BACKEND_NATIVE)
    (c1,) = unpack_chain(sn, [LAYER1])
    fs1 = base / "sn/snapshots" / sn.stat(c1).dir_id / "fs"
    os.link(fs1 / "bin/busybox", fs1 / "bin/ls")
    os.chown(fs1 / "etc/b", 123, 456)
    os.chmod(fs1 / "etc/b", 0o4750)
    os.setxattr(str(fs1 / "etc/b"), "user.k", b"v")
    os.symlink("/etc/passwd", fs1 / "abs")
    sn.prepare("a", c1)
    fs2 = base / "sn/snapshots" / sn.stat("a").dir_id / "fs"
    assert os.stat(fs2 / "bin/ls").st_ino == os.stat(fs2 / "bin/busybox").st_ino
    assert os.stat(fs2 / "bin/ls").st_ino != os.stat(fs1 / "bin/ls").st_ino
    st = os.stat(fs2 / "etc/b")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (123, 456, 0o4750)
    assert os.getxattr(str(fs2 / "etc/b"), "user.k") == b"v"
    assert os.readlink(fs2 / "abs") == "/etc/passwd"
    assert os.stat(fs2 / "etc").st_mtime == os.stat(fs1 / "etc").st_mtime


def test_failed_unpack_leaves_no_snapshot(base):
    sn = Snapshotter(str(base / "sn"))
    bad = tar_of(("../escape", b"x"))
    with pytest.raises(LayerError, match="escapes the root"):
        unpack_to_snapshot(sn, io.BytesIO(bad), chain_id=diff_id(bad), parent=None,
                           expected_diff_id=diff_id(bad), label="sha256:bad")
    good = tar_of(("f", b"1"))
    from moorage.images.unpack import DiffIDMismatch

    with pytest.raises(DiffIDMismatch):
        unpack_to_snapshot(sn, io.BytesIO(good), chain_id=diff_id(good), parent=None,
                           expected_diff_id=diff_id(b"other"), label="sha256:good")
    assert list(sn.walk()) == []
    assert os.listdir(base / "sn/snapshots") == []
    assert not os.path.exists(base / "escape") and not os.path.exists(base / "sn/escape")


def test_shared_layer_unpacked_once_and_commit_race(base):
    sn = Snapshotter(str(base / "sn"))
    (c1,) = unpack_chain(sn, [LAYER1])
    assert unpack_to_snapshot(sn, io.BytesIO(LAYER1), chain_id=c1, parent=None,
                              expected_diff_id=diff_id(LAYER1), label="again") is None
    sn.prepare("k1", c1)
    sn.prepare("k2", c1)
    sn.commit("same", "k1")
    with pytest.raises(AlreadyExists):
        sn.commit("same", "k2")
    sn.remove("k2")
    assert {r.key for r in sn.walk()} == {c1, "same"}


def test_cleanup_and_json_persistence(base):
    root = base / "sn"
    meta_path = str(base / "meta.json")
    sn = Snapshotter(str(root), JsonFileMetaStore(meta_path))
    (c1,) = unpack_chain(sn, [LAYER1])
    sn.prepare("active", c1, labels={"a": "b"})
    orphan = root / "snapshots" / "999"
    (orphan / "fs" / "deep").mkdir(parents=True)
    # a "restart": new objects over the same files
    sn2 = Snapshotter(str(root), JsonFileMetaStore(meta_path))
    assert sn2.cleanup() == ["999"]
    assert not orphan.exists()
    rec = sn2.stat("active")
    assert rec.parent == c1 and rec.labels == {"a": "b"} and rec.kind == "active"
    assert sn2.parent_dirs("active") == [str(root / "snapshots" / sn2.stat(c1).dir_id / "fs")]
    m = sn2.prepare("another", c1)
    assert sn2.stat("another").dir_id not in {sn2.stat(c1).dir_id, rec.dir_id}
    assert m[0].type == "overlay"


def test_bind_mount_readonly_and_unmount_idempotent(base):
    src = base / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    target = base / "t"
    target.mkdir()
    from moorage.core.mount import Mount

    mount([Mount("bind", str(src), ["rbind", "ro"])], str(target))
    try:
        assert (target / "f").read_bytes() == b"x"
        with pytest.raises(OSError) as ei:
            (target / "g").write_bytes(b"y")
        assert ei.value.errno == errno.EROFS
    finally:
        unmount(str(target))
    unmount(str(target))  # not mounted any more: no error
    assert not _mounted_under(base)


class _SignallingLock:
    """The snapshotter's lock, telling the test when thread ``who`` asks for it."""

    def __init__(self, inner, who, asked):
        self.inner, self.who, self.asked = inner, who, asked

    def __enter__(self):
        import threading
        if threading.current_thread().name == self.who:
            self.asked.set()
        self.inner.acquire()
        return self

    def __exit__(self, *exc):
        self.inner.release()


def test_remove_and_create_on_it_are_atomic(base):
    """remove(P) has checked P's children and is about to drop it; prepare(child, P) runs now.
    Either the child exists and P stays, or P is gone and prepare failed: never a child whose
    parent is missing."""
    import threading

    sn = Snapshotter(str(base / "sn"), MemoryMetaStore(), backend=BACKEND_OVERLAY)
    sn.prepare("p-active")
    sn.commit("P", "p-active")
    removing, go_on, a_asked, a_done = (threading.Event() for _ in range(4))
    real_remove = sn.meta.remove

    def remove_after_pause(key):
        removing.set()
        assert go_on.wait(60), "test never let remove() go on"
        return real_remove(key)

    sn.meta.remove = remove_after_pause
    sn._lock = _SignallingLock(sn._lock, "A", a_asked)
    errors = {}

    def run(name, fn):
        try:
            fn()
        except Exception as e:
            errors[name] = e
        finally:
            if name == "A":
                a_done.set()
                a_asked.set()

    b = threading.Thread(target=run, args=("B", lambda: sn.remove("P")), name="B")
    a = threading.Thread(target=run, args=("A", lambda: sn.prepare("child", "P")), name="A")
    b.start()
    try:
        assert removing.wait(60)
        a.start()
        assert a_asked.wait(60)  # A is at (or past) the lock, or finished
        go_on.set()
        a.join()
        b.join()
    finally:
        go_on.set()
        b.join()
    records = {r.key: r for r in sn.meta.list()}
    dangling = [k for k, r in records.items() if r.parent is not None and r.parent not in records]
    assert not dangling, f"snapshots whose parent was removed under them: {dangling}"
    assert "B" not in errors and "P" not in records
    assert isinstance(errors.get("A"), NotFound) and "child" not in records
    assert sorted(os.listdir(sn.snapshots_dir)) == []
