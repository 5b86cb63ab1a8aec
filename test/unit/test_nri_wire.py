"""NRI's wire: ttrpc frames, the multiplexer, and the asyncio endpoint over a real socketpair."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moorage.nri import mux, ttrpc
from moorage.nri.transport import UNKNOWN, ConnectionLost, Endpoint, Handler, RPCError


def test_ttrpc_frame_layout_is_length_stream_type_flags() -> None:
    raw = ttrpc.encode(ttrpc.Frame(stream_id=3, type=ttrpc.TYPE_REQUEST, flags=0, payload=b"abc"))
    assert raw == b"\x00\x00\x00\x03" + b"\x00\x00\x00\x03" + b"\x01" + b"\x00" + b"abc"


def test_ttrpc_decoder_zero_one_and_many_frames() -> None:
    dec = ttrpc.Decoder()
    assert dec.feed(b"") == []
    frames = [ttrpc.Frame(i * 2 + 1, ttrpc.TYPE_RESPONSE, 0, bytes([i]) * i) for i in range(5)]
    assert dec.feed(ttrpc.encode(frames[0])) == [frames[0]]  # an empty payload
    assert dec.feed(b"".join(ttrpc.encode(f) for f in frames[1:])) == frames[1:]
    assert dec.pending == 0


@given(st.lists(st.binary(max_size=64), max_size=6), st.lists(st.integers(1, 7), min_size=1, max_size=20))
def test_ttrpc_decoder_reassembles_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    frames = [ttrpc.Frame(2 * i + 1, ttrpc.TYPE_REQUEST, 0, p) for i, p in enumerate(payloads)]
    data = b"".join(ttrpc.encode(f) for f in frames)
    dec, out, pos, i = ttrpc.Decoder(), [], 0, 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        out += dec.feed(data[pos:pos + n])
        pos, i = pos + n, i + 1
    assert out == frames


def test_ttrpc_refuses_oversized_and_unknown_frames() -> None:
    with pytest.raises(ttrpc.FramingError, match="exceeds"):
        ttrpc.encode(ttrpc.Frame(1, ttrpc.TYPE_REQUEST, 0, b"x" * (ttrpc.MAX_PAYLOAD + 1)))
    with pytest.raises(ttrpc.FramingError, match="over the"):
        ttrpc.Decoder().feed(ttrpc.HEADER.pack(ttrpc.MAX_PAYLOAD + 1, 1, 1, 0))
    with pytest.raises(ttrpc.FramingError, match="unknown ttrpc message type 9"):
        ttrpc.Decoder().feed(ttrpc.HEADER.pack(0, 1, 9, 0))


def test_client_stream_ids_are_odd_and_rising() -> None:
    ids = ttrpc.StreamIds()
    assert [ids.next() for _ in range(4)] == [1, 3, 5, 7]


def test_mux_chunk_layout_and_reassembly() -> None:
    assert mux.encode(2, b"hi") == b"\x00\x00\x00\x02\x00\x00\x00\x02hi"
    with pytest.raises(mux.MuxError, match="reserved"):
        mux.encode(0, b"x")
    dec = mux.Decoder()
    data = mux.encode(1, b"one") + mux.encode(2, b"") + mux.encode(1, b"three")
    assert dec.feed(data[:5]) == []
    assert dec.feed(data[5:]) == [(1, b"one"), (2, b""), (1, b"three")]


def test_mux_cuts_large_data_as_nri_does() -> None:
    big = b"z" * (mux.MAX_CHUNK + 10)
    pieces = mux.Decoder().feed(mux.encode(1, big))
    assert [len(p) for _, p in pieces] == [mux.MAX_CHUNK, 10]
    with pytest.raises(mux.MuxError, match="exceeds"):
        mux.Decoder().feed(mux.HEADER.pack(1, mux.MAX_CHUNK + 1))


async def _pair(handler_a: Handler | None = None, handler_b: Handler | None = None) -> tuple[Endpoint, Endpoint]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_unix_connection(sock=a)
    rb, wb = await asyncio.open_unix_connection(sock=b)
    # a is the runtime (client on 1, server on 2); b is the plugin (the reverse)
    ea = Endpoint(ra, wa, client_conn=1, server_conn=2, handler=handler_a)
    eb = Endpoint(rb, wb, client_conn=2, server_conn=1, handler=handler_b)
    return ea, eb


def test_endpoint_calls_both_ways_answers_errors_and_times_out() -> None:
    async def plugin_side(service: str, method: str, payload: bytes) -> bytes:
        if method == "Fail":
            raise RPCError(UNKNOWN, "induced")
        if method == "Hang":
            await asyncio.Event().wait()
        if method == "Boom":
            raise ValueError("bug")
        return service.encode() + b"/" + method.encode() + b":" + payload * 5000  # several KiB: many chunks

    async def runtime_side(service: str, method: str, payload: bytes) -> bytes:
        return b"registered " + payload

    async def main() -> None:
        rt, pl = await _pair(runtime_side, plugin_side)
        tasks = [asyncio.ensure_future(rt.run()), asyncio.ensure_future(pl.run())]
        answers = await asyncio.gather(*(rt.call("svc", f"M{i}", b"x", 5) for i in range(3)))
        assert [a[:9] for a in answers] == [b"svc/M0:xx", b"svc/M1:xx", b"svc/M2:xx"]
        assert len(answers[0]) == len(b"svc/M0:") + 5000
        assert await pl.call("rt", "Register", b"p", 5) == b"registered p"
        with pytest.raises(RPCError, match="induced"):
            await rt.call("svc", "Fail", b"", 5)
        with pytest.raises(RPCError, match="bug"):
            await rt.call("svc", "Boom", b"", 5)
        with pytest.raises(TimeoutError):
            await rt.call("svc", "Hang", b"", 0.2)
        hanging = asyncio.ensure_future(rt.call("svc", "Hang", b"", 30))
        await asyncio.sleep(0.05)
        pl.close("plugin went away")
        with pytest.raises(ConnectionLost):
            await hanging
        await asyncio.gather(*tasks)
        assert rt.closed and rt.close_reason == "connection closed by peer"
        with pytest.raises(ConnectionLost):
            await rt.call("svc", "M", b"", 1)

    asyncio.run(main())


def test_endpoint_closes_on_garbage() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_unix_connection(sock=a)
        ep = Endpoint(ra, wa, client_conn=1, server_conn=2)
        b.sendall(mux.encode(2, ttrpc.HEADER.pack(0, 1, 7, 0)))
        await ep.run()
        assert ep.closed and "unknown ttrpc message type 7" in ep.close_reason
        b.close()

    asyncio.run(main())
