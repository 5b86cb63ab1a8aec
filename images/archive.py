"""Offline image import and export: OCI image layout archives and ``docker save`` archives.

Import reads an archive (a tar, optionally gzip/zstd/xz/bz2 compressed, that must be seekable):

* **OCI layout** (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``): every entry of
  ``index.json`` is an image; a nested index (multi-arch) is resolved to this machine's
  platform.  Names come from the entry's annotations: ``io.containerd.image.name`` (a full
  reference) or ``org.opencontainers.image.ref.name`` (a full reference, or a bare tag that
  is joined to ``base_name`` when one is given).
* **docker save** (``manifest.json`` with ``Config``, ``RepoTags``, ``Layers``): the config's
  and layers' digests are computed; an OCI manifest is synthesised for them.  (A Docker 25+
  archive carries both forms; the OCI one is preferred.)

The archive is untrusted: it is read by ``moorage.images.tarstream`` (bounded, strict headers;
gzip, zstd, xz or bz2 around it) and never extracted onto disk.  Only members named by a
descriptor (``blobs/<alg>/<hex>``) or by ``manifest.json`` are read, by exact name; their
content streams into the content store, which verifies size and digest before anything is
visible; manifests and configs are size-bounded; layers are unpacked by the same safe unpack
as pulls.  Symlinked members (older ``docker save`` de-duplicates layers that way) are
followed inside the archive only.

Export writes one OCI layout tar (plus a ``manifest.json`` so ``docker load`` takes it too)
of one or more images, with each tag as an ``index.json`` entry; it imports again unchanged.

Both run next to a daemon safely: they hold ``gc.lock`` shared so the daemon's GC and
start-up cleaning never remove what they are working with.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import posixpath
import secrets
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import zstandard

from moorage.core import safejson
from moorage.core.errors import InvalidArgument, MoorageError
from moorage.core.store import ImageRecord
from moorage.images import oci
from moorage.images.digest import Digest
from moorage.images.oci import Platform
from moorage.images.platform import select_manifest
from moorage.images.reference import Reference, parse_reference
from moorage.images.service import ImageService
from moorage.images.tarstream import TarCorrupt, TarEntry, TarLimits, TarReader, TarRefused, shown

log = logging.getLogger("moorage.images.archive")

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
MAX_INDEX_JSON = oci.MAX_MANIFEST_SIZE
MAX_DOCKER_MANIFEST_JSON = 4 * 1024 * 1024
_CHUNK = 1 << 20
_MAX_LINK_HOPS = 16
_TAR_MTIME = 946684800  # exports are reproducible: fixed mtimes, owners and order


class _Source(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class ArchiveError(InvalidArgument):
    """The archive is malformed, incomplete, or its content does not match its digests."""


@dataclass
class Imported:
    record: ImageRecord
    refs: list[str]


# --- reading an archive -------------------------------------------------------------------------

def _norm(name: str) -> str | None:
    """A member name as a relative POSIX path, or None when it could never be asked for."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    if not name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    return "/".join(parts)


_MAX_MEMBERS = 65_536  # names kept from one archive; an image layout holds a few per image
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bz2"))


def _open_archive_file(path: str) -> BinaryIO:
    return open(path, "rb")


class _Archive:
    """The members of an archive, read by ``moorage.images.tarstream`` in one forward pass; a
    member's data is then read from its recorded offset in the decompressed stream (a compressed
    archive is decompressed again from the start when a read goes backwards, as tarfile does)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._f = _open_archive_file(path)
        except OSError as e:
            raise ArchiveError(f"{path}: not a readable tar archive ({e.strerror})") from None
        try:
            head = self._f.read(6)
            self._kind = next((kind for magic, kind in _MAGIC if head.startswith(magic)), "none")
            self._stream = self._reopen()
            self.members: dict[str, TarEntry] = {}
            self._data_at: dict[str, int] = {}
            reader = TarReader(self._stream, label=path,
                               limits=TarLimits(max_headers=4 * _MAX_MEMBERS + 16))
            with self._errors():
                for m in reader:
                    n = _norm(m.name)
                    if n is not None and (m.isreg() or m.issym() or m.islnk()):
                        if n not in self.members and len(self.members) >= _MAX_MEMBERS:
                            raise ArchiveError(f"{path}: has more than {_MAX_MEMBERS} members")
                        self.members[n] = m
                        self._data_at[n] = reader.position
            self._at = reader.position
        except BaseException:
            self._f.close()
            raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Decompression and tar errors as ArchiveError (INVALID_ARGUMENT: an import is a CLI
        call on a file the operator named)."""
        try:
            yield
        except TarRefused as e:
            raise ArchiveError(e.message) from None
        except TarCorrupt as e:
            raise ArchiveError(f"not a readable tar archive: {e.message}") from None
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as e:
            raise ArchiveError(f"{self.path}: corrupt archive ({str(e)[:200]})") from None

    def _reopen(self) -> _Source:
        self._f.seek(0)
        self._at = 0
        if self._kind == "gzip":
            return gzip.GzipFile(fileobj=self._f, mode="rb")
        if self._kind == "zstd":
            return zstandard.ZstdDecompressor().stream_reader(self._f, read_across_frames=True)
        if self._kind == "xz":
            return lzma.LZMAFile(self._f)
        if self._kind == "bz2":
            return bz2.BZ2File(self._f)
        return self._f

    def _read_at(self, pos: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``pos`` of the decompressed stream."""
        with self._errors():
            if self._kind == "none":
                self._f.seek(pos)
            else:
                if pos < self._at:
                    self._stream = self._reopen()
                while self._at < pos:
                    skipped = self._stream.read(min(_CHUNK, pos - self._at))
                    if not skipped:
                        break
                    self._at += len(skipped)
            data = self._stream.read(n)
            self._at = pos + len(data)
            return data

    def close(self) -> None:
        self._f.close()

    def has(self, name: str) -> bool:
        return self._resolve(name, missing_ok=True) is not None

    def _resolve(self, name: str, missing_ok: bool = False) -> str | None:
        """The normalised name of the regular member ``name`` leads to (following links)."""
        n = _norm(name)
        for _ in range(_MAX_LINK_HOPS):
            m = self.members.get(n) if n is not None else None
            if m is None or n is None:
                if missing_ok:
                    return None
                raise ArchiveError(f"{self.path}: has no member \"{shown(name)}\"")
            if m.isreg():
                return n
            if m.issym():  # relative to the link's directory, inside the archive; absolute: never
                n = None if m.linkname.startswith("/") else \
                    _norm(posixpath.normpath(posixpath.join(posixpath.dirname(n), m.linkname)))
            else:  # hardlink: names another member
                n = _norm(m.linkname)
        raise ArchiveError(f"{self.path}: member \"{shown(name)}\" is a chain of links")

    def open(self, name: str) -> tuple[_Member, int]:
        n = self._resolve(name)
        assert n is not None  # _resolve raises when missing_ok is False
        size = self.members[n].size
        return _Member(self, self._data_at[n], size), size

    def read(self, name: str, limit: int) -> bytes:
        f, size = self.open(name)
        if size > limit:
            raise ArchiveError(f"{self.path}: {shown(name)} is {size} bytes, over the {limit} byte limit")
        return f.read(limit + 1)

    def sha256(self, name: str) -> tuple[str, int]:
        f, _ = self.open(name)
        h = hashlib.sha256()
        n = 0
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
        return f"sha256:{h.hexdigest()}", n


class _Member:
    """The data of one member, read forward."""

    def __init__(self, arc: _Archive, start: int, size: int) -> None:
        self._arc = arc
        self._pos = start
        self._left = size

    def read(self, n: int = -1) -> bytes:
        want = self._left if n is None or n < 0 else min(n, self._left)
        parts: list[bytes] = []
        while want > 0:
            data = self._arc._read_at(self._pos, want)
            if not data:
                raise ArchiveError(f"{self._arc.path}: the archive ends inside a member")
            parts.append(data)
            self._pos += len(data)
            self._left -= len(data)
            want -= len(data)
        return b"".join(parts)


def _blob_name(digest: str) -> str:
    d = Digest.parse(digest)
    return f"blobs/{d.algorithm}/{d.hex}"


class _Importer:
    def __init__(self, svc: ImageService, arc: _Archive, lease_id: str, platform: Platform | None = None) -> None:
        self.svc = svc
        self.arc = arc
        self.lease_id = lease_id
        self.platform = platform
        self.written: list[str] = []

    def _hold(self, *digests: str) -> None:
        self.svc.store.add_lease(self.lease_id, [str(d) for d in digests])

    def small_blob(self, desc: oci.Descriptor, limit: int, member: str | None = None) -> bytes:
        """A manifest/index/config: bounded, verified, stored."""
        if desc.size > limit:
            raise ArchiveError(f"{self.arc.path}: blob {desc.digest} is {desc.size} bytes, over the {limit} byte limit")
        data = self.arc.read(member or _blob_name(desc.digest), limit)
        if len(data) != desc.size:
            raise ArchiveError(f"{self.arc.path}: blob {desc.digest} is {len(data)} bytes, "
                               f"its descriptor says {desc.size}")
        self._hold(desc.digest)
        if not self.svc.content.exists(desc.digest):
            try:
                self.svc.content.write_blob(data, desc.digest)
            except MoorageError as e:
                raise ArchiveError(f"{self.arc.path}: {e.message}") from None
            self.written.append(str(desc.digest))
        return data

    def big_blob(self, digest: str, size: int | None, member: str | None = None) -> None:
        """A layer: streamed into the content store, verified on commit."""
        self._hold(digest)
        if self.svc.content.exists(digest):
            return
        f, msize = self.arc.open(member or _blob_name(digest))
        if size is not None and msize != size:
            raise ArchiveError(f"{self.arc.path}: blob {digest} is {msize} bytes, its descriptor says {size}")

        def chunks() -> Iterator[bytes]:
            while chunk := f.read(_CHUNK):
                yield chunk

        try:
            self.svc.content.ingest(digest, msize, chunks())
        except MoorageError as e:
            raise ArchiveError(f"{self.arc.path}: {e.message}") from None
        self.written.append(str(digest))

    def image_from_manifest(self, refs: list[Reference], root_digest: str, mdesc: oci.Descriptor,
                            mbytes: bytes) -> ImageRecord:
        manifest = oci.parse_manifest(mbytes, mdesc.media_type, f"image manifest {mdesc.digest}")
        if manifest.config.media_type not in oci.CONFIG_TYPES:
            raise ArchiveError(f"{self.arc.path}: {mdesc.digest} is not a container image "
                               f"(config media type {manifest.config.media_type!r})")
        config_bytes = self.small_blob(manifest.config, oci.MAX_CONFIG_SIZE)
        config = oci.parse_config(config_bytes, f"image config {manifest.config.digest}")
        oci.check_manifest_layers(manifest, config, str(mdesc.digest))
        for layer in manifest.layers:
            self.big_blob(layer.digest, layer.size)
        return self.svc.import_image(refs, root_digest, str(mdesc.digest), manifest, config_bytes)


def _names_for(desc: oci.Descriptor, base_name: str | None, where: str) -> list[Reference]:
    ann = desc.annotations or {}
    candidates = []
    if ann.get(ANNOTATION_IMAGE_NAME):
        candidates.append(ann[ANNOTATION_IMAGE_NAME])
    ref_name = ann.get(ANNOTATION_REF_NAME, "")
    if ref_name:
        if "/" in ref_name or ":" in ref_name or "@" in ref_name:
            candidates.append(ref_name)
        elif base_name:
            candidates.append(f"{base_name}:{ref_name}")
        else:
            log.info("%s: entry %s is tagged %r but has no repository name; pass a base name to keep it",
                     where, desc.digest, ref_name)
    out: list[Reference] = []
    for c in candidates:
        try:
            r = parse_reference(c)
        except InvalidArgument as e:
            raise ArchiveError(f"{where}: entry {desc.digest}: {e.message}") from None
        if r.digest is None and all(str(x) != str(r) for x in out):
            out.append(r)
    return out


def _import_oci(imp: _Importer, base_name: str | None) -> list[Imported]:
    arc = imp.arc
    index = oci.parse_index(arc.read("index.json", MAX_INDEX_JSON), oci.OCI_INDEX, f"{arc.path}: index.json")
    if not index.manifests:
        raise ArchiveError(f"{arc.path}: index.json lists no images")
    out: list[Imported] = []
    by_root: dict[str, Imported] = {}
    for entry in index.manifests:
        refs = _names_for(entry, base_name, arc.path)
        mt = entry.media_type
        if mt in oci.INDEX_TYPES:
            sub = oci.parse_index(imp.small_blob(entry, oci.MAX_MANIFEST_SIZE), mt, f"image index {entry.digest}")
            chosen = select_manifest(sub.manifests, imp.platform, f"image index {entry.digest} in {arc.path}")
            mdesc = chosen
        elif mt in oci.MANIFEST_TYPES:
            mdesc = entry
        else:
            log.info("%s: skipping index entry %s of media type %r", arc.path, entry.digest, mt)
            continue
        mbytes = imp.small_blob(mdesc, oci.MAX_MANIFEST_SIZE)
        rec = imp.image_from_manifest(refs, str(entry.digest), mdesc, mbytes)
        prev = by_root.get(str(entry.digest))
        if prev is not None:
            prev.record = rec
            prev.refs += [str(r) for r in refs]
        else:
            by_root[str(entry.digest)] = Imported(rec, [str(r) for r in refs])
            out.append(by_root[str(entry.digest)])
    if not out:
        raise ArchiveError(f"{arc.path}: index.json lists no container images")
    return out


def _import_docker(imp: _Importer) -> list[Imported]:
    arc = imp.arc
    try:
        doc = safejson.loads(arc.read("manifest.json", MAX_DOCKER_MANIFEST_JSON), what="manifest.json",
                             max_size=MAX_DOCKER_MANIFEST_JSON)
    except InvalidArgument as e:
        raise ArchiveError(f"{arc.path}: {e.message}") from None
    if not isinstance(doc, list) or not doc:
        raise ArchiveError(f"{arc.path}: manifest.json must be a non-empty list of images")
    out: list[Imported] = []
    for i, item in enumerate(doc):
        where = f"{arc.path}: manifest.json[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("Config"), str) \
                or not isinstance(item.get("Layers"), list) or not all(isinstance(l, str) for l in item["Layers"]):
            raise ArchiveError(f"{where}: want {{\"Config\": str, \"RepoTags\": [str], \"Layers\": [str]}}")
        config_bytes = arc.read(item["Config"], oci.MAX_CONFIG_SIZE)
        if len(config_bytes) > oci.MAX_CONFIG_SIZE:
            raise ArchiveError(f"{where}: config is over the {oci.MAX_CONFIG_SIZE} byte limit")
        config_desc = oci.Descriptor(oci.OCI_CONFIG, oci.sha256_digest(config_bytes), len(config_bytes))
        layers = []
        for name in item["Layers"]:
            digest, size = arc.sha256(name)
            f, _ = arc.open(name)
            head = f.read(4)
            if head[:2] == b"\x1f\x8b":
                mt = oci.OCI_LAYER_GZIP
            elif head == b"\x28\xb5\x2f\xfd":
                mt = oci.OCI_LAYER_ZSTD
            else:
                mt = oci.OCI_LAYER
            imp.big_blob(digest, size, member=name)
            layers.append(oci.Descriptor(mt, digest, size))
        imp.small_blob(config_desc, oci.MAX_CONFIG_SIZE, member=item["Config"])
        manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": config_desc.to_json(),
                    "layers": [l.to_json() for l in layers]}
        mbytes = oci.canonical_json(manifest)
        mdesc = oci.Descriptor(oci.OCI_MANIFEST, oci.sha256_digest(mbytes), len(mbytes))
        imp._hold(mdesc.digest)
        if not imp.svc.content.exists(mdesc.digest):
            imp.svc.content.write_blob(mbytes, mdesc.digest)
            imp.written.append(mdesc.digest)
        refs = []
        for t in item.get("RepoTags") or []:
            if not isinstance(t, str):
                raise ArchiveError(f"{where}: RepoTags must be strings")
            try:
                r = parse_reference(t)
            except InvalidArgument as e:
                raise ArchiveError(f"{where}: {e.message}") from None
            refs.append(r)
        parsed = oci.parse_manifest(mbytes, oci.OCI_MANIFEST, f"{where}")
        config = oci.parse_config(config_bytes, f"{where}: config")
        oci.check_manifest_layers(parsed, config, where)
        rec = imp.svc.import_image(refs, mdesc.digest, mdesc.digest, parsed, config_bytes)
        out.append(Imported(rec, [str(r) for r in refs]))
    return out


def import_archive(svc: ImageService, path: str, *, base_name: str | None = None,
                   platform: Platform | None = None) -> list[Imported]:
    """Import every image of the archive at *path* into *svc* (an ImageService). Blocking."""
    if base_name:
        r = parse_reference(base_name, default_tag=None)
        if r.tag or r.digest:
            raise InvalidArgument(f"base name {base_name!r} must be a repository without tag or digest")
        base_name = r.name
    arc = _Archive(path)
    lease_id = f"import-{secrets.token_hex(8)}"
    try:
        with svc.gc_lock(shared=True):
            imp = _Importer(svc, arc, lease_id, platform)
            try:
                if "index.json" in arc.members:
                    if not arc.has("oci-layout"):
                        log.info("%s: index.json without oci-layout; reading it as an OCI layout", path)
                    result = _import_oci(imp, base_name)
                elif "manifest.json" in arc.members:
                    result = _import_docker(imp)
                else:
                    raise ArchiveError(f"{path}: neither an OCI layout (index.json) nor a docker save "
                                       "archive (manifest.json)")
            except BaseException:
                _forget(svc, imp.written)
                raise
            finally:
                svc.store.release_lease(lease_id)
    finally:
        arc.close()
    return result


def _forget(svc: ImageService, digests: list[str]) -> None:
    """After a failed import: drop the blobs it wrote that no image references."""
    referenced: set[str] = set()
    for img in svc.store.list_images():
        referenced.update([img.id, img.manifest_digest, *img.layers, img.extra.get("root_digest", "")])
    for d in digests:
        if d not in referenced:
            with contextlib.suppress(MoorageError):
                svc.content.delete(d, missing_ok=True)


# --- export --------------------------------------------------------------------------------------

def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), _TAR_MTIME, 0o644
    tf.addfile(ti, io.BytesIO(data))


def _add_dir(tf: tarfile.TarFile, name: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mtime, ti.mode = tarfile.DIRTYPE, _TAR_MTIME, 0o755
    tf.addfile(ti)


def export_images(svc: ImageService, refs: list[str], path: str) -> list[ImageRecord]:
    """Write the images named by *refs* to an OCI layout tar at *path* (atomically). Blocking."""
    if not refs:
        raise InvalidArgument("nothing to export: name at least one image")
    recs: list[tuple[ImageRecord, str | None]] = []
    for ref in refs:
        rec = svc.get_local(ref)
        recs.append((rec, None))
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    try:
        with svc.gc_lock(shared=True), tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}\n')
            _add_dir(tf, "blobs")
            _add_dir(tf, "blobs/sha256")
            written: set[str] = set()
            entries: list[dict] = []
            docker: list[dict] = []
            seen: set[str] = set()
            for rec, _ in recs:
                if rec.id in seen:
                    continue
                seen.add(rec.id)
                rec = svc.store.get_image(rec.id)  # fresh, under the lock
                mbytes = svc.content.read_bytes(rec.manifest_digest, oci.MAX_MANIFEST_SIZE)
                mt = oci.sniff_media_type(mbytes)
                manifest = oci.parse_manifest(mbytes, mt, f"image manifest {rec.manifest_digest}")
                for d in [rec.manifest_digest, str(manifest.config.digest), *[str(l.digest) for l in manifest.layers]]:
                    if d in written:
                        continue
                    with svc.content.open(d) as f:
                        ti = tarfile.TarInfo(_blob_name(d))
                        ti.size, ti.mtime, ti.mode = os.fstat(f.fileno()).st_size, _TAR_MTIME, 0o444
                        tf.addfile(ti, f)
                    written.add(d)
                cfg = rec.config if isinstance(rec.config, dict) else {}
                plat = oci.Platform(cfg.get("os") or "linux", cfg.get("architecture") or "",
                                    cfg.get("variant") or "") if cfg.get("architecture") else None
                base = oci.Descriptor(mt, rec.manifest_digest, len(mbytes), platform=plat).to_json()
                if rec.repo_tags:
                    for tag in rec.repo_tags:
                        r = parse_reference(tag)
                        entries.append({**base, "annotations": {ANNOTATION_IMAGE_NAME: str(r),
                                                                ANNOTATION_REF_NAME: r.tag}})
                else:
                    entries.append(base)
                docker.append({"Config": _blob_name(str(manifest.config.digest)),
                               "RepoTags": [parse_reference(t).familiar() for t in rec.repo_tags],
                               "Layers": [_blob_name(str(l.digest)) for l in manifest.layers]})
            index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": entries}
            _add_bytes(tf, "index.json", json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")
            _add_bytes(tf, "manifest.json", json.dumps(docker, indent=2).encode() + b"\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return [r for r, _ in recs]
