"""Mounts: mount(2)/umount2(2) through libc, and /proc/self/mountinfo.

Ground floor: the snapshotter (rootfs and image volumes) and the sandbox (the
pod's /dev/shm) mount through here; nothing here knows about images or pods.

Unmounting retries EBUSY (50 x 50 ms, as containerd's ``unmount`` does): a
process that is still leaving a mount namespace (a runc or conmon child, an
fuser) holds it for a moment.  After the last try the mount is detached lazily
(MNT_DETACH) and that is logged, instead of failing the caller's RPC on a
transient busy mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moorage.core.errors import Internal

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
UNMOUNT_BUSY_TRIES = 50
UNMOUNT_BUSY_DELAY = 0.05

@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()

    def __init__(self, type: str, source: str, options: Iterable[str] = ()) -> None:
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "options", tuple(options))

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
CLONE_FS = 0x200

_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    # option: (clear?, flag)
    "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "nosuid": (False, MS_NOSUID), "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV), "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC), "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS), "async": (True, MS_SYNCHRONOUS),
    "noatime": (False, MS_NOATIME), "atime": (True, MS_NOATIME),
    "nodiratime": (False, MS_NODIRATIME), "diratime": (True, MS_NODIRATIME),
    "relatime": (False, MS_RELATIME), "norelatime": (True, MS_RELATIME),
    "strictatime": (False, MS_STRICTATIME),
    "bind": (False, MS_BIND), "rbind": (False, MS_BIND | MS_REC),
    "defaults": (False, 0),
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def _sys_mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def parse_mount_options(options: Iterable[str]) -> tuple[int, list[str]]:
    """Split options into mount(2) flags and filesystem data options."""
    flags = 0
    data: list[str] = []
    for opt in options:
        known = _FLAG_OPTIONS.get(opt)
        if known is None:
            data.append(opt)
            continue
        clear, flag = known
        flags = (flags & ~flag) if clear else (flags | flag)
    return flags, data


def compact_lowerdirs(data: list[str]) -> tuple[str | None, list[str]]:
    """Rewrite ``lowerdir=`` with paths relative to their common parent directory.

    Returns (directory to chdir into, new data options); (None, data) when
    there is nothing to shorten.
    """
    idx = next((i for i, o in enumerate(data) if o.startswith("lowerdir=")), None)
    if idx is None:
        return None, data
    dirs = data[idx][len("lowerdir="):].split(":")
    if len(dirs) < 2 or not all(os.path.isabs(d) for d in dirs):
        return None, data
    common = os.path.commonpath(dirs)
    if common in ("", "/"):
        return None, data
    # if one lowerdir is the common path itself, step up so every entry stays non-empty
    if any(os.path.normpath(d) == common for d in dirs):
        common = os.path.dirname(common)
    rel = [os.path.relpath(d, common) for d in dirs]
    new = list(data)
    new[idx] = "lowerdir=" + ":".join(rel)
    return common, new


def _mount_in_dir(chdir: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) with relative paths resolved against ``chdir``, without changing
    the cwd of the rest of the process: a dedicated thread unshares its fs
    attributes (CLONE_FS) first, so its chdir is private."""
    result: dict[str, BaseException] = {}

    def run() -> None:
        try:
            if _libc.unshare(CLONE_FS) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"unshare(CLONE_FS): {os.strerror(e)}")
            os.chdir(chdir)
            _sys_mount(source, target, fstype, flags, data)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread, which re-raises it
            result["error"] = e

    t = threading.Thread(target=run, name="moorage-mount", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]


def mount(mounts: Sequence[Mount], target: str) -> None:
    """Mount ``mounts`` in order onto ``target`` (mount(2) via libc; no mount binary)."""
    done = 0
    try:
        for m in mounts:
            _mount_one(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            with contextlib.suppress(OSError, Internal):
                unmount(target, detach=True)
        raise


def _mount_one(m: Mount, target: str) -> None:
    flags, data_opts = parse_mount_options(m.options)
    try:
        if flags & MS_BIND:
            _sys_mount(m.source, target, None, flags & (MS_BIND | MS_REC), None)
            rest = flags & ~(MS_BIND | MS_REC)
            if rest:
                # bind mounts ignore most flags on creation: apply them with a remount
                try:
                    _sys_mount(None, target, None, MS_REMOUNT | MS_BIND | rest, None)
                except BaseException:
                    with contextlib.suppress(OSError):
                        _umount(target, MNT_DETACH)
                    raise
            return
        data = ",".join(data_opts)
        if len(data) >= PAGE_SIZE - 512:
            chdir, compacted = compact_lowerdirs(data_opts)
            cdata = ",".join(compacted)
            if chdir is None or len(cdata) >= PAGE_SIZE - 1:
                raise Internal(
                    f"mount options for {target} are {len(data)} bytes, more than fit in a page "
                    f"({PAGE_SIZE}); too many layers for one overlay mount"
                )
            _mount_in_dir(chdir, m.source, target, m.type, flags, cdata)
        else:
            _sys_mount(m.source, target, m.type, flags, data or None)
    except OSError as e:
        raise Internal(f"mount {m.type} {m.source} on {target} failed: {e.strerror or e}") from None


def _umount(target: str, flags: int) -> None:
    if _libc.umount2(_b(target), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _umount_once(target: str, detach: bool) -> bool:
    """One unmount of the top mount at ``target``; False when nothing is mounted there.

    EBUSY is retried ``UNMOUNT_BUSY_TRIES`` times, ``UNMOUNT_BUSY_DELAY`` apart;
    then the mount is detached lazily and that is logged.
    """
    flags = MNT_DETACH if detach else 0
    for attempt in range(UNMOUNT_BUSY_TRIES):
        try:
            _umount(target, flags)
            return True
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return False  # not a mount point (any more)
            if e.errno != errno.EBUSY:
                raise Internal(f"unmount {target} failed: {e.strerror}") from None
            if attempt + 1 < UNMOUNT_BUSY_TRIES:
                time.sleep(UNMOUNT_BUSY_DELAY)
    log.warning("unmount %s: still busy after %d tries %.0f ms apart; detaching it lazily",
                target, UNMOUNT_BUSY_TRIES, UNMOUNT_BUSY_DELAY * 1000)
    try:
        _umount(target, MNT_DETACH)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):
            return False
        raise Internal(f"unmount {target} failed: {e.strerror}") from None
    return True


def unmount(target: str, *, detach: bool = False) -> None:
    """Unmount the top mount at ``target``; a target that is not mounted is ignored."""
    _umount_once(target, detach)


def unmount_all(target: str, *, detach: bool = False) -> None:
    """Unmount every mount stacked on ``target``."""
    for _ in range(1000):
        if not _umount_once(target, detach):
            return
    raise Internal(f"unmount {target}: still mounted after 1000 unmounts")


def _mountinfo_unescape(s: str) -> str:
    return (s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


@dataclass(frozen=True)
class MountInfo:
    mount_point: str
    root: str          # path inside the source filesystem that is mounted
    dev: int
    fstype: str
    source: str
    super_options: tuple[str, ...]


def read_mountinfo() -> list[MountInfo]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            pre, sep, post = line.rstrip("\n").partition(" - ")
            pf = pre.split(" ")
            if not sep or len(pf) < 5:
                continue
            major, _, minor = pf[2].partition(":")
            rest = post.split(" ", 2)
            while len(rest) < 3:
                rest.append("")
            out.append(MountInfo(
                mount_point=_mountinfo_unescape(pf[4]), root=_mountinfo_unescape(pf[3]),
                dev=os.makedev(int(major), int(minor)), fstype=rest[0],
                source=_mountinfo_unescape(rest[1]), super_options=tuple(rest[2].split(","))))
    return out


def mount_points() -> list[str]:
    """Mount points of this mount namespace (from /proc/self/mountinfo)."""
    return [m.mount_point for m in read_mountinfo()]


def _fs_relative(path: str, infos: list[MountInfo]) -> tuple[int, str] | None:
    """(device, path inside its filesystem) for an existing directory ``path``."""
    try:
        dev = os.stat(path).st_dev
    except FileNotFoundError:
        return None
    best = None
    for m in infos:
        if m.dev != dev:
            continue
        mp = m.mount_point.rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best.mount_point.rstrip("/")):
                best = m
    if best is None:
        return None
    rel = path[len(best.mount_point.rstrip("/")):]
    return dev, os.path.normpath(best.root.rstrip("/") + rel) if rel else best.root


def mounts_using(dirs: Sequence[str]) -> list[str]:
    """Mount points that show one of ``dirs`` (bind mounts of them or below them,
    overlays using them as upperdir/workdir, or mounts placed inside them)."""
    infos = read_mountinfo()
    wanted = [os.path.abspath(d) for d in dirs]
    rels = [r for r in (_fs_relative(d, infos) for d in wanted) if r is not None]
    out = []
    for m in infos:
        if any(m.mount_point == d or m.mount_point.startswith(d + "/") for d in wanted):
            out.append(m.mount_point)
            continue
        if m.fstype == "overlay":
            for o in m.super_options:
                k, _, v = o.partition("=")
                if k in ("upperdir", "workdir") and any(v == d or v.startswith(d + "/") for d in wanted):
                    out.append(m.mount_point)
                    break
            continue
        for dev, rel in rels:
            if m.dev == dev and (m.root == rel or m.root.startswith(rel + "/")):
                out.append(m.mount_point)
                break
    return out
