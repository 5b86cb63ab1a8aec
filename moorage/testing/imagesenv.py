"""Image-service test helpers over a real daemon: pulls, status, content and snapshot listings, a fault-injecting registry proxy."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import image_client
from moorage.testing.daemon import DaemonProcess
from moorage.testing.registry import FakeHTTPServer, FakeRequest, FakeResponse

#: ``hook(request, count)`` of a RegistryProxy: a response (or a coroutine giving one) to inject, None to forward.
ProxyHook = Callable[[FakeRequest, int], FakeResponse | Coroutine[Any, Any, FakeResponse | None] | None]


def pull(d: DaemonProcess, ref: str, auth: pb.AuthConfig | None = None, timeout: float = 120) -> str:
    req = pb.PullImageRequest(image=pb.ImageSpec(image=ref))
    if auth is not None:
        req.auth.CopyFrom(auth)
    r: pb.PullImageResponse = image_client(d).PullImage(req, timeout=timeout)
    return r.image_ref


def status(d: DaemonProcess, ref: str, verbose: bool = False) -> pb.ImageStatusResponse:
    r: pb.ImageStatusResponse = image_client(d).ImageStatus(
        pb.ImageStatusRequest(image=pb.ImageSpec(image=ref), verbose=verbose), timeout=30)
    return r


def list_images(d: DaemonProcess, ref: str = "") -> list[pb.Image]:
    req = pb.ListImagesRequest()
    if ref:
        req.filter.image.image = ref
    r: pb.ListImagesResponse = image_client(d).ListImages(req, timeout=30)
    return list(r.images)


def files_under(path: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        out += [os.path.join(dirpath, f) for f in filenames]
        out += [os.path.join(dirpath, x) for x in dirnames if os.path.islink(os.path.join(dirpath, x))]
    return sorted(out)


def content_files(d: DaemonProcess) -> list[str]:
    return files_under(os.path.join(d.root, "images", "content"))


def snapshot_entries(d: DaemonProcess) -> list[str]:
    snaps = os.path.join(d.root, "images", "snapshotter", "snapshots")
    return sorted(os.listdir(snaps)) if os.path.isdir(snaps) else []


class RegistryProxy:
    """A FakeHTTPServer in its own thread that forwards to a real registry.

    ``hook(req, count)`` may return a FakeResponse to inject a fault (``count`` is how
    many times this method+route was seen, starting at 1); otherwise the request is
    forwarded.  ``.requests`` records every request.
    """

    def __init__(self, upstream: str, hook: ProxyHook | None = None) -> None:
        self.upstream = upstream
        self.hook = hook
        self.counts: dict[tuple[str, str], int] = {}
        self.srv: FakeHTTPServer | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def host(self) -> str:
        assert self.srv is not None, "the proxy is not running (use it as a context manager)"
        return self.srv.host

    def blob_gets(self) -> dict[str, int]:
        return {route.rsplit("/", 1)[1]: n for (m, route), n in self.counts.items()
                if m == "GET" and "/blobs/" in route}

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            self._client = client
            async with FakeHTTPServer(self._handle) as srv:
                self.srv = srv
                self._ready.set()
                await self._stop.wait()

    async def _handle(self, req: FakeRequest) -> FakeResponse:
        key = (req.method, req.route)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.hook is not None:
            r = self.hook(req, self.counts[key])
            if asyncio.iscoroutine(r):
                r = await r
            if r is not None:
                return r
        headers = {k: v for k, v in req.headers.items() if k in ("accept", "range", "authorization")}
        up = await self._client.request(req.method, f"http://{self.upstream}{req.path}", headers=headers)
        out = {k: v for k, v in up.headers.items()
               if k.lower() in ("content-type", "docker-content-digest", "www-authenticate", "location",
                                "content-range", "docker-distribution-api-version")}
        if req.method == "HEAD" and "content-length" in up.headers:
            out["Content-Length"] = up.headers["content-length"]
        return FakeResponse(up.status_code, out, up.content)

    def __enter__(self) -> RegistryProxy:
        self._thread.start()
        assert self._ready.wait(30), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        # both are set before __enter__ saw the server ready
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

