"""RuntimeService stats and metrics RPCs."""

from __future__ import annotations


class StatsRPCs:
    """Mixed into RuntimeServicer; ``self.rt`` is the Runtime, ``self.stats`` the stats collector."""
