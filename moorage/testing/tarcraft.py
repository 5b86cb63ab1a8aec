"""Hand-made tar bytes for tests of readers that must not trust them.

``tarfile`` refuses to write most of what a hostile archive holds (negative sizes, a NUL in a PAX
path, a bad checksum), so these helpers lay out the 512-byte headers themselves.  Every function
returns ``bytes``; an archive is their concatenation followed by :func:`end`.
"""

from __future__ import annotations

import struct

BLOCK = 512
USTAR = b"ustar\x0000"
GNU = b"ustar  \x00"

#: ``security.capability`` values: CAP_NET_RAW (bit 13) permitted and effective
CAP_V2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def cap_v3(rootid: int) -> bytes:
    """A v3 (namespaced) ``security.capability`` value with its root uid."""
    return struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, rootid)


def octal(value: int, width: int) -> bytes:
    """``width`` bytes: zero-padded octal digits and a NUL."""
    return b"%0*o\0" % (width - 1, value)


def base256(value: int, width: int) -> bytes:
    """GNU base-256: the top bit of the first byte set, big-endian two's complement."""
    raw = value.to_bytes(width, "big", signed=True)
    return bytes([raw[0] | 0x80]) + raw[1:] if value >= 0 else raw


def fix_checksum(hdr: bytes | bytearray) -> bytes:
    block = bytearray(hdr)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def header(name: bytes | str, type_: bytes = b"0", size: int | bytes = 0, *, mode: int = 0o644,
           uid: int | bytes = 0, gid: int | bytes = 0, mtime: int | bytes = 1_600_000_000,
           linkname: bytes | str = b"", magic: bytes = USTAR, devmajor: int = 0, devminor: int = 0,
           prefix: bytes = b"", checksum: bool = True) -> bytes:
    """One header block.  Numbers given as ``bytes`` are put in their field as they are."""
    def field(v: int | bytes, width: int) -> bytes:
        return v.ljust(width, b"\0")[:width] if isinstance(v, bytes) else octal(v, width)

    name_b = name.encode() if isinstance(name, str) else name
    link_b = linkname.encode() if isinstance(linkname, str) else linkname
    block = bytearray(BLOCK)
    block[0:100] = name_b[:100].ljust(100, b"\0")
    block[100:108] = octal(mode, 8)
    block[108:116] = field(uid, 8)
    block[116:124] = field(gid, 8)
    block[124:136] = field(size, 12)
    block[136:148] = field(mtime, 12)
    block[156:157] = type_
    block[157:257] = link_b[:100].ljust(100, b"\0")
    block[257:265] = magic
    block[265:269] = b"root"
    block[297:301] = b"root"
    block[329:337] = octal(devmajor, 8)
    block[337:345] = octal(devminor, 8)
    block[345:500] = prefix[:155].ljust(155, b"\0")
    return fix_checksum(block) if checksum else bytes(block)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def pax_record(key: bytes | str, value: bytes | str) -> bytes:
    """One ``"<length> <key>=<value>\\n"`` record with its self-including length."""
    k = key.encode() if isinstance(key, str) else key
    v = value.encode() if isinstance(value, str) else value
    rest = b" " + k + b"=" + v + b"\n"
    n = len(rest) + 1
    while len(str(n)) + len(rest) != n:
        n += 1
    return str(n).encode() + rest


def pax(records: dict[bytes | str, bytes | str] | None = None, *, body: bytes | None = None,
        type_: bytes = b"x") -> bytes:
    """A PAX extended (``x``) or global (``g``) header and its body (records, or ``body`` raw)."""
    if body is None:
        body = b"".join(pax_record(k, v) for k, v in (records or {}).items())
    return header("././@PaxHeader", type_, len(body)) + pad(body)


def gnu_long(type_: bytes, value: bytes) -> bytes:
    """A GNU long name (``L``) or long link (``K``) header and its NUL-terminated body."""
    body = value + b"\0"
    return header("././@LongLink", type_, len(body), magic=GNU) + pad(body)


def file(name: bytes | str, data: bytes = b"", *, mode: int = 0o644, uid: int | bytes = 0,
         gid: int | bytes = 0, mtime: int | bytes = 1_600_000_000) -> bytes:
    """A regular file: header and padded data."""
    return header(name, b"0", len(data), mode=mode, uid=uid, gid=gid, mtime=mtime) + pad(data)


def directory(name: bytes | str, *, mode: int = 0o755) -> bytes:
    return header(name, b"5", 0, mode=mode)


def end() -> bytes:
    """The end-of-archive marker: two zero blocks."""
    return bytes(2 * BLOCK)
