"""The gzip decompressor used for layers: the one place that picks the implementation.

python-isal's reader (ISA-L, with the gzip member loop in C) decompresses about twice as fast
as the standard library's ``gzip.GzipFile`` (which loops in Python over 8 KiB reads) and drops
the GIL while it works, so an unpack thread does not stall the daemon's event loop.  It is a
dependency, but a missing or broken install falls back to the standard library: same format,
same checks (CRC-32 and size of every member), only slower.  ``hack/bench/bench_gzip.py``
measures both.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from types import ModuleType
from typing import IO, cast


@functools.cache
def _isal() -> tuple[ModuleType | None, ModuleType | None]:
    """(igzip, isal_zlib), or Nones without a usable install.

    Imported at the first gzip layer, not at start-up: a daemon that pulls nothing does not
    carry the extension's pages (part of the fresh-start RSS budget, see docs/architecture.md).
    """
    try:
        from isal import igzip, isal_zlib
    except ImportError:  # pragma: no cover -- exercised by the fallback test through monkeypatching
        return None, None
    return igzip, isal_zlib


def backend() -> str:
    """The default implementation: ``"isal"`` when it imports, else ``"zlib"``."""
    return "isal" if _isal()[0] is not None else "zlib"


def gzip_errors() -> tuple[type[Exception], ...]:
    """What a corrupt or truncated gzip stream raises, from either implementation."""
    errors: tuple[type[Exception], ...] = (gzip.BadGzipFile, zlib.error, EOFError)
    isal_zlib = _isal()[1]
    if isal_zlib is not None:
        errors += (isal_zlib.error,)
    return errors


def __getattr__(name: str) -> object:
    # The module's constants of old, now computed at first use (above).
    if name == "BACKEND":
        return backend()
    if name == "GZIP_ERRORS":
        return gzip_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_default_backend = backend  # open_gzip's parameter shadows the name


def open_gzip(stream: IO[bytes], backend: str | None = None) -> IO[bytes]:
    """A forward-only reader of the decompressed bytes of *stream* (one or more members).

    *backend* forces ``"isal"`` or ``"zlib"`` (benchmarks and tests); default: the fastest.
    """
    use = backend or _default_backend()
    igzip = _isal()[0]
    if use == "isal" and igzip is not None:
        return cast(IO[bytes], igzip.IGzipFile(fileobj=stream, mode="rb"))
    if use not in ("isal", "zlib"):
        raise ValueError(f"unknown gzip backend {use!r}")
    return cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))
