"""Pinned network namespaces.

A pod's network namespace lives as long as a file bind-mounted from nsfs
exists: ``<pin_dir>/<name>`` (default ``/run/moorage/netns/<sandbox id>``).
That is how containerd and iproute2 keep a namespace alive without a process
in it, and it is what CNI plugins get as ``CNI_NETNS``.

Everything that has to *enter* a namespace does so on a dedicated, short-lived
OS thread: ``setns(2)`` for CLONE_NEWNET only moves the calling thread, so the
daemon's event-loop thread never changes namespace.  A thread that entered a
namespace is never reused; it ends when the function returns.

Sockets keep the namespace they were created in, so ``run_in_netns(path,
socket.create_connection, (addr, port))`` hands back a socket connected from
inside the pod that the caller can use from any thread (port-forward).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from moorage.core.errors import Internal, InvalidArgument, NotFound

DEFAULT_PIN_DIR = "/run/moorage/netns"

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MNT_DETACH = 2
_NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs fd, Linux >= 4.11
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ_SIZE = 40  # struct ifreq: a 16-byte name, then a 24-byte union (ifr_flags first)

T = TypeVar("T")

_libc_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
            _libc.unshare.argtypes = [ctypes.c_int]
            _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
            _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        return _libc


def _oserror(what: str, path: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or "\x00" in name or len(name) > 255:
        raise InvalidArgument(f"invalid network namespace name {name!r}: must be a plain file name")


def netns_path(name: str, pin_dir: str = DEFAULT_PIN_DIR) -> str:
    _check_name(name)
    return os.path.join(pin_dir, name)


def is_netns(path: str) -> bool:
    """True when ``path`` is a live pin (an nsfs file of a network namespace)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == _CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def _in_thread(fn: Callable[[], T], name: str) -> T:
    """Run ``fn`` on a fresh OS thread (discarded afterwards) and return its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread, which re-raises it
            box["error"] = exc

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _lo_up() -> None:
    """Bring up ``lo`` of the calling thread's network namespace.  Two ioctls, not a netlink
    session: pyroute2's IPRoute ran milliseconds of Python per pod in this thread, holding the
    GIL the event loop needs while pods start."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        req = bytearray(_IFREQ_SIZE)
        req[:2] = b"lo"
        try:
            fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)
        except OSError as e:
            if e.errno == errno.ENODEV:  # no loopback device: nothing to bring up
                return
            raise
        flags = struct.unpack_from("H", req, 16)[0]
        if not flags & _IFF_UP:
            struct.pack_into("H", req, 16, flags | _IFF_UP)
            fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, req)


def create_netns(name: str, pin_dir: str = DEFAULT_PIN_DIR) -> str:
    """Create a new network namespace pinned at ``<pin_dir>/<name>``, loopback up.

    Returns the pin path.  Fails with InvalidArgument if the pin already exists.
    Blocking; call from an executor in async code (or use ``acreate_netns``).
    """
    path = netns_path(name, pin_dir)
    os.makedirs(pin_dir, mode=0o755, exist_ok=True)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
    except FileExistsError:
        raise InvalidArgument(f"network namespace {path} already exists") from None

    def make() -> None:
        libc = _c()
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise _oserror("unshare(CLONE_NEWNET)", path)
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        if libc.mount(src, path.encode(), b"none", _MS_BIND, None) != 0:
            raise _oserror("bind-mount of the new network namespace", path)
        _lo_up()

    try:
        _in_thread(make, f"netns-create-{name}")
    except BaseException as exc:
        remove_netns(path)
        if isinstance(exc, OSError):
            raise Internal(f"could not create network namespace {path}: {exc}") from exc
        raise
    return path


def pin_netns(name: str, source: str, pin_dir: str = DEFAULT_PIN_DIR) -> str:
    """Pin the existing network namespace at ``source`` (e.g. ``/proc/<pid>/ns/net``) at
    ``<pin_dir>/<name>``, loopback up; the pin path.  For a namespace a pod's infra process made
    inside its own user namespace, which must own it (see runtime/sandbox.py)."""
    path = netns_path(name, pin_dir)
    os.makedirs(pin_dir, mode=0o755, exist_ok=True)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
    except FileExistsError:
        raise InvalidArgument(f"network namespace {path} already exists") from None
    try:
        if _c().mount(source.encode(), path.encode(), b"none", _MS_BIND, None) != 0:
            raise _oserror(f"bind-mount of network namespace {source}", path)
        run_in_netns(path, _lo_up)
    except BaseException:
        remove_netns(path)
        raise
    return path


def remove_netns(path_or_name: str, pin_dir: str = DEFAULT_PIN_DIR) -> None:
    """Unmount and unlink a pin.  Idempotent: a missing or unmounted pin is fine."""
    unpin(path_or_name if "/" in path_or_name else netns_path(path_or_name, pin_dir), "network namespace pin")


def unpin(path: str, what: str = "namespace pin") -> None:
    """Unmount and unlink a namespace pin (any kind); idempotent: a missing or unmounted pin is fine."""
    libc = _c()
    # A pin may have been mounted more than once (unlikely); unmount until it is plain.
    for _ in range(8):
        if libc.umount2(path.encode(), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                break
            raise Internal(f"could not unmount {what} {path}: {os.strerror(err)}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise Internal(f"could not remove {what} {path}: {exc.strerror}") from exc


def list_netns(pin_dir: str = DEFAULT_PIN_DIR) -> list[str]:
    """Names of the live pins in ``pin_dir`` (sorted)."""
    try:
        names = os.listdir(pin_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if is_netns(os.path.join(pin_dir, n)))


def collect_stale(known_ids: Iterable[str], pin_dir: str = DEFAULT_PIN_DIR) -> list[str]:
    """Remove every entry of ``pin_dir`` whose name is not in ``known_ids``.

    Meant for daemon start-up, once the store says which sandboxes exist.  Also
    removes leftover unmounted files (a crash between create and mount).
    Returns the removed names.
    """
    known = set(known_ids)
    try:
        names = os.listdir(pin_dir)
    except FileNotFoundError:
        return []
    removed = []
    for n in sorted(names):
        if n in known:
            continue
        p = os.path.join(pin_dir, n)
        if os.path.isdir(p) and not os.path.islink(p):
            continue
        remove_netns(p)
        removed.append(n)
    return removed


def run_in_netns(netns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` inside the network namespace at path ``netns``.

    The call happens on a new OS thread that enters the namespace and then
    ends; the caller's thread is never moved.  Blocking.
    """
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"network namespace {netns} does not exist") from None
    try:
        if not is_netns(netns):
            raise NotFound(f"{netns} is not a network namespace (not mounted?)")

        def enter_and_call() -> T:
            if _c().setns(fd, _CLONE_NEWNET) != 0:
                raise Internal(f"setns into {netns} failed: {os.strerror(ctypes.get_errno())}")
            return fn(*args, **kwargs)

        return _in_thread(enter_and_call, "netns-exec")
    finally:
        os.close(fd)


async def arun_in_netns(netns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Async wrapper of :func:`run_in_netns` (the waiting happens in an executor)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: run_in_netns(netns, fn, *args, **kwargs))


async def acreate_netns(name: str, pin_dir: str = DEFAULT_PIN_DIR) -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, create_netns, name, pin_dir)


async def aremove_netns(path_or_name: str, pin_dir: str = DEFAULT_PIN_DIR) -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, remove_netns, path_or_name, pin_dir)


@dataclass(frozen=True)
class InterfaceStats:
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


def _counter(stats: Any, key: str) -> int:
    """One counter of a pyroute2 IFLA_STATS(64) attribute (untyped); absent counts as 0."""
    return int(stats.get(key, 0) or 0)


def _read_stats() -> dict[str, InterfaceStats]:
    from pyroute2 import IPRoute

    out: dict[str, InterfaceStats] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            st = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS")
            if st is None:
                continue
            out[name] = InterfaceStats(
                name=name,
                rx_bytes=_counter(st, "rx_bytes"),
                rx_packets=_counter(st, "rx_packets"),
                rx_errors=_counter(st, "rx_errors"),
                rx_dropped=_counter(st, "rx_dropped"),
                tx_bytes=_counter(st, "tx_bytes"),
                tx_packets=_counter(st, "tx_packets"),
                tx_errors=_counter(st, "tx_errors"),
                tx_dropped=_counter(st, "tx_dropped"),
            )
    return out


def interface_stats(netns: str) -> dict[str, InterfaceStats]:
    """Per-interface counters inside the namespace at ``netns`` (keyed by name)."""
    return run_in_netns(netns, _read_stats)
