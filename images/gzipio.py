"""The gzip decompressor used for layers: the one place that picks the implementation.

python-isal's reader (ISA-L, with the gzip member loop in C) decompresses about twice as fast
as the standard library's ``gzip.GzipFile`` (which loops in Python over 8 KiB reads) and drops
the GIL while it works, so an unpack thread does not stall the daemon's event loop.  It is a
dependency, but a missing or broken install falls back to the standard library: same format,
same checks (CRC-32 and size of every member), only slower.  ``hack/bench/bench_gzip.py``
measures both.
"""

from __future__ import annotations

import gzip
import zlib
from typing import IO, cast

try:
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover -- exercised by the fallback test through monkeypatching
    _igzip = None  # type: ignore[assignment]
    _isal_zlib = None  # type: ignore[assignment]

BACKEND = "isal" if _igzip is not None else "zlib"

# What a corrupt or truncated gzip stream raises, from either implementation.
GZIP_ERRORS: tuple[type[Exception], ...] = (gzip.BadGzipFile, zlib.error, EOFError)
if _isal_zlib is not None:
    GZIP_ERRORS += (_isal_zlib.error,)  # type: ignore[operator]  # its stub calls the class an instance


def open_gzip(stream: IO[bytes], backend: str | None = None) -> IO[bytes]:
    """A forward-only reader of the decompressed bytes of *stream* (one or more members).

    *backend* forces ``"isal"`` or ``"zlib"`` (benchmarks and tests); default: the fastest.
    """
    use = backend or BACKEND
    if use == "isal" and _igzip is not None:
        return cast(IO[bytes], _igzip.IGzipFile(fileobj=stream, mode="rb"))
    if use not in ("isal", "zlib"):
        raise ValueError(f"unknown gzip backend {use!r}")
    return cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))
