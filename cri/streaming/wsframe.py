"""Sans-I/O WebSocket (RFC 6455) framing and the Kubernetes channel protocols.

:class:`WebSocketConnection` turns bytes into messages and back (masking,
fragmentation, ping/pong, close handshake).  :class:`ChannelCodec` adds the
Kubernetes multiplexing on top: every message starts with a channel number
(a raw byte, or an ASCII digit followed by base64 data for the ``base64.``
variants); ``v5.channel.k8s.io`` adds the close signal ``[255, channel]``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import struct
from dataclasses import dataclass

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Remote command subprotocols, most preferred first.
REMOTECOMMAND_PROTOCOLS = [
    "v5.channel.k8s.io", "v5.base64.channel.k8s.io",
    "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
    "v3.channel.k8s.io", "v3.base64.channel.k8s.io",
    "v2.channel.k8s.io", "v2.base64.channel.k8s.io",
    "channel.k8s.io", "base64.channel.k8s.io",
]  # fmt: skip
# Port forward: the kubelet's names plus the portforward.k8s.io spellings.
PORTFORWARD_PROTOCOLS = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io", "v4.portforward.k8s.io", "portforward.k8s.io"]

CLOSE_SIGNAL = 255


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key.strip() + WS_GUID).encode()).digest()).decode()


def negotiate_subprotocol(requested: list[str], supported: list[str]) -> str | None:
    """First client-offered protocol the server supports; ``""`` if none offered."""
    if not requested:
        return ""
    for proto in requested:
        if proto in supported:
            return proto
    return None


def handshake_response(key: str, subprotocol: str) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011


class WebSocketError(Exception):
    def __init__(self, message: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


def apply_mask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


@dataclass(frozen=True)
class MessageReceived:
    data: bytes
    text: bool


@dataclass(frozen=True)
class CloseReceived:
    code: int | None
    reason: str


@dataclass(frozen=True)
class PongReceived:
    data: bytes


class WebSocketConnection:
    """One side of a WebSocket.  The server side requires masked frames."""

    def __init__(self, server: bool = True, max_message: int = 16 << 20) -> None:
        self.server = server
        self.max_message = max_message
        self._buf = bytearray()
        self._out = bytearray()
        self._frag_opcode: int | None = None
        self._frag = bytearray()
        self.close_sent = False
        self.close_received = False

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        mask = None if self.server else os.urandom(4)
        self._out += encode_frame(opcode, payload, True, mask)

    def send_message(self, data: bytes | str) -> None:
        if self.close_sent:
            raise WebSocketError("connection is closing")
        if isinstance(data, str):
            self._frame(Opcode.TEXT, data.encode())
        else:
            self._frame(Opcode.BINARY, bytes(data))

    def ping(self, data: bytes = b"") -> None:
        self._frame(Opcode.PING, data[:125])

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if not self.close_sent:
            self.close_sent = True
            self._frame(Opcode.CLOSE, struct.pack(">H", code) + reason.encode()[:123])

    def receive_data(self, data: bytes) -> list[MessageReceived | CloseReceived | PongReceived]:
        """Parse bytes from the peer.  Raises WebSocketError (and queues a close frame) on violations."""
        self._buf += data
        events: list[MessageReceived | CloseReceived | PongReceived] = []
        try:
            while (frame := self._next_frame()) is not None:
                ev = self._on_frame(*frame)
                if ev is not None:
                    events.append(ev)
        except WebSocketError as e:
            self.close(e.code, str(e))
            raise
        return events

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        if b0 & 0x70:
            raise WebSocketError("reserved bits set without a negotiated extension")
        masked, n, pos = bool(b1 & 0x80), b1 & 0x7F, 2
        if masked != self.server:
            raise WebSocketError("client frames must be masked, server frames must not be")
        if n == 126:
            if len(buf) < 4:
                return None
            (n,) = struct.unpack_from(">H", buf, 2)
            pos = 4
        elif n == 127:
            if len(buf) < 10:
                return None
            (n,) = struct.unpack_from(">Q", buf, 2)
            pos = 10
        if n > self.max_message:
            raise WebSocketError("frame too large", CloseCode.TOO_BIG)
        mask = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            mask = bytes(buf[pos : pos + 4])
            pos += 4
        if len(buf) < pos + n:
            return None
        payload = bytes(buf[pos : pos + n])
        del buf[: pos + n]
        if masked:
            payload = apply_mask(payload, mask)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def _on_frame(self, fin: bool, opcode: int, payload: bytes) -> MessageReceived | CloseReceived | PongReceived | None:
        if opcode >= 0x8:
            if not fin or len(payload) > 125:
                raise WebSocketError("control frames must be whole and at most 125 bytes")
            if opcode == Opcode.PING:
                if not self.close_sent:
                    self._frame(Opcode.PONG, payload)
                return None
            if opcode == Opcode.PONG:
                return PongReceived(payload)
            if opcode == Opcode.CLOSE:
                self.close_received = True
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                self.close(code if code is not None and code not in (1005, 1006, 1015) else CloseCode.NORMAL)
                return CloseReceived(code, reason)
            raise WebSocketError(f"unknown control opcode {opcode}")
        if opcode == Opcode.CONTINUATION:
            if self._frag_opcode is None:
                raise WebSocketError("continuation frame without a message")
        elif opcode in (Opcode.TEXT, Opcode.BINARY):
            if self._frag_opcode is not None:
                raise WebSocketError("new message inside a fragmented one")
            self._frag_opcode = opcode
        else:
            raise WebSocketError(f"unknown data opcode {opcode}")
        self._frag += payload
        if len(self._frag) > self.max_message:
            raise WebSocketError("message too large", CloseCode.TOO_BIG)
        if not fin:
            return None
        text = self._frag_opcode == Opcode.TEXT
        data = bytes(self._frag)
        self._frag.clear()
        self._frag_opcode = None
        return MessageReceived(data, text)


# --------------------------------------------------------------------------- k8s channels


@dataclass(frozen=True)
class ChannelData:
    channel: int
    data: bytes


@dataclass(frozen=True)
class ChannelClosed:
    channel: int


class ChannelCodec:
    """Encode/decode one Kubernetes channel subprotocol's messages."""

    def __init__(self, subprotocol: str) -> None:
        self.subprotocol = subprotocol
        self.base64 = "base64." in subprotocol
        self.close_signal = subprotocol.startswith("v5.")
        # Remote command status format: JSON metav1.Status from v4 on.
        self.v4_status = subprotocol.startswith(("v4.", "v5."))

    def encode(self, channel: int, data: bytes) -> bytes | str:
        if self.base64:
            return chr(ord("0") + channel) + base64.b64encode(data).decode()
        return bytes([channel]) + data

    def encode_close(self, channel: int) -> bytes:
        return bytes([CLOSE_SIGNAL, channel])

    def decode(self, message: bytes) -> ChannelData | ChannelClosed | None:
        """``None`` for an empty message (carries nothing)."""
        if not message:
            return None
        if self.close_signal and message[0] == CLOSE_SIGNAL:
            if len(message) != 2:
                raise WebSocketError("close signal must name exactly one channel")
            return ChannelClosed(message[1])
        if self.base64:
            channel = message[0] - ord("0")
            try:
                data = base64.b64decode(message[1:], validate=True)
            except binascii.Error:
                raise WebSocketError("invalid base64 channel data", CloseCode.INVALID_DATA) from None
        else:
            channel, data = message[0], message[1:]
        return ChannelData(channel, data)


def encode_port(port: int) -> bytes:
    """First message on each port-forward channel: the port, uint16 little-endian."""
    return struct.pack("<H", port)
