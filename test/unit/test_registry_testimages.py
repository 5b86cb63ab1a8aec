"""hack/build_test_images.py: deterministic, well-formed OCI layouts and hostile layers."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import zstandard

from moorage.images import oci
from moorage.images.platform import host_platform
from moorage.testing import testimages
from moorage.testing.testimages import (
    BUILD_LOG,
    BUSYBOX_TAGS,
    build_all,
    evil_layers,
    inputs_key,
    read_layout_blob,
    write_evil_layers,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    # Built fresh, not from the cache: these tests check the builder itself.
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


# --- the shared cache (cached_build_all) -------------------------------------------------------

# A stand-in for build_all that is quick but slow enough to overlap concurrent callers, and
# makes a layout that passes the cache's checks (index.json, blobs matching their digests).
FAKE_BUILD = textwrap.dedent("""
    import hashlib, os, time
    from moorage.testing import testimages

    def fake_build_all(out_dir, include_evil=False):
        time.sleep(0.5)
        path = os.path.join(out_dir, "tiny")
        os.makedirs(os.path.join(path, "blobs", "sha256"))
        data = b'{"evil": %d}' % include_evil
        hexd = hashlib.sha256(data).hexdigest()
        with open(os.path.join(path, "blobs", "sha256", hexd), "wb") as f:
            f.write(data)
        with open(os.path.join(path, "index.json"), "w") as f:
            f.write("{}")
        return {"tiny": testimages.LayoutInfo("tiny", path, "x", "sha256:" + hexd, len(data), ["latest"],
                                              [], ["sha256:" + hexd])}

    testimages.build_all = fake_build_all
""")


def _builds(root) -> list[str]:
    try:
        return Path(root, BUILD_LOG).read_text().splitlines()
    except FileNotFoundError:
        return []


def test_cached_layouts_are_what_a_fresh_build_makes(built, test_image_layouts):
    # test_image_layouts comes from the shared cache; built was made just now
    assert {n: i.digest for n, i in test_image_layouts.items()} == {n: i.digest for n, i in built.items()}
    for name, info in test_image_layouts.items():
        assert info.blobs == built[name].blobs and info.manifests == built[name].manifests
        for d in info.blobs:
            read_layout_blob(info.path, d)


def test_inputs_key_follows_the_inputs(monkeypatch, tmp_path):
    assert inputs_key(False) == inputs_key(False) != inputs_key(True)
    before = inputs_key(False)
    other = tmp_path / "catatonit"
    other.write_bytes(b"another catatonit")
    monkeypatch.setattr(testimages, "CATATONIT", str(other))
    assert inputs_key(False) != before


def test_concurrent_callers_share_one_build(tmp_path):
    root = tmp_path / "cache"
    script = FAKE_BUILD + textwrap.dedent(f"""
        import json, sys
        got = testimages.cached_build_all(cache_root={str(root)!r})
        print(json.dumps({{n: [i.path, i.digest] for n, i in got.items()}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert len(_builds(root)) == 1, _builds(root)
    assert outs[0] == outs[1] == outs[2]
    [(path, _)] = outs[0].values()
    key = os.path.relpath(path, root).split(os.sep)[0]
    assert path.startswith(str(root / key) + os.sep)
    # complete entries only: no temporary build dir is left behind
    assert sorted(os.listdir(root)) == sorted([BUILD_LOG, key, f"{key}.lock"])


def test_cache_rebuilds_a_damaged_entry_and_keys_the_evil_flag(tmp_path):
    root = tmp_path / "cache"
    script = FAKE_BUILD + textwrap.dedent(f"""
        import sys
        for evil in (False, True, False):
            got = testimages.cached_build_all(include_evil=evil, cache_root={str(root)!r})
        info = got["tiny"]
        blob = info.path + "/blobs/sha256/" + info.digest.split(":")[1]
        with open(blob, "ab") as f:
            f.write(b"tampered")
        again = testimages.cached_build_all(cache_root={str(root)!r})
        testimages.read_layout_blob(again["tiny"].path, again["tiny"].digest)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    builds = _builds(root)
    assert [b.split()[-1] for b in builds] == ["evil=False", "evil=True", "evil=False"], builds
