"""WebSocket framing (RFC 6455 examples) and the Kubernetes channel protocols."""

from __future__ import annotations

import struct

import pytest

from moorage.cri.streaming import wsframe as ws


def H(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


MASK = H("37fa213d")


def test_accept_key_rfc_example():
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_response_names_the_subprotocol():
    resp = ws.handshake_response("dGhlIHNhbXBsZSBub25jZQ==", "v5.channel.k8s.io").decode()
    assert resp.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in resp
    assert "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n" in resp and resp.endswith("\r\n\r\n")
    assert "Sec-WebSocket-Protocol" not in ws.handshake_response("x", "").decode()


@pytest.mark.parametrize(
    "opcode, payload, mask, expected",
    [
        (ws.Opcode.TEXT, b"Hello", None, "81 05 48656c6c6f"),  # RFC 6455 5.7
        (ws.Opcode.TEXT, b"Hello", MASK, "81 85 37fa213d 7f9f4d5158"),
        (ws.Opcode.PING, b"Hello", None, "89 05 48656c6c6f"),
        (ws.Opcode.BINARY, b"\0" * 256, None, "82 7e 0100" + "00" * 256),
        (ws.Opcode.BINARY, b"\0" * 65536, None, "82 7f 0000000000010000" + "00" * 65536),
    ],
)
def test_encode_frame_rfc_vectors(opcode, payload, mask, expected):
    assert ws.encode_frame(opcode, payload, mask=mask) == H(expected)


def test_server_reads_masked_text_and_answers_ping():
    conn = ws.WebSocketConnection(server=True)
    assert conn.receive_data(H("81 85 37fa213d 7f9f4d5158")) == [ws.MessageReceived(b"Hello", text=True)]
    assert conn.receive_data(ws.encode_frame(ws.Opcode.PING, b"Hello", mask=MASK)) == []
    assert conn.data_to_send() == H("8a 05 48656c6c6f")  # unmasked pong, same payload


def test_fragmented_message_rfc_example_and_interleaved_control():
    client = ws.WebSocketConnection(server=False)
    wire = H("01 03 48656c") + H("89 00") + H("80 02 6c6f")
    events = []
    for i in range(len(wire)):  # byte by byte
        events += client.receive_data(wire[i : i + 1])
    assert events == [ws.MessageReceived(b"Hello", text=True)]
    assert client.data_to_send()[:2] == H("8a 80")  # client pong is masked


def test_server_rejects_unmasked_frames_with_protocol_error_close():
    conn = ws.WebSocketConnection(server=True)
    with pytest.raises(ws.WebSocketError):
        conn.receive_data(H("81 05 48656c6c6f"))
    out = conn.data_to_send()
    assert out[0] == 0x88 and out[2:4] == H("03ea") and out[4:] == b"client frames must be masked, server frames must not be"


@pytest.mark.parametrize(
    "frame",
    [
        ws.encode_frame(ws.Opcode.BINARY, b"x", mask=MASK)[:0] + bytes([0xC2, 0x81]) + MASK + b"x",  # RSV1
        ws.encode_frame(ws.Opcode.PING, b"p" * 126, mask=MASK),  # control frame too long
        ws.encode_frame(ws.Opcode.PING, b"", fin=False, mask=MASK),  # fragmented control frame
        ws.encode_frame(ws.Opcode.CONTINUATION, b"x", mask=MASK),  # continuation without start
        ws.encode_frame(0x3, b"x", mask=MASK),  # reserved opcode
    ],
)
def test_protocol_violations(frame):
    with pytest.raises(ws.WebSocketError):
        ws.WebSocketConnection(server=True).receive_data(frame)


def test_message_size_is_bounded():
    conn = ws.WebSocketConnection(server=True, max_message=10)
    with pytest.raises(ws.WebSocketError) as e:
        conn.receive_data(ws.encode_frame(ws.Opcode.BINARY, b"x" * 11, mask=MASK))
    assert e.value.code == ws.CloseCode.TOO_BIG


def test_close_handshake():
    conn = ws.WebSocketConnection(server=True)
    events = conn.receive_data(ws.encode_frame(ws.Opcode.CLOSE, struct.pack(">H", 1000) + b"bye", mask=MASK))
    assert events == [ws.CloseReceived(1000, "bye")]
    assert conn.data_to_send() == H("88 02 03e8")
    with pytest.raises(ws.WebSocketError):
        conn.send_message(b"late")
    conn2 = ws.WebSocketConnection(server=True)
    conn2.close(1011, "oops")
    assert conn2.data_to_send() == H("88 06 03f3") + b"oops"


def test_send_message_binary_and_text():
    conn = ws.WebSocketConnection(server=True)
    conn.send_message(b"\x01hi")
    conn.send_message("1aGk=")
    assert conn.data_to_send() == H("82 03 016869") + H("81 05") + b"1aGk="


# --------------------------------------------------------------------------- k8s channels


def test_binary_channel_codec():
    codec = ws.ChannelCodec("v4.channel.k8s.io")
    assert codec.encode(1, b"foo\n") == b"\x01foo\n"
    assert codec.decode(b"\x00foo\n") == ws.ChannelData(0, b"foo\n")
    assert codec.decode(b"") is None
    assert codec.v4_status and not codec.base64 and not codec.close_signal
    # Without v5 the close signal is just data for a channel nobody reads.
    assert codec.decode(b"\xff\x00") == ws.ChannelData(255, b"\x00")


@pytest.mark.parametrize("proto", ["base64.channel.k8s.io", "v4.base64.channel.k8s.io", "v5.base64.channel.k8s.io"])
def test_base64_channel_codec(proto):
    codec = ws.ChannelCodec(proto)
    assert codec.encode(1, b"\n") == "1Cg=="
    assert codec.encode(2, b"foo\n") == "2Zm9vCg=="
    assert codec.decode(b"0Zm9vCg==") == ws.ChannelData(0, b"foo\n")
    with pytest.raises(ws.WebSocketError):
        codec.decode(b"0***")


def test_v5_close_signal():
    codec = ws.ChannelCodec("v5.channel.k8s.io")
    assert codec.close_signal and codec.v4_status
    assert codec.encode_close(0) == b"\xff\x00"
    assert codec.decode(b"\xff\x00") == ws.ChannelClosed(0)
    with pytest.raises(ws.WebSocketError):
        codec.decode(b"\xff\x00\x01")


def test_old_protocols_use_text_status():
    for proto in ("channel.k8s.io", "v2.channel.k8s.io", "v3.base64.channel.k8s.io"):
        assert not ws.ChannelCodec(proto).v4_status


def test_subprotocol_negotiation_follows_client_preference():
    supported = ws.REMOTECOMMAND_PROTOCOLS
    assert ws.negotiate_subprotocol(["v4.channel.k8s.io", "v5.channel.k8s.io"], supported) == "v4.channel.k8s.io"
    assert ws.negotiate_subprotocol(["x", "base64.channel.k8s.io"], supported) == "base64.channel.k8s.io"
    assert ws.negotiate_subprotocol([], supported) == ""
    assert ws.negotiate_subprotocol(["nope"], supported) is None
    assert ws.negotiate_subprotocol(["v4.portforward.k8s.io"], ws.PORTFORWARD_PROTOCOLS) == "v4.portforward.k8s.io"


def test_port_prefix_is_uint16_little_endian():
    assert ws.encode_port(8080) == b"\x90\x1f"
    assert ws.encode_port(1) == b"\x01\x00"
