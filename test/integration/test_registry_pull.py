"""Registry client against a real docker-registry (distribution 2.8) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from moorage.core.errors import InvalidArgument, NotFound
from moorage.images import oci
from moorage.images.oci import Descriptor, Platform
from moorage.images.platform import host_platform


def run(coro):
    return asyncio.run(coro)


def test_resolve_tags_and_digest(registry):
    img = registry.images["busybox"]

    async def go():
        async with registry.client() as c:
            descs = [await c.resolve(r) for r in img.refs]
            by_digest = await c.resolve(img.digest_ref)
            return descs, by_digest

    descs, by_digest = run(go())
    assert len(descs) == 3
    for d in descs:
        assert d.digest == img.digest
        assert d.media_type == oci.OCI_MANIFEST
    assert by_digest.digest == img.digest and by_digest.size == descs[0].size


def test_fetch_manifest_config_and_layers(registry):
    img = registry.images["busybox"]

    async def go():
        async with registry.client() as c:
            resolved = await c.resolve_image(img.ref)
            layers = []
            for l in resolved.manifest.layers:
                h = hashlib.sha256()
                n = 0
                async for chunk in c.fetch_blob(resolved.repo, l):
                    h.update(chunk)
                    n += len(chunk)
                layers.append(("sha256:" + h.hexdigest(), n))
            return resolved, layers

    resolved, layers = run(go())
    assert resolved.digest == img.digest
    assert resolved.index is None
    assert resolved.config.os == "linux"
    assert resolved.config.architecture == host_platform().architecture
    assert resolved.config.cmd == ["sh"]
    assert [(l.digest, l.size) for l in resolved.manifest.layers] == layers
    assert oci.sha256_digest(resolved.manifest_bytes) == img.digest


def test_nonroot_and_docker_v2(registry):
    async def go():
        async with registry.client() as c:
            return (await c.resolve_image(registry.images["nonroot"].ref),
                    await c.resolve_image(registry.images["dockerv2"].ref))

    nonroot, docker = run(go())
    assert nonroot.config.user == "tester"
    assert docker.root.media_type == oci.DOCKER_MANIFEST
    assert docker.manifest.config.media_type == oci.DOCKER_CONFIG
    assert docker.manifest.layers[0].media_type == oci.DOCKER_LAYER_GZIP


def test_multilayer_media_types(registry):
    async def go():
        async with registry.client() as c:
            return await c.resolve_image(registry.images["multilayer"].ref)

    r = run(go())
    assert [l.media_type for l in r.manifest.layers] == [oci.OCI_LAYER_GZIP, oci.OCI_LAYER_ZSTD, oci.OCI_LAYER]
    assert len(r.config.diff_ids) == 3


def test_digest_only_image(registry):
    img = registry.images["digestonly"]
    assert img.tags == [] and img.refs == [img.digest_ref]

    async def go():
        async with registry.client() as c:
            return await c.resolve(img.digest_ref)

    assert run(go()).digest == img.digest


def test_multiarch_selects_native_platform(registry):
    img = registry.images["multiarch"]
    native = host_platform()

    async def go():
        async with registry.client() as c:
            return await c.resolve_image(img.ref)

    r = run(go())
    assert r.root.media_type == oci.OCI_INDEX
    assert r.digest == img.digest
    assert r.index is not None and len(r.index.manifests) >= 3
    assert r.manifest_descriptor.digest == img.manifest_digests[str(native)]
    assert r.config.architecture == native.architecture


@pytest.mark.parametrize("plat", [Platform("linux", "arm64"), Platform("linux", "arm", "v7")])
def test_multiarch_selects_requested_platform(registry, plat):
    img = registry.images["multiarch"]

    async def go():
        async with registry.client() as c:
            return await c.resolve_image(img.ref, platform=plat)

    r = run(go())
    assert r.manifest_descriptor.digest == img.manifest_digests[str(plat)]
    assert r.config.labels["moorage.test.arch"] == (f"{plat.architecture}/{plat.variant}"
                                                   if plat.variant else plat.architecture)


def test_multiarch_absent_platform_is_a_clear_error(registry):
    img = registry.images["multiarch"]

    async def go():
        async with registry.client() as c:
            return await c.resolve_image(img.ref, platform=Platform("linux", "s390x"))

    with pytest.raises(NotFound) as ei:
        run(go())
    msg = ei.value.message
    assert "linux/s390x" in msg
    assert "linux/amd64" in msg and "linux/arm64" in msg and "linux/arm/v7" in msg


def test_single_platform_image_for_other_platform_is_an_error(registry):
    async def go():
        async with registry.client() as c:
            return await c.resolve_image(registry.images["busybox"].ref, platform=Platform("linux", "s390x"))

    with pytest.raises(NotFound, match="linux/s390x"):
        run(go())


def test_missing_tag_is_not_found_naming_the_reference(registry):
    ref = f"{registry.host}/test/busybox:nope"

    async def go():
        async with registry.client() as c:
            return await c.resolve(ref)

    with pytest.raises(NotFound) as ei:
        run(go())
    assert ref in ei.value.message
    assert "manifest unknown" in ei.value.message


def test_missing_repository_is_not_found(registry):
    ref = f"{registry.host}/test/does-not-exist:latest"

    async def go():
        async with registry.client() as c:
            return await c.resolve_image(ref)

    with pytest.raises(NotFound, match="does-not-exist"):
        run(go())


def test_missing_blob_is_not_found(registry):
    img = registry.images["busybox"]
    bogus = Descriptor(oci.OCI_LAYER_GZIP, "sha256:" + "0" * 64, 10)

    async def go():
        async with registry.client() as c:
            async for _ in c.fetch_blob(img.repository, bogus):
                pass

    with pytest.raises(NotFound, match="sha256:0000"):
        run(go())


def test_blob_with_wrong_descriptor_size_is_refused(registry):
    img = registry.images["busybox"]

    async def go():
        async with registry.client() as c:
            r = await c.resolve_image(img.ref)
            cfg = r.manifest.config
            short = Descriptor(cfg.media_type, cfg.digest, cfg.size - 1)
            return await c.read_blob(img.repository, short, max_size=1 << 20)

    with pytest.raises(Exception, match="larger than its declared size"):
        run(go())


def test_read_blob_refuses_oversized_descriptor(registry):
    img = registry.images["busybox"]
    big = Descriptor(oci.OCI_CONFIG, "sha256:" + "1" * 64, oci.MAX_CONFIG_SIZE + 1)

    async def go():
        async with registry.client() as c:
            return await c.read_blob(img.repository, big, max_size=oci.MAX_CONFIG_SIZE)

    with pytest.raises(InvalidArgument, match="limit"):
        run(go())


def test_fetch_manifest_by_descriptor_verifies(registry):
    img = registry.images["busybox"]

    async def go():
        async with registry.client() as c:
            d = await c.resolve(img.ref)
            return await c.fetch_manifest(img.repository, d)

    fm = run(go())
    assert oci.sha256_digest(fm.data) == img.digest
    assert isinstance(oci.parse_manifest_or_index(fm.data, fm.descriptor.media_type), oci.Manifest)


def test_push_then_pull_roundtrip(registry):
    repo = f"{registry.host}/test/pushed-{os.getpid()}"
    data = b"hello moorage\n" * 100

    async def go():
        async with registry.client() as c:
            desc = await c.push_blob(repo, data)
            again = await c.push_blob(repo, data)  # already there: skipped
            got = await c.read_blob(repo, desc, max_size=1 << 20)
            return desc, again, got

    desc, again, got = run(go())
    assert desc == again and got == data and desc.digest == oci.sha256_digest(data)
