"""Composition root: builds the domain objects and the CRI servicers over them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cri.image_service import ImageServicer
from cri.runtime_service import RuntimeServicer

if TYPE_CHECKING:
    from cri.server import Daemon


def build_services(daemon: "Daemon") -> tuple[object, object, list]:
    """Returns (runtime servicer, image servicer, components to start/stop in order)."""
    components: list = []
    runtime_svc = RuntimeServicer(daemon.cfg)
    image_svc = ImageServicer(daemon.cfg)
    return runtime_svc, image_svc, components
