"""Pinned IPC and UTS namespaces of a pod that has no infra process.

A pod whose containers do not share a PID namespace needs no process of its own
(CRI-O's ``drop_infra_ctr``): its namespaces live as long as nsfs files
bind-mounted under the pod's state dir exist, as the network namespace already
does (``core.netns``).  The pod's containers join them by path.

unshare(2) of CLONE_NEWIPC / CLONE_NEWUTS (unlike CLONE_NEWUSER) works on one
thread of a multi-threaded process, so the namespaces are made on a fresh,
short-lived OS thread (the ``core.netns`` pattern): no fork of the daemon and no
exec of a helper.  The same thread sets the hostname and the pod's IPC sysctls
while it is inside: ``/proc/sys`` answers for the namespaces of the calling
thread.  Sysctl names and values must already be validated (``runtime.spec``);
they are only checked here not to leave ``/proc/sys``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from collections.abc import Mapping

from moorage.core.errors import Internal, InvalidArgument, NotFound
from moorage.core.netns import _c, _in_thread, _oserror, unpin

CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
_FLAGS = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "net": CLONE_NEWNET}
_MS_BIND = 4096
_NS_GET_NSTYPE = 0xB703
_HOST_NAME_MAX = 64
#: The kinds this module pins, in the order they are made.
KINDS = ("ipc", "uts")


def pin_path(pin_dir: str, kind: str) -> str:
    if kind not in _FLAGS:
        raise InvalidArgument(f"unknown namespace kind {kind!r}")
    return os.path.join(pin_dir, kind)


def is_pinned(path: str, kind: str) -> bool:
    """True when ``path`` is a live nsfs pin of a namespace of ``kind``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return bool(fcntl.ioctl(fd, _NS_GET_NSTYPE) == _FLAGS[kind])
    except OSError:
        return False
    finally:
        os.close(fd)


def proc_sys_path(name: str) -> str:
    """The /proc/sys file of a sysctl in dotted form, where a "/" stands for a dot inside one
    component (``net.ipv4.conf.eth0/100.forwarding``), as the OCI runtimes read it."""
    parts = [p.replace("/", ".") for p in name.split(".")]
    if not name or any(p in ("", ".", "..") or "\x00" in p for p in parts):
        raise InvalidArgument(f"invalid sysctl name {name!r}")
    return "/proc/sys/" + "/".join(parts)


def _write_sysctls(sysctls: Mapping[str, str]) -> None:
    """Write sysctls for the calling thread's namespaces."""
    for name, value in sysctls.items():
        try:
            with open(proc_sys_path(name), "w") as f:
                f.write(value)
        except OSError as exc:
            raise InvalidArgument(f"sysctl {name}: cannot set {value[:64]!r}: {exc.strerror}") from exc


def pin_namespaces(pin_dir: str, kinds: tuple[str, ...], *, hostname: str | None = None,
                   sysctls: Mapping[str, str] | None = None) -> dict[str, str]:
    """Make new namespaces of ``kinds`` (a subset of ``KINDS``), pin each at ``<pin_dir>/<kind>``,
    set ``hostname`` in the UTS one and ``sysctls`` (IPC ones) in the IPC one; the pin paths.

    Blocking.  On failure nothing stays pinned.
    """
    if not kinds:
        return {}
    flags = 0
    for k in kinds:
        if k not in KINDS:
            raise InvalidArgument(f"cannot pin a namespace of kind {k!r} here")
        flags |= _FLAGS[k]
    os.makedirs(pin_dir, mode=0o711, exist_ok=True)
    paths = {k: pin_path(pin_dir, k) for k in kinds}
    made: list[str] = []

    def make() -> None:
        libc = _c()
        if libc.unshare(flags) != 0:
            raise _oserror("unshare of the pod's namespaces", pin_dir)
        if hostname is not None and "uts" in kinds:
            raw = hostname.encode()
            if libc.sethostname(raw, len(raw)) != 0:
                err = ctypes.get_errno()
                raise InvalidArgument(f"hostname {hostname[:80]!r} cannot be set: {os.strerror(err)}"
                                      + (f" (longer than {_HOST_NAME_MAX} bytes)" if len(raw) > _HOST_NAME_MAX else ""))
        if sysctls:
            _write_sysctls(sysctls)
        tid = threading.get_native_id()
        for k, path in paths.items():
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
            except FileExistsError:
                raise InvalidArgument(f"namespace pin {path} already exists") from None
            made.append(path)
            src = f"/proc/self/task/{tid}/ns/{k}".encode()
            if libc.mount(src, path.encode(), b"none", _MS_BIND, None) != 0:
                raise _oserror(f"bind-mount of the new {k} namespace", path)

    try:
        _in_thread(make, "nspin")
    except BaseException as exc:
        for p in made:
            unpin(p)
        if isinstance(exc, OSError):
            raise Internal(f"could not make the pod's namespaces under {pin_dir}: {exc}") from exc
        raise
    return paths


def set_sysctls_in(path: str, kind: str, sysctls: Mapping[str, str]) -> None:
    """Write ``sysctls`` inside the pinned namespace at ``path`` (e.g. ``net.*`` in a pod's
    network namespace), from a fresh thread that enters it.  Blocking."""
    if not sysctls:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"namespace {path} does not exist") from None
    try:
        def enter_and_write() -> None:
            if _c().setns(fd, _FLAGS[kind]) != 0:
                raise Internal(f"setns into {path} failed: {os.strerror(ctypes.get_errno())}")
            _write_sysctls(sysctls)

        _in_thread(enter_and_write, "nspin-sysctl")
    finally:
        os.close(fd)


def unpin_all(pin_dir: str) -> None:
    """Release every pin ``pin_namespaces`` may have made under ``pin_dir``; idempotent."""
    for k in KINDS:
        unpin(os.path.join(pin_dir, k))
