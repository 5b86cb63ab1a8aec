"""Crafted images for the hostile-input suite: valid-by-digest documents with bad content.

The real test registry (docker-registry) stores anything whose digest matches, and does
not read image configs, so hostile configs, nested and empty indexes, wrong media types
and deeply nested JSON blobs are pushed to it as they are.  What it refuses to store
(content that does not hash to its digest, a body of another length than its descriptor
says, documents its own parser rejects) is served by a :class:`~moorage.testing.imagesenv.RegistryProxy`
in front of it instead.

:class:`ImageForge` pushes a small real image (the busybox test image's layers) with a
config of the caller's choosing, so a good pull of the same reference can follow a bad one.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sqlite3
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from moorage.images import oci
from moorage.images.oci import Descriptor
from moorage.images.registry import RegistryClient
from moorage.testing.daemon import DaemonProcess
from moorage.testing.testimages import LayoutInfo, read_layout_blob

T = TypeVar("T")

#: The store tables that must be empty when no image is present.
IMAGE_TABLES = ("images", "image_refs", "snapshots", "leases")


@dataclass
class BaseImage:
    """One platform's manifest of a test image, split into the parts a forge reuses."""

    config: dict[str, Any]
    config_digest: str
    layers: list[tuple[Descriptor, bytes]]


def base_image(layout: LayoutInfo, platform: str = "linux/amd64") -> BaseImage:
    m = next(x for x in layout.manifests if x.platform == platform)
    manifest = oci.parse_manifest(read_layout_blob(layout.path, m.digest), m.media_type)
    config = json.loads(read_layout_blob(layout.path, manifest.config.digest))
    layers = [(d, read_layout_blob(layout.path, d.digest)) for d in manifest.layers]
    return BaseImage(config, manifest.config.digest, layers)


def nested_json(depth: int) -> bytes:
    """A JSON object whose "config" is *depth* arrays deep."""
    return b'{"config": ' + b"[" * depth + b"]" * depth + b"}"


class ImageForge:
    """Pushes crafted images and indexes to a registry (``host`` as "127.0.0.1:PORT")."""

    def __init__(self, host: str, base: BaseImage) -> None:
        self.host = host
        self.base = base

    def _run(self, coro: Awaitable[T]) -> T:
        async def go() -> T:
            return await coro
        return asyncio.run(go())

    def config(self, **changes: Any) -> dict[str, Any]:
        """The base config with keys of its ``config`` object replaced (None removes one)."""
        doc = copy.deepcopy(self.base.config)
        for k, v in changes.items():
            if v is None:
                doc["config"].pop(k, None)
            else:
                doc["config"][k] = v
        return doc

    def image(self, repo: str, tag: str | None, config: dict[str, Any] | bytes | None = None, *,
              layer_media_type: str | None = None, config_media_type: str = oci.OCI_CONFIG) -> Descriptor:
        """Push the base layers with *config* (default: the base's); tag the manifest if *tag*."""
        raw = config if isinstance(config, bytes) else json.dumps(config or self.base.config).encode()

        async def go() -> Descriptor:
            async with RegistryClient(trust_env=False, retries=1, backoff=0.05) as c:
                name = f"{self.host}/{repo}"
                cdesc = await c.push_blob(name, raw, config_media_type)
                layers = []
                for d, data in self.base.layers:
                    await c.push_blob(name, data, d.media_type)
                    layers.append(Descriptor(layer_media_type or d.media_type, d.digest, d.size))
                doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                       "config": Descriptor(config_media_type, cdesc.digest, cdesc.size).to_json(),
                       "layers": [d.to_json() for d in layers]}
                data = json.dumps(doc).encode()
                desc = await c.push_manifest(name, oci.sha256_digest(data), data, oci.OCI_MANIFEST)
                if tag:
                    await c.push_manifest(name, tag, data, oci.OCI_MANIFEST)
                return desc
        return self._run(go())

    def index(self, repo: str, tag: str | None, entries: list[dict[str, Any]]) -> Descriptor:
        """Push an OCI index of *entries* (descriptor JSON objects), tagged if *tag*."""
        data = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": entries}).encode()

        async def go() -> Descriptor:
            async with RegistryClient(trust_env=False, retries=1, backoff=0.05) as c:
                name = f"{self.host}/{repo}"
                desc = await c.push_manifest(name, oci.sha256_digest(data), data, oci.OCI_INDEX)
                if tag:
                    await c.push_manifest(name, tag, data, oci.OCI_INDEX)
                return desc
        return self._run(go())


def entry(desc: Descriptor, platform: str | None = "linux/amd64", **extra: Any) -> dict[str, Any]:
    """An index entry for *desc* with a platform "os/arch[/variant]" (None: no platform)."""
    d = desc.to_json()
    if platform is not None:
        os_, arch, *variant = platform.split("/")
        d["platform"] = {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}
    d.update(extra)
    return d


def image_rows(d: DaemonProcess) -> dict[str, int]:
    """Rows of the image tables in the daemon's store (read-only; the daemon keeps writing)."""
    con = sqlite3.connect(f"file:{os.path.join(d.root, 'meta.db')}?mode=ro", uri=True, timeout=30)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in IMAGE_TABLES}
    finally:
        con.close()
