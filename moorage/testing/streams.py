"""Streaming test helpers: the WebSocket protocol names and the exec sessions conmon left on the host."""

from __future__ import annotations

import json
import os
import socket

import websocket

from moorage.core.procs import cmdlines


class WS:
    """A Kubernetes channel session over websocket-client (binary, or the base64 text variant)."""

    def __init__(self, url: str, protocol: str = "v5.channel.k8s.io", timeout: float = 60) -> None:
        self.protocol = protocol
        self.b64 = ".base64." in protocol or protocol.startswith("base64.")
        self.ws = websocket.create_connection(url.replace("http", "ws", 1), subprotocols=[protocol], timeout=timeout)
        assert self.ws.getsubprotocol() == protocol
        self.data: dict[int, bytearray] = {}
        self.closed = False

    def send(self, channel: int, data: bytes) -> None:
        if self.b64:
            import base64

            self.ws.send(str(channel) + base64.b64encode(data).decode())
        else:
            self.ws.send_binary(bytes([channel]) + data)

    def close_stdin(self) -> None:
        assert self.protocol.startswith("v5.")
        self.ws.send_binary(bytes([255, 0]))

    def resize(self, width: int, height: int) -> None:
        self.send(4, json.dumps({"Width": width, "Height": height}).encode())

    def recv(self) -> tuple[int, bytes] | None:
        """Next (channel, data); None once the server closed the connection."""
        if self.closed:
            return None
        try:
            opcode, msg = self.ws.recv_data()
        except websocket.WebSocketConnectionClosedException:
            self.closed = True
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self.closed = True
            return None
        if self.b64:
            import base64

            text = msg.decode()
            channel, payload = int(text[0]), base64.b64decode(text[1:])
        else:
            channel, payload = msg[0], bytes(msg[1:])
        self.data.setdefault(channel, bytearray()).extend(payload)
        return channel, payload

    def read_until(self, channel: int, needle: bytes) -> bytes:
        while needle not in self.data.get(channel, b""):
            if self.recv() is None:
                raise AssertionError(f"closed before {needle!r} arrived on channel {channel}: {self.data}")
        return bytes(self.data[channel])

    def finish(self) -> dict[int, bytes]:
        try:
            while self.recv() is not None:
                pass
            self.ws.close()
        finally:
            self.ws.shutdown()  # closes the socket whatever state the close handshake left it in
        return {ch: bytes(v) for ch, v in self.data.items()}

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (a client that vanished)."""
        sock = self.ws.sock
        assert sock is not None, "the connection was already shut down"
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def exec_sessions_on_host(cid: str) -> list[int]:
    """Pids of exec-session conmons for container ``cid`` still running on the host."""
    out = []
    for pid, args in cmdlines():
        if args and os.path.basename(args[0]) == b"conmon" and b"--exec" in args and cid.encode() in args:
            out.append(pid)
    return out

