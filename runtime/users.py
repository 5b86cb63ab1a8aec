"""Resolve a container's uid/gid/additional gids from the image's own user database.

The files read here (``/etc/passwd`` and ``/etc/group`` of an image rootfs) are
untrusted: they may be huge, or symlinks pointing anywhere - including at the
host's own ``/etc/passwd``.  Paths are therefore resolved component by
component *inside* the rootfs (an absolute symlink target restarts at the
rootfs, ``..`` never climbs above it), using directory file descriptors so that
nothing outside the rootfs is ever opened, and reads are bounded.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from moorage.core.errors import InvalidArgument, NotFound

_E = TypeVar("_E")

#: Upper bound on bytes read from /etc/passwd or /etc/group.
MAX_DB_BYTES = 1 << 20
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


# --- safe file access inside a root ----------------------------------------------


def _open_in_root(root_fd: int, path: str) -> int | None:
    """Open ``path`` for reading as if ``root_fd`` were ``/``.

    Returns a read-only fd of a regular file, or ``None`` when the path does not
    exist inside the root (or is not a regular file).  Never leaves the root.
    """
    pending = [c for c in path.split("/") if c not in ("", ".")]
    pending.reverse()  # a stack: next component at the end
    stack: list[int] = []  # fds of directories below the root, innermost last
    hops = 0

    def cur() -> int:
        return stack[-1] if stack else root_fd

    try:
        while pending:
            comp = pending.pop()
            if comp == "..":
                if stack:
                    os.close(stack.pop())
                continue
            try:
                fd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur())
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.EACCES, errno.ELOOP, errno.ENAMETOOLONG):
                    return None
                raise
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                hops += 1
                if hops > _MAX_SYMLINKS:
                    return None
                target = os.readlink(comp, dir_fd=cur())
                if target.startswith("/"):
                    while stack:
                        os.close(stack.pop())
                parts = [c for c in target.split("/") if c not in ("", ".")]
                pending.extend(reversed(parts))
                continue
            if pending:
                if not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    return None
                stack.append(fd)
                continue
            # Last component: must be a regular file.  Re-open it for reading
            # relative to the same directory without following anything, and
            # check that it is the very inode we inspected.
            os.close(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            try:
                rfd = os.open(
                    comp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=cur()
                )
            except OSError:
                return None
            rst = os.fstat(rfd)
            if (rst.st_dev, rst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(rst.st_mode):
                os.close(rfd)
                return None
            return rfd
        return None  # path named the root itself or a directory chain ending in ".."
    finally:
        for d in stack:
            os.close(d)


def read_file_in_root(rootfs: str, path: str, limit: int = MAX_DB_BYTES) -> bytes | None:
    """Read at most ``limit`` bytes of ``path`` resolved inside ``rootfs``.

    ``None`` when the file does not exist there; ``InvalidArgument`` when it is
    larger than ``limit``.
    """
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = _open_in_root(root_fd, path)
    finally:
        os.close(root_fd)
    if fd is None:
        return None
    try:
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(65536, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InvalidArgument(
                    f"the image's {path} is larger than {limit} bytes; refusing to parse it"
                )
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- parsing -----------------------------------------------------------------------


def _int(s: str) -> int | None:
    s = s.strip()
    if not s.isdigit():
        return None
    v = int(s)
    return v if v <= 0xFFFFFFFF else None


def parse_passwd(data: bytes) -> list[PasswdEntry]:
    out: list[PasswdEntry] = []
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split(":")
        if len(f) < 4:
            continue
        uid, gid = _int(f[2]), _int(f[3])
        if uid is None or gid is None:
            continue
        out.append(PasswdEntry(f[0], uid, gid, f[5] if len(f) > 5 else ""))
    return out


def parse_group(data: bytes) -> list[GroupEntry]:
    out: list[GroupEntry] = []
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split(":")
        if len(f) < 3:
            continue
        gid = _int(f[2])
        if gid is None:
            continue
        members = tuple(m.strip() for m in f[3].split(",") if m.strip()) if len(f) > 3 else ()
        out.append(GroupEntry(f[0], gid, members))
    return out


def _load(rootfs: str | None, path: str, parser: Callable[[bytes], list[_E]]) -> list[_E]:
    if not rootfs:
        return []
    data = read_file_in_root(rootfs, path)
    return parser(data) if data is not None else []


# --- resolution --------------------------------------------------------------------


def resolve_user(
    rootfs: str | None,
    run_as_user: int | None,
    run_as_username: str | None,
    run_as_group: int | None,
    supplemental_groups: list[int] | tuple[int, ...] = (),
    image_user: str = "",
    *,
    supplemental_groups_policy: str = "Merge",
) -> tuple[int, int, list[int], str]:
    """Return ``(uid, gid, additional_gids, home)`` for a container process.

    Precedence: ``run_as_username`` > ``run_as_user`` > the image's ``User``
    (``name``, ``uid``, ``name:group``, ``uid:gid``; empty means root).
    ``run_as_group`` overrides the primary group.  A numeric uid absent from
    ``/etc/passwd`` gets gid 0 and home ``/``.  ``additional_gids`` starts with
    the primary gid, then (policy ``Merge``) the groups listing the user as a
    member in ``/etc/group``, then ``supplemental_groups``; duplicates dropped.
    With policy ``Strict`` the image's ``/etc/group`` is not consulted.
    """
    if supplemental_groups_policy not in ("Merge", "Strict"):
        raise InvalidArgument(
            f"unknown supplemental groups policy {supplemental_groups_policy!r}; "
            "expected \"Merge\" or \"Strict\""
        )
    for v, what in ((run_as_user, "run_as_user"), (run_as_group, "run_as_group")):
        if v is not None and not (0 <= v <= 0xFFFFFFFE):
            raise InvalidArgument(f"{what} {v} is out of range (0..4294967294)")
    for g in supplemental_groups:
        if not (0 <= g <= 0xFFFFFFFE):
            raise InvalidArgument(f"supplemental group {g} is out of range (0..4294967294)")

    passwd: list[PasswdEntry] | None = None
    groups: list[GroupEntry] | None = None

    def pw() -> list[PasswdEntry]:
        nonlocal passwd
        if passwd is None:
            passwd = _load(rootfs, "/etc/passwd", parse_passwd)
        return passwd

    def gr() -> list[GroupEntry]:
        nonlocal groups
        if groups is None:
            groups = _load(rootfs, "/etc/group", parse_group)
        return groups

    def by_name(name: str) -> PasswdEntry:
        for e in pw():
            if e.name == name:
                return e
        raise NotFound(
            f'user "{name}" not found in the image\'s /etc/passwd; '
            "use a numeric uid or add the user to the image"
        )

    def by_uid(uid: int) -> PasswdEntry | None:
        for e in pw():
            if e.uid == uid:
                return e
        return None

    def group_gid(spec: str) -> int:
        n = _int(spec)
        if n is not None:
            return n
        for g in gr():
            if g.name == spec:
                return g.gid
        raise NotFound(
            f'group "{spec}" not found in the image\'s /etc/group; '
            "use a numeric gid or add the group to the image"
        )

    entry: PasswdEntry | None
    gid_override: int | None = None
    if run_as_username:
        entry = by_name(run_as_username)
        uid = entry.uid
    elif run_as_user is not None:
        uid = run_as_user
        entry = by_uid(uid)
    else:
        spec = (image_user or "").strip()
        user_part, _, group_part = spec.partition(":")
        if spec and not user_part:
            raise InvalidArgument(f"image user {image_user!r} has a group but no user")
        if not user_part:
            uid, entry = 0, by_uid(0)
        elif _int(user_part) is not None:
            uid = _int(user_part)  # type: ignore[assignment]
            entry = by_uid(uid)
        elif user_part.isdigit():
            raise InvalidArgument(f"image user {image_user!r}: uid is out of range")
        else:
            entry = by_name(user_part)
            uid = entry.uid
        if group_part:
            gid_override = group_gid(group_part)

    gid = entry.gid if entry is not None else 0
    if gid_override is not None:
        gid = gid_override
    if run_as_group is not None:
        gid = run_as_group
    home = entry.home if entry is not None and entry.home else "/"

    additional: list[int] = [gid]
    if supplemental_groups_policy == "Merge" and entry is not None:
        for grp in gr():
            if entry.name in grp.members:
                additional.append(grp.gid)
    additional.extend(int(g) for g in supplemental_groups)
    return uid, gid, list(dict.fromkeys(additional)), home
