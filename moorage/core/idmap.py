"""Idmapped mounts (mount_setattr(2) ``MOUNT_ATTR_IDMAP``) for user-namespaced pods.

runc 1.1 cannot make idmapped mounts, and overlayfs cannot be idmapped itself, so
moorage maps a container's rootfs the way containerd's overlay snapshotter does:
each *lower* layer directory gets an idmapped clone (``open_tree(OPEN_TREE_CLONE)``
+ ``mount_setattr`` with the pod's user namespace), the overlay is mounted over
those clones, and the clones are then detached (the overlay keeps its own
references to them).  Image files owned by 0 on disk show as the pod's mapped
root inside, with no copy; what the container writes lands in the upper dir with
the ids the host sees for the container's processes (e.g. 100000), exactly as a
chowned copy would.

Ground floor: only mount(2)-level mechanics; the namespace comes from the caller
(``/proc/<infra pid>/ns/user``, or a short-lived ``unshare --user`` child for a probe).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from moorage.core import mount as mountmod
from moorage.core.errors import Internal

# x86_64 and aarch64 share these numbers (the "new" syscalls are numbered alike on all arches).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = 0o2000000
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@dataclass(frozen=True)
class UserNS:
    """A user namespace to map mounts into, and the host ids of its root (for chowns)."""

    path: str  # an nsfs file, e.g. /proc/<pid>/ns/user
    uid: int
    gid: int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _syscall(*args: object) -> int:
    return int(_libc.syscall(*args))


def open_idmapped_tree(src: str, userns_fd: int, *, readonly: bool = False) -> int:
    """A detached clone of the mount at ``src``, idmapped into ``userns_fd``: its fd (caller closes)."""
    fd = _check(_syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(src), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
                f"open_tree {src}")
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if readonly else 0), 0, 0, userns_fd)
        _check(_syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)),
               f"mount_setattr(MOUNT_ATTR_IDMAP) {src}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def idmapped_bind(src: str, dst: str, userns_fd: int, *, readonly: bool = False) -> None:
    """Bind ``src`` at ``dst`` (an existing directory), idmapped into ``userns_fd``."""
    fd = open_idmapped_tree(src, userns_fd, readonly=readonly)
    try:
        _check(_syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(dst), MOVE_MOUNT_F_EMPTY_PATH),
               f"move_mount {src} to {dst}")
    finally:
        os.close(fd)


def mount_idmapped(mounts: Sequence[mountmod.Mount], target: str, userns: UserNS, scratch: str) -> None:
    """Mount ``mounts`` (a snapshot's: one overlay or one bind) at ``target``, idmapped into ``userns``.

    Overlay: every lowerdir gets an idmapped clone under ``scratch`` (made and removed here).
    Bind: the source itself is bound idmapped.
    """
    if len(mounts) != 1:
        raise Internal(f"cannot idmap a stack of {len(mounts)} mounts at {target}")
    m = mounts[0]
    nsfd = os.open(userns.path, os.O_RDONLY | os.O_CLOEXEC)
    made: list[str] = []
    try:
        if m.type == "bind":
            try:
                idmapped_bind(m.source, target, nsfd, readonly=m.readonly)
            except OSError as e:
                raise Internal(f"idmapped bind of {m.source} on {target} failed: {e.strerror or e}") from None
            return
        if m.type != "overlay":
            raise Internal(f"cannot idmap a {m.type} mount at {target}")
        opts = list(m.options)
        idx = next((i for i, o in enumerate(opts) if o.startswith("lowerdir=")), None)
        if idx is None:
            raise Internal(f"overlay for {target} has no lowerdir")
        lowers = opts[idx][len("lowerdir="):].split(":")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        mapped: list[str] = []
        for i, lower in enumerate(lowers):
            d = os.path.join(scratch, str(i))
            os.makedirs(d, exist_ok=True)
            try:
                idmapped_bind(lower, d, nsfd, readonly=True)
            except OSError as e:
                raise Internal(f"idmapped clone of layer {lower} failed: {e.strerror or e}") from None
            made.append(d)
            mapped.append(d)
        opts[idx] = "lowerdir=" + ":".join(mapped)
        mountmod.mount([mountmod.Mount("overlay", m.source, opts)], target)
    finally:
        os.close(nsfd)
        # The overlay holds its layers by reference: the clones can go as soon as it is mounted.
        for d in reversed(made):
            with contextlib.suppress(OSError, Internal):
                mountmod.unmount(d, detach=True)
        if made:
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def temporary_userns(host_id: int, size: int, timeout: float = 5.0) -> Iterator[int]:
    """An fd of a fresh user namespace mapping 0..size to host_id (for probes): a short-lived
    ``unshare --user`` child holds it until the fd is open, then is killed."""
    p = subprocess.Popen(["unshare", "--user", "sleep", "60"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + timeout
        while os.readlink(f"/proc/{p.pid}/ns/user") == own:
            if p.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"unshare --user did not start a user namespace (exit {p.returncode})")
            time.sleep(0.01)
        for f in ("uid_map", "gid_map"):
            with open(f"/proc/{p.pid}/{f}", "w") as fh:
                fh.write(f"0 {host_id} {size}\n")
        fd = os.open(f"/proc/{p.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        p.kill()
        p.wait()
    try:
        yield fd
    finally:
        os.close(fd)


def idmap_unsupported(path: str) -> str:
    """Why an idmapped mount of the filesystem holding ``path`` cannot be made ("" if it can)."""
    try:
        with temporary_userns(65536, 65536) as nsfd:
            os.close(open_idmapped_tree(path, nsfd))
    except (OSError, subprocess.SubprocessError) as e:
        return f"no idmapped mount of {path}: {e}"
    return ""
