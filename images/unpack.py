"""Apply an image layer (tar, optionally gzip/zstd compressed) into a directory.

Layers are hostile input (DESIGN principle 7).  This module therefore never
extracts with a library; it creates every entry itself, relative to directory
file descriptors opened with ``O_NOFOLLOW``, so nothing it writes can land
outside the target directory:

* Entry names are normalised: a leading ``/`` and ``.`` components are dropped
  (``/etc/passwd`` means ``<root>/etc/passwd``, as GNU tar and containerd do);
  any ``..`` component is rejected, even one that would stay inside.
* Parent directories are walked one component at a time with ``O_NOFOLLOW``.
  A parent that is a symbolic link is rejected ("refusing to write through
  it"), in this layer and in lower layers alike, so ``link -> /etc`` followed
  by ``link/evil`` fails.  Missing parents are created (mode 0755, or copying
  mode/owner of the same directory in a lower layer in overlay mode).
* The root entry (``./``) is skipped: the snapshot root keeps its attributes.
* Symlinks are created verbatim (their targets are only ever resolved inside
  the container) and never followed by us.
* Hardlink targets are resolved the same way as entry names and must exist
  inside the snapshot; in overlay mode a target from a lower layer is copied up
  into the new layer first (the nearest layer that has it wins, honouring
  whiteouts and opaque directories), then linked.  Links to directories are
  rejected.
* Character/block devices are rejected unless ``allow_devices`` (privileged
  semantics); FIFOs are always allowed (they reach no host resource).  The only
  device created otherwise is the overlayfs whiteout (char 0/0).
* Whiteouts: ``.wh.<name>`` and ``.wh..wh..opq``.  In ``overlay`` mode they become
  a char 0/0 device and the ``trusted.overlay.opaque=y`` xattr in the new upper
  directory; in ``copy`` mode (applying onto a copy of the parent) the path is
  deleted / the directory emptied, keeping what this same layer added (a
  whiteout only hides lower layers).  Other ``.wh..wh.*`` (aufs metadata) are skipped.
* xattrs come from PAX ``SCHILY.xattr.*`` records; ``trusted.overlay.*`` from a
  layer is dropped (it would let a layer forge overlayfs metadata).  They are set
  after the owner (chown clears ``security.capability``) and the data (so does a
  write), and before the mode, as containerd does; a kernel refusal is handled as
  containerd handles it (``_Applier._set_xattr``).
* Bounded: number of entries, uncompressed bytes, size of any single file and
  of all files together, name length and directory depth.  The tar headers are
  read by ``moorage.images.tarstream``, which bounds and checks every header
  before reading its body and refuses corrupt archives (``CorruptLayer``,
  DATA_LOSS, naming the byte offset).  Sparse members are rejected: their holes
  would be written out in full, so a tiny layer could fill the disk.

The uncompressed stream is hashed while it is read (the whole stream, including
the trailing padding after the end-of-archive marker), giving the layer's
diff_id, which the caller compares with the image config's ``rootfs.diff_ids``
(or passes as ``expected_diff_id``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Literal, Protocol, cast, overload

from moorage.core.errors import DataLoss, Internal, InvalidArgument, MoorageError, ResourceExhausted, Unavailable
from moorage.images.digest import Digest
from moorage.images.gzipio import gzip_errors, open_gzip
from moorage.images.tarstream import TarCorrupt, TarEntry, TarLimits, TarReader, TarRefused, shown

log = logging.getLogger(__name__)

MODE_OVERLAY = "overlay"
MODE_COPY = "copy"

OPAQUE_XATTR = "trusted.overlay.opaque"
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20


def _decompress_errors() -> tuple[type[Exception], ...]:
    """What a corrupt or truncated compressed stream raises (evaluated only when one is raised)."""
    errors = gzip_errors()
    zstandard = sys.modules.get("zstandard")  # not imported: no zstd stream can have raised
    return errors if zstandard is None else (*errors, zstandard.ZstdError)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ALLOWED_XATTR_PREFIXES = ("user.", "security.", "trusted.", "system.")
_IS_ROOT = os.geteuid() == 0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class LayerError(InvalidArgument):
    """The layer is malformed or tries something it may not do."""


class CorruptLayer(DataLoss, LayerError):
    """The layer's bytes are not a valid (compressed) tar archive: DATA_LOSS, with the byte
    offset of the bad header; the image itself is broken, so retrying cannot help.  Still a
    ``LayerError`` (a refused layer) for the callers that clean up after one."""


class DiffIDMismatch(InvalidArgument):
    """The layer's uncompressed content does not match the diff_id the config announced."""


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    max_entries: int = 2_000_000
    max_bytes: int = 256 << 30          # uncompressed tar stream
    max_file_size: int | None = None    # defaults to max_bytes
    # all regular files of a layer together are bounded by max_bytes too (checked on headers)
    max_name_length: int = 4096
    max_depth: int = 256                # path components; keeps tree walks far from recursion limits


@dataclass(frozen=True, slots=True)
class UnpackResult:
    diff_id: Digest
    entries: int
    size: int  # bytes of the uncompressed tar stream
    compression: str


# --------------------------------------------------------------------------- streams
class _Prefixed:
    """Re-attach bytes already read (for magic detection) to the front of a stream."""

    def __init__(self, prefix: bytes, src: BinaryIO) -> None:
        self._prefix = prefix
        self._src = src

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            if n is None or n < 0:
                data, self._prefix = self._prefix + self._src.read(), b""
                return data
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            if len(data) < n:
                data += self._src.read(n - len(data)) or b""
            return data
        return self._src.read(n)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """isal's gzip reader (written in C) fills its buffer through readinto."""
        if not self._prefix:
            readinto = getattr(self._src, "readinto", None)
            if readinto is not None:
                return int(readinto(buf))
        data = self.read(len(buf))
        memoryview(buf)[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _HashingReader:
    """Counts and hashes the uncompressed stream; enforces the byte bound."""

    def __init__(self, src: _Reader, limit: int, label: str) -> None:
        self._src = src
        self._limit = limit
        self._label = label
        self.hasher = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _CHUNK
        data = self._src.read(n)
        if data:
            self.count += len(data)
            if self.count > self._limit:
                raise LayerError(
                    f"layer {self._label}: uncompressed size exceeds the limit of {self._limit} bytes"
                )
            self.hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _tar_limits(limits: UnpackLimits) -> TarLimits:
    """The tar reader's bounds for a layer: every entry may bring a few extended headers."""
    return TarLimits(max_headers=4 * limits.max_entries + 16, max_path=limits.max_name_length)


def _read_exact(src: BinaryIO, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def open_decompressed(src: BinaryIO) -> tuple[_Reader, str]:
    """Detect gzip / zstd / plain by magic bytes; return (reader, compression name)."""
    head = _read_exact(src, 4)
    pre = _Prefixed(head, src)
    # Their stubs want a seekable file; reading forward, as here, they only ever call read().
    stream = cast(IO[bytes], pre)
    if head[:2] == _GZIP_MAGIC:
        return open_gzip(stream), "gzip"
    if head == _ZSTD_MAGIC:
        import zstandard  # at the first zstd layer: not part of a fresh daemon's RSS

        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True), "zstd"
    return pre, "none"


# --------------------------------------------------------------------------- names
def _split_name(name: str) -> list[str] | None:
    """Normalised path components, or None when a ``..`` component is present."""
    comps = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            return None
        comps.append(c)
    return comps


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _fd_path(dfd: int, name: str | None = None) -> str:
    base = f"/proc/self/fd/{dfd}"
    return base if name is None else f"{base}/{name}"


def _is_opaque(dfd: int) -> bool:
    try:
        return os.getxattr(dfd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _remove_at(dfd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _syncfs(fd: int, label: str = "layer") -> None:
    """Flush the filesystem holding ``fd``.  A failure (a writeback error) fails the unpack: the
    snapshot would otherwise be committed, and trusted, without being on disk."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"{label}: syncing the unpacked layer to disk: {os.strerror(e)}")
        raise Unavailable(f"{label}: syncing the unpacked layer to disk failed: {os.strerror(e)}")


# --------------------------------------------------------------------------- applier
class _Applier:
    def __init__(self, root: str, mode: str, parents: Sequence[str], label: str,
                 allow_devices: bool, limits: UnpackLimits) -> None:
        if mode not in (MODE_OVERLAY, MODE_COPY):
            raise Internal(f"unknown unpack mode {mode!r}")
        if mode == MODE_COPY and parents:
            raise Internal("parents are only used in overlay mode (copy mode applies onto a copy)")
        self.root = root
        self.mode = mode
        self.parents = list(parents)
        self.label = label
        self.allow_devices = allow_devices
        self.limits = limits
        self.max_file = limits.max_file_size if limits.max_file_size is not None else limits.max_bytes
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.unpacked: set[str] = set()     # paths this layer created
        self.ancestors: set[str] = set()    # their parent directories
        self.dir_times: list[tuple[list[str], tuple[int, int]]] = []
        self.entry = ""
        self.file_bytes = 0                 # sizes of the regular files written so far

    def close(self) -> None:
        os.close(self.root_fd)

    def bad(self, reason: str) -> LayerError:
        return LayerError(f"layer {self.label} entry \"{shown(self.entry)}\" {reason}")

    # -- bookkeeping
    def _mark(self, comps: list[str]) -> None:
        self.unpacked.add("/".join(comps))
        for i in range(1, len(comps)):
            self.ancestors.add("/".join(comps[:i]))

    def _kept(self, rel: str) -> bool:
        return rel in self.unpacked or rel in self.ancestors

    # -- directory walking (never follows symlinks)
    @overload
    def _open_dir(self, comps: list[str], create: Literal[True]) -> int: ...
    @overload
    def _open_dir(self, comps: list[str], create: bool) -> int | None: ...

    def _open_dir(self, comps: list[str], create: bool) -> int | None:
        """An fd of the directory ``comps`` (made when ``create``; else None when missing)."""
        fd = os.dup(self.root_fd)
        try:
            for i, c in enumerate(comps):
                try:
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    self._make_implicit_dir(fd, comps[: i + 1])
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(c, dir_fd=fd, follow_symlinks=False)
                    where = "/".join(comps[: i + 1])
                    if stat.S_ISLNK(st.st_mode):
                        raise self.bad(f"has parent \"{where}\" which is a symbolic link; "
                                       "refusing to write through it") from None
                    raise self.bad(f"has parent \"{where}\" which is not a directory") from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _make_implicit_dir(self, parent_fd: int, comps: list[str]) -> None:
        name = comps[-1]
        src = None
        if self.mode == MODE_OVERLAY:
            found = self._lookup_lower(comps)
            if found is not None:
                lfd, st = found
                try:
                    if stat.S_ISLNK(st.st_mode):
                        where = "/".join(comps)
                        raise self.bad(f"has parent \"{where}\" which is a symbolic link in a lower "
                                       "layer; refusing to write through it")
                    if stat.S_ISDIR(st.st_mode):
                        src = st
                finally:
                    os.close(lfd)
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        dfd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            if src is not None:
                if _IS_ROOT:
                    os.fchown(dfd, src.st_uid, src.st_gid)
                os.fchmod(dfd, stat.S_IMODE(src.st_mode))
                self.dir_times.append((list(comps), (src.st_atime_ns, src.st_mtime_ns)))
            else:
                os.fchmod(dfd, 0o755)
        finally:
            os.close(dfd)

    def _lookup_lower(self, comps: list[str]) -> tuple[int, os.stat_result] | None:
        """Find ``comps`` in the lower layers as overlayfs would see it.

        Returns (fd of the containing directory, lstat) or None.  Honours
        whiteouts and opaque directories of this layer and the lower ones.
        """
        layers: list[int | str] = [self.root_fd, *self.parents]
        for index, layer in enumerate(layers):
            fd = os.dup(layer) if isinstance(layer, int) else os.open(
                layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            stop_below = False
            try:
                for i, c in enumerate(comps):
                    try:
                        st = os.stat(c, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        break
                    if _is_whiteout(st):
                        return None
                    if i == len(comps) - 1:
                        if index == 0:
                            break  # callers look here only for what this layer lacks
                        found_fd, fd = fd, -1
                        return found_fd, st
                    if not stat.S_ISDIR(st.st_mode):
                        return None  # a file or symlink covers the directory
                    nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                    if _is_opaque(fd):
                        stop_below = True
            finally:
                if fd >= 0:
                    os.close(fd)
            if stop_below:
                return None
        return None

    # -- metadata
    def _xattrs(self, member: TarEntry) -> list[tuple[str, bytes]]:
        out = []
        for name, value in member.xattrs:
            if name.startswith("trusted.overlay.") or not name.startswith(_ALLOWED_XATTR_PREFIXES):
                log.warning("layer %s entry \"%s\": dropping xattr \"%s\"", self.label, shown(self.entry),
                            shown(name))
                continue
            out.append((name, value))
        return out

    def _set_xattr(self, target: int | str, name: str, value: bytes, *, follow: bool = True,
                   reg_or_dir: bool = True) -> None:
        """Set one xattr from the layer as containerd's archive.Apply does: a filesystem without
        support for it (ENOTSUP) and ``user.*`` on what is neither a file nor a directory (EPERM,
        see xattr(7)) are skipped with a warning; any other refusal fails the layer."""
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or (
                    e.errno == errno.EPERM and name.startswith("user.") and not reg_or_dir):
                log.warning("layer %s entry \"%s\": ignoring xattr \"%s\": %s",
                            self.label, shown(self.entry), shown(name), e.strerror)
                return
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise self.bad(f"has xattr \"{shown(name)}\" which the kernel refused: "
                           f"{e.strerror or e}") from None

    @staticmethod
    def _times(member: TarEntry) -> tuple[int, int]:
        mtime_ns = member.mtime_ns
        atime_ns = max(member.atime_ns, mtime_ns) if member.atime_ns is not None else mtime_ns
        return atime_ns, mtime_ns

    # Order as containerd: owner first (chown clears security.capability and set-id bits), then
    # xattrs, then the mode; the data is written before all of them (a write clears the caps too).
    def _meta_fd(self, fd: int, member: TarEntry, times: bool = True) -> None:
        if _IS_ROOT:
            os.fchown(fd, member.uid, member.gid)
        for name, value in self._xattrs(member):
            self._set_xattr(fd, name, value)
        os.fchmod(fd, member.mode & 0o7777)
        if times:
            os.utime(fd, ns=self._times(member))

    def _meta_at(self, dfd: int, name: str, member: TarEntry) -> None:
        """Metadata for entries we must not open (symlinks, devices, fifos)."""
        if _IS_ROOT:
            os.chown(name, member.uid, member.gid, dir_fd=dfd, follow_symlinks=False)
        for xname, value in self._xattrs(member):
            self._set_xattr(_fd_path(dfd, name), xname, value, follow=False, reg_or_dir=False)
        if not member.issym():
            os.chmod(name, member.mode & 0o7777, dir_fd=dfd)  # not a symlink: nothing to follow
        os.utime(name, ns=self._times(member), dir_fd=dfd, follow_symlinks=False)

    # -- entries
    def apply(self, tf: TarReader) -> int:
        count = 0
        for member in tf:
            count += 1
            self.entry = member.name
            if count > self.limits.max_entries:
                raise LayerError(f"layer {self.label}: more than {self.limits.max_entries} entries")
            if len(member.name) > self.limits.max_name_length:
                raise self.bad(f"has a name longer than {self.limits.max_name_length} characters")
            comps = _split_name(member.name)
            if comps is None:
                raise self.bad("escapes the root (\"..\" path component)")
            if not comps:
                continue  # the root directory itself
            if len(comps) > self.limits.max_depth:
                raise self.bad(f"is nested deeper than {self.limits.max_depth} directories")
            base = comps[-1]
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(comps)
                continue
            pfd = self._open_dir(comps[:-1], create=True)
            try:
                self._entry(tf, member, comps, pfd)
            finally:
                os.close(pfd)
            self._mark(comps)
        for comps, times in self.dir_times:
            try:
                fd = self._open_dir(comps, create=False)
            except LayerError:
                fd = None  # the directory was replaced later in the layer
            if fd is not None:
                try:
                    os.utime(fd, ns=times)
                finally:
                    os.close(fd)
        return count

    def _entry(self, tf: TarReader, member: TarEntry, comps: list[str], pfd: int) -> None:
        base = comps[-1]
        try:
            existing = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None

        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                was_whiteout = _is_whiteout(existing)
                _remove_at(pfd, base)
                existing = None
            else:
                was_whiteout = False
            if existing is None:
                os.mkdir(base, 0o700, dir_fd=pfd)
            dfd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._meta_fd(dfd, member, times=False)
                if was_whiteout and self.mode == MODE_OVERLAY:
                    # a directory replacing a whited-out path must not show lower contents
                    os.setxattr(dfd, OPAQUE_XATTR, b"y")
            finally:
                os.close(dfd)
            self.dir_times.append((list(comps), self._times(member)))
            return

        if member.islnk():
            self._hardlink(member, comps, pfd, existing)
            return

        if member.ischr() or member.isblk():
            if not self.allow_devices:
                kind = "character" if member.ischr() else "block"
                raise self.bad(f"is a {kind} device node ({member.devmajor}:{member.devminor}); "
                               "device nodes are not allowed in image layers")
        elif not (member.isreg() or member.issym() or member.isfifo()):
            raise self.bad(f"has unsupported tar entry type {member.type!r}")

        if member.isreg() and member.size > self.max_file:
            raise self.bad(f"is {member.size} bytes, larger than the limit of {self.max_file} bytes")
        if member.isreg():
            self.file_bytes += member.size
            if self.file_bytes > self.limits.max_bytes:
                raise self.bad(f"brings the files of the layer to {self.file_bytes} bytes, more than "
                               f"the limit of {self.limits.max_bytes} bytes")

        if existing is not None:
            _remove_at(pfd, base)

        if member.isreg():
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=pfd)
            try:
                remaining = member.size
                while remaining > 0:
                    chunk = tf.read(min(_CHUNK, remaining))  # the reader refuses a short member
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    remaining -= len(chunk)
                self._meta_fd(fd, member)
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, base, dir_fd=pfd)
            self._meta_at(pfd, base, member)
        elif member.isfifo():
            os.mkfifo(base, 0o600, dir_fd=pfd)
            self._meta_at(pfd, base, member)
        else:
            node = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(base, node | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=pfd)
            self._meta_at(pfd, base, member)

    def _hardlink(self, member: TarEntry, comps: list[str], pfd: int,
                  existing: os.stat_result | None) -> None:
        base = comps[-1]
        tcomps = _split_name(member.linkname)
        if tcomps is None:
            raise self.bad(f"is a hardlink to \"{shown(member.linkname)}\" which escapes the root")
        if not tcomps:
            raise self.bad("is a hardlink to the root directory")
        if tcomps == comps:
            return
        tpfd, tst = self._find_here(tcomps)
        if tst is not None and self.mode == MODE_OVERLAY and _is_whiteout(tst):
            if tpfd is not None:
                os.close(tpfd)
            tpfd, tst = None, None  # whited out in this layer: gone
        elif tst is None and self.mode == MODE_OVERLAY:
            if tpfd is not None:
                os.close(tpfd)
            tpfd = self._copy_up(tcomps)
            if tpfd is not None:
                tst = os.stat(tcomps[-1], dir_fd=tpfd, follow_symlinks=False)
        if tst is None or tpfd is None:
            if tpfd is not None:
                os.close(tpfd)
            raise self.bad(f"is a hardlink to \"{shown(member.linkname)}\" which does not exist in the layer "
                           "or below it")
        try:
            if stat.S_ISDIR(tst.st_mode):
                raise self.bad(f"is a hardlink to \"{shown(member.linkname)}\" which is a directory")
            if existing is not None:
                if (existing.st_dev, existing.st_ino) == (tst.st_dev, tst.st_ino):
                    return
                _remove_at(pfd, base)
            os.link(tcomps[-1], base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tpfd)

    def _find_here(self, comps: list[str]) -> tuple[int | None, os.stat_result | None]:
        """(fd of parent dir, lstat) of ``comps`` in the target directory; parent fd may be
        returned with a None stat when only the entry is missing."""
        pfd = self._open_dir(comps[:-1], create=False)
        if pfd is None:
            return None, None
        try:
            return pfd, os.stat(comps[-1], dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return pfd, None

    def _copy_up(self, comps: list[str]) -> int | None:
        """Copy a lower-layer file into this layer; return the fd of its new parent dir."""
        found = self._lookup_lower(comps)
        if found is None:
            return None
        lfd, st = found
        try:
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                return None
            pfd = self._open_dir(comps[:-1], create=True)
            name = comps[-1]
            try:
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(name, dir_fd=lfd), name, dir_fd=pfd)
                    if _IS_ROOT:
                        os.chown(name, st.st_uid, st.st_gid, dir_fd=pfd, follow_symlinks=False)
                    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=pfd, follow_symlinks=False)
                else:
                    sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=lfd)
                    try:
                        dfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                                      os.O_CLOEXEC, 0o600, dir_fd=pfd)
                        try:
                            _copy_fd(sfd, dfd, st.st_size)
                            _copy_xattrs_fd(sfd, dfd)
                            if _IS_ROOT:
                                os.fchown(dfd, st.st_uid, st.st_gid)
                            os.fchmod(dfd, stat.S_IMODE(st.st_mode))
                            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
                        finally:
                            os.close(dfd)
                    finally:
                        os.close(sfd)
            except BaseException:
                os.close(pfd)
                raise
            self._mark(comps)
            return pfd
        finally:
            os.close(lfd)

    # -- whiteouts
    def _whiteout(self, comps: list[str]) -> None:
        base = comps[-1]
        parent = comps[:-1]
        if base == WHITEOUT_OPAQUE:
            if self.mode == MODE_OVERLAY:
                pfd = self._open_dir(parent, create=True)
                try:
                    os.setxattr(pfd, OPAQUE_XATTR, b"y")
                finally:
                    os.close(pfd)
            else:
                found = self._open_dir(parent, create=False)
                if found is not None:
                    try:
                        self._clear_lower(found, "/".join(parent))
                    finally:
                        os.close(found)
            if parent:
                self._mark(parent)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            log.debug("layer %s: skipping aufs metadata entry %r", self.label, self.entry)
            return
        name = base[len(WHITEOUT_PREFIX):]
        if name in ("", ".", ".."):
            raise self.bad("is a whiteout without a valid target name")
        rel = "/".join(parent + [name])
        if self.mode == MODE_OVERLAY:
            pfd = self._open_dir(parent, create=True)
            try:
                try:
                    existing = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    existing = None
                if existing is not None:
                    if self._kept(rel) or _is_whiteout(existing):
                        return  # whiteouts only hide lower layers, never this one
                    _remove_at(pfd, name)
                os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=pfd)
            finally:
                os.close(pfd)
        else:
            dfd = self._open_dir(parent, create=False)
            if dfd is None:
                return
            try:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if self._kept(rel):
                    if stat.S_ISDIR(st.st_mode) and rel in self.ancestors:
                        cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                        try:
                            self._clear_lower(cfd, rel)
                        finally:
                            os.close(cfd)
                    return
                _remove_at(dfd, name)
            finally:
                os.close(dfd)
        if parent:
            self._mark(parent)

    def _clear_lower(self, dfd: int, rel_prefix: str) -> None:
        """Remove what lower layers put under a directory, keeping this layer's entries."""
        for name in os.listdir(dfd):
            rel = f"{rel_prefix}/{name}" if rel_prefix else name
            if not self._kept(rel):
                _remove_at(dfd, name)
                continue
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self._clear_lower(cfd, rel)
                finally:
                    os.close(cfd)


def _copy_fd(sfd: int, dfd: int, size: int) -> None:
    remaining = size
    while remaining > 0:
        try:
            n = os.copy_file_range(sfd, dfd, min(remaining, 1 << 30))
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.sendfile(dfd, sfd, None, min(remaining, 1 << 30))
        if n == 0:
            break
        remaining -= n


def _copy_xattrs_fd(sfd: int, dfd: int) -> None:
    try:
        names = os.listxattr(sfd)
    except OSError:
        return
    for name in names:
        try:
            os.setxattr(dfd, name, os.getxattr(sfd, name))
        except OSError as e:
            log.warning("cannot copy xattr %r: %s", name, e.strerror)


# --------------------------------------------------------------------------- entry point
def apply_layer(
    src: BinaryIO,
    root: str,
    *,
    mode: str = MODE_OVERLAY,
    parents: Sequence[str] = (),
    label: str = "layer",
    allow_devices: bool = False,
    limits: UnpackLimits = UnpackLimits(),
    expected_diff_id: Digest | str | None = None,
    sync: bool = True,
) -> UnpackResult:
    """Apply the layer read from ``src`` into the directory ``root``.

    ``mode``: ``"overlay"`` writes an overlayfs upper directory (whiteouts as
    char 0/0 devices and opaque xattrs); ``parents`` are the lower layer
    directories, nearest first, used to resolve hardlinks to lower files and
    the attributes of implicitly created directories.  ``"copy"`` applies onto a
    directory that already holds the parent's full tree and performs deletions.
    ``label`` names the layer in error messages (its digest).

    Returns the diff_id (sha256 of the uncompressed tar stream).  On error the
    directory is left partially written; the caller removes the snapshot.
    """
    applier = _Applier(root, mode, parents, label, allow_devices, limits)
    hashing: _HashingReader | None = None
    try:
        try:
            stream, compression = open_decompressed(src)
            hashing = _HashingReader(stream, limits.max_bytes, label)
            reader = TarReader(hashing, label=f"layer {label}", limits=_tar_limits(limits))
            count = applier.apply(reader)
            hashing.drain()  # what follows the end marker counts in the diff_id, as containerd hashes it
        except TarCorrupt as e:
            raise CorruptLayer(e.message) from None
        except TarRefused as e:
            raise LayerError(e.message) from None
        except MoorageError:
            raise
        except _decompress_errors() as e:
            at = hashing.count if hashing is not None else 0
            raise CorruptLayer(f"layer {label}: corrupt or truncated archive (after {at} uncompressed "
                               f"bytes): {str(e)[:200]}") from None
        except OSError as e:
            where = f"layer {label} entry \"{shown(applier.entry)}\""
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"{where}: no space left on the image filesystem") from None
            if e.errno == errno.ENAMETOOLONG:
                raise LayerError(f"{where}: name too long") from None
            raise Internal(f"{where}: {e.strerror or e}") from e
        if sync:
            _syncfs(applier.root_fd, f"layer {label}")
    finally:
        applier.close()
    assert hashing is not None  # set before anything that can return normally
    diff_id = Digest("sha256", hashing.hasher.hexdigest())
    if expected_diff_id is not None:
        expected = Digest.parse(expected_diff_id)
        if expected != diff_id:
            raise DiffIDMismatch(
                f"layer {label}: uncompressed digest {diff_id} does not match the diff_id {expected} "
                "in the image config; the image is corrupt or was tampered with"
            )
    return UnpackResult(diff_id=diff_id, entries=count, size=hashing.count, compression=compression)


class SnapshotterLike(Protocol):
    """What unpack_to_snapshot uses of ``images.snapshotter.Snapshotter`` (which imports
    this module, so it is described here rather than imported)."""

    @property
    def unpack_mode(self) -> str: ...
    def exists(self, key: str) -> bool: ...
    def prepare(self, key: str, parent: str | None = None, labels: dict[str, str] | None = None) -> Any: ...
    def upper_dir(self, key: str) -> str: ...
    def parent_dirs(self, key: str) -> list[str]: ...
    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> Any: ...
    def remove(self, key: str) -> None: ...


def unpack_to_snapshot(
    snapshotter: SnapshotterLike,
    src: BinaryIO,
    *,
    chain_id: Digest | str,
    parent: Digest | str | None,
    expected_diff_id: Digest | str,
    label: str,
    allow_devices: bool = False,
    limits: UnpackLimits = UnpackLimits(),
    labels: dict[str, str] | None = None,
) -> UnpackResult | None:
    """Unpack one layer as the committed snapshot ``chain_id`` on top of ``parent``.

    Returns None when that snapshot already exists (shared layer).  Works in a
    temporary active snapshot and commits it only after the diff_id matched; on
    any error the temporary snapshot is removed.  When another pull commits the
    same chain ID first, ours is discarded and the result still returned.
    (``snapshotter`` is an ``images.snapshotter.Snapshotter``.)
    """
    from moorage.core.errors import AlreadyExists

    name = str(chain_id)
    if snapshotter.exists(name):
        return None
    key = f"extract-{os.urandom(6).hex()}-{name}"
    snapshotter.prepare(key, str(parent) if parent is not None else None,
                        labels={"moorage.io/extract": name})
    try:
        mode = snapshotter.unpack_mode
        result = apply_layer(
            src, snapshotter.upper_dir(key), mode=mode,
            parents=snapshotter.parent_dirs(key) if mode == MODE_OVERLAY else (),
            label=label, allow_devices=allow_devices, limits=limits, expected_diff_id=expected_diff_id,
        )
        try:
            snapshotter.commit(name, key, labels=labels)
        except AlreadyExists:
            snapshotter.remove(key)
        return result
    except BaseException:
        try:
            snapshotter.remove(key)
        except Exception:  # keep the original error; cleanup() retries at start-up
            log.exception("removing failed extract snapshot %s", key)
        raise
