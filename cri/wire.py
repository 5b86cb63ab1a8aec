"""Why a request's bytes did not parse: which field, for the caller's message.

protobuf's parser says only "Error parsing message" when a ``string`` field
holds invalid UTF-8 (proto3 requires UTF-8 there); the edge answers
INVALID_ARGUMENT and this walk of the wire format names the field
(``config.hostname``), so the caller knows what to fix.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

MAX_DEPTH = 100  # protobuf's own recursion limit


class _Truncated(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Truncated
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def explain(data: bytes, desc: Descriptor, prefix: str = "", depth: int = 0) -> str | None:
    """The path of the first string field of ``desc`` in ``data`` that is not UTF-8, or a
    short description of the damage; None when nothing is found."""
    if depth > MAX_DEPTH:
        return f"{prefix or 'the request'}: nested more than {MAX_DEPTH} deep"
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            fd = desc.fields_by_number.get(number)
            path = f"{prefix}.{fd.name}" if prefix and fd is not None else (fd.name if fd is not None else "")
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                chunk = data[pos:pos + size]
                if len(chunk) < size:
                    raise _Truncated
                pos += size
                if fd is None:
                    continue
                if fd.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return f"{path}: is not valid UTF-8"
                elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                    found = explain(chunk, fd.message_type, path, depth + 1)
                    if found:
                        return found
            else:
                return f"{prefix or 'the request'}: unsupported wire type {wire_type}"
            if pos > len(data):
                raise _Truncated
    except _Truncated:
        return f"{prefix or 'the request'}: the encoding is cut short or corrupt"
    return None
