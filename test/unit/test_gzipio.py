"""The layer gzip reader: isal and the zlib fallback read and refuse exactly the same streams."""

from __future__ import annotations

import gzip
import io
import os
import struct

import pytest

from moorage.images import gzipio

BACKENDS = ["isal", "zlib"]


def _read_all(blob: bytes, backend: str) -> bytes:
    out = bytearray()
    f = gzipio.open_gzip(io.BytesIO(blob), backend)
    while chunk := f.read(1 << 16):
        out += chunk
    return bytes(out)


def test_isal_is_the_default_when_installed() -> None:
    pytest.importorskip("isal")
    assert gzipio.BACKEND == "isal"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("members", [0, 1, 3])
def test_members_concatenate(backend: str, members: int) -> None:
    parts = [os.urandom(70_000) + b"text " * 20_000 for _ in range(members)]
    blob = b"".join(gzip.compress(p, mtime=0) for p in parts)
    assert _read_all(blob, backend) == b"".join(parts)


def _corruptions() -> dict[str, bytes]:
    good = gzip.compress(b"hello layer " * 10_000, mtime=0)
    crc_off = len(good) - 8
    bad_crc = good[:crc_off] + struct.pack("<I", struct.unpack("<I", good[crc_off:crc_off + 4])[0] ^ 1) + good[-4:]
    bad_size = good[:-4] + struct.pack("<I", struct.unpack("<I", good[-4:])[0] + 1)
    return {"truncated": good[: len(good) // 2], "no trailer": good[:-8], "bad crc": bad_crc,
            "bad size": bad_size, "garbage member": good + b"\x1f\x8bXXXXXXXXXXXXXX",
            "flipped body": good[:20] + bytes([good[20] ^ 0xFF]) + good[21:]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(_corruptions()))
def test_corrupt_streams_raise_a_gzip_error(backend: str, name: str) -> None:
    with pytest.raises(gzipio.GZIP_ERRORS):
        _read_all(_corruptions()[name], backend)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown gzip backend"):
        gzipio.open_gzip(io.BytesIO(b""), "brotli")
