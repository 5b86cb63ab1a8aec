"""SPDY/3.1 framing and session state, checked against byte layouts from the draft spec."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest

from moorage.cri.streaming import spdy


def H(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


def pair() -> tuple[spdy.SpdyConnection, spdy.SpdyConnection]:
    return spdy.SpdyConnection(client=True), spdy.SpdyConnection(client=False)


def pump(src: spdy.SpdyConnection, dst: spdy.SpdyConnection) -> list:
    return dst.receive_data(src.data_to_send())


# --------------------------------------------------------------------------- fixed frames


def test_dictionary_is_the_spdy3_one():
    assert len(spdy.DICTIONARY) == 1423
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")
    assert hashlib.sha256(spdy.DICTIONARY).hexdigest() == "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"


def test_data_frame_layout():
    assert spdy.data_frame(1, b"hi") == H("00000001 00000002") + b"hi"
    assert spdy.data_frame(0x7FFFFFFF, b"", fin=True) == H("7fffffff 01000000")


@pytest.mark.parametrize(
    "frame, expected",
    [
        (spdy.rst_stream_frame(3, spdy.RstStatus.CANCEL), "8003 0003 00000008 00000003 00000005"),
        (spdy.ping_frame(2), "8003 0006 00000004 00000002"),
        (spdy.goaway_frame(5, spdy.GoAwayStatus.OK), "8003 0007 00000008 00000005 00000000"),
        (spdy.window_update_frame(1, 0x8000), "8003 0009 00000008 00000001 00008000"),
        (spdy.settings_frame({spdy.Setting.INITIAL_WINDOW_SIZE: 65536}), "8003 0004 0000000c 00000001 00000007 00010000"),
        (spdy.settings_frame({4: 100}, clear=True), "8003 0004 0100000c 00000001 00000004 00000064"),
    ],
)
def test_control_frame_layouts(frame, expected):
    assert frame == H(expected)


def test_header_block_layout_joins_repeated_names_with_nul():
    block = spdy.encode_header_block([("StreamType", "error"), ("a", "1"), ("a", "2")])
    assert block == (H("00000002") + H("0000000a") + b"streamtype" + H("00000005") + b"error"
                     + H("00000001") + b"a" + H("00000003") + b"1\x002")
    assert spdy.decode_header_block(block) == [("streamtype", "error"), ("a", "1"), ("a", "2")]


def test_syn_stream_layout():
    c = spdy.SpdyConnection(client=True)
    sid = c.open_stream([("streamtype", "stdin")], priority=3)
    out = c.data_to_send()
    assert sid == 1
    length = struct.unpack(">I", out[4:8])[0]
    assert out[:4] == H("8003 0001") and length == len(out) - 8
    assert out[8:18] == H("00000001 00000000 6000")  # stream 1, no associated stream, priority 3
    # The header block is the start of a zlib stream primed with the SPDY dictionary (RFC 1950 FDICT).
    assert out[18:20] == b"\x78\xbb" and out[20:24] == struct.pack(">I", zlib.adler32(spdy.DICTIONARY))
    assert spdy.HeaderDecompressor().decompress(out[18:]) == [("streamtype", "stdin")]


def test_syn_reply_and_fin_flags():
    c = spdy.SpdyConnection(client=False)
    c.receive_data(_peer_syn(1))
    c.reply(1, [], fin=True)
    out = c.data_to_send()
    assert out[:5] == H("8003 0002 01") and out[8:12] == H("00000001")


def _peer_syn(sid: int, comp: spdy.HeaderCompressor | None = None) -> bytes:
    body = struct.pack(">IIBB", sid, 0, 0, 0) + (comp or spdy.HeaderCompressor()).compress([("x", "y")])
    return spdy.control_frame(spdy.FrameType.SYN_STREAM, 0, body)


# --------------------------------------------------------------------------- header compression


def test_header_compression_contexts_persist_across_blocks():
    comp, decomp = spdy.HeaderCompressor(), spdy.HeaderDecompressor()
    headers = [("streamtype", "stdout"), ("port", "8080"), ("requestid", "0")]
    first, second = comp.compress(headers), comp.compress(headers)
    assert len(second) < len(first)  # the second block refers back to the first
    assert decomp.decompress(first) == headers
    assert decomp.decompress(second) == headers
    # A fresh decompressor cannot read the second block alone: one context per direction.
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.HeaderDecompressor().decompress(second)


def test_header_blocks_are_sync_flushed_zlib():
    comp = spdy.HeaderCompressor()
    blocks = [comp.compress([("n", str(i))]) for i in range(3)]
    assert all(b.endswith(b"\x00\x00\xff\xff") for b in blocks)
    z = zlib.decompressobj(zdict=spdy.DICTIONARY)
    raw = z.decompress(b"".join(blocks))
    assert raw == b"".join(spdy.encode_header_block([("n", str(i))]) for i in range(3))


def test_malformed_header_block_is_a_protocol_error():
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.decode_header_block(H("00000001 00000005") + b"ab")


# --------------------------------------------------------------------------- session


def test_stream_round_trip_and_byte_by_byte_parsing():
    c, s = pair()
    sid = c.open_stream([("streamtype", "stdin")])
    c.send_data(sid, b"hello", fin=True)
    wire = c.data_to_send()
    events = []
    for i in range(len(wire)):
        events += s.receive_data(wire[i : i + 1])
    assert events == [spdy.StreamOpened(1, [("streamtype", "stdin")]), spdy.DataReceived(1, b"hello", fin=True)]
    s.reply(sid)
    assert pump(s, c) == [spdy.StreamReplied(1, [])]


def test_large_data_is_split_with_fin_on_last_frame_only():
    c, s = pair()
    sid = c.open_stream([])
    c.send_data(sid, b"x" * (spdy.MAX_DATA_CHUNK * 2 + 1), fin=True)
    events = pump(c, s)[1:]
    assert [len(e.data) for e in events] == [spdy.MAX_DATA_CHUNK, spdy.MAX_DATA_CHUNK, 1]
    assert [e.fin for e in events] == [False, False, True]


def test_stream_id_parity_and_order_are_enforced():
    s, comp = spdy.SpdyConnection(client=False), spdy.HeaderCompressor()  # one context per direction
    assert s.receive_data(_peer_syn(2, comp)) == []  # even ids belong to the server
    assert s.data_to_send() == spdy.rst_stream_frame(2, spdy.RstStatus.PROTOCOL_ERROR)
    assert [e.stream_id for e in s.receive_data(_peer_syn(5, comp))] == [5]
    assert s.receive_data(_peer_syn(3, comp)) == []  # ids must increase
    assert s.data_to_send() == spdy.rst_stream_frame(3, spdy.RstStatus.PROTOCOL_ERROR)


def test_data_on_unknown_stream_is_refused():
    s = spdy.SpdyConnection(client=False)
    assert s.receive_data(spdy.data_frame(7, b"x")) == []
    assert s.data_to_send() == spdy.rst_stream_frame(7, spdy.RstStatus.INVALID_STREAM)


def test_reset_and_goaway_events():
    c, s = pair()
    sid = c.open_stream([])
    pump(c, s)
    s.reset_stream(sid, spdy.RstStatus.REFUSED_STREAM)
    s.goaway()
    assert pump(s, c) == [spdy.StreamReset(1, spdy.RstStatus.REFUSED_STREAM), spdy.GoAwayReceived(1, spdy.GoAwayStatus.OK)]
    assert not c.is_open(sid)
    with pytest.raises(spdy.SpdyProtocolError):
        c.open_stream([])


def test_ping_is_echoed_and_acknowledged():
    c, s = pair()
    pid = c.ping()
    assert pid == 1
    assert pump(c, s) == []
    assert s.data_to_send() == spdy.ping_frame(1)
    assert c.receive_data(spdy.ping_frame(1)) == [spdy.PingAcknowledged(1)]


def test_wrong_version_is_a_session_error():
    bad = struct.pack(">HHI", 0x8002, 6, 4) + b"\0\0\0\1"
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.SpdyConnection(client=False).receive_data(bad)


# --------------------------------------------------------------------------- flow control


def test_send_window_is_enforced_once_peer_announces_flow_control():
    c, s = pair()
    c.initiate()  # SETTINGS INITIAL_WINDOW_SIZE=64KiB
    sid = c.open_stream([])
    pump(c, s)
    assert s.peer_flow_control
    assert s.send_window(sid) == spdy.DEFAULT_WINDOW
    s.send_data(sid, b"a" * spdy.DEFAULT_WINDOW)
    assert s.send_window(sid) == 0
    with pytest.raises(spdy.SpdyProtocolError):
        s.send_data(sid, b"b")
    assert sum(len(e.data) for e in pump(s, c)) == spdy.DEFAULT_WINDOW
    # Consuming half the window grants it back, per stream and for the session.
    c.acknowledge_received(sid, spdy.DEFAULT_WINDOW // 2)
    wire = c.data_to_send()
    assert wire == spdy.window_update_frame(0, 32768) + spdy.window_update_frame(sid, 32768)
    assert s.receive_data(wire) == [spdy.WindowUpdated(0, 32768), spdy.WindowUpdated(sid, 32768)]
    assert s.send_window(sid) == 32768


def test_small_consumption_does_not_send_window_updates():
    c, s = pair()
    sid = c.open_stream([])
    pump(c, s)
    s.send_data(sid, b"abc")
    pump(s, c)
    c.acknowledge_received(sid, 3)
    assert c.data_to_send() == b""


def test_peer_without_flow_control_is_not_throttled():
    """moby/spdystream (kubectl, kubelet) never sends WINDOW_UPDATE: do not stall on it."""
    c, s = pair()
    sid = c.open_stream([])
    pump(c, s)
    assert not s.peer_flow_control
    s.send_data(sid, b"z" * (spdy.DEFAULT_WINDOW * 3))
    assert sum(len(e.data) for e in pump(s, c)) == spdy.DEFAULT_WINDOW * 3


def test_flow_controlled_peer_overrunning_window_gets_reset():
    c, s = pair()
    c.initiate()
    sid = c.open_stream([])
    pump(c, s)
    events = s.receive_data(spdy.data_frame(sid, b"q" * spdy.DEFAULT_WINDOW) + spdy.data_frame(sid, b"!"))
    assert events[-1] == spdy.StreamReset(sid, spdy.RstStatus.FLOW_CONTROL_ERROR)
    assert s.data_to_send() == spdy.rst_stream_frame(sid, spdy.RstStatus.FLOW_CONTROL_ERROR)


def test_initial_window_setting_adjusts_open_streams():
    c, s = pair()
    sid = c.open_stream([])
    pump(c, s)
    s.receive_data(spdy.settings_frame({spdy.Setting.INITIAL_WINDOW_SIZE: 1000}))
    assert s.send_window(sid) == 1000
    s.receive_data(spdy.window_update_frame(sid, 500))
    assert s.send_window(sid) == 1500


def test_can_send_only_until_fin():
    c, s = pair()
    sid = c.open_stream([])
    assert c.can_send(sid)
    c.end_stream(sid)
    assert not c.can_send(sid) and c.send_window(sid) == 0
    with pytest.raises(spdy.SpdyProtocolError):
        c.send_data(sid, b"late")


def test_larger_receive_window_is_announced_per_stream_and_for_the_session():
    big = 1 << 20
    c, s = spdy.SpdyConnection(client=True, recv_window=big), spdy.SpdyConnection(client=False)
    c.initiate()
    wire = c.data_to_send()
    assert wire == (spdy.settings_frame({spdy.Setting.INITIAL_WINDOW_SIZE: big})
                    + spdy.window_update_frame(0, big - spdy.DEFAULT_WINDOW))
    s.receive_data(wire)
    sid = c.open_stream([])
    pump(c, s)
    assert s.send_window(sid) == big
    s.send_data(sid, b"x" * big)  # the whole window, on the stream and the session
    assert sum(len(e.data) for e in pump(s, c)) == big
    c.acknowledge_received(sid, big // 2)
    assert c.data_to_send() == spdy.window_update_frame(0, big // 2) + spdy.window_update_frame(sid, big // 2)


def test_streams_beyond_the_concurrency_limit_are_refused():
    c, s = spdy.SpdyConnection(client=True), spdy.SpdyConnection(client=False, max_concurrent_streams=2)
    first, second = c.open_stream([]), c.open_stream([])
    assert [type(e) for e in pump(c, s)] == [spdy.StreamOpened, spdy.StreamOpened]
    third = c.open_stream([])
    assert pump(c, s) == []
    assert s.data_to_send() == spdy.rst_stream_frame(third, spdy.RstStatus.REFUSED_STREAM)
    # Our own streams do not count; a peer stream that ends frees its slot.
    s.open_stream([])
    s.reset_stream(first)
    fourth = c.open_stream([])
    assert [type(e) for e in pump(c, s)] == [spdy.StreamOpened]
    assert s.peer_stream_count() == 2 and s.is_open(fourth) and s.is_open(second)
