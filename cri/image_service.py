"""CRI ImageService: translates protobuf to calls on ``images/`` objects and back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from moorage.core.store import ImageRecord
from moorage.cri import config as configmod
from moorage.cri.api import api_pb2 as pb
from moorage.images.registry import Credentials
from moorage.images.service import ImageService


class ImageServicer:
    def __init__(self, cfg: configmod.Config, images: ImageService) -> None:
        self.cfg = cfg
        self.images = images

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

    async def ListImages(self, request: pb.ListImagesRequest, context: grpc.aio.ServicerContext) -> pb.ListImagesResponse:
        ref = request.filter.image.image if request.HasField("filter") else ""
        return pb.ListImagesResponse(images=[self._image(r) for r in self.images.list(ref or None)])

    async def StreamImages(self, request: pb.StreamImagesRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamImagesResponse]:
        ref = request.filter.image.image if request.HasField("filter") else ""
        for r in self.images.list(ref or None):
            yield pb.StreamImagesResponse(images=[self._image(r)])  # the field is repeated: one per message

    async def ImageStatus(self, request: pb.ImageStatusRequest, context: grpc.aio.ServicerContext) -> pb.ImageStatusResponse:
        rec = self.images.status(request.image.image)
        if rec is None:
            return pb.ImageStatusResponse()  # the CRI's "not present": no image, no error
        info = {"info": self.images.verbose_info(rec)} if request.verbose else {}
        return pb.ImageStatusResponse(image=self._image(rec), info=info)

    async def PullImage(self, request: pb.PullImageRequest, context: grpc.aio.ServicerContext) -> pb.PullImageResponse:
        a = request.auth
        creds = Credentials(username=a.username, password=a.password, auth=a.auth, server_address=a.server_address,
                            identity_token=a.identity_token, registry_token=a.registry_token)
        rec = await self.images.pull(request.image.image, None if creds.empty else creds)
        return pb.PullImageResponse(image_ref=rec.id)

    async def RemoveImage(self, request: pb.RemoveImageRequest, context: grpc.aio.ServicerContext) -> pb.RemoveImageResponse:
        await self.images.remove(request.image.image)
        return pb.RemoveImageResponse()

    async def ImageFsInfo(self, request: pb.ImageFsInfoRequest, context: grpc.aio.ServicerContext) -> pb.ImageFsInfoResponse:
        now = time.time_ns()
        out = []
        for mountpoint, used, inodes in await self.images.fs_info():
            out.append(pb.FilesystemUsage(timestamp=now, fs_id=pb.FilesystemIdentifier(mountpoint=mountpoint),
                                          used_bytes=pb.UInt64Value(value=used),
                                          inodes_used=pb.UInt64Value(value=inodes)))
        return pb.ImageFsInfoResponse(image_filesystems=out[:1], container_filesystems=out[1:])
