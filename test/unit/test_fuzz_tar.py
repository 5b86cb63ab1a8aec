"""Property-based fuzzing of the tar reader and the layer applier: random and mutated archives
only ever raise the project's domain errors (bounded messages), and nothing lands outside the
target directory."""

from __future__ import annotations

import io
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moorage.core.errors import MoorageError
from moorage.images.tarstream import TarCorrupt, TarLimits, TarReader, TarRefused
from moorage.images.unpack import MODE_COPY, MODE_OVERLAY, UnpackLimits, apply_layer
from moorage.testing import tarcraft as tc

SMALL = TarLimits(max_headers=200, max_size=1 << 20, max_ext_header=8192, max_global_bytes=8192,
                  max_pax_records=64, max_path=512, max_xattrs=8, max_xattr_bytes=4096)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def seed_archive() -> bytes:
    """One of every header kind, small enough for many mutations to reach every field."""
    return b"".join([
        tc.directory("d"),
        tc.file("d/f", b"hello", uid=1, gid=2),
        tc.pax({"path": "d/p" * 3, "mtime": "1.5", "SCHILY.xattr.user.k": "v"}) + tc.file("x", b"pax"),
        tc.pax({"comment": "g"}, type_=b"g"),
        tc.gnu_long(b"L", b"d/long" * 30) + tc.header("short", magic=tc.GNU),
        tc.header("d/s", b"2", linkname="../../../etc"),
        tc.header("d/h", b"1", linkname="d/f"),
        tc.header("d/.wh.gone"),
        tc.end(),
    ])


SEED = seed_archive()


def walk_reader(data: bytes) -> None:
    reader = TarReader(io.BytesIO(data), label="layer fuzz", limits=SMALL)
    for _ in reader:
        while reader.read(4096):
            pass


def check_domain_error(e: MoorageError) -> None:
    assert len(e.message) < 1024
    assert e.code != "INTERNAL", e.message


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["byte", "splice", "cut", "digits"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "splice":
            data[at:at] = draw(st.binary(max_size=64))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 600))]
        else:  # a numeric-looking run where a field or record length was
            data[at:at + 8] = draw(st.sampled_from([b"-1", b"77777777777", b"\x80\xff\xff", b"9" * 30,
                                                    b"inf", b"1e300", b"\xff" * 12]))
    fix = draw(st.booleans())  # also mutate past the checksum, to reach the field parsers
    if fix:
        for off in range(0, len(data) - 511, 512):
            block = data[off:off + 512]
            if block.count(0) < 512 and block[257:262] == b"ustar":
                data[off:off + 512] = tc.fix_checksum(block)
    return bytes(data)


NUMBERS = st.one_of(st.integers(0, 0o7777777).map(lambda v: b"%o" % v), st.binary(max_size=12),
                    st.sampled_from([b"-1", b"77777777777", b"\x80\xff\xff", b"\xff" * 12, b" 17 ", b""]),
                    st.integers(-(1 << 60), 1 << 60).map(lambda v: tc.base256(v, 12)))
NAMES = st.one_of(st.sampled_from(["a", "d/", "../x", "/abs", "d/.wh.x", ".wh..wh..opq", "a/../../b", "."]),
                  st.binary(max_size=120))
PAX_KEYS = st.sampled_from(["path", "linkpath", "size", "uid", "gid", "mtime", "atime", "ctime",
                            "SCHILY.xattr.user.k", "SCHILY.xattr.trusted.overlay.opaque",
                            "SCHILY.xattr.security.capability", "GNU.sparse.major", "comment", "hdrcharset"])
PAX_VALUES = st.one_of(st.sampled_from(["0", "-5", "inf", "nan", "1e300", "1.5", "4294967295", "a\0b", "x" * 300]),
                       st.binary(max_size=40))


@st.composite
def member(draw: st.DrawFn) -> bytes:
    out = b""
    if draw(st.booleans()):
        records = draw(st.dictionaries(PAX_KEYS, PAX_VALUES, max_size=5))
        out += tc.pax(records, type_=draw(st.sampled_from([b"x", b"g"])))
    if draw(st.integers(0, 4)) == 0:
        out += tc.gnu_long(draw(st.sampled_from([b"L", b"K"])), draw(st.binary(max_size=300)))
    data = draw(st.binary(max_size=700))
    type_ = draw(st.sampled_from([b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"V", b"x"]))
    size: int | bytes = len(data) if draw(st.booleans()) else draw(NUMBERS)
    out += tc.header(draw(NAMES), type_, size, uid=draw(NUMBERS), gid=draw(NUMBERS),
                     mtime=draw(NUMBERS), linkname=draw(NAMES),
                     magic=draw(st.sampled_from([tc.USTAR, tc.GNU, bytes(8)])),
                     devmajor=draw(st.integers(0, 9000)), devminor=draw(st.integers(0, 3)))
    return out + tc.pad(data)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """Archives of members with fuzzed fields and records, valid checksums, sometimes cut."""
    data = b"".join(draw(st.lists(member(), max_size=6)))
    data += draw(st.sampled_from([tc.end(), b"", bytes(512), bytes(512) + tc.file("late")]))
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@FUZZ
@given(structured())
def test_structured_archives_only_raise_domain_errors(data):
    try:
        walk_reader(data)
    except (TarCorrupt, TarRefused) as e:
        check_domain_error(e)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_domain_errors(data):
    try:
        walk_reader(data)
    except (TarCorrupt, TarRefused) as e:
        check_domain_error(e)


@FUZZ
@given(mutated())
def test_mutated_archives_only_raise_domain_errors(data):
    try:
        walk_reader(data)
    except (TarCorrupt, TarRefused) as e:
        check_domain_error(e)


def tree(top: str) -> dict[str, tuple[int, bytes | str | None]]:
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for dirpath, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            content: bytes | str | None = None
            if os.path.islink(p):
                content = os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    content = f.read()
            out[os.path.relpath(p, top)] = (st_.st_mode, content)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted xattrs)")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), structured()), st.sampled_from([MODE_OVERLAY, MODE_COPY]))
def test_mutated_layers_never_escape_and_fail_only_with_domain_errors(data, mode):
    base = tempfile.mkdtemp(prefix="tar-fuzz-")
    try:
        outside = os.path.join(base, "outside")
        os.makedirs(os.path.join(outside, "etc"))
        with open(os.path.join(outside, "victim"), "wb") as f:
            f.write(b"original")
        root = os.path.join(base, "root")
        os.mkdir(root)
        before = tree(outside)
        try:
            apply_layer(io.BytesIO(data), root, mode=mode, label="sha256:fuzz", sync=False,
                        limits=UnpackLimits(max_entries=100, max_bytes=1 << 20))
        except MoorageError as e:
            check_domain_error(e)
        assert tree(outside) == before
        assert sorted(os.listdir(base)) == ["outside", "root"]
    finally:
        shutil.rmtree(base)
