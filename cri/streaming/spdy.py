"""Sans-I/O SPDY/3.1 framing and connection state machine.

Only what the Kubernetes streaming protocols need: bidirectional streams with
compressed header blocks, data with FIN, resets, pings, GOAWAY and flow
control.  Nothing here touches a socket: feed received bytes to
:meth:`SpdyConnection.receive_data`, act on the returned events, and write out
whatever :meth:`SpdyConnection.data_to_send` returns.

Frame layout (all integers big-endian)::

    control: |1| version:15 | type:16 | flags:8 | length:24 | payload
    data:    |0| stream-id:31         | flags:8 | length:24 | payload

Flow control: every stream and the session start with a 64 KiB window in each
direction.  The receiver grants more with WINDOW_UPDATE as the application
consumes data (:meth:`SpdyConnection.acknowledge_received`).  Peers built on
moby/spdystream (kubectl, the kubelet, the API server) never send
WINDOW_UPDATE and ignore ours, so the send windows are only *enforced* once
the peer has shown it speaks flow control (a WINDOW_UPDATE, or SETTINGS with
INITIAL_WINDOW_SIZE, which this implementation sends first thing).
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3
DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 0x7FFFFFFF
MAX_FRAME_LENGTH = 0xFFFFFF
MAX_DATA_CHUNK = 16 * 1024  # what we put in one DATA frame
MAX_HEADER_BLOCK = 256 * 1024  # bound on a decompressed header block

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01

Headers = list[tuple[str, str]]


def _build_dictionary() -> bytes:
    """The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1)."""
    words = (
        "options head post put delete trace accept accept-charset accept-encoding"
        " accept-language accept-ranges age allow authorization cache-control"
        " connection content-base content-encoding content-language content-length"
        " content-location content-md5 content-range content-type date etag expect"
        " expires from host if-match if-modified-since if-none-match if-range"
        " if-unmodified-since last-modified location max-forwards pragma"
        " proxy-authenticate proxy-authorization range referer retry-after server te"
        " trailer transfer-encoding upgrade user-agent vary via warning"
        " www-authenticate method get status"
    ).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
    out = b"".join(struct.pack(">I", len(w)) + w.encode() for w in words)
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
        "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
        "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
        "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
        "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return out + tail.encode()


DICTIONARY = _build_dictionary()


class FrameType(enum.IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(enum.IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


class GoAwayStatus(enum.IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class Setting(enum.IntEnum):
    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


class SpdyProtocolError(Exception):
    """The peer broke the protocol badly enough that the session must end."""


# --------------------------------------------------------------------------- header blocks


def encode_header_block(headers: Headers) -> bytes:
    """Uncompressed name/value block; repeated names are joined with NUL."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.lower(), []).append(value)
    out = [struct.pack(">I", len(merged))]
    for name, values in merged.items():
        n, v = name.encode(), "\0".join(values).encode()
        out.append(struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def decode_header_block(block: bytes) -> Headers:
    try:
        (count,) = struct.unpack_from(">I", block, 0)
        pos, headers = 4, []
        for _ in range(count):
            (ln,) = struct.unpack_from(">I", block, pos)
            name = block[pos + 4 : pos + 4 + ln]
            pos += 4 + ln
            (lv,) = struct.unpack_from(">I", block, pos)
            value = block[pos + 4 : pos + 4 + lv]
            pos += 4 + lv
            if pos > len(block) or not name:
                raise SpdyProtocolError("truncated header block")
            for v in value.decode("utf-8", "replace").split("\0"):
                headers.append((name.decode("utf-8", "replace").lower(), v))
    except struct.error as e:
        raise SpdyProtocolError(f"malformed header block: {e}") from None
    return headers


class HeaderCompressor:
    """One zlib stream (with the SPDY dictionary) for every header block we send."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def compress(self, headers: Headers) -> bytes:
        raw = encode_header_block(headers)
        return self._z.compress(raw) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The peer's zlib stream; every header block must be a sync-flushed chunk of it."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(15, zdict=DICTIONARY)

    def decompress(self, data: bytes) -> Headers:
        try:
            raw = self._z.decompress(data, MAX_HEADER_BLOCK)
        except zlib.error as e:
            raise SpdyProtocolError(f"header decompression failed: {e}") from None
        if self._z.unconsumed_tail:
            raise SpdyProtocolError("header block too large")
        return decode_header_block(raw)


def header_value(headers: Headers, name: str, default: str | None = None) -> str | None:
    name = name.lower()
    for n, v in headers:
        if n == name:
            return v
    return default


# --------------------------------------------------------------------------- raw frames


def control_frame(ftype: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_LENGTH:
        raise ValueError("frame payload too large")
    return struct.pack(">HHI", 0x8000 | VERSION, ftype, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    if len(data) > MAX_FRAME_LENGTH:
        raise ValueError("frame payload too large")
    return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


def rst_stream_frame(stream_id: int, status: int) -> bytes:
    return control_frame(FrameType.RST_STREAM, 0, struct.pack(">II", stream_id & 0x7FFFFFFF, status))


def settings_frame(values: dict[int, int], clear: bool = False) -> bytes:
    body = struct.pack(">I", len(values)) + b"".join(struct.pack(">II", k & 0xFFFFFF, v) for k, v in values.items())
    return control_frame(FrameType.SETTINGS, FLAG_SETTINGS_CLEAR if clear else 0, body)


def ping_frame(ping_id: int) -> bytes:
    return control_frame(FrameType.PING, 0, struct.pack(">I", ping_id))


def goaway_frame(last_good_stream_id: int, status: int) -> bytes:
    return control_frame(FrameType.GOAWAY, 0, struct.pack(">II", last_good_stream_id & 0x7FFFFFFF, status))


def window_update_frame(stream_id: int, delta: int) -> bytes:
    return control_frame(FrameType.WINDOW_UPDATE, 0, struct.pack(">II", stream_id & 0x7FFFFFFF, delta & 0x7FFFFFFF))


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class StreamOpened:
    stream_id: int
    headers: Headers
    fin: bool = False
    unidirectional: bool = False
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True)
class StreamReplied:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class HeadersReceived:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class DataReceived:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class StreamReset:
    stream_id: int
    status: int


@dataclass(frozen=True)
class SettingsReceived:
    values: dict[int, int]
    clear: bool = False


@dataclass(frozen=True)
class PingAcknowledged:
    ping_id: int


@dataclass(frozen=True)
class GoAwayReceived:
    last_good_stream_id: int
    status: int


@dataclass(frozen=True)
class WindowUpdated:
    stream_id: int  # 0 = the session window
    delta: int


Event = (
    StreamOpened | StreamReplied | HeadersReceived | DataReceived | StreamReset
    | SettingsReceived | PingAcknowledged | GoAwayReceived | WindowUpdated
)


# --------------------------------------------------------------------------- connection


@dataclass
class _Stream:
    send_window: int
    recv_window: int
    local_closed: bool = False
    remote_closed: bool = False
    unacked: int = 0  # bytes consumed by the application but not yet granted back


@dataclass
class SpdyConnection:
    """SPDY/3.1 session state for one side (``client=True`` opens odd stream ids)."""

    client: bool
    max_buffered_frame: int = 1 << 20
    max_concurrent_streams: int = 1000  # streams the peer may have open at once; more are refused
    recv_window: int = DEFAULT_WINDOW  # our per-stream and session receive window (announced by initiate)
    _buf: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _out: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _streams: dict[int, _Stream] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor()
        self._next_stream_id = 1 if self.client else 2
        self._next_ping_id = 1 if self.client else 2
        self._last_peer_stream_id = 0
        self.initial_send_window = DEFAULT_WINDOW  # the peer's INITIAL_WINDOW_SIZE
        self.initial_recv_window = self.recv_window
        self.session_send_window = DEFAULT_WINDOW
        self.session_recv_window = DEFAULT_WINDOW
        self._session_unacked = 0
        self.peer_flow_control = False
        self.goaway_sent = False
        self.goaway_received = False

    # ---- output

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def initiate(self) -> None:
        """Announce our receive window, which also tells the peer we do flow control."""
        self._out += settings_frame({Setting.INITIAL_WINDOW_SIZE: self.initial_recv_window})
        if self.recv_window > DEFAULT_WINDOW:  # the session window starts at 64 KiB: raise it to match
            self._out += window_update_frame(0, self.recv_window - DEFAULT_WINDOW)
            self.session_recv_window = self.recv_window

    def open_stream(self, headers: Headers, fin: bool = False, priority: int = 0) -> int:
        if self.goaway_sent or self.goaway_received:
            raise SpdyProtocolError("session is going away")
        sid = self._next_stream_id
        self._next_stream_id += 2
        self._streams[sid] = _Stream(self.initial_send_window, self.initial_recv_window, local_closed=fin)
        body = struct.pack(">IIBB", sid, 0, (priority & 7) << 5, 0) + self._compressor.compress(headers)
        self._out += control_frame(FrameType.SYN_STREAM, FLAG_FIN if fin else 0, body)
        return sid

    def reply(self, stream_id: int, headers: Headers | None = None, fin: bool = False) -> None:
        body = struct.pack(">I", stream_id) + self._compressor.compress(headers or [])
        self._out += control_frame(FrameType.SYN_REPLY, FLAG_FIN if fin else 0, body)
        if fin:
            self._local_close(stream_id)

    def send_headers(self, stream_id: int, headers: Headers, fin: bool = False) -> None:
        body = struct.pack(">I", stream_id) + self._compressor.compress(headers)
        self._out += control_frame(FrameType.HEADERS, FLAG_FIN if fin else 0, body)
        if fin:
            self._local_close(stream_id)

    def can_send(self, stream_id: int) -> bool:
        st = self._streams.get(stream_id)
        return st is not None and not st.local_closed

    def send_window(self, stream_id: int) -> int:
        """How many bytes may be sent on ``stream_id`` right now."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return 0
        if not self.peer_flow_control:
            return MAX_WINDOW
        return max(0, min(st.send_window, self.session_send_window))

    def send_data(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise SpdyProtocolError(f"stream {stream_id} is not open for sending")
        if len(data) > self.send_window(stream_id):
            raise SpdyProtocolError(f"data exceeds the send window of stream {stream_id}")
        st.send_window -= len(data)
        self.session_send_window -= len(data)
        view = memoryview(data)
        for off in range(0, len(data), MAX_DATA_CHUNK):
            last = off + MAX_DATA_CHUNK >= len(data)
            self._out += data_frame(stream_id, bytes(view[off : off + MAX_DATA_CHUNK]), fin and last)
        if not data and fin:
            self._out += data_frame(stream_id, b"", True)
        if fin:
            self._local_close(stream_id)

    def end_stream(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is not None and not st.local_closed:
            self.send_data(stream_id, b"", fin=True)

    def reset_stream(self, stream_id: int, status: int = RstStatus.CANCEL) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._out += rst_stream_frame(stream_id, status)

    def ping(self) -> int:
        pid = self._next_ping_id
        self._next_ping_id += 2
        self._out += ping_frame(pid)
        return pid

    def goaway(self, status: int = GoAwayStatus.OK) -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self._out += goaway_frame(self._last_peer_stream_id, status)

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of ``stream_id``: grant them back."""
        half = self.initial_recv_window // 2
        self._session_unacked += n
        if self._session_unacked >= half:
            self._out += window_update_frame(0, self._session_unacked)
            self.session_recv_window += self._session_unacked
            self._session_unacked = 0
        st = self._streams.get(stream_id)
        if st is None or st.remote_closed:
            return
        st.unacked += n
        if st.unacked >= half:
            self._out += window_update_frame(stream_id, st.unacked)
            st.recv_window += st.unacked
            st.unacked = 0

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def peer_stream_count(self) -> int:
        """Streams the peer opened that are not yet closed (or reset) on both sides."""
        return sum(1 for sid in self._streams if (sid % 2 == 1) != self.client)

    # ---- input

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse bytes from the peer.  Raises SpdyProtocolError on session errors."""
        self._buf += data
        events: list[Event] = []
        while len(self._buf) >= 8:
            first, second = struct.unpack_from(">II", self._buf, 0)
            length = second & 0xFFFFFF
            if length > self.max_buffered_frame:
                raise SpdyProtocolError(f"frame of {length} bytes is too large")
            if len(self._buf) < 8 + length:
                break
            flags = second >> 24
            payload = bytes(self._buf[8 : 8 + length])
            del self._buf[: 8 + length]
            if first & 0x80000000:
                version, ftype = (first >> 16) & 0x7FFF, first & 0xFFFF
                if version != VERSION:
                    raise SpdyProtocolError(f"unsupported SPDY version {version}")
                ev = self._on_control(ftype, flags, payload)
            else:
                ev = self._on_data(first & 0x7FFFFFFF, flags, payload)
            if ev is not None:
                events.append(ev)
        return events

    def _on_control(self, ftype: int, flags: int, p: bytes) -> Event | None:
        fin = bool(flags & FLAG_FIN)
        try:
            if ftype == FrameType.SYN_STREAM:
                sid, assoc, pri, _slot = struct.unpack_from(">IIBB", p, 0)
                sid &= 0x7FFFFFFF
                headers = self._decompressor.decompress(p[10:])
                if sid == 0 or (sid % 2 == 1) == self.client or sid <= self._last_peer_stream_id:
                    self._out += rst_stream_frame(sid, RstStatus.PROTOCOL_ERROR)
                    return None
                self._last_peer_stream_id = sid
                if self.goaway_sent or self.peer_stream_count() >= self.max_concurrent_streams:
                    self._out += rst_stream_frame(sid, RstStatus.REFUSED_STREAM)
                    return None
                uni = bool(flags & FLAG_UNIDIRECTIONAL)
                self._streams[sid] = _Stream(self.initial_send_window, self.initial_recv_window, local_closed=uni, remote_closed=fin)
                return StreamOpened(sid, headers, fin, uni, assoc & 0x7FFFFFFF, pri >> 5)
            if ftype in (FrameType.SYN_REPLY, FrameType.HEADERS):
                (sid,) = struct.unpack_from(">I", p, 0)
                sid &= 0x7FFFFFFF
                headers = self._decompressor.decompress(p[4:])
                if sid not in self._streams:
                    self._out += rst_stream_frame(sid, RstStatus.INVALID_STREAM)
                    return None
                if fin:
                    self._remote_close(sid)
                cls = StreamReplied if ftype == FrameType.SYN_REPLY else HeadersReceived
                return cls(sid, headers, fin)
            if ftype == FrameType.RST_STREAM:
                sid, status = struct.unpack_from(">II", p, 0)
                self._streams.pop(sid & 0x7FFFFFFF, None)
                return StreamReset(sid & 0x7FFFFFFF, status)
            if ftype == FrameType.SETTINGS:
                (count,) = struct.unpack_from(">I", p, 0)
                values = {}
                for i in range(count):
                    ident, value = struct.unpack_from(">II", p, 4 + 8 * i)
                    values[ident & 0xFFFFFF] = value
                if Setting.INITIAL_WINDOW_SIZE in values:
                    new = min(values[Setting.INITIAL_WINDOW_SIZE], MAX_WINDOW)
                    for st in self._streams.values():
                        st.send_window += new - self.initial_send_window
                    self.initial_send_window = new
                    self.peer_flow_control = True
                return SettingsReceived(values, bool(flags & FLAG_SETTINGS_CLEAR))
            if ftype == FrameType.PING:
                (pid,) = struct.unpack_from(">I", p, 0)
                if (pid % 2 == 1) == self.client:
                    return PingAcknowledged(pid)
                self._out += ping_frame(pid)  # the peer's ping: echo it
                return None
            if ftype == FrameType.GOAWAY:
                last, status = struct.unpack_from(">II", p, 0)
                self.goaway_received = True
                return GoAwayReceived(last & 0x7FFFFFFF, status)
            if ftype == FrameType.WINDOW_UPDATE:
                sid, delta = struct.unpack_from(">II", p, 0)
                sid, delta = sid & 0x7FFFFFFF, delta & 0x7FFFFFFF
                self.peer_flow_control = True
                if sid == 0:
                    self.session_send_window = min(self.session_send_window + delta, MAX_WINDOW)
                elif sid in self._streams:
                    st = self._streams[sid]
                    st.send_window = min(st.send_window + delta, MAX_WINDOW)
                return WindowUpdated(sid, delta)
        except struct.error:
            raise SpdyProtocolError(f"malformed control frame of type {ftype}") from None
        return None  # unknown control frame types are ignored, as the spec asks

    def _on_data(self, sid: int, flags: int, payload: bytes) -> Event | None:
        st = self._streams.get(sid)
        if st is None or st.remote_closed:
            self._out += rst_stream_frame(sid, RstStatus.INVALID_STREAM if st is None else RstStatus.STREAM_ALREADY_CLOSED)
            return None
        fin = bool(flags & FLAG_FIN)
        # Peers without flow control (spdystream) overrun freely; only hold
        # a peer that claims to do flow control to its window.
        if self.peer_flow_control and len(payload) > st.recv_window:
            self.reset_stream(sid, RstStatus.FLOW_CONTROL_ERROR)
            return StreamReset(sid, RstStatus.FLOW_CONTROL_ERROR)
        st.recv_window -= len(payload)
        self.session_recv_window -= len(payload)
        if fin:
            self._remote_close(sid)
        return DataReceived(sid, payload, fin)

    def _local_close(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is not None:
            st.local_closed = True
            if st.remote_closed:
                del self._streams[sid]

    def _remote_close(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is not None:
            st.remote_closed = True
            if st.local_closed:
                del self._streams[sid]
