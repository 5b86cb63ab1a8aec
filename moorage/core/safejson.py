"""JSON from untrusted sources (registries, archives, token servers, helpers), parsed safely.

``json.loads`` recurses once per nesting level: a document of 100 000 ``[`` raises
RecursionError (an INTERNAL answer), and a merely deep one still makes every later walk
of the value (the store's encoder, our own checks) recurse as deep.  So before the
parser sees a byte, :func:`loads` checks the size, that the bytes are UTF-8, and the
nesting depth with a pre-scan that runs in C (a regex drops the strings, ``translate``
keeps only the brackets, ``accumulate`` gives the running depth).  Go's encoding/json
has a depth limit for the same reason.

Errors are :class:`InvalidArgument` with a bounded message that names *what* was parsed
and never quotes the document.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from moorage.core.errors import InvalidArgument

#: Deep enough for every real image document (configs nest about 4 levels), far below
#: the interpreter's recursion limit.
MAX_DEPTH = 64
#: Values (arrays, objects and list items, counted by their brackets and commas) a document
#: may hold.  The C parser holds the GIL for its whole run: a 4 MiB manifest of a million tiny
#: arrays takes seconds to parse, while real manifests and configs hold a few thousand values.
MAX_VALUES = 100_000

# A JSON string: possessive, so a hostile run of quotes and backslashes cannot backtrack.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
# Opening brackets become 0x01, closing ones 0xff (-1 as a signed byte); all else goes.
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


#: Brackets scanned per step: each step is one C call holding the GIL, so a multi-megabyte
#: document parsed in a thread never stalls the event loop for long.
_CHUNK = 1 << 16


def _without_strings(data: bytes) -> bytes:
    return _STRING.sub(b"", data) if b'"' in data else data


def count_values(data: bytes) -> int:
    """About how many values a JSON text holds: its brackets and commas outside strings."""
    bare = _without_strings(data)
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{")


def nesting_depth(data: bytes, stop_above: int | None = None) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings do not count).

    With *stop_above*, scanning stops as soon as the depth exceeds it (the result is then
    only known to be larger than *stop_above*).
    """
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    skeleton = memoryview(_without_strings(data).translate(_BRACKETS, _NOT_BRACKETS)).cast("b")
    depth = deepest = 0
    for i in range(0, len(skeleton), _CHUNK):
        chunk = skeleton[i:i + _CHUNK]
        top = max(itertools.accumulate(chunk, initial=depth))
        if top > deepest:
            deepest = top
        if stop_above is not None and deepest > stop_above:
            break
        depth += sum(chunk)
    return deepest


def loads(data: bytes | str, *, what: str, max_size: int, max_depth: int = MAX_DEPTH,
          max_values: int = MAX_VALUES) -> Any:
    """Parse *data* as JSON, refusing it (InvalidArgument) when over *max_size* bytes,
    not UTF-8, nested deeper than *max_depth*, holding more than *max_values* values, or
    not JSON."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_size:
        raise InvalidArgument(f"{what} is {len(raw)} bytes, over the {max_size} byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{what} is not valid UTF-8 (at byte {e.start})") from None
    if nesting_depth(raw, stop_above=max_depth) > max_depth:
        raise InvalidArgument(f"{what} nests more than {max_depth} levels deep")
    values = count_values(raw)
    if values > max_values:
        raise InvalidArgument(f"{what} holds about {values} values, over the limit of {max_values}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # e.g. a number too long to convert
        raise InvalidArgument(f"{what} is not valid JSON: {type(e).__name__}") from None


def loads_object(data: bytes | str, *, what: str, max_size: int, max_depth: int = MAX_DEPTH,
                 max_values: int = MAX_VALUES) -> dict[str, Any]:
    """:func:`loads`, for documents that must be a JSON object."""
    doc = loads(data, what=what, max_size=max_size, max_depth=max_depth, max_values=max_values)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


def clip(value: object, limit: int = 80) -> str:
    """``repr`` of an untrusted value for a message or log line: escaped (no newline or
    control character gets through) and at most about *limit* characters."""
    s = value if isinstance(value, str) else str(value)
    shown = repr(s[:limit])
    if len(shown) > limit + 2:  # escapes (\n, \x00, \U...) make it longer: cut the escaped form
        return shown[:limit] + f"... ({len(s)} characters in all)"
    if len(s) > limit:
        return shown + f"... ({len(s) - limit} more characters)"
    return shown
