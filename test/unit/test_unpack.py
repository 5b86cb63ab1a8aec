"""Layer unpack safety and semantics.  Runs as root (chown, mknod, trusted.* xattrs)."""

import gzip
import hashlib
import io
import os
import stat
import tarfile

import pytest
import zstandard

from moorage.images.digest import Digest
from moorage.images.unpack import (
    MODE_COPY,
    MODE_OVERLAY,
    OPAQUE_XATTR,
    DiffIDMismatch,
    LayerError,
    UnpackLimits,
    apply_layer,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted xattrs)")


# --------------------------------------------------------------------------- tar building
def F(name, data=b"", mode=0o644, uid=0, gid=0, mtime=1_600_000_000, pax=None):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.REGTYPE
    ti.size = len(data)
    ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, mtime
    if pax:
        ti.pax_headers = pax
    return ti, data


def D(name, mode=0o755, uid=0, gid=0, mtime=1_500_000_000, pax=None):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, mtime
    if pax:
        ti.pax_headers = pax
    return ti, None


def S(name, target):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    ti.mode = 0o777
    return ti, None


def L(name, target):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.LNKTYPE
    ti.linkname = target
    return ti, None


def DEV(name, kind=tarfile.CHRTYPE, major=1, minor=3):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.devmajor, ti.devminor = major, minor
    ti.mode = 0o666
    return ti, None


def FIFO(name):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.FIFOTYPE
    ti.mode = 0o644
    return ti, None


def make_tar(*entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def apply(tar: bytes, root, **kw):
    kw.setdefault("label", "sha256:test")
    kw.setdefault("sync", False)
    return apply_layer(io.BytesIO(tar), str(root), **kw)


# --------------------------------------------------------------------------- host guard
def snapshot_tree(top, skip):
    """Every path under ``top`` except ``skip``, with type, mode, owner and content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != str(skip)]
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_nlink, content)
    return out


HOST_PATHS = ["/etc/evil", "/evil", "/tmp/evil", "/etc/passwd-evil"]


@pytest.fixture
def sandbox(tmp_path):
    """tmp/outside/victim (must stay untouched) and tmp/root (the target)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    (outside / "dir").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    with open("/etc/passwd", "rb") as f:
        passwd = f.read()
    before = snapshot_tree(outside, None)
    yield root
    assert snapshot_tree(outside, None) == before, "something outside the target changed"
    for p in HOST_PATHS:
        assert not os.path.lexists(p), f"{p} was created on the host"
    with open("/etc/passwd", "rb") as f:
        assert f.read() == passwd


# --------------------------------------------------------------------------- escapes
@pytest.mark.parametrize("name", ["../../etc/passwd", "../outside/victim", "a/../../outside/victim", ".."])
def test_dotdot_rejected(sandbox, name):
    with pytest.raises(LayerError) as ei:
        apply(make_tar(F(name, b"pwned")), sandbox)
    assert ei.value.message == f"layer sha256:test entry \"{name}\" escapes the root (\"..\" path component)"


def test_absolute_name_is_made_relative(sandbox):
    apply(make_tar(F("/evil", b"x"), F("/tmp/evil", b"y")), sandbox)
    assert (sandbox / "evil").read_bytes() == b"x"
    assert (sandbox / "tmp" / "evil").read_bytes() == b"y"


def test_absolute_symlink_then_write_through_it(sandbox):
    with pytest.raises(LayerError, match='entry "link/evil" has parent "link" which is a symbolic link'):
        apply(make_tar(S("link", "/etc"), F("link/evil", b"pwned")), sandbox)
    assert os.readlink(sandbox / "link") == "/etc"


def test_relative_symlink_escape_then_write(sandbox):
    with pytest.raises(LayerError, match="symbolic link"):
        apply(make_tar(S("out", "../outside"), F("out/victim", b"pwned")), sandbox)


def test_symlink_then_directory_entry_through_it(sandbox):
    with pytest.raises(LayerError, match="symbolic link"):
        apply(make_tar(S("out", "../outside"), D("out/dir/sub")), sandbox)


def test_symlink_chain_escape(sandbox):
    with pytest.raises(LayerError, match='has parent "a" which is a symbolic link'):
        apply(make_tar(D("d"), S("d/b", "../.."), S("a", "d/b"), F("a/outside/victim", b"pwned")), sandbox)
    with pytest.raises(LayerError, match='has parent "d/b" which is a symbolic link'):
        apply(make_tar(F("d/b/outside/victim", b"pwned")), sandbox)


def test_hardlink_to_outside(sandbox):
    with pytest.raises(LayerError, match='hardlink to "../outside/victim" which escapes the root'):
        apply(make_tar(L("h", "../outside/victim")), sandbox)
    assert not os.path.lexists(sandbox / "h")


def test_hardlink_through_symlink(sandbox):
    with pytest.raises(LayerError, match="symbolic link"):
        apply(make_tar(S("l", "../outside"), L("h", "l/victim")), sandbox)
    with pytest.raises(LayerError, match="symbolic link"):
        apply(make_tar(S("e", "/etc"), L("h2", "e/passwd")), sandbox)
    assert not os.path.lexists(sandbox / "h") and not os.path.lexists(sandbox / "h2")


def test_hardlink_absolute_target_is_inside_root(sandbox):
    apply(make_tar(F("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), L("h", "/etc/passwd")), sandbox)
    assert os.stat(sandbox / "h").st_ino == os.stat(sandbox / "etc/passwd").st_ino


def test_hardlink_missing_target_and_directory_target(sandbox):
    with pytest.raises(LayerError, match="does not exist"):
        apply(make_tar(L("h", "nope")), sandbox)
    with pytest.raises(LayerError, match="is a directory"):
        apply(make_tar(D("d"), L("h", "d")), sandbox)


def test_file_replaces_escaping_symlink_without_following(sandbox):
    apply(make_tar(S("s", "../outside/victim"), F("s", b"new")), sandbox)
    assert not os.path.islink(sandbox / "s")
    assert (sandbox / "s").read_bytes() == b"new"


def test_dangling_and_absolute_symlinks_created_verbatim(sandbox):
    apply(make_tar(S("abs", "/etc/passwd"), S("rel", "../../../x")), sandbox)
    assert os.readlink(sandbox / "abs") == "/etc/passwd"
    assert os.readlink(sandbox / "rel") == "../../../x"


# --------------------------------------------------------------------------- special files
@pytest.mark.parametrize("kind,word", [(tarfile.CHRTYPE, "character"), (tarfile.BLKTYPE, "block")])
def test_device_node_rejected(sandbox, kind, word):
    with pytest.raises(LayerError, match=f'entry "dev/x" is a {word} device node'):
        apply(make_tar(D("dev"), DEV("dev/x", kind, 8, 0)), sandbox)
    assert not os.path.lexists(sandbox / "dev" / "x")


def test_device_node_allowed_when_privileged(sandbox):
    apply(make_tar(DEV("null", tarfile.CHRTYPE, 1, 3)), sandbox, allow_devices=True)
    st = os.lstat(sandbox / "null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


def test_fifo(sandbox):
    apply(make_tar(FIFO("p")), sandbox)
    st = os.lstat(sandbox / "p")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644


# --------------------------------------------------------------------------- metadata
def test_setuid_owner_mode_mtime(sandbox):
    apply(make_tar(
        D("bin", mode=0o751, uid=7, gid=8, mtime=1_000_000_000),
        F("bin/su", b"#!", mode=0o4755, uid=1000, gid=1001, mtime=1_234_567_890),
        F("bin/sg", b"#!", mode=0o2711),
        S("bin/link", "su"),
    ), sandbox)
    st = os.lstat(sandbox / "bin/su")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert st.st_mtime == 1_234_567_890
    assert stat.S_IMODE(os.lstat(sandbox / "bin/sg").st_mode) == 0o2711
    dst = os.lstat(sandbox / "bin")
    assert stat.S_IMODE(dst.st_mode) == 0o751 and (dst.st_uid, dst.st_gid) == (7, 8)
    assert dst.st_mtime == 1_000_000_000  # set after its children were written


def test_xattrs_from_pax(sandbox):
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    pax = {
        "SCHILY.xattr.user.comment": "hello",
        "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.trusted.overlay.opaque": "y",  # forged overlay metadata: dropped
    }
    apply(make_tar(F("ping", b"elf", mode=0o755, pax=pax), D("d", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})),
          sandbox)
    p = str(sandbox / "ping")
    assert os.getxattr(p, "user.comment") == b"hello"
    assert os.getxattr(p, "security.capability") == cap
    assert "trusted.overlay.opaque" not in os.listxattr(p)
    assert "trusted.overlay.opaque" not in os.listxattr(str(sandbox / "d"))


def test_hardlink_within_layer(sandbox):
    apply(make_tar(F("bin/busybox", b"bb", mode=0o755), L("bin/sh", "bin/busybox"), L("bin/ls", "./bin/busybox")),
          sandbox)
    ino = os.stat(sandbox / "bin/busybox").st_ino
    assert os.stat(sandbox / "bin/sh").st_ino == ino == os.stat(sandbox / "bin/ls").st_ino
    assert os.stat(sandbox / "bin/busybox").st_nlink == 3


def test_implicit_parent_directories(sandbox):
    apply(make_tar(F("a/b/c/file", b"x")), sandbox)
    assert (sandbox / "a/b/c/file").read_bytes() == b"x"
    assert stat.S_IMODE(os.stat(sandbox / "a/b").st_mode) == 0o755


def test_replace_directory_with_file_and_file_with_directory(sandbox):
    apply(make_tar(D("x"), F("x/inner", b"1"), F("y", b"2"), F("x", b"file now"), D("y"), F("y/z", b"3")), sandbox)
    assert (sandbox / "x").read_bytes() == b"file now"
    assert (sandbox / "y/z").read_bytes() == b"3"


# --------------------------------------------------------------------------- whiteouts
@pytest.fixture
def lower(tmp_path):
    low = tmp_path / "lower"
    (low / "d" / "sub").mkdir(parents=True)
    (low / "d" / "old").write_bytes(b"old")
    (low / "d" / "sub" / "deep").write_bytes(b"deep")
    (low / "gone").write_bytes(b"gone")
    (low / "keep").write_bytes(b"keep")
    (low / "private").mkdir(mode=0o700)
    os.chmod(low / "private", 0o700)
    os.chown(low / "private", 33, 33)
    (low / "bin").mkdir()
    (low / "bin" / "busybox").write_bytes(b"busybox-binary")
    os.chmod(low / "bin" / "busybox", 0o4755)
    os.chmod(low / "bin", 0o751)
    os.setxattr(str(low / "bin" / "busybox"), "user.origin", b"lower")
    return low


def test_whiteouts_overlay_form(sandbox, lower):
    before = snapshot_tree(lower, None)
    apply(make_tar(F(".wh.gone"), D("d"), F("d/.wh..wh..opq"), F("d/new", b"n")),
          sandbox, mode=MODE_OVERLAY, parents=[str(lower)])
    st = os.lstat(sandbox / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(str(sandbox / "d"), OPAQUE_XATTR) == b"y"
    assert (sandbox / "d/new").read_bytes() == b"n"
    assert not os.path.lexists(sandbox / ".wh.gone")
    assert not os.path.lexists(sandbox / "d/.wh..wh..opq")
    assert snapshot_tree(lower, None) == before


def test_whiteout_in_missing_parent_overlay_copies_lower_dir_attrs(sandbox, lower):
    apply(make_tar(F("private/.wh.secret"), F("private/new", b"x")), sandbox, parents=[str(lower)])
    st = os.stat(sandbox / "private")
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 33
    assert stat.S_ISCHR(os.lstat(sandbox / "private/secret").st_mode)


def test_parent_symlink_in_lower_layer_rejected(sandbox, tmp_path):
    low = tmp_path / "lower2"
    low.mkdir()
    os.symlink("/etc", low / "etc2")
    with pytest.raises(LayerError, match="symbolic link in a lower layer"):
        apply(make_tar(F("etc2/evil", b"x")), sandbox, parents=[str(low)])


def test_whiteout_does_not_hide_same_layer_file(sandbox, lower):
    apply(make_tar(F("keep", b"mine"), F(".wh.keep")), sandbox, parents=[str(lower)])
    assert (sandbox / "keep").read_bytes() == b"mine"


def test_directory_replacing_whiteout_is_opaque(sandbox, lower):
    apply(make_tar(F(".wh.d"), D("d"), F("d/x", b"x")), sandbox, parents=[str(lower)])
    assert os.getxattr(str(sandbox / "d"), OPAQUE_XATTR) == b"y"


def copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


@pytest.mark.parametrize("opq_first", [True, False])
def test_whiteouts_copy_form(sandbox, lower, opq_first):
    copy_tree(lower, sandbox)
    opq = [F("d/.wh..wh..opq")]
    body = [D("d"), F("d/new", b"n"), F("d/sub/added", b"a")]
    entries = ([body[0]] + opq + body[1:]) if opq_first else (body + opq)
    apply(make_tar(F(".wh.gone"), *entries), sandbox, mode=MODE_COPY)
    assert not os.path.lexists(sandbox / "gone")
    assert (sandbox / "keep").read_bytes() == b"keep"
    assert sorted(os.listdir(sandbox / "d")) == ["new", "sub"]
    assert os.listdir(sandbox / "d/sub") == ["added"]  # lower's deep is hidden too
    assert not list(sandbox.rglob(".wh.*"))


def test_whiteout_copy_form_directory_and_missing(sandbox, lower):
    copy_tree(lower, sandbox)
    apply(make_tar(F(".wh.d"), F(".wh.never-existed"), F("nodir/.wh.x")), sandbox, mode=MODE_COPY)
    assert not os.path.lexists(sandbox / "d")
    assert not os.path.lexists(sandbox / "nodir")


def test_whiteout_copy_form_keeps_same_layer(sandbox, lower):
    copy_tree(lower, sandbox)
    apply(make_tar(F("keep", b"mine"), F(".wh.keep")), sandbox, mode=MODE_COPY)
    assert (sandbox / "keep").read_bytes() == b"mine"


def test_whiteout_name_escape_rejected(sandbox):
    with pytest.raises(LayerError, match="escapes the root"):
        apply(make_tar(F("../.wh.outside")), sandbox, mode=MODE_COPY)
    with pytest.raises(LayerError, match="symbolic link"):
        apply(make_tar(S("o", "../outside"), F("o/.wh.victim")), sandbox, mode=MODE_COPY)
    with pytest.raises(LayerError, match="symbolic link"):
        apply(make_tar(S("p", "../outside"), F("p/.wh..wh..opq")), sandbox, mode=MODE_COPY)


def test_hardlink_to_lower_layer_is_copied_up(sandbox, lower):
    before = snapshot_tree(lower, None)
    apply(make_tar(L("bin/sh", "bin/busybox")), sandbox, parents=[str(lower)])
    up = os.lstat(sandbox / "bin/busybox")
    assert (sandbox / "bin/busybox").read_bytes() == b"busybox-binary"
    assert stat.S_IMODE(up.st_mode) == 0o4755
    assert os.getxattr(str(sandbox / "bin/busybox"), "user.origin") == b"lower"
    assert os.lstat(sandbox / "bin/sh").st_ino == up.st_ino
    assert stat.S_IMODE(os.stat(sandbox / "bin").st_mode) == 0o751  # parent copied from lower
    assert snapshot_tree(lower, None) == before


def test_hardlink_to_lower_respects_whiteout(sandbox, lower, tmp_path):
    upper_mid = tmp_path / "mid"
    upper_mid.mkdir()
    os.mknod(upper_mid / "keep", stat.S_IFCHR | 0o600, 0)
    with pytest.raises(LayerError, match="does not exist"):
        apply(make_tar(L("x", "keep")), sandbox, parents=[str(upper_mid), str(lower)])
    os.setxattr(str(lower / "d"), "user.x", b"1")  # not opaque: just noise
    mid_d = upper_mid / "d"
    mid_d.mkdir()
    os.setxattr(str(mid_d), OPAQUE_XATTR, b"y")
    with pytest.raises(LayerError, match="does not exist"):
        apply(make_tar(L("y", "d/old")), sandbox, parents=[str(upper_mid), str(lower)])


# --------------------------------------------------------------------------- streams
def sample_tar():
    return make_tar(D("etc"), F("etc/hostname", b"moorage\n"), F("big", os.urandom(200_000)))


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_compression_and_diff_id(tmp_path, compression):
    tar = sample_tar()
    blob = {"none": lambda b: b, "gzip": gzip.compress,
            "zstd": lambda b: zstandard.ZstdCompressor().compress(b)}[compression](tar)
    root = tmp_path / "r"
    root.mkdir()
    res = apply(blob, root, expected_diff_id=f"sha256:{hashlib.sha256(tar).hexdigest()}")
    assert res.diff_id == Digest("sha256", hashlib.sha256(tar).hexdigest())
    assert res.compression == compression
    assert res.size == len(tar) and res.entries == 3
    assert (root / "etc/hostname").read_bytes() == b"moorage\n"


def test_diff_id_includes_trailing_padding(tmp_path):
    tar = sample_tar() + b"\0" * 8192
    root = tmp_path / "r"
    root.mkdir()
    res = apply(gzip.compress(tar), root)
    assert res.diff_id.hex == hashlib.sha256(tar).hexdigest()


def test_diff_id_mismatch(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(DiffIDMismatch, match="does not match the diff_id"):
        apply(sample_tar(), root, expected_diff_id="sha256:" + "0" * 64)


def test_corrupt_streams(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    gz = gzip.compress(sample_tar())
    with pytest.raises(LayerError, match="corrupt or truncated"):
        apply(gz[: len(gz) // 2], root)
    with pytest.raises(LayerError):
        apply(b"\x1f\x8b" + b"garbage" * 100, root)
    with pytest.raises(LayerError, match="not a tar archive|corrupt"):
        apply(b"this is not a tar file at all" * 40, root)


def test_limits(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    tar = make_tar(*(F(f"f{i}", b"x") for i in range(10)))
    with pytest.raises(LayerError, match="more than 5 entries"):
        apply(tar, root, limits=UnpackLimits(max_entries=5))
    # headers alone (the files hold 10 bytes) take the stream over the cap: only the cap can refuse it
    with pytest.raises(LayerError, match="uncompressed size exceeds the limit of 4096 bytes"):
        apply(gzip.compress(tar), root, limits=UnpackLimits(max_bytes=4096))
    with pytest.raises(LayerError, match="larger than the limit of 100 bytes"):
        apply(make_tar(F("big", b"y" * 1000)), root, limits=UnpackLimits(max_file_size=100))


def test_sync_path_runs(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    apply(sample_tar(), root, sync=True)


# --------------------------------------------------------------------------- hostile headers
HEADER_CLAIM = 64 << 20  # what the crafted headers claim; never allocated, never sent


def _chksum(hdr: bytearray) -> bytes:
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def raw_header(name: str, type_: bytes, size: int, fmt=tarfile.GNU_FORMAT) -> bytes:
    """One 512-byte header, built without its body (the body may be claimed, not present)."""
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = 0
    hdr = bytearray(ti.tobuf(format=fmt))
    assert len(hdr) == tarfile.BLOCKSIZE
    hdr[124:136] = b"%011o\0" % size
    return _chksum(hdr)


def pax_block(type_: bytes, records: dict[str, str], name="././@PaxHeader") -> bytes:
    body = b""
    for k, v in records.items():
        rec = f" {k}={v}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    pad = -len(body) % tarfile.BLOCKSIZE
    return raw_header(name, type_, len(body), fmt=tarfile.USTAR_FORMAT) + body + b"\0" * pad


class CountingStream:
    """``head`` followed by zeros up to ``total`` bytes, generated lazily; counts what is read
    and refuses to hand out more than ``budget`` bytes (a reader that loads the claimed body
    fails here, loudly, instead of allocating it)."""

    def __init__(self, head: bytes, total: int, budget: int = 4 << 20) -> None:
        self.head, self.total, self.budget, self.read_bytes = head, total, budget, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 16
        n = min(n, self.total - self.read_bytes)
        if self.read_bytes + n > self.budget:
            raise AssertionError(f"read past {self.budget} bytes: the header body is being loaded")
        start = self.read_bytes
        out = self.head[start:start + n]
        out += b"\0" * (n - len(out))
        self.read_bytes += n
        return out


@pytest.mark.parametrize("type_,word", [(tarfile.GNUTYPE_LONGNAME, "GNU long name"),
                                        (tarfile.GNUTYPE_LONGLINK, "GNU long link"),
                                        (tarfile.XHDTYPE, "PAX extended"),
                                        (tarfile.XGLTYPE, "PAX global")])
def test_huge_extended_header_rejected_before_its_body_is_read(tmp_path, type_, word):
    root = tmp_path / "r"
    root.mkdir()
    src = CountingStream(raw_header("././@LongLink", type_, HEADER_CLAIM), HEADER_CLAIM + 4096)
    with pytest.raises(LayerError, match=f"{word} tar header claims {HEADER_CLAIM} bytes"):
        apply_layer(src, str(root), label="sha256:test", sync=False)
    assert src.read_bytes <= 64 << 10  # the header and tarfile's first buffer, not the body
    assert os.listdir(root) == []


def test_extended_header_chain_is_bounded(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    # thousands of tiny PAX headers in front of one member: tarfile recurses once per header
    chain = pax_block(tarfile.XHDTYPE, {"comment": "x"}) * 3000
    tar = chain + make_tar(F("f", b"data"))
    with pytest.raises(LayerError, match="more than 8 extended headers"):
        apply(tar, root)
    # a few large ones that are each under the limit, but not together
    big = pax_block(tarfile.XHDTYPE, {"comment": "x" * (400 << 10)})
    with pytest.raises(LayerError, match="extended headers"):
        apply(big * 3 + make_tar(F("f", b"data")), root)
    # and global PAX headers, which tarfile keeps for the whole archive
    g = b"".join(pax_block(tarfile.XGLTYPE, {f"k{i}": "v" * (300 << 10)}) + make_tar(F(f"f{i}", b"d"))[:1024]
                 for i in range(5))
    with pytest.raises(LayerError, match="global PAX tar headers exceed"):
        apply(g + b"\0" * 1024, root)


def test_ordinary_long_names_and_pax_still_work(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    name = "d/" + "n" * 200 + "/" + "m" * 200
    link = "t" * 300
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti, data = F(name, b"long")
        tf.addfile(ti, io.BytesIO(data))
        ti, _ = S("s", link)
        tf.addfile(ti)
    apply(buf.getvalue(), root)
    assert (root / name).read_bytes() == b"long"
    assert os.readlink(root / "s") == link
    apply(make_tar(F("p", b"x", pax={"SCHILY.xattr.user.k": "v" * 2000})), root)
    assert os.getxattr(root / "p", "user.k") == b"v" * 2000


# --------------------------------------------------------------------------- sparse members
def old_gnu_sparse(name: str, realsize: int) -> bytes:
    """A GNU 'S' member: one 512-byte data chunk at offset 0 of a ``realsize`` file."""
    hdr = bytearray(raw_header(name, tarfile.GNUTYPE_SPARSE, tarfile.BLOCKSIZE))
    hdr[386:398] = b"%011o\0" % 0
    hdr[398:410] = b"%011o\0" % tarfile.BLOCKSIZE
    hdr[482] = 0
    hdr[483:495] = b"%011o\0" % realsize
    return _chksum(hdr) + b"s" * tarfile.BLOCKSIZE


def pax_sparse(version: str, name: str, realsize: int) -> bytes:
    records = {"GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)}
    data = b"s" * tarfile.BLOCKSIZE
    if version == "0.1":
        records |= {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.map": "0,512"}
    else:
        records |= {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
        data = b"1\n0\n512\n".ljust(tarfile.BLOCKSIZE, b"\0") + data
    hdr = raw_header(f"GNUSparseFile.0/{name}", tarfile.REGTYPE, len(data), fmt=tarfile.USTAR_FORMAT)
    return pax_block(tarfile.XHDTYPE, records) + hdr + data


@pytest.mark.parametrize("kind", ["gnu", "pax0.1", "pax1.0"])
def test_sparse_member_rejected(tmp_path, kind):
    root = tmp_path / "r"
    root.mkdir()
    realsize = 512 << 10
    member = old_gnu_sparse("holes", realsize) if kind == "gnu" else pax_sparse(kind[3:], "holes", realsize)
    tar = make_tar(F("before", b"ok"))[:1024] + member + b"\0" * 1024
    # the limit would also stop this one (its apparent size is larger); the error must name sparseness
    with pytest.raises(LayerError, match='"holes" is a sparse file'):
        apply(tar, root, limits=UnpackLimits(max_bytes=256 << 10))
    assert not (root / "holes").exists()


def test_total_file_size_is_bounded_on_headers(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    # "a" is real; "b" claims 6000 bytes that never come: refused on its header, before any write
    tar = make_tar(F("a", b"a" * 3000)).rstrip(b"\0")
    tar += b"\0" * (-len(tar) % 512) + raw_header("b", tarfile.REGTYPE, 6000) + b"b" * 512
    with pytest.raises(LayerError, match='"b" brings the files of the layer to 9000 bytes, more than the limit of 8192'):
        apply(tar, root, limits=UnpackLimits(max_bytes=8192))
    assert not (root / "b").exists()
