"""mount(2)/umount2(2) through libc, and a look at what is mounted."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from runtime.errors import Internal

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None)
    if rc != 0:
        e = ctypes.get_errno()
        raise Internal(f"mount {fstype or 'bind'} {source} on {target} failed: {os.strerror(e)}")


def unmount(target: str, detach: bool = False) -> bool:
    """Unmount ``target``; False if nothing was mounted there."""
    rc = _libc.umount2(target.encode(), MNT_DETACH if detach else 0)
    if rc != 0:
        e = ctypes.get_errno()
        if e in (errno.EINVAL, errno.ENOENT):
            return False
        if e == errno.EBUSY and not detach:
            return unmount(target, detach=True)
        raise Internal(f"unmount {target} failed: {os.strerror(e)}")
    return True


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target``."""
    while unmount(target):
        pass


def is_mountpoint(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def mounts_under(prefix: str) -> list[str]:
    prefix = os.path.realpath(prefix).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]
