#!/usr/bin/env python3
"""Build moorage's test images offline, as OCI image layouts.

No network and no docker: every image is made from the host's static busybox
(``busybox-static``, one symlink per applet) and ``catatonit``.  Output is
deterministic (fixed mtimes, numeric owners, sorted entries, gzip mtime 0, fixed
compression levels), so digests only change when the inputs do.

Images (one OCI layout directory each, ``<out>/<name>/``):

==============  ================================================================
busybox         one gzip layer; /etc/passwd and /etc/group with root, nobody and
                ``tester`` (1234:1234); tags ``latest``, ``1.0``, ``alias``
multilayer      busybox + a zstd layer (whiteout of a lower file, opaque dir) + an
                uncompressed layer that overwrites a lower file
multiarch       OCI index: linux/amd64, linux/arm64, linux/arm/v7 (plus the host's
                platform if it is none of those); all share the busybox layer, each
                config names its architecture and carries label ``moorage.test.arch``
nonroot         busybox with config ``User: tester`` and WorkingDir /home/tester
stopsignal      busybox with config ``StopSignal: SIGUSR1``
dockerv2        busybox as a Docker schema 2 manifest (Docker media types)
digestonly      busybox with a distinct label; meant to be pushed by digest only
evil-*          (``build_all(include_evil=True)``) one hostile layer each, for unpack tests
==============  ================================================================

Library use::

    from moorage.testing.testimages import build_all, cached_build_all
    images = build_all("/tmp/layouts")      # name -> LayoutInfo, built now
    images = cached_build_all()             # the same, built once per set of inputs (see there)

CLI: ``python -m moorage.testing.testimages OUT_DIR [--evil]`` prints a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from moorage.images import oci
from moorage.images.platform import host_platform

BUSYBOX = "/bin/busybox"
CATATONIT = "/usr/bin/catatonit"
MTIME = 946684800  # 2000-01-01T00:00:00Z
CREATED = "2000-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TESTER_UID = 1234
TESTER_GID = 1234
BUSYBOX_TAGS = ("latest", "1.0", "alias")

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    f"tester:x:{TESTER_UID}:{TESTER_GID}:tester:/home/tester:/bin/sh\n"
)
GROUP = (
    "root:x:0:\n"
    "nobody:x:65534:\n"
    f"tester:x:{TESTER_GID}:\n"
)


# --- tar building ---------------------------------------------------------------------------

@dataclass
class Entry:
    """One tar member: kind is "file", "dir", "symlink", "hardlink", "char" or "fifo"."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""      # symlink / hardlink target
    devmajor: int = 0
    devminor: int = 0


def tar_bytes(entries: Iterable[Entry], sort: bool = True) -> bytes:
    """A deterministic tar (PAX format) of *entries* (sorted by path unless sort=False)."""
    items = list(entries)
    if sort:
        items.sort(key=lambda e: e.path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in items:
            ti = tarfile.TarInfo(e.path)
            ti.mtime = MTIME
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.uname = ti.gname = ""
            if e.kind == "file":
                ti.type = tarfile.REGTYPE
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
                continue
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
            elif e.kind == "char":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, e.devmajor, e.devminor
            elif e.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            else:
                raise ValueError(f"unknown entry kind {e.kind!r}")
            tf.addfile(ti)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
        gz.write(data)
    return out.getvalue()


def zstd_bytes(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def busybox_applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({a.strip() for a in out.split() if a.strip() and "/" not in a and a.strip() != "busybox"})


def busybox_entries() -> list[Entry]:
    ents = [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/busybox", data=_read(BUSYBOX), mode=0o755),
        Entry("dev", "dir", mode=0o755),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", data=PASSWD.encode()),
        Entry("etc/group", data=GROUP.encode()),
        Entry("etc/hostname", data=b"busybox\n"),
        Entry("etc/hosts", data=b"127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
        Entry("home", "dir", mode=0o755),
        Entry("home/tester", "dir", mode=0o755, uid=TESTER_UID, gid=TESTER_GID),
        Entry("proc", "dir", mode=0o555),
        Entry("root", "dir", mode=0o700),
        Entry("sys", "dir", mode=0o555),
        Entry("tmp", "dir", mode=0o1777),
        Entry("usr", "dir", mode=0o755),
        Entry("usr/bin", "dir", mode=0o755),
        Entry("usr/sbin", "dir", mode=0o755),
        Entry("sbin", "dir", mode=0o755),
        Entry("var", "dir", mode=0o755),
        Entry("var/tmp", "dir", mode=0o1777),
    ]
    if os.path.exists(CATATONIT):
        ents.append(Entry("usr/bin/catatonit", data=_read(CATATONIT), mode=0o755))
    for a in busybox_applets():
        ents.append(Entry(f"bin/{a}", "symlink", mode=0o777, target="busybox"))
    return ents


# --- layouts --------------------------------------------------------------------------------

@dataclass
class ManifestInfo:
    digest: str
    size: int
    media_type: str
    platform: str
    config_digest: str
    layers: list[str]


@dataclass
class LayoutInfo:
    """What build_all made for one image."""

    name: str                     # image name, also the default repository suffix ("test/<name>")
    path: str                     # the OCI layout directory
    media_type: str               # of the root (index or manifest)
    digest: str                   # root digest
    size: int
    tags: list[str]               # tags to push; empty means "push by digest only"
    manifests: list[ManifestInfo] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)   # every digest in the layout, dependencies first

    def to_json(self) -> dict:
        return asdict(self)


class _LayoutWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self.blob_dir = os.path.join(path, "blobs", "sha256")
        os.makedirs(self.blob_dir, exist_ok=True)
        self.order: list[str] = []

    def put(self, data: bytes) -> str:
        digest = oci.sha256_digest(data)
        p = os.path.join(self.blob_dir, digest.split(":", 1)[1])
        if not os.path.exists(p):
            tmp = p + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        if digest not in self.order:
            self.order.append(digest)
        return digest

    def finish(self, root: oci.Descriptor, tags: list[str]) -> None:
        entries = []
        if tags:
            for t in tags:
                d = root.to_json()
                d["annotations"] = {"org.opencontainers.image.ref.name": t}
                entries.append(d)
        else:
            entries.append(root.to_json())
        index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": entries}
        with open(os.path.join(self.path, "index.json"), "wb") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")
        with open(os.path.join(self.path, "oci-layout"), "wb") as f:
            f.write(b'{"imageLayoutVersion":"1.0.0"}\n')


@dataclass
class _Layer:
    tar: bytes
    blob: bytes
    media_type: str

    @property
    def diff_id(self) -> str:
        return oci.sha256_digest(self.tar)


def _layer(tar: bytes, compression: str, docker: bool = False) -> _Layer:
    if compression == "gzip":
        return _Layer(tar, gzip_bytes(tar), oci.DOCKER_LAYER_GZIP if docker else oci.OCI_LAYER_GZIP)
    if compression == "zstd":
        return _Layer(tar, zstd_bytes(tar), oci.OCI_LAYER_ZSTD)
    if compression == "":
        return _Layer(tar, tar, oci.OCI_LAYER)
    raise ValueError(compression)


def _write_image(w: _LayoutWriter, layers: list[_Layer], *, arch: str, variant: str = "",
                 config_extra: dict | None = None, labels: dict | None = None,
                 docker: bool = False, history: list[str] | None = None) -> tuple[oci.Descriptor, ManifestInfo]:
    cfg: dict[str, Any] = {"Env": [PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"}
    if labels:
        cfg["Labels"] = dict(labels)
    cfg.update(config_extra or {})
    config = {
        "architecture": arch,
        "os": "linux",
        "created": CREATED,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created": CREATED, "created_by": h} for h in (history or
                                                                     [f"layer {i}" for i in range(len(layers))])],
    }
    if variant:
        config["variant"] = variant
    config_bytes = oci.canonical_json(config)
    config_digest = w.put(config_bytes)
    layer_descs: list[dict[str, Any]] = []
    for l in layers:
        d = w.put(l.blob)
        layer_descs.append({"mediaType": l.media_type, "digest": d, "size": len(l.blob)})
    media_type = oci.DOCKER_MANIFEST if docker else oci.OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG,
                   "digest": config_digest, "size": len(config_bytes)},
        "layers": layer_descs,
    }
    mbytes = oci.canonical_json(manifest)
    mdigest = w.put(mbytes)
    plat = oci.Platform("linux", arch, variant)
    desc = oci.Descriptor(media_type, mdigest, len(mbytes), platform=plat)
    info = ManifestInfo(mdigest, len(mbytes), media_type, str(plat), config_digest,
                        [str(d["digest"]) for d in layer_descs])
    return desc, info


class Builder:
    """Builds the test images; caches the busybox layer across images."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.native = host_platform()
        self._busybox_tar: bytes | None = None

    def busybox_tar(self) -> bytes:
        if self._busybox_tar is None:
            self._busybox_tar = tar_bytes(busybox_entries())
        return self._busybox_tar

    def _single(self, name: str, layers: list[_Layer], tags: list[str], **kw: Any) -> LayoutInfo:
        w = _LayoutWriter(os.path.join(self.out_dir, name))
        desc, info = _write_image(w, layers, arch=self.native.architecture, variant=self.native.variant, **kw)
        root = oci.Descriptor(desc.media_type, desc.digest, desc.size)
        w.finish(root, tags)
        return LayoutInfo(name, w.path, desc.media_type, desc.digest, desc.size, tags, [info], list(w.order))

    def busybox(self) -> LayoutInfo:
        return self._single("busybox", [_layer(self.busybox_tar(), "gzip")], list(BUSYBOX_TAGS),
                            history=["busybox-static with applet symlinks"])

    def nonroot(self) -> LayoutInfo:
        return self._single("nonroot", [_layer(self.busybox_tar(), "gzip")], ["latest"],
                            config_extra={"User": "tester", "WorkingDir": "/home/tester"})

    def stopsignal(self) -> LayoutInfo:
        return self._single("stopsignal", [_layer(self.busybox_tar(), "gzip")], ["latest"],
                            config_extra={"StopSignal": "SIGUSR1"})

    def dockerv2(self) -> LayoutInfo:
        return self._single("dockerv2", [_layer(self.busybox_tar(), "gzip", docker=True)], ["latest"],
                            docker=True)

    def digestonly(self) -> LayoutInfo:
        return self._single("digestonly", [_layer(self.busybox_tar(), "gzip")], [],
                            labels={"moorage.test": "digest-only"})

    def multilayer(self) -> LayoutInfo:
        d = Entry
        l1 = tar_bytes(busybox_entries() + [
            d("data", "dir", mode=0o755),
            d("data/keep.txt", data=b"v1\n"),
            d("data/delete-me.txt", data=b"to be deleted\n"),
            d("opaque", "dir", mode=0o755),
            d("opaque/old1.txt", data=b"old1\n"),
            d("opaque/sub", "dir", mode=0o755),
            d("opaque/sub/old2.txt", data=b"old2\n"),
        ])
        l2 = tar_bytes([
            d("data", "dir", mode=0o755),
            d("data/.wh.delete-me.txt", data=b"", mode=0o600),
            d("opaque", "dir", mode=0o755),
            d("opaque/.wh..wh..opq", data=b"", mode=0o600),
            d("opaque/new.txt", data=b"new\n"),
            d("layer2.txt", data=b"layer2\n"),
        ])
        l3 = tar_bytes([
            d("data", "dir", mode=0o755),
            d("data/keep.txt", data=b"v3\n"),
            d("layer3.txt", data=b"layer3\n"),
        ])
        return self._single("multilayer", [_layer(l1, "gzip"), _layer(l2, "zstd"), _layer(l3, "")], ["latest"],
                            history=["busybox + data", "whiteout + opaque (zstd)", "overwrite (plain tar)"])

    def multiarch(self) -> LayoutInfo:
        w = _LayoutWriter(os.path.join(self.out_dir, "multiarch"))
        plats = [("amd64", ""), ("arm64", ""), ("arm", "v7")]
        native = (self.native.architecture, self.native.variant)
        if native not in plats:
            plats.append(native)
        layer = _layer(self.busybox_tar(), "gzip")
        descs, infos = [], []
        for arch, variant in plats:
            label = f"{arch}/{variant}" if variant else arch
            desc, info = _write_image(w, [layer], arch=arch, variant=variant,
                                      labels={"moorage.test.arch": label})
            descs.append(desc)
            infos.append(info)
        index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [d.to_json() for d in descs]}
        ibytes = oci.canonical_json(index)
        idigest = w.put(ibytes)
        root = oci.Descriptor(oci.OCI_INDEX, idigest, len(ibytes))
        w.finish(root, ["latest"])
        return LayoutInfo("multiarch", w.path, oci.OCI_INDEX, idigest, len(ibytes), ["latest"], infos, list(w.order))

    def evil(self) -> dict[str, LayoutInfo]:
        out = {}
        for kind, tar in evil_layers().items():
            name = f"evil-{kind}"
            out[name] = self._single(name, [_layer(self.busybox_tar(), "gzip"), _layer(tar, "")], ["latest"],
                                     labels={"moorage.test.evil": kind})
        return out


def build_random_layers(out_dir: str, name: str = "big", layers: int = 10, layer_bytes: int = 10_000_000,
                        seed: int = 0) -> LayoutInfo:
    """An image of *layers* gzip layers of incompressible data (busybox first), for pull benchmarks.

    Random bytes do not compress, so the blobs are as large as the data: the pull moves what the
    caller asked for.  *seed* makes the content (and so the digests) reproducible.
    """
    import random
    rng = random.Random(seed)
    b = Builder(out_dir)
    made = [_layer(b.busybox_tar(), "gzip")]
    for i in range(layers - 1):
        data = rng.randbytes(layer_bytes)
        made.append(_layer(tar_bytes([Entry(f"data{i}", "dir", mode=0o755),
                                      Entry(f"data{i}/random.bin", data=data)]), "gzip"))
    return b._single(name, made, ["latest"], history=["busybox"] + [f"random {i}" for i in range(layers - 1)])


def build_all(out_dir: str, include_evil: bool = False) -> dict[str, LayoutInfo]:
    """Build every test image under *out_dir*; returns name -> LayoutInfo."""
    b = Builder(out_dir)
    images = {
        "busybox": b.busybox(),
        "multilayer": b.multilayer(),
        "multiarch": b.multiarch(),
        "nonroot": b.nonroot(),
        "dockerv2": b.dockerv2(),
        "digestonly": b.digestonly(),
        "stopsignal": b.stopsignal(),
    }
    if include_evil:
        images.update(b.evil())
    return images


# --- a shared cache of built layouts ----------------------------------------------------------
#
# Every pytest-xdist worker, fixture and benchmark wants the same layouts; building them takes
# seconds each time.  They are built once per set of inputs into a directory named by a hash of
# those inputs, so a changed builder or binary never serves stale layouts, and unchanged ones are
# reused across workers and runs.  Users must treat the layouts as read-only.

CACHE_ENV = "MOORAGE_TEST_LAYOUTS_CACHE"
DEFAULT_CACHE_ROOT = "/var/tmp/moorage-test-layouts"
CACHE_MAX_IDLE = 14 * 86400  # other keys' entries unused this long are removed
_SUMMARY = "summary.json"
BUILD_LOG = "builds.log"  # one line per build, for the curious (and the cache's tests)


def inputs_key(include_evil: bool = False) -> str:
    """A content hash of everything the layouts are made from: this module's source, the
    OCI helpers it serialises with, the busybox and catatonit binaries, the evil flag, and
    the host platform and library versions that shape the bytes (multiarch, tar, gzip, zstd)."""
    import zstandard

    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "big") + data)

    add("builder", _read(os.path.abspath(__file__)))
    add("oci", _read(os.path.abspath(oci.__file__)))
    add("busybox", _read(BUSYBOX))
    add("catatonit", _read(CATATONIT) if os.path.exists(CATATONIT) else b"")
    add("evil", b"1" if include_evil else b"0")
    add("platform", str(host_platform()).encode())
    add("python", sys.version.encode())
    add("zstandard", str(zstandard.__version__).encode())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _layout_from_json(d: dict, entry: str) -> LayoutInfo:
    manifests = [ManifestInfo(**m) for m in d["manifests"]]
    return LayoutInfo(**{**d, "path": os.path.join(entry, d["path"]), "manifests": manifests})


def _load_cached(entry: str) -> dict[str, LayoutInfo] | None:
    """The layouts in a finished cache entry, or None when it is missing or damaged (a blob
    that no longer matches its digest: someone wrote into the cache)."""
    try:
        with open(os.path.join(entry, _SUMMARY), encoding="utf-8") as f:
            summary = json.load(f)
        images = {name: _layout_from_json(d, entry) for name, d in summary.items()}
        for info in images.values():
            if not os.path.isfile(os.path.join(info.path, "index.json")):
                return None
            for digest in info.blobs:
                read_layout_blob(info.path, digest)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with contextlib.suppress(OSError):
        os.utime(entry)  # last use, for pruning
    return images


def _prune(root: str, keep: str) -> None:
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name == keep or name.endswith(".lock") or name == BUILD_LOG:
            continue
        try:
            idle = now - os.stat(path).st_mtime
        except OSError:
            continue
        if idle > CACHE_MAX_IDLE:
            shutil.rmtree(path, ignore_errors=True)


def cached_build_all(include_evil: bool = False, cache_root: str | None = None) -> dict[str, LayoutInfo]:
    """build_all's layouts from the cache, built there first if no process has yet.

    The entry is ``<cache_root>/<inputs_key()>`` (root: ``cache_root``, else
    ``$MOORAGE_TEST_LAYOUTS_CACHE``, else /var/tmp/moorage-test-layouts).  It is built in a
    temporary directory and renamed into place, so it is complete or absent; a file lock
    makes concurrent callers (xdist workers) wait for one build instead of each building.
    """
    root = os.path.abspath(cache_root or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT)
    os.makedirs(root, mode=0o755, exist_ok=True)
    key = inputs_key(include_evil)
    entry = os.path.join(root, key)
    images = _load_cached(entry)
    if images is not None:
        return images
    with _flock(os.path.join(root, f"{key}.lock")):
        images = _load_cached(entry)  # built by another process while we waited
        if images is not None:
            return images
        shutil.rmtree(entry, ignore_errors=True)  # damaged: build it again
        tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
        try:
            built = build_all(os.path.join(tmp, "layouts"), include_evil=include_evil)
            summary = {name: {**info.to_json(), "path": os.path.relpath(info.path, tmp)}
                       for name, info in built.items()}
            with open(os.path.join(tmp, _SUMMARY), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o755)  # mkdtemp made it 0700
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with open(os.path.join(root, BUILD_LOG), "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} built {key} evil={include_evil}\n")
        _prune(root, keep=key)
    images = _load_cached(entry)
    if images is None:
        raise RuntimeError(f"test layouts cache entry {entry} is unreadable right after it was built")
    return images


# --- hostile layers ---------------------------------------------------------------------------

EVIL_TARGET_DIR = "/tmp/moorage-evil-target"


def evil_layers() -> dict[str, bytes]:
    """Uncompressed tar layers that a safe unpacker must refuse or neutralise.

    dotdot            entries named ``../escape.txt`` and ``a/../../escape2.txt``
    absolute          an entry named ``/abs-escape.txt``
    symlink-abs       symlink ``link -> /tmp/moorage-evil-target`` then a file ``link/pwned``
                      (a naive unpacker writes through the link onto the host)
    symlink-rel       symlink ``rel -> ../../../../../../tmp/moorage-evil-target`` then ``rel/pwned``
    hardlink-outside  hardlinks to ``/etc/passwd`` and ``../../../../etc/shadow``
    device            a character device ``dev/evil-mem`` (1, 1) and a fifo
    """
    E = Entry
    return {
        "dotdot": tar_bytes([E("../escape.txt", data=b"escaped\n"),
                             E("a", "dir", mode=0o755),
                             E("a/../../escape2.txt", data=b"escaped\n")], sort=False),
        "absolute": tar_bytes([E("/abs-escape.txt", data=b"escaped\n")], sort=False),
        "symlink-abs": tar_bytes([E("link", "symlink", mode=0o777, target=EVIL_TARGET_DIR),
                                  E("link/pwned", data=b"written through an absolute symlink\n")], sort=False),
        "symlink-rel": tar_bytes([E("rel", "symlink", mode=0o777, target="../../../../../.." + EVIL_TARGET_DIR),
                                  E("rel/pwned", data=b"written through a relative symlink\n")], sort=False),
        "hardlink-outside": tar_bytes([E("hl-passwd", "hardlink", target="/etc/passwd"),
                                       E("hl-shadow", "hardlink", target="../../../../etc/shadow")], sort=False),
        "device": tar_bytes([E("dev", "dir", mode=0o755),
                             E("dev/evil-mem", "char", mode=0o666, devmajor=1, devminor=1),
                             E("dev/evil-fifo", "fifo", mode=0o644)], sort=False),
    }


def write_evil_layers(out_dir: str) -> dict[str, str]:
    """Write each evil layer as ``<out_dir>/<kind>.tar``; returns kind -> path."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for kind, data in evil_layers().items():
        p = os.path.join(out_dir, f"{kind}.tar")
        with open(p, "wb") as f:
            f.write(data)
        paths[kind] = p
    return paths


def read_layout_blob(layout_path: str, digest: str) -> bytes:
    alg, hexpart = digest.split(":", 1)
    data = _read(os.path.join(layout_path, "blobs", alg, hexpart))
    if hashlib.new(alg, data).hexdigest() != hexpart:
        raise ValueError(f"blob {digest} in {layout_path} is corrupt")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory to write one OCI layout per image into")
    ap.add_argument("--evil", action="store_true", help="also build the evil-* images")
    ap.add_argument("--evil-layers", metavar="DIR", help="also write the raw evil layer tars into DIR")
    args = ap.parse_args(argv)
    images = build_all(args.out_dir, include_evil=args.evil)
    summary = {name: info.to_json() for name, info in images.items()}
    if args.evil_layers:
        summary["_evil_layers"] = write_evil_layers(args.evil_layers)
    json.dump(summary, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- stand-ins for the images the upstream CRI conformance suite (critest) pulls -------------
#
# critest (kubernetes-sigs/cri-tools, pkg/validate) pulls images from registry.k8s.io and
# gcr.io/k8s-staging-cri-tools.  These are offline, busybox-static based equivalents with the
# properties the specs check (users, groups, served HTTP pages, process names, a setuid
# binary); they are pushed to a local registry under the same repository paths, and the
# daemon reaches them through certs.d/<upstream-host>/hosts.toml mirrors.  The existing
# images above are untouched: these only add layers on top of the shared busybox layer.

CRITEST_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "bin:x:2:2:bin:/bin:/bin/false\n"
    "sys:x:3:3:sys:/dev:/bin/false\n"
    "sync:x:4:100:sync:/bin:/bin/sync\n"
    "mail:x:8:8:mail:/var/spool/mail:/bin/false\n"
    "www-data:x:33:33:www-data:/var/www:/bin/false\n"
    "operator:x:37:37:Operator:/var:/bin/false\n"
    "nobody:x:65534:65534:nobody:/home:/bin/false\n"
)
CRITEST_GROUP = (
    "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nadm:x:4:\ntty:x:5:\ndisk:x:6:\nlp:x:7:\n"
    "mail:x:8:\nkmem:x:9:\nwheel:x:10:root\ncdrom:x:11:\ndialout:x:18:\nfloppy:x:19:\n"
    "video:x:28:\naudio:x:29:\ntape:x:32:\nwww-data:x:33:\noperator:x:37:\nutmp:x:43:\n"
    "plugdev:x:46:\nstaff:x:50:\nlock:x:54:\nnetdev:x:82:\nusers:x:100:\nnogroup:x:65534:\n"
)

# `ipcs -m` for busybox builds without the ipcs applet: the kernel's own table of the
# caller's IPC namespace (the shmid column is what critest's HostIpc specs look for).
IPCS_SCRIPT = b"""#!/bin/sh
# stand-in for ipcs: print the System V IPC tables of this IPC namespace
case "$1" in
  -q) cat /proc/sysvipc/msg ;;
  -s) cat /proc/sysvipc/sem ;;
  *) cat /proc/sysvipc/shm ;;
esac
"""

# `pgrep PATTERN` for busybox builds without the pgrep applet: pids whose name contains PATTERN.
PGREP_SCRIPT = b"""#!/bin/sh
# stand-in for pgrep: print the pids whose process name (comm) contains $1
[ $# -ge 1 ] || { echo "usage: pgrep PATTERN" >&2; exit 2; }
found=1
for d in /proc/[0-9]*; do
  n=$(cat "$d/comm" 2>/dev/null) || continue
  case "$n" in *"$1"*) echo "${d#/proc/}"; found=0 ;; esac
done
exit $found
"""

# A process whose name (comm) is "nginx": the kernel names a script's process after the
# script.  It writes its pid to /var/run/nginx.pid and serves /usr/share/nginx/html with
# busybox httpd on $NGINX_PORT (80).  Its command line carries "master process" as nginx's
# does (critest's ContainerPID spec greps /proc/1/cmdline for it).
NGINX_SCRIPT = b"""#!/bin/sh
# stand-in for nginx: busybox httpd serving /usr/share/nginx/html
PORT="${NGINX_PORT:-80}"
echo $$ > /var/run/nginx.pid
httpd -f -p "$PORT" -h /usr/share/nginx/html &
child=$!
trap 'kill $child 2>/dev/null; exit 0' TERM INT QUIT
wait $child
"""

HTTPD_SCRIPT = b"""#!/bin/sh
# stand-in for httpd-foreground: busybox httpd serving /usr/local/apache2/htdocs on :80
echo "httpd: busybox httpd stand-in, serving /usr/local/apache2/htdocs on port 80" >&2
httpd -f -p 80 -h /usr/local/apache2/htdocs &
child=$!
trap 'kill $child 2>/dev/null; exit 0' TERM INT QUIT
wait $child
"""

# x86-64 machine code of a program that prints "Effective uid: <geteuid()>\n" in one write
# and exits 0 (k8s e2e "nonewprivs"); assembled from:
#   mov eax,107; syscall; lea rdi,[rip+num]; mov ecx,10; xor r8d,r8d
#   1: xor edx,edx; div ecx; add edx,'0'; push rdx; inc r8d; test eax,eax; jnz 1b
#   2: pop rax; stosb; dec r8d; jnz 2b; mov byte [rdi],10; inc rdi
#   lea rsi,[rip+msg]; mov rdx,rdi; sub rdx,rsi; mov edi,1; mov eax,1; syscall
#   mov eax,60; xor edi,edi; syscall
#   msg: .ascii "Effective uid: "   num:
_NNP_CODE_AMD64 = bytes.fromhex(
    "b86b0000000f05488d3d55000000b90a0000004531c031d2f7f183c2305241ffc085c075f158aa41ffc875f9"
    "c6070a48ffc7488d351b0000004889fa4829f2bf01000000b8010000000f05b83c00000031ff0f05"
    "456666656374697665207569643a20")


def nnp_elf_amd64() -> bytes:
    """A minimal static ELF64 executable (one RWX PT_LOAD) around _NNP_CODE_AMD64."""
    import struct
    base, ehsize, phsize = 0x400000, 64, 56
    code = _NNP_CODE_AMD64
    filesz = ehsize + phsize + len(code)
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,
                       2, 0x3E, 1, base + ehsize + phsize, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0, base, base, filesz, filesz + 64, 0x1000)
    return ehdr + phdr + code


@dataclass
class CritestImage:
    """One critest stand-in: pushed to ``<registry>/<repository>`` under each tag."""

    upstream: str            # the reference critest uses (its host is the one to mirror)
    repository: str          # path in the local registry (upstream path without the host)
    layout: LayoutInfo


def critest_busybox_entries() -> list[Entry]:
    """busybox_entries() with every applet a hardlink of bin/busybox instead of a symlink."""
    return [Entry(e.path, "hardlink", mode=0o755, target="bin/busybox") if e.kind == "symlink" and
            e.target == "busybox" else e for e in busybox_entries()]


def _critest_base_entries(passwd: str = CRITEST_PASSWD, group: str = CRITEST_GROUP) -> list[Entry]:
    return [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/ipcs", data=IPCS_SCRIPT, mode=0o755),
        Entry("bin/pgrep", data=PGREP_SCRIPT, mode=0o755),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", data=passwd.encode()),
        Entry("etc/group", data=group.encode()),
        Entry("var", "dir", mode=0o755),
        Entry("var/run", "dir", mode=0o755),
        Entry("var/www", "dir", mode=0o755),
    ]


def critest_repository(upstream: str) -> str:
    """"gcr.io/a/b:tag" -> "a/b" (the path in the local registry)."""
    path = upstream.split("/", 1)[1].split("@", 1)[0]
    head, _, last = path.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def build_critest_images(out_dir: str) -> dict[str, CritestImage]:
    """Build offline stand-ins for critest's images under *out_dir*; name -> CritestImage.

    Every image is a busybox layer (applets hardlinked) plus one small layer (below).  Names are
    the local layout directory names; ``upstream``/``repository`` say where to push.
    The digest-pinned ``test-image-digest@sha256:9700f9a2…`` cannot be reproduced (its
    digest is upstream's bytes); it is pushed by tag only.
    """
    if host_platform().architecture != "amd64":
        raise RuntimeError("build_critest_images: the nonewprivs stand-in is x86-64 machine code")
    b = Builder(out_dir)
    # Applets as hardlinks of /bin/busybox, as in the busybox image critest expects: masking
    # /bin/ls (MaskedPaths spec) must hide that applet only, not follow a symlink to busybox.
    bb = sorted(critest_busybox_entries(), key=lambda e: (e.kind == "hardlink", e.path))  # targets first
    base = _layer(tar_bytes(bb, sort=False), "gzip")
    common = _critest_base_entries()
    out: dict[str, CritestImage] = {}

    def add(name: str, upstream: str, extra: list[Entry], tags: list[str], *,
            entries: list[Entry] | None = None, **kw: Any) -> None:
        top = tar_bytes((entries if entries is not None else common) + extra)
        info = b._single(f"critest-{name}", [base, _layer(top, "gzip")], tags,
                         history=["busybox-static with applet hardlinks", f"critest stand-in: {name}"], **kw)
        out[name] = CritestImage(upstream, critest_repository(upstream), info)

    e2e = "registry.k8s.io/e2e-test-images"
    staging = "gcr.io/k8s-staging-cri-tools"

    add("busybox", f"{e2e}/busybox:1.29-2", [], ["1.29-2"])

    html = b"<html><body><h1>Welcome to nginx!</h1></body></html>\n"
    nginx_files = [
        Entry("usr/sbin", "dir", mode=0o755),
        Entry("usr/sbin/nginx", data=NGINX_SCRIPT, mode=0o755),
        Entry("usr/share", "dir", mode=0o755),
        Entry("usr/share/nginx", "dir", mode=0o755),
        Entry("usr/share/nginx/html", "dir", mode=0o755),
        Entry("usr/share/nginx/html/index.html", data=html),
    ]
    nginx_cmd = ["nginx", "-g", "daemon off;", "master process"]
    add("nginx", f"{e2e}/nginx:1.14-2", nginx_files, ["1.14-2"],
        config_extra={"Cmd": nginx_cmd, "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGTERM"})
    add("hostnet-nginx", f"{staging}/hostnet-nginx-amd64", nginx_files, ["latest"],
        config_extra={"Cmd": nginx_cmd, "Env": [PATH_ENV, "NGINX_PORT=12003"],
                      "ExposedPorts": {"12003/tcp": {}}})

    add("httpd", f"{e2e}/httpd:2.4.39-4", [
        Entry("usr/local", "dir", mode=0o755),
        Entry("usr/local/bin", "dir", mode=0o755),
        Entry("usr/local/bin/httpd-foreground", data=HTTPD_SCRIPT, mode=0o755),
        Entry("usr/local/apache2", "dir", mode=0o755),
        Entry("usr/local/apache2/htdocs", "dir", mode=0o755),
        Entry("usr/local/apache2/htdocs/index.html", data=b"<html><body><h1>It works!</h1></body></html>\n"),
    ], ["2.4.39-4"], config_extra={"Cmd": ["httpd-foreground"], "ExposedPorts": {"80/tcp": {}}})

    add("nonewprivs", f"{e2e}/nonewprivs:1.3", [
        Entry("usr/local", "dir", mode=0o755),
        Entry("usr/local/bin", "dir", mode=0o755),
        Entry("usr/local/bin/nnp", data=nnp_elf_amd64(), mode=0o4755),
    ], ["1.3"], config_extra={"Entrypoint": ["/usr/local/bin/nnp"], "Cmd": []})

    for name, user in (("test-image-user-uid", "1002"), ("test-image-user-username", "www-data"),
                       ("test-image-user-uid-group", "1003:1004"),
                       ("test-image-user-username-group", "www-data:1004")):
        add(name, f"{staging}/{name}", [], ["latest"], config_extra={"User": user})

    add("test-image-predefined-group", f"{staging}/test-image-predefined-group", [
        Entry("home", "dir", mode=0o755),
        Entry("home/default-user", "dir", mode=0o755, uid=1000, gid=1000),
    ], ["latest"], config_extra={"User": "1000"}, entries=_critest_base_entries(
        CRITEST_PASSWD + "default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n",
        CRITEST_GROUP + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"))

    # image-test: busybox + a file named after the image (or tag), so each is distinct.
    for name in ("test-image-1", "test-image-2", "test-image-3", "test-image-latest", "test-image-digest"):
        add(name, f"{staging}/{name}", [Entry(name, data=name.encode() + b"\n")], ["latest"])
    add("test-image-tags", f"{staging}/test-image-tags",
        [Entry("same-image", data=b"same-image\n")], ["1", "2", "3"])
    for tag in ("test", "all"):
        add(f"test-image-tag-{tag}", f"{staging}/test-image-tag:{tag}", [Entry(tag, data=tag.encode() + b"\n")],
            [tag])

    # pause:3.9, pulled as registry.k8s.io/pause:3.9 and k8s.gcr.io/pause:3.9 (the same image).
    add("pause", "registry.k8s.io/pause:3.9", [], ["3.9"],
        config_extra={"Entrypoint": ["/usr/bin/catatonit", "-P"], "Cmd": []})
    return out
