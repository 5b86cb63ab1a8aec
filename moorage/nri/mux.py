"""NRI's connection multiplexer, sans-I/O (standard library only).

NRI (pkg/net/multiplex) carries several logical byte streams over one unix
connection: each chunk on the trunk is an 8-byte header -- the logical
connection id (uint32, big-endian) and the chunk length (uint32) -- and the
chunk's bytes.  A logical connection is a plain byte stream, so a ttrpc frame
may span chunks.  Connection 1 carries the Plugin service (the runtime is the
client), connection 2 the Runtime service (the plugin is the client); id 0 is
reserved.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">II")
HEADER_LEN = HEADER.size  # 8
PLUGIN_SERVICE_CONN = 1
RUNTIME_SERVICE_CONN = 2
#: NRI's largest chunk: a whole ttrpc frame at its size limit
MAX_CHUNK = 10 + (4 << 20)


class MuxError(Exception):
    """The trunk carries something that is not NRI's multiplexed stream."""


def encode(conn_id: int, data: bytes) -> bytes:
    """``data`` for logical connection ``conn_id``, cut into chunks as NRI's writer cuts them."""
    if conn_id == 0:
        raise MuxError("connection id 0 is reserved")
    out = bytearray()
    view = memoryview(data)
    while True:
        chunk = view[:MAX_CHUNK]
        out += HEADER.pack(conn_id, len(chunk))
        out += chunk
        view = view[len(chunk):]
        if not view:
            return bytes(out)


class Decoder:
    """Trunk bytes in (any chunking), ``(conn_id, bytes)`` pieces out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while len(self._buf) >= HEADER_LEN:
            conn_id, size = HEADER.unpack_from(self._buf)
            if size > MAX_CHUNK:
                raise MuxError(f"multiplexed chunk of {size} bytes exceeds the {MAX_CHUNK}-byte limit")
            if len(self._buf) < HEADER_LEN + size:
                break
            out.append((conn_id, bytes(self._buf[HEADER_LEN:HEADER_LEN + size])))
            del self._buf[:HEADER_LEN + size]
        return out
