"""The untrusting tar reader (moorage.images.tarstream) on hand-made bytes: every header kind,
every limit, every refusal, and zero, one and many members."""

from __future__ import annotations

import io
import tarfile

import pytest

from moorage.images.tarstream import (
    DIRECTORY,
    HARDLINK,
    REGULAR,
    SYMLINK,
    TarCorrupt,
    TarEntry,
    TarLimits,
    TarReader,
    TarRefused,
    shown,
)
from moorage.testing import tarcraft as tc

GIB = 1 << 30
DEFAULT_LIMITS = TarLimits()


class Source:
    """Bytes handed out ``chunk`` at a most per read (decompressors return short reads too)."""

    def __init__(self, data: bytes, chunk: int = 1 << 20) -> None:
        self.data, self.pos, self.chunk, self.max_read = data, 0, chunk, 0

    def read(self, n: int = -1) -> bytes:
        n = min(n, self.chunk)
        self.max_read = max(self.max_read, n)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def read_all(data: bytes, limits: TarLimits = DEFAULT_LIMITS, chunk: int = 1 << 20) -> list[tuple[TarEntry, bytes]]:
    reader = TarReader(Source(data, chunk), label="layer sha256:t", limits=limits)
    out = []
    for entry in reader:
        out.append((entry, reader.read(1 << 30)))
    return out


def corrupt(data: bytes, *parts: str, limits: TarLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(TarCorrupt) as ei:
        read_all(data, limits)
    msg = ei.value.message
    assert ei.value.code == "DATA_LOSS"
    assert msg.startswith("layer sha256:t: corrupt tar archive at byte offset ")
    for p in parts:
        assert p in msg, msg
    assert len(msg) < 400
    return msg


def refused(data: bytes, *parts: str, limits: TarLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(TarRefused) as ei:
        read_all(data, limits)
    msg = ei.value.message
    assert ei.value.code == "INVALID_ARGUMENT"
    for p in parts:
        assert p in msg, msg
    assert len(msg) < 400
    return msg


# --------------------------------------------------------------------------- zero, one, many
@pytest.mark.parametrize("data", [b"", tc.end(), bytes(512), tc.end() + b"trailing garbage"],
                         ids=["empty", "end-marker", "lone-zero-block", "garbage-after-end"])
def test_zero_members(data):
    assert read_all(data) == []


def test_one_member():
    [(e, data)] = read_all(tc.file("a/b.txt", b"hello", mode=0o640, uid=7, gid=8, mtime=1234) + tc.end())
    assert (e.name, e.type, e.mode, e.uid, e.gid, e.size, data) == ("a/b.txt", REGULAR, 0o640, 7, 8, 5, b"hello")
    assert e.mtime_ns == 1234 * 10**9 and e.atime_ns is None and e.offset == 0 and e.isreg()


def test_many_members_and_unread_data_is_skipped():
    archive = b"".join(tc.file(f"f{i}", bytes([i]) * (i * 100)) for i in range(20)) + tc.end()
    reader = TarReader(Source(archive, chunk=333), label="l")
    names = []
    for i, e in enumerate(reader):
        names.append(e.name)
        if i % 2:
            data = b"".join(iter(lambda: reader.read(1 << 20), b""))
            assert data == bytes([i]) * (i * 100)
    assert names == [f"f{i}" for i in range(20)]
    assert reader.position == len(archive)  # the whole marker, no more
    assert reader.next() is None


def test_end_at_a_header_boundary_without_marker_is_accepted_as_containerd_does():
    assert [e.name for e, _ in read_all(tc.file("a", b"x") + tc.file("b"))] == ["a", "b"]


def test_matches_what_tarfile_writes():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(3):
            ti = tarfile.TarInfo(f"d/{'n' * 150}/{i}")
            ti.size, ti.mtime, ti.uid = 3, 1.5, 3_000_000
            ti.pax_headers = {"SCHILY.xattr.user.k": f"v{i}"}
            tf.addfile(ti, io.BytesIO(b"abc"))
        ti = tarfile.TarInfo("link")
        ti.type, ti.linkname = tarfile.SYMTYPE, "t" * 200
        tf.addfile(ti)
    got = read_all(buf.getvalue())
    assert [(e.name, d, e.uid, e.mtime_ns, e.xattrs) for e, d in got[:3]] == [
        (f"d/{'n' * 150}/{i}", b"abc", 3_000_000, 1_500_000_000, (("user.k", f"v{i}".encode()),))
        for i in range(3)]
    assert got[3][0].issym() and got[3][0].linkname == "t" * 200


# --------------------------------------------------------------------------- header kinds
def test_ustar_prefix_is_joined():
    [(e, _)] = read_all(tc.header("name", prefix=b"some/prefix") + tc.end())
    assert e.name == "some/prefix/name"


def test_gnu_magic_has_no_prefix_field():
    [(e, _)] = read_all(tc.header("name", magic=tc.GNU, prefix=b"ignored") + tc.end())
    assert e.name == "name"


def test_v7_regular_with_trailing_slash_is_a_directory():
    [(e, _)] = read_all(tc.header("dir/", b"\0", magic=b"\0" * 8) + tc.end())
    assert e.type == DIRECTORY


def test_contiguous_is_regular_and_header_only_types_have_no_data():
    archive = (tc.header("c", b"7", 3) + tc.pad(b"abc") + tc.header("h", HARDLINK, 512, linkname="c")
               + tc.header("s", SYMLINK, 0, linkname="/abs/target") + tc.end())
    (c, cd), (h, hd), (s, _) = read_all(archive)
    assert c.type == REGULAR and cd == b"abc"
    assert h.islnk() and h.size == 0 and hd == b"" and h.linkname == "c"  # size of a link is no data
    assert s.linkname == "/abs/target"


def test_gnu_long_name_and_link():
    archive = (tc.gnu_long(b"L", b"x/" * 300) + tc.gnu_long(b"K", b"y" * 700)
               + tc.header("short", SYMLINK, magic=tc.GNU) + tc.end())
    [(e, _)] = read_all(archive)
    assert e.name == "x/" * 300 and e.linkname == "y" * 700 and e.offset == 0


def test_base256_numbers():
    archive = tc.header("big", size=tc.base256(5, 12), uid=tc.base256(70_000_000, 8),
                        mtime=tc.base256(-86400, 12), magic=tc.GNU) + tc.pad(b"12345") + tc.end()
    [(e, data)] = read_all(archive)
    assert (e.size, e.uid, e.mtime_ns, data) == (5, 70_000_000, -86400 * 10**9, b"12345")


def test_pax_fields_override_and_later_records_win():
    records = {"path": "from/pax", "linkpath": "target", "uid": "4294967294", "gid": "0",
               "mtime": "-1.25", "atime": "1700000000.123456789999", "ctime": "5",
               "SCHILY.xattr.security.capability": tc.CAP_V2, "SCHILY.xattr.user.a": "1",
               "comment": "ignored", "uname": "whoever"}
    archive = (tc.pax(records) + tc.pax({"SCHILY.xattr.user.a": "2"})
               + tc.header("ustar-name", SYMLINK, linkname="ustar-link") + tc.end())
    [(e, _)] = read_all(archive)
    assert (e.name, e.linkname, e.uid, e.gid) == ("from/pax", "target", 4294967294, 0)
    assert e.mtime_ns == -1_250_000_000 and e.atime_ns == 1_700_000_000_123_456_789
    assert dict(e.xattrs) == {"security.capability": tc.CAP_V2, "user.a": b"2"}


def test_pax_size_governs_the_data():
    archive = tc.pax({"size": "3"}) + tc.header("f", size=999) + tc.pad(b"abc") + tc.end()
    [(e, data)] = read_all(archive)
    assert (e.size, data) == (3, b"abc")


def test_global_pax_headers_are_checked_then_ignored():
    archive = (tc.pax({"path": "evil", "uid": "5"}, type_=b"g") + tc.file("a")
               + tc.pax({"mtime": "7"}, type_=b"g") + tc.file("b") + tc.end())
    got = read_all(archive)
    assert [(e.name, e.uid, e.offset) for e, _ in got] == [("a", 0, 1024), ("b", 0, 2560)]
    corrupt(tc.pax(body=b"9 k=v\n", type_=b"g") + tc.end(), "PAX record 1 has a wrong length")


def test_signed_checksum_is_accepted():
    block = bytearray(tc.header("\xe9t\xe9".encode("latin-1")))
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b & 0x80 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    [(e, _)] = read_all(bytes(block) + tc.end())
    assert e.name.encode("utf-8", "surrogateescape") == "\xe9t\xe9".encode("latin-1")


def test_non_utf8_names_round_trip_as_bytes():
    [(e, _)] = read_all(tc.pax({"path": b"caf\xff"}) + tc.file("x") + tc.end())
    assert e.name.encode("utf-8", "surrogateescape") == b"caf\xff"


# --------------------------------------------------------------------------- corruption
def test_bad_checksum_names_the_offset():
    bad = bytearray(tc.file("c"))
    bad[0:1] = b"X"
    archive = tc.file("a", b"1") + tc.file("b", b"2") + bytes(bad) + tc.end()
    corrupt(archive, "at byte offset 2048:", "checksum does not match")


def test_not_a_tar_at_all():
    corrupt(b"this is not a tar file at all" * 40, "at byte offset 0:", "not a tar header")


@pytest.mark.parametrize("field,value,word", [
    ("size", b"12x4", "size field is not an octal number"),
    ("uid", b"99999999", "uid field is not an octal number"),
    ("mtime", b"-1", "mtime field is not an octal number"),
])
def test_non_octal_fields(field, value, word):
    corrupt(tc.header("f", **{field: value}) + tc.end(), word)


@pytest.mark.parametrize("archive,word", [
    (tc.header("f", size=tc.base256(-5, 12), magic=tc.GNU), "the member size is negative (-5)"),
    (tc.pax({"size": "-5"}) + tc.file("f"), "the PAX size is negative"),
    (tc.pax({"size": "5 "}) + tc.file("f"), "the PAX size is not a decimal number"),
    (tc.pax({"size": "9" * 21}) + tc.file("f"), "the PAX size is not a decimal number"),
    (tc.header("f", uid=tc.base256(-1, 8), magic=tc.GNU), "the uid -1 is outside 0..4294967294"),
    (tc.header("f", gid=tc.base256(1 << 32, 8), magic=tc.GNU), "the gid 4294967296 is outside"),
    (tc.pax({"uid": "-1"}) + tc.file("f"), "the PAX uid is negative"),
    (tc.pax({"uid": "4294967295"}) + tc.file("f"), "the uid 4294967295 is outside"),
    (tc.pax({"gid": "99999999999999999999"}) + tc.file("f"), "the gid 99999999999999999999 is outside"),
    (tc.pax({"mtime": "inf"}) + tc.file("f"), "the PAX mtime is not a decimal number of seconds"),
    (tc.pax({"mtime": "nan"}) + tc.file("f"), "the PAX mtime is not a decimal number of seconds"),
    (tc.pax({"mtime": "1e300"}) + tc.file("f"), "the PAX mtime is not a decimal number of seconds"),
    (tc.pax({"mtime": "1" + "0" * 300}) + tc.file("f"), "the PAX mtime is longer than 40 characters"),
    (tc.pax({"mtime": "10000000000"}) + tc.file("f"), "the PAX mtime 10000000000 is outside"),
    (tc.pax({"atime": ".5"}) + tc.file("f"), "the PAX atime is not a decimal"),
    (tc.pax({"ctime": "-"}) + tc.file("f"), "the PAX ctime is not a decimal"),
    (tc.header("f", mtime=tc.base256(1 << 40, 12), magic=tc.GNU), "the mtime 1099511627776 is outside"),
    (tc.pax({"path": b"a\0b"}) + tc.file("f"), "the PAX path contains a NUL byte"),
    (tc.pax({"linkpath": b"\0"}) + tc.file("f"), "the PAX link target contains a NUL byte"),
    (tc.header("d", b"3", devmajor=1 << 13), "the device number 8192:0 is out of range"),
], ids=lambda v: v if isinstance(v, str) else "archive")
def test_invalid_values(archive, word):
    corrupt(archive + tc.end(), "at byte offset 0:", word)


@pytest.mark.parametrize("body,word", [
    (b"8" * 80_000 + b" path=x\n", "PAX record 1 does not start with a length"),
    (b"1" * 120_000, "PAX record 1 does not start with a length"),
    (b"12 path=x\n", "PAX record 1 has a wrong length"),       # claims 12, is 11
    (b"11 path=xxx", "PAX record 1 has a wrong length"),      # no newline at its end
    (b"9 =value\n", "PAX record 1 has no keyword"),
    (b"11 novalue\n", "PAX record 1 has no keyword"),
    (b"8 a\0b=v\n", "PAX record 1 has no keyword"),
    (tc.pax_record("a", "b") + b"\0" * 20, "PAX record 2 does not start with a length"),
    (b"-5 a=b\n", "does not start with a length"),
], ids=lambda v: v if isinstance(v, str) else "body")
def test_malformed_pax_records(body, word):
    corrupt(tc.pax(body=body) + tc.file("f") + tc.end(), "at byte offset 0:", word)


def test_invalid_header_mid_archive_fails_instead_of_ending():
    # tarfile treated this as the end of the archive and dropped the rest of the layer
    junk = b"\x01" * 512
    corrupt(tc.file("a", b"x") + junk + tc.file("b") + tc.end(), "at byte offset 1024:")


def test_header_after_a_zero_block():
    corrupt(tc.file("a") + bytes(512) + tc.file("b") + tc.end(), "at byte offset 1024:", "follows a zero block")


@pytest.mark.parametrize("cut,word", [
    (100, "ends inside a header (100 of 512 bytes)"),
    (512 + 100, "ends inside a member's data"),
    (512 + 1000, "ends inside the padding"),
    (512 + 1024 + 512 + 10, "ends inside a PAX extended header's body"),
])
def test_truncated(cut, word):
    archive = tc.file("a", b"d" * 1000) + tc.pax({"path": "p" * 600}) + tc.file("b")
    corrupt(archive[:cut], word)


def test_extended_header_without_its_member():
    corrupt(tc.file("a") + tc.pax({"path": "x"}) + tc.end(), "ends after an extended header")
    corrupt(tc.gnu_long(b"L", b"name"), "ends after an extended header")


# --------------------------------------------------------------------------- limits
def test_header_count_limit():
    archive = b"".join(tc.file(f"f{i}") for i in range(5)) + tc.end()
    assert len(read_all(archive, TarLimits(max_headers=5))) == 5
    refused(archive, "more than 4 headers", "byte offset 2048", limits=TarLimits(max_headers=4))


def test_size_limit():
    refused(tc.header("f", size=2 * GIB) + tc.end(), "a member claims 2147483648 bytes, more than the limit",
            limits=TarLimits(max_size=GIB))


@pytest.mark.parametrize("type_,kind", [(b"x", "PAX extended"), (b"g", "PAX global"),
                                        (b"L", "GNU long name"), (b"K", "GNU long link")])
def test_extended_header_claim_is_refused_before_its_body_is_read(type_, kind):
    src = Source(tc.header("././@LongLink", type_, 64 << 20))  # the body is claimed, never there
    with pytest.raises(TarRefused, match=f"a {kind} tar header claims 67108864 bytes"):
        TarReader(src, label="l").next()
    assert src.pos == 512


def test_extended_chain_limits():
    refused(tc.pax({"comment": "x"}) * 9 + tc.file("f") + tc.end(), "more than 8 extended headers")
    assert len(read_all(tc.pax({"comment": "x"}) * 8 + tc.file("f") + tc.end())) == 1
    refused(tc.pax({"comment": "x" * 600}) * 3 + tc.file("f") + tc.end(), "more than 8 extended headers or more than 1024 bytes",
            limits=TarLimits(max_ext_header=1024))


def test_global_bytes_limit_is_cumulative():
    g = tc.pax({"comment": "x" * 400}, type_=b"g")
    assert read_all(g * 2 + tc.end(), TarLimits(max_global_bytes=1024)) == []
    refused(g * 3 + tc.end(), "global PAX tar headers exceed the limit of 1024 bytes",
            limits=TarLimits(max_global_bytes=1024))


def test_pax_record_count_limit_60000_global_keys():
    body = b"".join(tc.pax_record(f"k{i}", "v") for i in range(60_000))
    assert len(body) < 1 << 20
    refused(tc.pax(body=body, type_=b"g") + tc.end(), "a PAX header has more than 4096 records")


def test_path_limits():
    refused(tc.pax({"path": "p" * 5000}) + tc.file("f") + tc.end(), "a path of 5000 bytes is longer")
    refused(tc.gnu_long(b"K", b"t" * 5000) + tc.header("f", SYMLINK) + tc.end(), "a link target of 5000 bytes")
    assert read_all(tc.pax({"path": "p" * 4096}) + tc.file("f") + tc.end())[0][0].name == "p" * 4096


def test_xattr_limits():
    many = {f"SCHILY.xattr.user.k{i}": "v" for i in range(129)}
    refused(tc.pax(many) + tc.file("f") + tc.end(), "more than 128 xattrs")
    refused(tc.pax({"SCHILY.xattr.user.k": "v" * 70_000}) + tc.file("f") + tc.end(),
            "an xattr value of 70000 bytes")
    refused(tc.pax({f"SCHILY.xattr.user.{i}": "v" * 60_000 for i in range(5)}) + tc.file("f") + tc.end(),
            "or more than 262144 bytes of them")
    corrupt(tc.pax({"SCHILY.xattr.": "v"}) + tc.file("f") + tc.end(), "an xattr name is empty")
    corrupt(tc.pax({"SCHILY.xattr." + "n" * 256: "v"}) + tc.file("f") + tc.end(), "longer than 255 bytes")


@pytest.mark.parametrize("archive", [
    tc.header("holes", b"S", 512, magic=tc.GNU) + tc.pad(b"s"),
    tc.pax({"GNU.sparse.name": "holes", "GNU.sparse.major": "1"}) + tc.file("GNUSparseFile.0/x", b"s"),
], ids=["gnu", "pax"])
def test_sparse_refused(archive):
    refused(archive + tc.end(), 'entry "holes" is a sparse file')


def test_shown_escapes_and_bounds():
    assert shown('a"b\n\x1b') == 'a\\"b\\n\\x1b'
    assert shown(b"\xff") == "\\udcff"
    long = shown("x" * 1000)
    assert long.startswith("x" * 120) and long.endswith("(880 more)") and len(long) < 140


def test_reader_never_reads_more_than_asked_for_a_header():
    src = Source(tc.file("a", b"x" * 5000) + tc.end())
    reader = TarReader(src, label="l")
    assert reader.next() is not None
    assert src.pos == 512
