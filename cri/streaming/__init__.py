"""moorage cri/streaming: exec / attach / port-forward over SPDY/3.1 and WebSocket.

Sans-I/O cores: ``spdy`` (framing, header compression, flow control), ``wsframe``
(RFC 6455 + Kubernetes channels); protocol logic: ``remotecommand``,
``portforward``; asyncio adapters: ``spdyio``, ``wsio``, ``server``, ``client``.
"""

from .backend import ByteQueue, InputStream, StreamingBackend, Writer
from .server import AttachRequest, ExecRequest, PortForwardRequest, StreamingServer

__all__ = [
    "AttachRequest", "ByteQueue", "ExecRequest", "InputStream", "PortForwardRequest",
    "StreamingBackend", "StreamingServer", "Writer",
]  # fmt: skip
