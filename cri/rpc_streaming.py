"""RuntimeService streaming RPCs (Exec, Attach, PortForward): URLs on the streaming server."""

from __future__ import annotations


class StreamingRPCs:
    """Mixed into RuntimeServicer; ``self.rt`` is the Runtime, ``self.streaming`` the server."""
