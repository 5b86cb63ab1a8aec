"""images/archive.py: OCI layout and docker-save import, export, round trip, hostile archives.

Runs on a temporary root with the native (copying) snapshotter: no daemon, no mounts.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from moorage.core.errors import InvalidArgument
from moorage.core.store import Store
from moorage.images import archive, oci
from moorage.images.service import ImageService, ImageSettings
from moorage.testing.layouts import tar_layout
from moorage.testing.testimages import EVIL_TARGET_DIR


@pytest.fixture
def svc(tmp_path):
    root = tmp_path / "root"
    store = Store(str(root))
    s = ImageService(ImageSettings(root_dir=str(root), snapshotter="native", hosts_dir=str(tmp_path / "certs.d")),
                     store)
    yield s
    store.close()


def tree(svc, key: str) -> str:
    """The directory of a committed native snapshot (the whole tree)."""
    return svc.snapshots._fs(svc.snapshots.stat(key))


def blobs_on_disk(svc) -> list[str]:
    return sorted(str(b.digest) for b in svc.content.list())


def assert_empty(svc) -> None:
    assert svc.store.list_images() == []
    assert blobs_on_disk(svc) == []
    assert svc.store.list_snapshots() == []
    assert os.listdir(svc.content.ingest_dir) == []


def test_import_oci_layout_with_base_name(svc, test_image_layouts, tmp_path):
    info = test_image_layouts["busybox"]
    path = tar_layout(info.path, str(tmp_path / "bb.tar"))
    out = archive.import_archive(svc, path, base_name="example.com/test/busybox")
    assert len(out) == 1
    rec = out[0].record
    assert rec.id == info.manifests[0].config_digest
    assert sorted(rec.repo_tags) == sorted(f"example.com/test/busybox:{t}" for t in info.tags)
    assert rec.repo_digests == [f"example.com/test/busybox@{info.digest}"]
    assert svc.snapshots.exists(rec.chain_id)
    assert os.path.isfile(os.path.join(tree(svc, rec.chain_id), "bin", "busybox"))
    # importing again changes nothing
    again = archive.import_archive(svc, path, base_name="example.com/test/busybox")
    assert again[0].record.id == rec.id and len(svc.store.list_images()) == 1


def test_bare_tags_without_base_name_import_untagged(svc, test_image_layouts, tmp_path):
    info = test_image_layouts["busybox"]
    out = archive.import_archive(svc, tar_layout(info.path, str(tmp_path / "bb.tar")))
    assert out[0].record.repo_tags == [] and out[0].record.id == info.manifests[0].config_digest


def test_import_multiarch_index_picks_this_platform(svc, test_image_layouts, tmp_path):
    from moorage.images.platform import host_platform

    info = test_image_layouts["multiarch"]
    out = archive.import_archive(svc, tar_layout(info.path, str(tmp_path / "ma.tar")), base_name="x.io/ma")
    want = next(m for m in info.manifests if m.platform == str(host_platform()))
    assert out[0].record.id == want.config_digest
    assert out[0].record.repo_digests == [f"x.io/ma@{info.digest}"]
    assert out[0].record.manifest_digest == want.digest


def test_multilayer_whiteouts_apply(svc, test_image_layouts, tmp_path):
    info = test_image_layouts["multilayer"]
    rec = archive.import_archive(svc, tar_layout(info.path, str(tmp_path / "ml.tar")), base_name="x.io/ml")[0].record
    top = tree(svc, rec.chain_id)  # native: the top snapshot is the whole tree
    assert Path(os.path.join(top, "data", "keep.txt")).read_text() == "v3\n"
    assert not os.path.exists(os.path.join(top, "data", "delete-me.txt"))
    assert sorted(os.listdir(os.path.join(top, "opaque"))) == ["new.txt"]


def test_export_import_round_trip(svc, test_image_layouts, tmp_path):
    for name in ("busybox", "multilayer", "dockerv2"):
        info = test_image_layouts[name]
        archive.import_archive(svc, tar_layout(info.path, str(tmp_path / f"{name}.tar")),
                               base_name=f"docker.io/library/{name}")
    recs = {r.id: r for r in svc.store.list_images()}
    out = str(tmp_path / "export.tar")
    archive.export_images(svc, ["busybox:latest", "multilayer", "dockerv2:latest"], out)
    with tarfile.open(out) as tf:
        names = tf.getnames()
        index = json.load(tf.extractfile("index.json"))
        docker = json.load(tf.extractfile("manifest.json"))
    assert "oci-layout" in names and all(n == "blobs" or n.startswith("blobs/") or n in (
        "oci-layout", "index.json", "manifest.json") for n in names)
    assert {e["annotations"]["io.containerd.image.name"] for e in index["manifests"]} >= {
        "docker.io/library/busybox:latest", "docker.io/library/multilayer:latest"}
    assert any("busybox:latest" in d["RepoTags"] for d in docker)

    other = ImageService(ImageSettings(root_dir=str(tmp_path / "root2"), snapshotter="native"),
                         Store(str(tmp_path / "root2")))
    try:
        got = archive.import_archive(other, out)
        recs2 = {r.id: r for r in other.store.list_images()}
        assert set(recs2) == set(recs)
        for iid, rec in recs.items():
            assert sorted(recs2[iid].repo_tags) == sorted(rec.repo_tags)
            assert recs2[iid].layers == rec.layers and recs2[iid].chain_id == rec.chain_id
        assert len(got) == 3
        # and the docker-save half of the same file works too
        docker_only = str(tmp_path / "docker-only.tar")
        with tarfile.open(out) as src, tarfile.open(docker_only, "w") as dst:
            for m in src.getmembers():
                if m.name not in ("index.json", "oci-layout"):
                    dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        third = ImageService(ImageSettings(root_dir=str(tmp_path / "root3"), snapshotter="native"),
                             Store(str(tmp_path / "root3")))
        try:
            got3 = archive.import_archive(third, docker_only)
            assert {g.record.id for g in got3} == set(recs)
            assert "docker.io/library/busybox:latest" in next(g for g in got3 if g.record.id in
                                                              {r.id for r in recs.values()
                                                               if "docker.io/library/busybox:latest" in r.repo_tags}).refs
        finally:
            third.store.close()
    finally:
        other.store.close()


def _docker_save(path: str, layers: list[bytes], config: dict, tags: list[str], symlink_dup: bool = False,
                 layer_names: list[str] | None = None) -> None:
    with tarfile.open(path, "w") as tf:
        names = []
        for i, layer in enumerate(layers):
            name = (layer_names or [])[i] if layer_names else f"l{i}/layer.tar"
            if symlink_dup and i > 0 and layer == layers[0]:
                ti = tarfile.TarInfo(name)
                ti.type, ti.linkname = tarfile.SYMTYPE, "../l0/layer.tar"
                tf.addfile(ti)
            else:
                ti = tarfile.TarInfo(name)
                ti.size = len(layer)
                tf.addfile(ti, io.BytesIO(layer))
            names.append(name)
        cfg = json.dumps(config).encode()
        ti = tarfile.TarInfo("config.json")
        ti.size = len(cfg)
        tf.addfile(ti, io.BytesIO(cfg))
        man = json.dumps([{"Config": "config.json", "RepoTags": tags, "Layers": names}]).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(man)
        tf.addfile(ti, io.BytesIO(man))


def _layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for n, d in files.items():
            ti = tarfile.TarInfo(n)
            ti.size = len(d)
            tf.addfile(ti, io.BytesIO(d))
    return buf.getvalue()


def _config(diff_layers: list[bytes]) -> dict:
    return {"architecture": "amd64", "os": "linux", "config": {"User": "1000:1000"},
            "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(l) for l in diff_layers]}}


def test_import_docker_save_with_gzip_and_symlinked_layers(svc, tmp_path):
    l0 = _layer_tar({"a.txt": b"a\n"})
    l1 = gzip.compress(_layer_tar({"b.txt": b"b\n"}), mtime=0)
    layers = [l0, l1, l0]
    cfg = _config([l0, _layer_tar({"b.txt": b"b\n"}), l0])
    path = str(tmp_path / "save.tar")
    _docker_save(path, layers, cfg, ["busybox:1.2", "example.com/x/y:z"], symlink_dup=True,
                 layer_names=["l0/layer.tar", "l1/layer.tar", "l2/layer.tar"])
    out = archive.import_archive(svc, path)
    rec = out[0].record
    assert rec.id == oci.sha256_digest(json.dumps(cfg).encode())
    assert sorted(rec.repo_tags) == ["docker.io/library/busybox:1.2", "example.com/x/y:z"]
    assert rec.config["config"]["User"] == "1000:1000"
    assert len(rec.layers) == 3 and rec.layers[0] == rec.layers[2]
    top = tree(svc, rec.chain_id)
    assert sorted(os.listdir(top)) == ["a.txt", "b.txt"]


def test_tampered_blob_in_archive_imports_nothing(svc, test_image_layouts, tmp_path):
    info = test_image_layouts["multilayer"]
    victim = info.manifests[0].layers[1].split(":", 1)[1]

    def mutate(arc, data):
        if arc.endswith(victim):
            b = bytearray(data)
            b[len(b) // 2] ^= 0xFF
            return bytes(b)
        return data

    path = tar_layout(info.path, str(tmp_path / "bad.tar"), mutate)
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        archive.import_archive(svc, path, base_name="x.io/ml")
    assert_empty(svc)


def test_diff_id_mismatch_imports_nothing(svc, tmp_path):
    l0 = _layer_tar({"a.txt": b"a\n"})
    cfg = _config([_layer_tar({"other": b""})])
    path = str(tmp_path / "save.tar")
    _docker_save(path, [l0], cfg, ["x.io/y:z"])
    with pytest.raises(InvalidArgument, match="diff"):
        archive.import_archive(svc, path)
    assert_empty(svc)


@pytest.mark.parametrize("name", ["evil-dotdot", "evil-symlink-abs", "evil-hardlink-outside", "evil-device"])
def test_hostile_layer_in_archive_imports_nothing(svc, test_image_layouts, tmp_path, name):
    info = test_image_layouts[name]
    with pytest.raises(InvalidArgument):
        archive.import_archive(svc, tar_layout(info.path, str(tmp_path / "evil.tar")), base_name="x.io/evil")
    assert not os.path.exists(os.path.join(EVIL_TARGET_DIR, "pwned"))
    assert_empty(svc)


def test_hostile_archive_member_names_are_never_used(svc, test_image_layouts, tmp_path):
    """Members with ../ or absolute names, and links leaving the archive, are never read or written."""
    test_image_layouts["busybox"]
    path = str(tmp_path / "hostile.tar")
    marker = tmp_path / "outside.txt"
    with tarfile.open(path, "w") as tf:
        for name, data in ((f"../{marker.name}", b"escaped"), (str(marker), b"escaped")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        # index.json is a symlink pointing out of the archive
        ti = tarfile.TarInfo("index.json")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(ti)
    with pytest.raises(InvalidArgument, match="no member"):
        archive.import_archive(svc, path)
    assert not marker.exists()
    assert_empty(svc)
    # a manifest.json naming a layer by a path that escapes is just "not there"
    path2 = str(tmp_path / "hostile2.tar")
    l0 = _layer_tar({"a": b""})
    _docker_save(path2, [l0], _config([l0]), ["x.io/y:z"], layer_names=["../../etc/passwd"])
    with pytest.raises(InvalidArgument, match="no member"):
        archive.import_archive(svc, path2)
    assert_empty(svc)


def test_not_an_archive(svc, tmp_path):
    p = tmp_path / "junk.tar"
    p.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InvalidArgument, match="not a readable tar"):
        archive.import_archive(svc, str(p))
    empty = str(tmp_path / "empty.tar")
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(InvalidArgument, match="neither an OCI layout"):
        archive.import_archive(svc, empty)


def test_export_unknown_image_is_not_found(svc, tmp_path):
    from moorage.core.errors import NotFound

    with pytest.raises(NotFound):
        archive.export_images(svc, ["nothere:latest"], str(tmp_path / "x.tar"))
    assert not os.path.exists(tmp_path / "x.tar")


def _raw_header(name: str, type_: bytes, size: int) -> bytearray:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    hdr = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))
    hdr[124:136] = b"%011o\0" % size
    return hdr


def _chksum(hdr: bytearray) -> bytes:
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


@pytest.mark.parametrize("type_,word", [(tarfile.GNUTYPE_LONGNAME, "GNU long name"),
                                        (tarfile.XHDTYPE, "PAX extended")])
def test_huge_extended_header_is_refused_before_its_body_is_read(svc, tmp_path, monkeypatch, type_, word):
    claim = 64 << 20
    p = tmp_path / "huge.tar"
    with open(p, "wb") as f:
        f.write(_chksum(_raw_header("././@LongLink", type_, claim)))
        f.truncate(512 + claim + 1024)  # a hole: the body exists on disk only if read
    read = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            if n is None or n < 0 or n > (4 << 20):
                raise AssertionError(f"read({n}): the header body is being loaded")
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_open = archive._open_archive_file
    monkeypatch.setattr(archive, "_open_archive_file", lambda path: Counting(real_open(path)))
    with pytest.raises(InvalidArgument, match=f"{word} tar header claims {claim} bytes"):
        archive.import_archive(svc, str(p))
    assert sum(read) <= 64 << 10
    assert_empty(svc)


def test_sparse_archive_member_is_refused(svc, tmp_path):
    # an old-GNU sparse blob: 512 stored bytes that would read back as a 1 TiB file
    hdr = _raw_header("blobs/sha256/" + "0" * 64, tarfile.GNUTYPE_SPARSE, 512)
    hdr[386:398] = b"%011o\0" % 0
    hdr[398:410] = b"%011o\0" % 512
    hdr[483:495] = b"%011o\0" % (1 << 40)
    p = tmp_path / "sparse.tar"
    p.write_bytes(_chksum(hdr) + b"s" * 512 + b"\0" * 1024)
    with pytest.raises(InvalidArgument, match="is a sparse file"):
        archive.import_archive(svc, str(p))
    assert_empty(svc)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz", "bz2"])
def test_compressed_archives_import(svc, test_image_layouts, tmp_path, compression):
    # members are read in the importer's order, not the archive's (index.json, then manifest,
    # config, layers), so a read may go backwards and decompress again from the start
    import bz2
    import lzma

    import zstandard

    info = test_image_layouts["multilayer"]
    plain = Path(tar_layout(info.path, str(tmp_path / "ml.tar"))).read_bytes()
    packed = {"gzip": lambda b: gzip.compress(b, mtime=0), "zstd": zstandard.ZstdCompressor().compress,
              "xz": lzma.compress, "bz2": bz2.compress}[compression](plain)
    path = tmp_path / f"ml.tar.{compression}"
    path.write_bytes(packed)
    out = archive.import_archive(svc, str(path), base_name="x.io/ml")
    assert [o.record.id for o in out] == [info.manifests[0].config_digest]
    assert len(out[0].record.layers) == len(info.manifests[0].layers)


def test_corrupt_header_mid_archive_names_the_offset(svc, test_image_layouts, tmp_path):
    info = test_image_layouts["busybox"]
    data = bytearray(Path(tar_layout(info.path, str(tmp_path / "bb.tar"))).read_bytes())
    # the second header block of the archive: after the first member (one header, its data)
    first_size = int(data[124:136].strip(b"\0 ") or b"0", 8)
    second = 512 + (first_size + 511) // 512 * 512
    data[second] ^= 0x55
    p = tmp_path / "bad.tar"
    p.write_bytes(bytes(data))
    with pytest.raises(InvalidArgument, match=f"not a readable tar archive: .*at byte offset {second}: ") as ei:
        archive.import_archive(svc, str(p))
    assert len(ei.value.message) < 512
    assert_empty(svc)


def test_truncated_archive_is_refused(svc, test_image_layouts, tmp_path):
    info = test_image_layouts["busybox"]
    data = Path(tar_layout(info.path, str(tmp_path / "bb.tar"))).read_bytes()
    p = tmp_path / "cut.tar"
    p.write_bytes(data[:len(data) // 2 + 100])
    with pytest.raises(InvalidArgument, match="ends inside"):
        archive.import_archive(svc, str(p))
    assert_empty(svc)
