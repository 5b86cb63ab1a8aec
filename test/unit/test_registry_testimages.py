"""hack/build_test_images.py: deterministic, well-formed OCI layouts and hostile layers."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from moorage.images import oci
from moorage.images.platform import host_platform
from moorage.testing.testimages import (
    BUSYBOX_TAGS,
    build_all,
    evil_layers,
    read_layout_blob,
    write_evil_layers,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_all(str(tmp_path_factory.mktemp("layouts")), include_evil=True)


def _layer_members(layout, desc) -> dict[str, tarfile.TarInfo]:
    blob = read_layout_blob(layout, desc.digest)
    comp = oci.layer_compression(desc.media_type)
    raw = gzip.decompress(blob) if comp == "gzip" else (
        zstandard.ZstdDecompressor().decompress(blob) if comp == "zstd" else blob)
    tf = tarfile.open(fileobj=io.BytesIO(raw))
    return {m.name: (m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()}


def _image(info, idx=0):
    m = oci.parse_manifest(read_layout_blob(info.path, info.manifests[idx].digest))
    c = oci.parse_config(read_layout_blob(info.path, m.config.digest))
    oci.check_manifest_layers(m, c)
    return m, c


def test_deterministic(built, tmp_path):
    again = build_all(str(tmp_path / "again"))
    for name, info in again.items():
        assert info.digest == built[name].digest, name


def test_layout_files(built):
    info = built["busybox"]
    assert json.loads(Path(os.path.join(info.path, "oci-layout")).read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = oci.parse_index(Path(os.path.join(info.path, "index.json")).read_bytes())
    assert [d.annotations["org.opencontainers.image.ref.name"] for d in index.manifests] == list(BUSYBOX_TAGS)
    assert {d.digest for d in index.manifests} == {info.digest}
    for d in info.blobs:
        read_layout_blob(info.path, d)  # verifies


def test_busybox_content(built):
    info = built["busybox"]
    m, c = _image(info)
    assert c.platform == host_platform() or c.architecture == host_platform().architecture
    assert [l.media_type for l in m.layers] == [oci.OCI_LAYER_GZIP]
    members = _layer_members(info.path, m.layers[0])
    assert members["bin/sh"][0].issym() and members["bin/sh"][0].linkname == "busybox"
    for applet in ("echo", "cat", "ls", "id", "sleep", "wget", "httpd", "nc", "top", "ps", "grep"):
        assert f"bin/{applet}" in members
    passwd = members["etc/passwd"][1].decode()
    assert "root:x:0:0:" in passwd and "nobody:x:65534:65534:" in passwd and "tester:x:1234:1234:" in passwd
    assert "tester:x:1234:" in members["etc/group"][1].decode()
    assert all(mi.mtime == members["bin"][0].mtime for mi, _ in members.values())


def test_multilayer(built):
    info = built["multilayer"]
    m, c = _image(info)
    assert [l.media_type for l in m.layers] == [oci.OCI_LAYER_GZIP, oci.OCI_LAYER_ZSTD, oci.OCI_LAYER]
    l2 = _layer_members(info.path, m.layers[1])
    assert "data/.wh.delete-me.txt" in l2 and "opaque/.wh..wh..opq" in l2
    l1 = _layer_members(info.path, m.layers[0])
    assert "data/delete-me.txt" in l1 and "opaque/old1.txt" in l1
    assert _layer_members(info.path, m.layers[2])["data/keep.txt"][1] == b"v3\n"


def test_multiarch(built):
    info = built["multiarch"]
    index = oci.parse_index(read_layout_blob(info.path, info.digest))
    plats = [str(d.platform) for d in index.manifests]
    assert plats[:3] == ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    for i, _d in enumerate(index.manifests):
        _, c = _image(info, i)
        assert str(c.platform) == plats[i]


def test_nonroot_and_digest_only(built):
    _, c = _image(built["nonroot"])
    assert c.user == "tester"
    assert built["digestonly"].tags == []
    idx = json.loads(Path(os.path.join(built["digestonly"].path, "index.json")).read_text())
    assert "annotations" not in idx["manifests"][0]


def test_dockerv2(built):
    m, _ = _image(built["dockerv2"])
    assert m.media_type == oci.DOCKER_MANIFEST and m.layers[0].media_type == oci.DOCKER_LAYER_GZIP


def test_evil_layers(tmp_path):
    layers = evil_layers()
    names = {k: [m.name for m in tarfile.open(fileobj=io.BytesIO(v)).getmembers()] for k, v in layers.items()}
    assert "../escape.txt" in names["dotdot"]
    assert "/abs-escape.txt" in names["absolute"]
    tf = tarfile.open(fileobj=io.BytesIO(layers["symlink-abs"]))
    link = tf.getmember("link")
    assert link.issym() and link.linkname.startswith("/") and "link/pwned" in names["symlink-abs"]
    hl = tarfile.open(fileobj=io.BytesIO(layers["hardlink-outside"])).getmembers()
    assert all(m.islnk() for m in hl) and hl[0].linkname == "/etc/passwd"
    assert tarfile.open(fileobj=io.BytesIO(layers["device"])).getmember("dev/evil-mem").ischr()
    paths = write_evil_layers(str(tmp_path))
    assert set(paths) == set(layers) and all(os.path.getsize(p) > 0 for p in paths.values())


def test_evil_images_built(built):
    assert {n for n in built if n.startswith("evil-")} == {f"evil-{k}" for k in evil_layers()}
