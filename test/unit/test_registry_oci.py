"""images.oci: media types, bounded parsing and validation of manifests, indexes, configs."""

from __future__ import annotations

import json

import pytest

from moorage.core.errors import InvalidArgument
from moorage.images import oci

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64
D3 = "sha256:" + "c" * 64


def _manifest(**kw):
    doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
           "config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": 10},
           "layers": [{"mediaType": oci.OCI_LAYER_GZIP, "digest": D2, "size": 20,
                       "annotations": {"a": "b"}, "urls": ["https://x/y"]}]}
    doc.update(kw)
    return json.dumps(doc).encode()


def test_parse_manifest():
    m = oci.parse_manifest(_manifest())
    assert m.media_type == oci.OCI_MANIFEST
    assert m.config == oci.Descriptor(oci.OCI_CONFIG, D1, 10)
    assert m.layers[0].annotations == {"a": "b"} and m.layers[0].urls == ("https://x/y",)


def test_manifest_without_media_type_uses_the_given_one():
    doc = json.loads(_manifest())
    del doc["mediaType"]
    assert oci.parse_manifest(json.dumps(doc).encode(), oci.OCI_MANIFEST).media_type == oci.OCI_MANIFEST
    assert oci.sniff_media_type(json.dumps(doc).encode()) == oci.OCI_MANIFEST


def test_docker_manifest():
    data = _manifest(mediaType=oci.DOCKER_MANIFEST)
    assert oci.parse_manifest_or_index(data, oci.DOCKER_MANIFEST).media_type == oci.DOCKER_MANIFEST


@pytest.mark.parametrize("bad, match", [
    ({"schemaVersion": 3}, "schemaVersion"),
    ({"layers": "nope"}, "layers"),
    ({"config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:xyz", "size": 1}}, "digest"),
    ({"config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": -1}}, "size"),
    ({"config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": True}}, "size"),
    ({"config": {"mediaType": oci.OCI_CONFIG, "digest": "md5:" + "a" * 32, "size": 1}}, "algorithm"),
    ({"config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": oci.MAX_CONFIG_SIZE + 1}}, "limit"),
    ({"mediaType": oci.OCI_INDEX}, "media type"),
])
def test_manifest_validation(bad, match):
    with pytest.raises(InvalidArgument, match=match):
        oci.parse_manifest(_manifest(**bad))


def test_size_bound_checked_before_decoding():
    with pytest.raises(InvalidArgument, match="limit"):
        oci.parse_manifest(b" " * (oci.MAX_MANIFEST_SIZE + 1))


def test_not_json():
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        oci.parse_manifest(b"{nope")
    with pytest.raises(InvalidArgument, match="JSON object"):
        oci.parse_manifest(b"[]")


@pytest.mark.parametrize("mt", [oci.DOCKER_SCHEMA1, oci.DOCKER_SCHEMA1_SIGNED])
def test_schema1_rejected(mt):
    data = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()
    with pytest.raises(InvalidArgument, match="schema 1"):
        oci.parse_manifest_or_index(data, mt)
    with pytest.raises(InvalidArgument, match="schema 1"):
        oci.parse_manifest(data)


def test_parse_index_with_platforms():
    doc = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": D1, "size": 1,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": D2, "size": 2,
         "platform": {"os": "windows", "architecture": "amd64", "os.version": "10.0.17763",
                      "os.features": ["win32k"]}},
    ]}
    idx = oci.parse_manifest_or_index(json.dumps(doc).encode())
    assert isinstance(idx, oci.Index)
    assert str(idx.manifests[0].platform) == "linux/arm/v7"
    assert idx.manifests[1].platform.os_version == "10.0.17763"
    assert idx.manifests[1].platform.os_features == ("win32k",)


def test_docker_manifest_list():
    doc = {"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST_LIST, "manifests": []}
    idx = oci.parse_index(json.dumps(doc).encode())
    assert idx.media_type == oci.DOCKER_MANIFEST_LIST


def test_index_entries_bounded():
    entry = {"mediaType": oci.OCI_MANIFEST, "digest": D1, "size": 1}
    doc = {"schemaVersion": 2, "manifests": [entry] * (oci.MAX_INDEX_ENTRIES + 1)}
    with pytest.raises(InvalidArgument, match="limit"):
        oci.parse_index(json.dumps(doc).encode())


def _config(**kw):
    doc = {"architecture": "amd64", "os": "linux",
           "config": {"User": "tester", "Env": ["A=1"], "Cmd": ["sh"], "Entrypoint": None,
                      "WorkingDir": "/w", "Labels": {"l": "v"}, "ExposedPorts": {"80/tcp": {}},
                      "Volumes": {"/data": {}}, "StopSignal": "SIGTERM"},
           "rootfs": {"type": "layers", "diff_ids": [D1, D2]}}
    doc.update(kw)
    return json.dumps(doc).encode()


def test_parse_config():
    c = oci.parse_config(_config())
    assert c.platform == oci.Platform("linux", "amd64")
    assert (c.user, c.env, c.cmd, c.entrypoint, c.working_dir) == ("tester", ["A=1"], ["sh"], [], "/w")
    assert c.labels == {"l": "v"} and c.exposed_ports == ["80/tcp"] and c.volumes == ["/data"]
    assert c.stop_signal == "SIGTERM"
    assert c.diff_ids == (D1, D2)


@pytest.mark.parametrize("bad, match", [
    ({"rootfs": {"type": "other", "diff_ids": []}}, "rootfs"),
    ({"rootfs": {"type": "layers", "diff_ids": ["x"]}}, "diff_id"),
    ({"config": {"Env": "A=1"}}, "Env"),
    ({"config": {"User": 0}}, "User"),
    ({"architecture": 5}, "architecture"),
])
def test_config_validation(bad, match):
    with pytest.raises(InvalidArgument, match=match):
        oci.parse_config(_config(**bad))


def test_config_size_bound():
    with pytest.raises(InvalidArgument, match="limit"):
        oci.parse_config(b" " * (oci.MAX_CONFIG_SIZE + 1))


def test_check_manifest_layers():
    m = oci.parse_manifest(_manifest())
    with pytest.raises(InvalidArgument, match="diff_ids"):
        oci.check_manifest_layers(m, oci.parse_config(_config()))
    oci.check_manifest_layers(m, oci.parse_config(_config(rootfs={"type": "layers", "diff_ids": [D3]})))


def test_layer_compression():
    assert oci.layer_compression(oci.OCI_LAYER) == ""
    assert oci.layer_compression(oci.OCI_LAYER_GZIP) == "gzip"
    assert oci.layer_compression(oci.DOCKER_LAYER_GZIP) == "gzip"
    assert oci.layer_compression(oci.OCI_LAYER_ZSTD) == "zstd"
    with pytest.raises(InvalidArgument, match="unsupported layer"):
        oci.layer_compression("application/x-foo")


def test_descriptor_roundtrip():
    d = oci.Descriptor(oci.OCI_MANIFEST, D1, 5, oci.Platform("linux", "arm64", "v8"), {"k": "v"}, ("u",))
    assert oci.parse_descriptor(d.to_json()) == d


def test_digests():
    assert oci.is_digest(D1) and not oci.is_digest("sha256:ABC")
    assert oci.compute_digest(b"x", "sha512:" + "0" * 128).startswith("sha512:")
    assert oci.sha256_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
