"""What the runtime needs from its neighbours, as Protocols.

The runtime never imports ``moorage.images`` or ``moorage.cni``: the composition
root (``cri/services.py``) hands it an image service and a pod network that
satisfy these, and unit tests hand it fakes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from moorage.core.idmap import UserNS
from moorage.core.network import Bandwidth, DNSConfig, PortMapping
from moorage.core.store import ImageRecord, Store
from moorage.runtime.adjust import ContainerAdjustment
from moorage.runtime.model import LinuxContainerResources
from moorage.runtime.records import Container, Sandbox


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


class LifecycleHooks(Protocol):
    """Pod and container lifecycle hooks (NRI, moorage/nri): the runtime calls them at each step.

    A hook that raises fails the CRI call it runs in (before anything is visible for the
    creating ones, which then roll back); the notification-only ones never raise.
    ``create_container`` gets the spec as built from the CRI config and returns what to
    change (None: nothing); ``update_container`` returns the resources to apply.
    """

    def creating(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held from a create's hook until its object is visible: a plugin's synchronization
        waits for it, so no pod or container is missed by a plugin that registers meanwhile."""
        ...
    async def run_pod_sandbox(self, sb: Sandbox) -> None: ...
    async def stop_pod_sandbox(self, sb: Sandbox) -> None: ...
    async def remove_pod_sandbox(self, sb: Sandbox) -> None: ...
    async def update_pod_sandbox(self, sb: Sandbox, overhead: LinuxContainerResources | None,
                                 resources: LinuxContainerResources | None) -> None: ...
    async def post_update_pod_sandbox(self, sb: Sandbox) -> None: ...
    async def create_container(self, sb: Sandbox, ctr: Container, spec: dict) -> ContainerAdjustment | None: ...
    async def post_create_container(self, sb: Sandbox, ctr: Container) -> None: ...
    async def start_container(self, sb: Sandbox, ctr: Container) -> None: ...
    async def post_start_container(self, sb: Sandbox, ctr: Container) -> None: ...
    async def update_container(self, sb: Sandbox, ctr: Container,
                               res: LinuxContainerResources) -> LinuxContainerResources: ...
    async def post_update_container(self, sb: Sandbox, ctr: Container) -> None: ...
    async def stop_container(self, sb: Sandbox, ctr: Container) -> None: ...
    async def remove_container(self, sb: Sandbox, ctr: Container) -> None: ...


class NoHooks:
    """NRI off: every hook does nothing."""

    @contextlib.asynccontextmanager
    async def creating(self) -> AsyncIterator[None]:
        yield

    async def run_pod_sandbox(self, sb: Sandbox) -> None:
        return None

    async def stop_pod_sandbox(self, sb: Sandbox) -> None:
        return None

    async def remove_pod_sandbox(self, sb: Sandbox) -> None:
        return None

    async def update_pod_sandbox(self, sb: Sandbox, overhead: LinuxContainerResources | None,
                                 resources: LinuxContainerResources | None) -> None:
        return None

    async def post_update_pod_sandbox(self, sb: Sandbox) -> None:
        return None

    async def create_container(self, sb: Sandbox, ctr: Container, spec: dict) -> ContainerAdjustment | None:
        return None

    async def post_create_container(self, sb: Sandbox, ctr: Container) -> None:
        return None

    async def start_container(self, sb: Sandbox, ctr: Container) -> None:
        return None

    async def post_start_container(self, sb: Sandbox, ctr: Container) -> None:
        return None

    async def update_container(self, sb: Sandbox, ctr: Container,
                               res: LinuxContainerResources) -> LinuxContainerResources:
        return res

    async def post_update_container(self, sb: Sandbox, ctr: Container) -> None:
        return None

    async def stop_container(self, sb: Sandbox, ctr: Container) -> None:
        return None

    async def remove_container(self, sb: Sandbox, ctr: Container) -> None:
        return None
