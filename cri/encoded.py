"""Responses sent as bytes the servicer already holds.

The read RPCs the kubelet polls (List*, *Status) answer from per-object messages serialized once
(``cri.readcache``).  A protobuf message is a concatenation of its fields, and a repeated or
singular message field is ``tag, length, bytes`` per item, so a response is assembled by joining
cached pieces: byte for byte what ``SerializeToString`` of the same message gives (fields in
number order, as the encoder writes them), with no message copied per call.

A servicer returns ``Encoded`` instead of a message; the edge's response serializer passes it
through unchanged.  ``Encoded.parse`` turns it back into the message (tests, in-process callers).
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


class Encoded(bytes):
    """A serialized response message of type ``M``, ready to send."""

    def parse(self, cls: type[M]) -> M:
        msg = cls()
        msg.ParseFromString(self)
        return msg


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2): a message, string or bytes value."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def serialize(resp: object) -> bytes:
    """The edge's response serializer: ``Encoded`` as plain bytes (gRPC takes no subclass), a
    message serialized."""
    if isinstance(resp, bytes):
        return resp if type(resp) is bytes else bytes(resp)
    assert isinstance(resp, Message)
    return resp.SerializeToString()
