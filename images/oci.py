"""OCI / Docker image format types and parsers (pure: bytes in, dataclasses out).

Everything a registry or an archive hands us is hostile until checked here:
sizes are bounded before JSON decoding, digests must be well formed, and only
the media types we know how to handle pass.  Docker schema 1 manifests are
refused with an explanation, as every maintained runtime does.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
from dataclasses import dataclass, field
from typing import Any

from moorage.core import safejson
from moorage.core.errors import InvalidArgument
from moorage.core.safejson import clip
from moorage.images.digest import Hasher

# --- media types ----------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

#: layer media type -> compression ("", "gzip", "zstd")
LAYER_TYPES: dict[str, str] = {
    OCI_LAYER: "",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDIST: "",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    OCI_LAYER_NONDIST_ZSTD: "zstd",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_FOREIGN_GZIP: "gzip",
}

#: Accept header for manifest requests, most preferred first.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_CONFIG_SIZE = 8 * 1024 * 1024
MAX_INDEX_ENTRIES = 4096
MAX_LAYERS = 1024
#: An index may name other indexes (OCI allows it); this many levels below the root at most.
MAX_INDEX_DEPTH = 4
#: Image config bounds beyond the document's size: labels as a whole, volumes and ports by count.
MAX_LABELS_BYTES = 256 * 1024
MAX_CONFIG_ENTRIES = 1024
MAX_USER_LENGTH = 256
MAX_PATH_LENGTH = 4096

_DIGEST_RE = re.compile(r"^(?P<alg>[a-z0-9]+(?:[.+_-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]+)$")
_HEX_LEN = {"sha256": 64, "sha512": 128}


# --- digests --------------------------------------------------------------------

def validate_digest(digest: str, what: str = "digest") -> str:
    """Return *digest* if it is a well-formed sha256/sha512 digest, else InvalidArgument."""
    if not isinstance(digest, str):
        raise InvalidArgument(f"{what}: expected a digest string, got {type(digest).__name__}")
    m = _DIGEST_RE.match(digest) if len(digest) <= 200 else None
    if not m:
        raise InvalidArgument(f"{what}: {clip(digest, 140)} is not a valid digest (want sha256:<64 hex>)")
    alg, hexpart = m.group("alg"), m.group("hex")
    if alg not in _HEX_LEN:
        raise InvalidArgument(f"{what}: unsupported digest algorithm {clip(alg, 20)} in {clip(digest, 140)}")
    if len(hexpart) != _HEX_LEN[alg] or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise InvalidArgument(f"{what}: {clip(digest, 140)} is not a valid {alg} digest")
    return digest


def is_digest(s: str) -> bool:
    try:
        validate_digest(s)
        return True
    except InvalidArgument:
        return False


def hasher_for(digest: str) -> Hasher:
    """A fresh hashlib object for the algorithm of *digest*."""
    alg = validate_digest(digest).split(":", 1)[0]
    return hashlib.new(alg)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compute_digest(data: bytes, like: str | None = None) -> str:
    """Digest of *data*, using the algorithm of *like* (default sha256)."""
    if like is None:
        return sha256_digest(data)
    h = hasher_for(like)
    h.update(data)
    return f"{h.name}:{h.hexdigest()}"


# --- data types -------------------------------------------------------------------

@dataclass(frozen=True)
class Platform:
    """An OCI platform as written in an index entry or an image config."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        if self.os_version:
            d["os.version"] = self.os_version
        if self.os_features:
            d["os.features"] = list(self.os_features)
        return d


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    urls: tuple[str, ...] = ()
    artifact_type: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform is not None:
            d["platform"] = self.platform.to_json()
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.urls:
            d["urls"] = list(self.urls)
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config a runtime needs, plus the raw document."""

    architecture: str
    os: str
    variant: str
    diff_ids: tuple[str, ...]
    config: dict[str, Any]  # the "config" object: User, Env, Entrypoint, Cmd, WorkingDir, ...
    raw: dict[str, Any] = field(hash=False, compare=False, repr=False)

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "")

    @property
    def env(self) -> list[str]:
        return list(self.config.get("Env") or [])

    @property
    def entrypoint(self) -> list[str]:
        return list(self.config.get("Entrypoint") or [])

    @property
    def cmd(self) -> list[str]:
        return list(self.config.get("Cmd") or [])

    @property
    def working_dir(self) -> str:
        return str(self.config.get("WorkingDir") or "")

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.config.get("Labels") or {})

    @property
    def stop_signal(self) -> str:
        return str(self.config.get("StopSignal") or "")

    @property
    def exposed_ports(self) -> list[str]:
        return sorted((self.config.get("ExposedPorts") or {}).keys())

    @property
    def volumes(self) -> list[str]:
        return sorted((self.config.get("Volumes") or {}).keys())


# --- parsing helpers ----------------------------------------------------------------

def _load_json(data: bytes, limit: int, what: str) -> dict[str, Any]:
    # bounded in size and depth before the parser runs (see moorage.core.safejson)
    return safejson.loads_object(data, what=what, max_size=limit)


def _str_map(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise InvalidArgument(f"{what}: annotations must map strings to strings")
    return dict(v)


def parse_platform(v: Any, what: str = "platform") -> Platform | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InvalidArgument(f"{what} must be an object")
    os_ = v.get("os", "")
    arch = v.get("architecture", "")
    variant = v.get("variant", "") or ""
    os_version = v.get("os.version", "") or ""
    features = v.get("os.features") or []
    if not all(isinstance(x, str) for x in (os_, arch, variant, os_version)):
        raise InvalidArgument(f"{what}: os, architecture, variant must be strings")
    if not isinstance(features, list) or not all(isinstance(x, str) for x in features):
        raise InvalidArgument(f"{what}: os.features must be a list of strings")
    return Platform(os_, arch, variant, os_version, tuple(features))


def parse_descriptor(v: Any, what: str = "descriptor") -> Descriptor:
    if not isinstance(v, dict):
        raise InvalidArgument(f"{what} must be an object")
    mt = v.get("mediaType")
    if not isinstance(mt, str) or not mt:
        raise InvalidArgument(f"{what}: mediaType missing")
    if len(mt) > 255:
        raise InvalidArgument(f"{what}: mediaType {clip(mt)} is longer than 255 characters")
    digest = validate_digest(v.get("digest"), f"{what} digest")  # type: ignore[arg-type]
    size = v.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: size must be a non-negative integer")
    urls = v.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise InvalidArgument(f"{what}: urls must be a list of strings")
    at = v.get("artifactType", "") or ""
    if not isinstance(at, str):
        raise InvalidArgument(f"{what}: artifactType must be a string")
    return Descriptor(
        media_type=mt,
        digest=digest,
        size=size,
        platform=parse_platform(v.get("platform"), f"{what} platform"),
        annotations=_str_map(v.get("annotations"), what),
        urls=tuple(urls),
        artifact_type=at,
    )


def _reject_schema1(doc: dict[str, Any], media_type: str | None, what: str) -> None:
    if (media_type in SCHEMA1_TYPES or doc.get("mediaType") in SCHEMA1_TYPES
            or (doc.get("schemaVersion") == 1)):
        raise InvalidArgument(
            f"{what} uses Docker image manifest schema 1, which is deprecated and not supported; "
            "re-push the image with a current client (Docker schema 2 or OCI)")


def sniff_media_type(data: bytes, content_type: str | None = None) -> str:
    """The media type of a manifest-ish document: Content-Type if specific, else the body's."""
    ct = (content_type or "").split(";", 1)[0].strip()
    if ct in INDEX_TYPES or ct in MANIFEST_TYPES or ct in SCHEMA1_TYPES:
        return ct
    try:
        doc = safejson.loads(data, what="manifest", max_size=MAX_MANIFEST_SIZE)
    except InvalidArgument:
        return ct  # the parser that runs next says what is wrong with it
    if not isinstance(doc, dict):
        return ct
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1
    # OCI allows omitting mediaType: guess from shape.
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    return ct


def parse_index(data: bytes, media_type: str | None = None, what: str = "image index") -> Index:
    doc = _load_json(data, MAX_MANIFEST_SIZE, what)
    _reject_schema1(doc, media_type, what)
    mt = doc.get("mediaType") or media_type or OCI_INDEX
    if mt not in INDEX_TYPES:
        raise InvalidArgument(f"{what}: unexpected media type {clip(mt)} (want an OCI index or Docker manifest list)")
    if media_type and doc.get("mediaType") and media_type != doc["mediaType"] and media_type in INDEX_TYPES:
        raise InvalidArgument(f"{what}: media type {clip(media_type)} disagrees with the document's "
                              f"{clip(doc['mediaType'])}")
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schemaVersion must be 2")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise InvalidArgument(f"{what}: manifests must be a list")
    if len(entries) > MAX_INDEX_ENTRIES:
        raise InvalidArgument(f"{what}: {len(entries)} entries is over the limit of {MAX_INDEX_ENTRIES}")
    manifests = tuple(parse_descriptor(e, f"{what} entry {i}") for i, e in enumerate(entries))
    return Index(media_type=mt, manifests=manifests, annotations=_str_map(doc.get("annotations"), what))


def parse_manifest(data: bytes, media_type: str | None = None, what: str = "image manifest") -> Manifest:
    doc = _load_json(data, MAX_MANIFEST_SIZE, what)
    _reject_schema1(doc, media_type, what)
    mt = doc.get("mediaType") or media_type or OCI_MANIFEST
    if mt not in MANIFEST_TYPES:
        raise InvalidArgument(f"{what}: unexpected media type {clip(mt)} (want an OCI or Docker v2 image manifest)")
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schemaVersion must be 2")
    config = parse_descriptor(doc.get("config"), f"{what} config")
    layers_raw = doc.get("layers")
    if not isinstance(layers_raw, list):
        raise InvalidArgument(f"{what}: layers must be a list")
    if len(layers_raw) > MAX_LAYERS:
        raise InvalidArgument(f"{what}: {len(layers_raw)} layers is over the limit of {MAX_LAYERS}")
    layers = tuple(parse_descriptor(e, f"{what} layer {i}") for i, e in enumerate(layers_raw))
    if config.size > MAX_CONFIG_SIZE:
        raise InvalidArgument(f"{what}: config size {config.size} is over the {MAX_CONFIG_SIZE} byte limit")
    return Manifest(media_type=mt, config=config, layers=layers,
                    annotations=_str_map(doc.get("annotations"), what))


def parse_manifest_or_index(data: bytes, media_type: str | None = None,
                            what: str = "manifest") -> Index | Manifest:
    mt = sniff_media_type(data, media_type)
    if mt in SCHEMA1_TYPES:
        _reject_schema1({}, mt, what)
    if mt in INDEX_TYPES:
        return parse_index(data, mt, what)
    if mt in MANIFEST_TYPES:
        return parse_manifest(data, mt, what)
    raise InvalidArgument(f"{what}: unsupported media type {clip(mt or 'unknown')}")


def parse_config(data: bytes, what: str = "image config") -> ImageConfig:
    doc = _load_json(data, MAX_CONFIG_SIZE, what)
    arch = doc.get("architecture", "")
    os_ = doc.get("os", "")
    variant = doc.get("variant", "") or ""
    if not all(isinstance(x, str) for x in (arch, os_, variant)):
        raise InvalidArgument(f"{what}: architecture, os and variant must be strings")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidArgument(f"{what}: rootfs.type must be 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise InvalidArgument(f"{what}: rootfs.diff_ids must be a list")
    for i, d in enumerate(diff_ids):
        validate_digest(d, f"{what} diff_id {i}")
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"{what}: config must be an object")
    validate_config_fields(cfg, what)
    return ImageConfig(architecture=arch, os=os_, variant=variant, diff_ids=tuple(diff_ids),
                       config=cfg, raw=doc)


_PORT_RE = re.compile(r"(\d{1,5})(?:/(tcp|udp|sctp))?", re.IGNORECASE)
_RT_SIGNAL_RE = re.compile(r"(?:SIG)?RTM(IN|AX)([+-]\d{1,2})?")


def _no_nul(value: str, field_name: str, what: str) -> None:
    # A NUL can never reach the kernel (argv, env, paths are C strings): refused up front.
    if "\x00" in value:
        raise InvalidArgument(f"{what}: config.{field_name} contains a NUL character")


def _valid_signal(name: str) -> bool:
    """Signal names as Docker writes STOPSIGNAL: SIGTERM, TERM, 15, SIGRTMIN+3."""
    n = name.upper()
    if n.isdigit():
        return 1 <= int(n) <= 64
    m = _RT_SIGNAL_RE.fullmatch(n)
    if m:
        off = int(m.group(2) or 0)
        return 0 <= off <= 30 if m.group(1) == "IN" else -30 <= off <= 0
    sig = n if n.startswith("SIG") else "SIG" + n
    return sig in signal.Signals.__members__


def _check_user(user: str, what: str) -> None:
    """``name``, ``uid``, ``name:group`` or ``uid:gid`` (empty: root), as the runtime reads it."""
    if len(user) > MAX_USER_LENGTH:
        raise InvalidArgument(f"{what}: config.User is {len(user)} characters, over {MAX_USER_LENGTH}")
    parts = user.split(":")
    bad = (len(parts) > 2 or any(not p or "/" in p or not p.isprintable() or p != p.strip() for p in parts)
           or any(p.isdigit() and int(p) > 0xFFFFFFFE for p in parts))
    if bad:
        raise InvalidArgument(f"{what}: config.User {clip(user)} is not a user, uid, user:group or uid:gid")


def _string_map(v: Any, field_name: str, what: str, *, values: type | tuple[type, ...]) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, values) for k, x in v.items()):
        kind = "strings" if values is str else "objects"
        raise InvalidArgument(f"{what}: config.{field_name} must map strings to {kind}")
    if len(v) > MAX_CONFIG_ENTRIES:
        raise InvalidArgument(f"{what}: config.{field_name} has {len(v)} entries, over {MAX_CONFIG_ENTRIES}")
    for k in v:
        if not k:
            raise InvalidArgument(f"{what}: config.{field_name} has an empty key")
        _no_nul(k, field_name, what)
    return v


def validate_config_fields(cfg: dict[str, Any], what: str) -> None:
    """Check the runtime part (``config``) of an image config at pull or import time.

    What a container would be made from must be usable: no NUL anywhere (it cannot be
    passed to the kernel), ``NAME=value`` environment entries with a name (an entry
    without ``=`` is kept: it unsets the variable, as containerd applies it), an
    absolute working directory, a user the runtime can parse, a stop signal that
    exists, absolute volume paths, ``port[/proto]`` exposed ports and bounded labels.
    Refusing at pull is the truthful moment: such an image can never run.
    """
    for key in ("Env", "Entrypoint", "Cmd"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            raise InvalidArgument(f"{what}: config.{key} must be a list of strings")
        for i, x in enumerate(v or ()):
            _no_nul(x, f"{key}[{i}]", what)
    for i, e in enumerate(cfg.get("Env") or ()):
        if not e or e.startswith("="):
            raise InvalidArgument(f"{what}: config.Env[{i}] {clip(e)} has no variable name")
    for key in ("User", "WorkingDir", "StopSignal"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str):
            raise InvalidArgument(f"{what}: config.{key} must be a string")
        if v:
            _no_nul(v, key, what)
    wd = cfg.get("WorkingDir") or ""
    if wd and (not wd.startswith("/") or len(wd) > MAX_PATH_LENGTH):
        raise InvalidArgument(f"{what}: config.WorkingDir {clip(wd)} is not an absolute path")
    if cfg.get("User"):
        _check_user(cfg["User"], what)
    sig = cfg.get("StopSignal") or ""
    if sig and not _valid_signal(sig):
        raise InvalidArgument(f"{what}: config.StopSignal {clip(sig)} is not a signal")
    for path in _string_map(cfg.get("Volumes"), "Volumes", what, values=(dict, type(None))):
        if not path.startswith("/") or len(path) > MAX_PATH_LENGTH:
            raise InvalidArgument(f"{what}: config.Volumes entry {clip(path)} is not an absolute path")
    for port in _string_map(cfg.get("ExposedPorts"), "ExposedPorts", what, values=(dict, type(None))):
        m = _PORT_RE.fullmatch(port)
        if m is None or int(m.group(1)) > 65535:
            raise InvalidArgument(f"{what}: config.ExposedPorts entry {clip(port)} is not port[/tcp|udp|sctp]")
    labels = _string_map(cfg.get("Labels"), "Labels", what, values=str)
    total = sum(len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
                for k, v in labels.items())
    if total > MAX_LABELS_BYTES:
        raise InvalidArgument(f"{what}: config.Labels hold {total} bytes, over the {MAX_LABELS_BYTES} byte limit")


def check_manifest_layers(manifest: Manifest, config: ImageConfig, what: str = "image") -> None:
    """A manifest's layer list and its config's diff_ids must have the same length."""
    if len(manifest.layers) != len(config.diff_ids):
        raise InvalidArgument(
            f"{what}: manifest has {len(manifest.layers)} layers but config lists "
            f"{len(config.diff_ids)} diff_ids")
    for i, layer in enumerate(manifest.layers):
        if layer.media_type not in LAYER_TYPES:
            raise InvalidArgument(f"{what}: layer {i} has unsupported media type {clip(layer.media_type)}")


def layer_compression(media_type: str) -> str:
    """"", "gzip" or "zstd" for a layer media type; InvalidArgument for unknown ones."""
    try:
        return LAYER_TYPES[media_type]
    except KeyError:
        raise InvalidArgument(f"unsupported layer media type {clip(media_type)}") from None


def canonical_json(doc: Any) -> bytes:
    """Deterministic JSON encoding used for documents we write ourselves."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
