"""ttrpc framing, sans-I/O (standard library only).

ttrpc (github.com/containerd/ttrpc) is the small RPC protocol NRI speaks.  A
frame is a 10-byte header -- payload length (uint32, big-endian), stream id
(uint32), message type (uint8: 1 request, 2 response, 3 data) and flags
(uint8) -- followed by the payload (a protobuf ``Request`` or ``Response``).
A client numbers its streams with odd ids counting up; the response travels on
the request's stream.  This module only cuts bytes into frames and back, so
the framing is testable without sockets; transport.py runs it on asyncio.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_LEN = HEADER.size  # 10
#: ttrpc's own limit on one message's payload
MAX_PAYLOAD = 4 << 20

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


class FramingError(Exception):
    """The peer sent something that is not ttrpc: the connection cannot go on."""


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    payload: bytes


def encode(frame: Frame) -> bytes:
    if len(frame.payload) > MAX_PAYLOAD:
        raise FramingError(f"ttrpc message of {len(frame.payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return HEADER.pack(len(frame.payload), frame.stream_id, frame.type, frame.flags) + frame.payload


class Decoder:
    """Bytes in (any chunking), whole frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= HEADER_LEN:
            length, sid, typ, flags = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                raise FramingError(f"ttrpc frame announces {length} bytes, over the {MAX_PAYLOAD}-byte limit")
            if typ not in (TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA):
                raise FramingError(f"unknown ttrpc message type {typ}")
            if len(self._buf) < HEADER_LEN + length:
                break
            payload = bytes(self._buf[HEADER_LEN:HEADER_LEN + length])
            del self._buf[:HEADER_LEN + length]
            out.append(Frame(sid, typ, flags, payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


class StreamIds:
    """A client's stream ids: odd, counting up from 1 (ttrpc's rule)."""

    def __init__(self) -> None:
        self._next = 1

    def next(self) -> int:
        sid = self._next
        self._next += 2
        if self._next > 0xFFFFFFFF:
            raise FramingError("ttrpc stream ids exhausted on this connection")
        return sid
