"""CRI ImageService: translates protobuf to calls on ``images/`` objects."""

from __future__ import annotations

from cri import config as configmod


class ImageServicer:
    def __init__(self, cfg: configmod.Config) -> None:
        self.cfg = cfg
