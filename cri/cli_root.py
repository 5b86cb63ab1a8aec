"""The root and state dirs as the offline tools see them (``inspect``, ``du``, ``gc``, ``fsck``).

These commands read the store and the directories directly, like ``moorage images import``,
so they work with or without a running daemon and say the same whichever is the case.  What
a daemon keeps only in memory (pulls in flight) they cannot see; commands that change
anything therefore take the locks the daemon honours (``gc.lock``, or the root-dir lock).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from moorage.core.errors import InvalidArgument, NotFound
from moorage.core.store import ObjectRow, Store
from moorage.cri import config as configmod
from moorage.cri.services import image_settings
from moorage.images.service import ImageService
from moorage.runtime import oci as ocimod
from moorage.runtime import records
from moorage.runtime.records import ContainerMeta, ContainerStatus, SandboxMeta, SandboxStatus

LOCK_NAME = "moorage.lock"  # the daemon's root-dir lock (cri/server.py DaemonLock)


def add_common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", help=f"TOML config file (default {configmod.DEFAULT_CONFIG_PATH} if present)")
    sp.add_argument("--root", help="the daemon's root dir (default: from the config)")
    sp.add_argument("--state", help="the daemon's state dir (default: from the config)")


def load_config(args: argparse.Namespace) -> configmod.Config:
    cfg = configmod.load(getattr(args, "config", None))
    if getattr(args, "root", None):
        cfg.root_dir = args.root
    if getattr(args, "state", None):
        cfg.state_dir = args.state
    return cfg


def daemon_pid(root_dir: str) -> int | None:
    """Pid of the daemon holding the root-dir lock (0 if it did not write one), else None."""
    try:
        fd = os.open(os.path.join(root_dir, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)  # closing releases a lock we got


def alive(pid: int) -> bool:
    """A live (not zombie) process."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@dataclass
class SandboxRow:
    row: ObjectRow
    meta: SandboxMeta
    status: SandboxStatus


@dataclass
class ContainerRow:
    row: ObjectRow
    meta: ContainerMeta
    status: ContainerStatus


class Root:
    """The store, image service and paths of one root/state dir pair, opened offline."""

    def __init__(self, cfg: configmod.Config) -> None:
        if not os.path.isdir(cfg.root_dir):
            raise NotFound(f"no moorage root dir at {cfg.root_dir} (--root, or root_dir in the config)")
        self.cfg = cfg
        self.root_dir = os.path.abspath(cfg.root_dir)
        self.state_dir = os.path.abspath(cfg.state_dir)
        self.store = Store(cfg.root_dir, cfg.namespace)
        self.images = ImageService(image_settings(cfg), self.store)
        self._oci: dict[str, ocimod.OCIRuntime] = {}

    def close(self) -> None:
        self.store.close()

    # -- paths (as runtime/context.py and runtime/container.py lay them out) ---------------------

    def sandbox_root(self, sid: str) -> str:
        return os.path.join(self.root_dir, "sandboxes", sid)

    def sandbox_state(self, sid: str) -> str:
        return os.path.join(self.state_dir, "sandboxes", sid)

    def container_state(self, cid: str) -> str:
        return os.path.join(self.state_dir, "containers", cid)

    def snapshot_dir(self, dir_id: str) -> str:
        return os.path.join(self.images.snapshots.snapshots_dir, dir_id)

    @property
    def netns_dir(self) -> str:
        return os.path.abspath(self.cfg.netns_dir)

    # -- records ---------------------------------------------------------------------------------

    def sandboxes(self) -> list[SandboxRow]:
        out = []
        for row in self.store.list_sandboxes():
            meta, status = records.decode_sandbox(row)
            out.append(SandboxRow(row, meta, status))
        return out

    def containers(self) -> list[ContainerRow]:
        out = []
        for row in self.store.list_containers():
            meta, status = records.decode_container(row)
            out.append(ContainerRow(row, meta, status))
        return out

    def find_sandbox(self, sid: str) -> SandboxRow:
        return _unique(self.sandboxes(), sid, lambda s: s.meta.id, "pod sandbox")

    def find_container(self, cid: str) -> ContainerRow:
        return _unique(self.containers(), cid, lambda c: c.meta.id, "container")

    def update_container(self, c: ContainerRow, status: ContainerStatus) -> None:
        records.check_transition("container", c.meta.id, c.status.state, status.state)
        self.store.update_container(records.container_row(c.meta, status))

    def update_sandbox(self, s: SandboxRow, status: SandboxStatus) -> None:
        records.check_transition("sandbox", s.meta.id, s.status.state, status.state)
        self.store.update_sandbox(records.sandbox_row(s.meta, status))

    # -- the OCI runtime of each handler ------------------------------------------------------------

    def oci(self, handler: str) -> ocimod.OCIRuntime:
        rt = self.cfg.runtime
        name = handler or rt.default_handler
        if name not in rt.handlers:
            name = rt.default_handler
        if name not in self._oci:
            h = rt.handlers[name]
            self._oci[name] = ocimod.OCIRuntime(
                ocimod.RuntimeHandler(name, h.path, h.root or None), os.path.join(self.state_dir, "oci"),
                rt.conmon, self.cfg.log_level, systemd_cgroup=rt.cgroup_driver == "systemd")
        return self._oci[name]

    def all_oci(self) -> list[ocimod.OCIRuntime]:
        return [self.oci(n) for n in sorted(self.cfg.runtime.handlers)]


def _unique(items: list[Any], key: str, ident: Any, what: str) -> Any:
    """By full id or unique prefix."""
    exact = [i for i in items if ident(i) == key]
    if exact:
        return exact[0]
    matches = [i for i in items if key and ident(i).startswith(key)]
    if len(matches) > 1:
        raise InvalidArgument(f"{what} id prefix {key!r} is ambiguous ({len(matches)} matches)")
    if not matches:
        raise NotFound(f"{what} {key!r} not found")
    return matches[0]


@contextlib.contextmanager
def opened(cfg: configmod.Config) -> Iterator[Root]:
    r = Root(cfg)
    try:
        yield r
    finally:
        r.close()
