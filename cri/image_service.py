"""CRI ImageService: translates protobuf to calls on ``images/`` objects and back."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from typing import TypeAlias

import grpc

from moorage.core.errors import InvalidArgument
from moorage.core.store import ImageRecord
from moorage.cri import validate
from moorage.cri.api import api_pb2 as pb
from moorage.cri.batches import Batching
from moorage.cri.encoded import Encoded, field
from moorage.images.credentials import Credentials
from moorage.images.service import ImageService

Ctx: TypeAlias = grpc.aio.ServicerContext  # Any to mypy: grpc ships no stubs
#: ImageStatus answers kept per reference (any string a client sends): bounded.
STATUS_CACHE_MAX = 1024


log = logging.getLogger("moorage.images")


class ImageServicer:
    def __init__(self, images: ImageService, batching: Batching | None = None,
                 handlers: Collection[str] = ()) -> None:
        self.images = images
        self.batching = batching or Batching()
        #: Configured runtime handlers: a pull may name one (``ImageSpec.runtime_handler``).
        self.handlers = frozenset(handlers)
        # Ready-to-send answers while the image store and the pins stay the same (the kubelet asks
        # for every pod's images and lists them all often; they change only on pull/remove/GC).
        self._version: object = None
        self._list: Encoded | None = None
        self._statuses: dict[str, Encoded] = {}

    def _cached(self) -> None:
        """Forget the ready answers if images or pins changed since they were made."""
        version = self.images.view_version()
        if version != self._version:
            self._version, self._list, self._statuses = version, None, {}

    @staticmethod
    def _image(rec: ImageRecord) -> pb.Image:
        img = pb.Image(id=rec.id, repo_tags=rec.repo_tags, repo_digests=rec.repo_digests, size=rec.size,
                       spec=pb.ImageSpec(image=rec.id), pinned=rec.pinned)
        user = (rec.config.get("config") or {}).get("User", "") if isinstance(rec.config, dict) else ""
        name = user.split(":", 1)[0]
        if name.isdigit():
            img.uid.value = int(name)
        elif name:
            img.username = name
        return img

    def _images(self, f: pb.ImageFilter | None) -> list[pb.Image]:
        """What ListImages and StreamImages answer for a filter (an image reference, or all)."""
        ref = f.image.image if f is not None else ""
        validate.image_ref(ref, "filter.image.image")
        return [self._image(r) for r in self.images.list(ref or None)]

    async def ListImages(self, request: pb.ListImagesRequest, context: Ctx) -> pb.ListImagesResponse | Encoded:
        if request.HasField("filter") and request.filter.image.image:
            return pb.ListImagesResponse(images=self._images(request.filter))
        self._cached()
        if self._list is None:  # ListImagesResponse: images = 1
            self._list = Encoded(b"".join(field(1, i.SerializeToString()) for i in self._images(None)))
        return self._list

    async def StreamImages(self, request: pb.StreamImagesRequest, context: Ctx) -> AsyncIterator[pb.StreamImagesResponse]:
        for batch in self.batching.split(self._images(request.filter if request.HasField("filter") else None)):
            yield pb.StreamImagesResponse(images=batch)

    async def ImageStatus(self, request: pb.ImageStatusRequest, context: Ctx) -> pb.ImageStatusResponse | Encoded:
        ref = request.image.image
        validate.image_ref(ref, "image.image")
        if not request.verbose:
            self._cached()
            hit = self._statuses.get(ref)
            if hit is None:
                rec = self.images.status(ref)  # ImageStatusResponse: image = 1; none: "not present"
                hit = Encoded(field(1, self._image(rec).SerializeToString()) if rec is not None else b"")
                if len(self._statuses) >= STATUS_CACHE_MAX:
                    self._statuses.clear()
                self._statuses[ref] = hit
            return hit
        rec = self.images.status(ref)
        if rec is None:
            return pb.ImageStatusResponse()  # the CRI's "not present": no image, no error
        info = {"info": self.images.verbose_info(rec)} if request.verbose else {}
        return pb.ImageStatusResponse(image=self._image(rec), info=info)

    async def PullImage(self, request: pb.PullImageRequest, context: Ctx) -> pb.PullImageResponse:
        # A handler has no snapshotter or platform of its own in moorage, so a known one pulls as
        # usual; an unknown one is refused as RunPodSandbox refuses it.
        handler = request.image.runtime_handler
        validate.image_ref(request.image.image, "image.image")
        validate.runtime_handler(handler, "image.runtime_handler")
        if handler and self.handlers and handler not in self.handlers:
            raise InvalidArgument(f"unknown runtime handler {handler!r} for the pull of {request.image.image!r}; "
                                  f"configured handlers: {', '.join(sorted(self.handlers))}")
        if request.HasField("sandbox_config"):
            # Only for the log: the pod the kubelet pulls for (the image store is node-wide).
            md = request.sandbox_config.metadata
            log.info("pulling image for pod", extra={"fields": {"image": request.image.image, "pod": md.name,
                                                                "namespace": md.namespace, "handler": handler}})
        a = request.auth
        creds = Credentials(username=a.username, password=a.password, auth=a.auth, server_address=a.server_address,
                            identity_token=a.identity_token, registry_token=a.registry_token)
        rec = await self.images.pull(request.image.image, None if creds.empty else creds)
        return pb.PullImageResponse(image_ref=rec.id)

    async def RemoveImage(self, request: pb.RemoveImageRequest, context: Ctx) -> pb.RemoveImageResponse:
        validate.image_ref(request.image.image, "image.image")
        await self.images.remove(request.image.image)
        return pb.RemoveImageResponse()

    async def ImageFsInfo(self, request: pb.ImageFsInfoRequest, context: Ctx) -> pb.ImageFsInfoResponse:
        now = time.time_ns()
        out = []
        # (the annotation in images.service names its own ``list`` method: it reaches mypy as no type)
        rows: Sequence[tuple[str, int, int]] = await self.images.fs_info()
        for mountpoint, used, inodes in rows:
            out.append(pb.FilesystemUsage(timestamp=now, fs_id=pb.FilesystemIdentifier(mountpoint=mountpoint),
                                          used_bytes=pb.UInt64Value(value=used),
                                          inodes_used=pb.UInt64Value(value=inodes)))
        return pb.ImageFsInfoResponse(image_filesystems=out[:1], container_filesystems=out[1:])
