"""What the runtime needs from its neighbours, as Protocols.

The runtime never imports ``moorage.images`` or ``moorage.cni``: the composition
root (``cri/services.py``) hands it an image service and a pod network that
satisfy these, and unit tests hand it fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from moorage.core.idmap import UserNS
from moorage.core.network import Bandwidth, DNSConfig, PortMapping
from moorage.core.store import ImageRecord, Store


class LayerUsage(Protocol):
    @property
    def size(self) -> int: ...
    @property
    def inodes(self) -> int: ...


class ImageProvider(Protocol):
    """Local images: rootfs snapshots for containers and read-only image volumes."""

    @property
    def root(self) -> str: ...
    @property
    def store(self) -> Store: ...  # the CRI layer reads image records through it

    def get_local(self, ref: str) -> ImageRecord: ...
    #: ``userns``: id-map the rootfs into that user namespace (moorage/core/idmap.py).
    async def prepare_rootfs(self, key: str, image: ImageRecord, target: str, *,
                             userns: UserNS | None = None) -> None: ...
    async def release_rootfs(self, key: str, target: str) -> None: ...
    async def mount_image_volume(self, key: str, image: ImageRecord, target: str) -> None: ...
    async def unmount_image_volume(self, key: str, target: str) -> None: ...
    def container_usage(self, key: str) -> LayerUsage | None: ...


class NetworkAttachment(Protocol):
    @property
    def ips(self) -> list[str]: ...  # primary first


class PodNetwork(Protocol):
    """Pod network set-up (CNI)."""

    def status(self) -> tuple[bool, str, str]: ...  # (ready, reason, message)
    def config_errors(self) -> list[str]: ...
    async def setup(self, sandbox_id: str, netns_path: str, pod_namespace: str, pod_name: str,
                    pod_uid: str = "", port_mappings: Sequence[PortMapping] = (),
                    bandwidth: Bandwidth | None = None, dns: DNSConfig | None = None) -> NetworkAttachment: ...
    async def teardown(self, sandbox_id: str, netns_path: str | None = None) -> None: ...
    def cached_sandboxes(self) -> set[str]: ...
