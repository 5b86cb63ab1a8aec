"""The pull pipeline of ImageService with a fake registry client: parallel downloads bounded
by images.max_concurrent_downloads, unpack overlapped with the downloads (in layer order),
and a failure in any layer leaving nothing behind.  Real content store, snapshotter (native)
and unpacker; only the network is faked."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from moorage.core.errors import InvalidArgument, MoorageError, Unavailable
from moorage.core.store import Store
from moorage.images import oci
from moorage.images.registry import RepoName, ResolvedImage
from moorage.images.service import ImageService, ImageSettings
from moorage.images.unpack import DiffIDMismatch


def _layer(i: int, corrupt: bool = False) -> tuple[bytes, bytes]:
    """(tar, gzip blob) of a layer with one file; *corrupt* changes the tar after its diff_id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        data = f"layer {i}\n".encode() * 1000
        ti = tarfile.TarInfo(f"f{i}")
        ti.size, ti.mode = len(data), 0o644
        tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    shipped = tar.replace(b"layer", b"LAYER") if corrupt else tar
    return tar, gzip.compress(shipped, mtime=0)


class FakeClient:
    """Serves one image; records concurrency and the order of events."""

    def __init__(self, n: int, fail_download: int | None = None, fail_unpack: int | None = None) -> None:
        self.layers = [_layer(i, corrupt=i == fail_unpack) for i in range(n)]
        self.fail_download = fail_download
        self.active = 0
        self.max_active = 0
        self.events: list[tuple[str, int]] = []
        self.gate: asyncio.Event | None = None  # the last download waits on it when set
        diff_ids = [oci.sha256_digest(t) for t, _ in self.layers]
        self.config_bytes = oci.canonical_json({"architecture": "amd64", "os": "linux", "config": {},
                                                "rootfs": {"type": "layers", "diff_ids": diff_ids}})
        cfg = oci.Descriptor(oci.OCI_CONFIG, oci.sha256_digest(self.config_bytes), len(self.config_bytes))
        self.descs = tuple(oci.Descriptor(oci.OCI_LAYER_GZIP, oci.sha256_digest(b), len(b)) for _, b in self.layers)
        self.manifest = oci.Manifest(oci.OCI_MANIFEST, cfg, self.descs)
        self.manifest_bytes = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                                                  "config": cfg.to_json(),
                                                  "layers": [d.to_json() for d in self.descs]})

    async def resolve_image(self, ref: str, *, credentials: Any = None, read_config: Any = None) -> ResolvedImage:
        repo = RepoName("registry.test", "pipe/img")
        cfg_bytes = await read_config(repo, self.manifest.config)
        mdesc = oci.Descriptor(oci.OCI_MANIFEST, oci.sha256_digest(self.manifest_bytes), len(self.manifest_bytes))
        return ResolvedImage(repo=repo, reference="latest", root=mdesc, index=None, manifest_descriptor=mdesc,
                             manifest=self.manifest, manifest_bytes=self.manifest_bytes,
                             config=oci.parse_config(cfg_bytes), config_bytes=cfg_bytes,
                             root_bytes=self.manifest_bytes)

    async def read_blob(self, repo: Any, desc: Any, *, max_size: int, credentials: Any = None) -> bytes:
        assert desc.digest == self.manifest.config.digest
        return self.config_bytes

    async def fetch_blob(self, repo: Any, desc: Any, *, credentials: Any = None) -> AsyncIterator[bytes]:
        i = self.descs.index(desc)
        blob = self.layers[i][1]
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.events.append(("fetch", i))
        try:
            if i == len(self.layers) - 1 and self.gate is not None:
                # raises (failing the test) when no unpack began while this download was open
                await asyncio.wait_for(self.gate.wait(), 60)
            step = max(1, len(blob) // 8)
            for off in range(0, len(blob), step):
                await asyncio.sleep(0)  # let the other downloads run, as a socket would
                if i == self.fail_download and off >= step:
                    raise Unavailable(f"connection to registry.test lost in layer {i}")
                yield blob[off:off + step]
            if hashlib.sha256(blob).hexdigest() != desc.digest.split(":")[1]:
                raise AssertionError("fake served a blob not matching its descriptor")
        finally:
            self.active -= 1
            self.events.append(("fetched", i))


@pytest.fixture
def make_svc(tmp_path: Any) -> Iterator[Any]:
    stores: list[Store] = []

    def make(client: FakeClient, limit: int = 3) -> ImageService:
        root = str(tmp_path / "root")
        store = Store(root)
        stores.append(store)
        svc = ImageService(ImageSettings(root_dir=root, snapshotter="native", max_concurrent_downloads=limit,
                                         sync_snapshots=False), store)
        svc.client = client
        real_apply = svc._apply

        def apply(layer_digest: str, *a: Any) -> None:
            i = [d.digest for d in client.descs].index(layer_digest)
            client.events.append(("unpack", i))
            if client.gate is not None:
                loop.call_soon_threadsafe(client.gate.set)
            real_apply(layer_digest, *a)

        svc._apply = apply  # type: ignore[method-assign]
        loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        svc.loop_for_test = loop  # type: ignore[attr-defined]
        return svc

    yield make
    for s in stores:
        s.close()


def _run(svc: ImageService, coro: Any) -> Any:
    loop = svc.loop_for_test  # type: ignore[attr-defined]
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def _assert_nothing_left(svc: ImageService) -> None:
    assert svc.store.list_images() == []
    assert svc.store.list_snapshots() == []
    assert svc.content.list() == []
    assert os.listdir(svc.content.ingest_dir) == []


@pytest.mark.parametrize("n", [1, 2, 7])
def test_layers_unpack_in_order_and_files_are_there(make_svc: Any, n: int) -> None:
    client = FakeClient(n)
    svc = make_svc(client)
    rec = _run(svc, svc.pull("registry.test/pipe/img:latest"))
    assert [i for e, i in client.events if e == "unpack"] == list(range(n))
    assert rec.layers == [d.digest for d in client.descs]
    (mount,) = svc.snapshots.mounts(rec.chain_id)
    top = mount.source
    for i in range(n):  # native snapshots hold the full tree: every layer's file is in the top one
        with open(os.path.join(top, f"f{i}")) as f:
            assert f.read() == f"layer {i}\n" * 1000
    # an unpack never precedes its own layer's download end
    for i in range(n):
        assert client.events.index(("fetched", i)) < client.events.index(("unpack", i))


def test_unpack_overlaps_the_remaining_downloads(make_svc: Any) -> None:
    client = FakeClient(4)
    svc = make_svc(client, limit=4)

    async def go() -> Any:
        client.gate = asyncio.Event()
        return await svc.pull("registry.test/pipe/img:latest")

    _run(svc, go())
    assert client.events.index(("unpack", 0)) < client.events.index(("fetched", 3))


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_downloads_are_bounded_by_max_concurrent_downloads(make_svc: Any, limit: int) -> None:
    client = FakeClient(6)
    svc = make_svc(client, limit=limit)
    _run(svc, svc.pull("registry.test/pipe/img:latest"))
    assert client.max_active == limit
    # the slots are taken in layer order: the first layers are not starved by later ones
    assert [i for e, i in client.events if e == "fetch"] == list(range(6))


def test_zero_layers_is_invalid_and_leaves_nothing(make_svc: Any) -> None:
    client = FakeClient(0)
    svc = make_svc(client)
    with pytest.raises(InvalidArgument, match="has no layers"):
        _run(svc, svc.pull("registry.test/pipe/img:latest"))
    _assert_nothing_left(svc)


@pytest.mark.parametrize(("n", "k"), [(1, 0), (5, 0), (5, 2), (5, 4)])
@pytest.mark.parametrize("where", ["download", "unpack"])
def test_a_failure_in_layer_k_of_n_leaves_nothing(make_svc: Any, n: int, k: int, where: str) -> None:
    client = FakeClient(n, fail_download=k if where == "download" else None,
                        fail_unpack=k if where == "unpack" else None)
    svc = make_svc(client, limit=2)
    expected: type[MoorageError] = Unavailable if where == "download" else DiffIDMismatch
    with pytest.raises(expected, match=f"layer {k}" if where == "download" else "does not match the diff_id"):
        _run(svc, svc.pull("registry.test/pipe/img:latest"))
    _assert_nothing_left(svc)
    assert client.active == 0  # every download ended (the others were cancelled)
    if where == "unpack":
        assert [i for e, i in client.events if e == "unpack"] == list(range(k + 1))
