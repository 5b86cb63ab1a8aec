"""Image-service test helpers over a real daemon: pulls, status, content and snapshot listings, a fault-injecting registry proxy."""

from __future__ import annotations

import asyncio
import gzip
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from moorage.cri.api import api_pb2 as pb
from moorage.images import oci
from moorage.images.platform import host_platform
from moorage.testing.cri import image_client
from moorage.testing.daemon import DaemonProcess
from moorage.testing.registry import FakeHTTPServer, FakeRequest, FakeResponse, TestRegistry

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


def push_layers(reg: TestRegistry, name: str, tars: list[bytes], *, compress: bool = True) -> str:
    """Push an image made of the given layer tars (any bytes: they may be hostile) to ``reg`` as
    ``test/<name>:latest``, with a config whose diff_ids match them; returns the reference."""
    plat = host_platform()
    blobs = [gzip.compress(t, mtime=0) if compress else t for t in tars]
    media = oci.OCI_LAYER_GZIP if compress else oci.OCI_LAYER
    config = oci.canonical_json({
        "architecture": plat.architecture, "os": "linux", "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(t) for t in tars]}})
    manifest = oci.canonical_json({
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": media, "digest": oci.sha256_digest(b), "size": len(b)} for b in blobs]})
    repo = f"{reg.host}/test/{name}"

    async def go() -> None:
        async with reg.client(retries=2, backoff=0.1) as c:
            for blob in [config, *blobs]:
                await c.push_blob(repo, blob, credentials=reg.credentials())
            await c.push_manifest(repo, "latest", manifest, oci.OCI_MANIFEST, credentials=reg.credentials())

    asyncio.run(go())
    return f"{repo}:latest"


class VersionProbe:
    """Calls Version on ``d`` in a loop from a thread, each with a ``deadline`` (the issue's
    responsiveness bar), recording the longest call and any failure, until stopped."""

    def __init__(self, d: DaemonProcess, deadline: float = 2.0) -> None:
        self._d = d
        self._deadline = deadline
        self._stop = threading.Event()
        self.longest = 0.0
        self.calls = 0
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stub = self._d.runtime
        assert stub is not None
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                stub.Version(pb.VersionRequest(), timeout=self._deadline)
            except Exception as e:  # any failure is what the probe reports
                self.failures.append(f"{type(e).__name__}: {str(e)[:200]}")
            self.longest = max(self.longest, time.monotonic() - start)
            self.calls += 1
            self._stop.wait(0.02)

    def __enter__(self) -> VersionProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process has had."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


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

