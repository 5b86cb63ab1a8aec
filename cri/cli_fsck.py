"""``moorage fsck [--repair]``: is the store consistent with the disk, the OCI runtime, the
mounts and the network namespaces?

Each check yields findings: what is wrong, and the action ``--repair`` takes.  Repairs run in
an order where each one leaves the next something simpler (processes first, then mounts, then
directories, then records).  ``--repair`` refuses to run next to a daemon (it would change
what the daemon holds in memory) and holds the root-dir lock, so none starts meanwhile.

Exit status: 0 nothing found, 1 findings (repaired with ``--repair``), 2 an error (or a
repair that failed).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from moorage.cni.manager import CNIManager
from moorage.core import mount as mountmod
from moorage.core import netns as netnsmod
from moorage.core import nspin
from moorage.core.errors import FailedPrecondition, MoorageError, NotFound
from moorage.core.procs import cmdlines
from moorage.core.store import now_ns
from moorage.cri import cli_root
from moorage.cri.cli_admin import IMAGE_VOLUME_PREFIX
from moorage.cri.cli_root import Root, alive
from moorage.images.service import EXTRACT_PREFIX
from moorage.runtime import podfiles
from moorage.runtime.oci import ExitStatus, OCIRuntime
from moorage.runtime.records import ContainerState, SandboxState, replace

LOST = "container state lost"


@dataclass
class Finding:
    check: str  # which check found it (a short word, for tests and grep)
    subject: str
    problem: str
    action: str  # what --repair does
    repair: Callable[[], None] | None = None  # None: nothing to do automatically

    def line(self) -> str:
        return f"[{self.check}] {self.subject}: {self.problem} -> {self.action}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fsck", help="check store, disk, runtime, mounts and netns consistency")
    p.add_argument("--repair", action="store_true", help="carry out the actions (no daemon may run)")
    cli_root.add_common(p)
    p.set_defaults(func=_cmd_fsck)


# --- helpers -----------------------------------------------------------------------------------------

def _rmtree(path: str) -> None:
    """Unmount whatever is mounted at or below ``path``, then remove it (a dir or a file)."""
    for mp in sorted((m for m in mountmod.mount_points() if m == path or m.startswith(path + "/")),
                     key=len, reverse=True):
        mountmod.unmount_all(mp, detach=True)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)  # e.g. an exit file
    if os.path.lexists(path):
        raise FailedPrecondition(f"could not remove {path}")


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _conmons(state_dir: str) -> dict[str, int]:
    """Live conmons of this state dir: container id -> pid (from their command lines)."""
    out: dict[str, int] = {}
    marker = (state_dir.rstrip("/") + "/").encode()
    for pid, args in cmdlines():
        if not args or not os.path.basename(args[0]).startswith(b"conmon") or not any(a.startswith(marker) for a in args):
            continue
        if b"--exec" in args or b"-e" in args:
            continue  # an exec session's conmon: it belongs to its container
        for i, a in enumerate(args[:-1]):
            if a in (b"-c", b"--cid") and alive(pid):
                out[args[i + 1].decode(errors="replace")] = pid
    return out


# --- the checks --------------------------------------------------------------------------------------

def check_processes(r: Root) -> Iterator[Finding]:
    """Conmons and runtime containers no record knows; records whose process is gone."""
    known = {s.meta.id for s in r.sandboxes()} | {c.meta.id for c in r.containers()}
    conmons = _conmons(r.state_dir)
    orphans: dict[str, str] = {}  # id -> handler
    for rt in r.all_oci():
        try:
            listed = asyncio.run(rt.list())
        except MoorageError as e:
            yield Finding("runtime", rt.handler.name, f"`{rt.handler.name} list` failed: {e.message}", "none")
            continue
        for st in listed:
            if st.id not in known:
                orphans.setdefault(st.id, rt.handler.name)
    for cid in conmons:
        if cid not in known:
            orphans.setdefault(cid, r.cfg.runtime.default_handler)
    for cid, handler in sorted(orphans.items()):
        rt = r.oci(handler)

        def kill(rt: OCIRuntime = rt, cid: str = cid) -> None:
            pid = conmons.get(cid)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            asyncio.run(rt.delete(cid, force=True))

        what = f"conmon pid {conmons[cid]}" if cid in conmons else f"{handler} container"
        yield Finding("orphan-process", cid, f"{what} with no sandbox or container record",
                      "kill it and delete it from the OCI runtime", kill)

    for s in r.sandboxes():
        if s.status.state != SandboxState.READY or s.status.phase is not None:
            continue
        def notready(s: cli_root.SandboxRow = s) -> None:
            r.update_sandbox(s, replace(s.status, state=SandboxState.NOTREADY))
        if not s.meta.infra:
            # A pod without an infra process lives in its pinned namespaces.
            pins = [(p, k) for k, p in s.meta.ns_paths.items()]
            if (s.status.netns_path and not netnsmod.is_netns(s.status.netns_path)) or \
                    not all(nspin.is_pinned(p, k) for p, k in pins):
                yield Finding("lost-process", f"pod {s.meta.id}", "READY but its pinned namespaces are gone",
                              "mark it NOTREADY", notready)
            continue
        rt = r.oci(s.meta.runtime_handler)
        if rt.conmon_pid(s.meta.id) is None and not alive(s.status.pid):
            yield Finding("lost-process", f"pod {s.meta.id}", "READY but its infra process is gone",
                          "mark it NOTREADY", notready)
    for c in r.containers():
        if c.status.state != ContainerState.RUNNING or c.status.phase is not None:
            continue
        rt = r.oci(c.meta.runtime_handler)
        if rt.conmon_pid(c.meta.id) is not None:
            continue
        ex = rt.exit_status(c.meta.id)
        if ex is not None:
            recorded: ExitStatus = ex

            def exited(c: cli_root.ContainerRow = c, ex: ExitStatus = recorded) -> None:
                reason = "OOMKilled" if ex.oom_killed else ("Completed" if ex.code == 0 else "Error")
                r.update_container(c, replace(c.status, state=ContainerState.EXITED, exit_code=ex.code,
                                              finished_at=int(ex.finished_at.timestamp() * 1e9), reason=reason))
            yield Finding("lost-process", f"container {c.meta.id}", f"RUNNING but it exited (code {ex.code}) "
                          "while no daemon watched", f"record the exit (code {ex.code})", exited)
            continue
        running = alive(c.status.pid)

        def lost(c: cli_root.ContainerRow = c, running: bool = running) -> None:
            if running:
                asyncio.run(r.oci(c.meta.runtime_handler).delete(c.meta.id, force=True))
            r.update_container(c, replace(c.status, state=ContainerState.EXITED, exit_code=255,
                                          finished_at=now_ns(), reason="Error", message=LOST))
        if running:
            yield Finding("lost-process", f"container {c.meta.id}", f"process {c.status.pid} runs without a conmon "
                          "(no exit would ever be recorded)", "kill it and record it EXITED (255)", lost)
        else:
            yield Finding("lost-process", f"container {c.meta.id}", "RUNNING but neither conmon nor its process "
                          "exists", "record it EXITED (255, container state lost)", lost)


def _owned_mounts(r: Root) -> list[str]:
    owned = []
    for s in r.sandboxes():
        owned += [s.meta.shm_path, s.status.netns_path, os.path.join(r.sandbox_state(s.meta.id), "shm"),
                  *s.meta.ns_paths.values()]
    for c in r.containers():
        owned += [os.path.join(r.container_state(c.meta.id), "bundle", "rootfs"),
                  os.path.join(r.container_state(c.meta.id), "image-volumes")]
    return [o for o in owned if o]


def check_mounts(r: Root) -> Iterator[Finding]:
    """Mounts under moorage's dirs that no sandbox or container owns."""
    owned = _owned_mounts(r)
    tops = [r.root_dir, r.state_dir, r.netns_dir]
    seen = set()
    for mp in mountmod.mount_points():
        if mp in tops or mp in seen or not any(mp.startswith(t.rstrip("/") + "/") for t in tops):
            continue
        if any(mp == o or mp.startswith(o + "/") for o in owned):
            continue
        if mp.startswith(r.netns_dir.rstrip("/") + "/"):
            continue  # pins: check_netns
        seen.add(mp)

        def umount(mp: str = mp) -> None:
            mountmod.unmount_all(mp, detach=True)
        yield Finding("mount", mp, "mounted under moorage's dirs, owned by no sandbox or container",
                      "unmount it (lazily)", umount)


def check_dirs(r: Root) -> Iterator[Finding]:
    """Directories (sandboxes, bundles, snapshots, conmon state) without a record."""
    sids = {s.meta.id for s in r.sandboxes()}
    cids = {c.meta.id for c in r.containers()}
    for base, ids, what in ((os.path.join(r.root_dir, "sandboxes"), sids, "pod files dir"),
                            (os.path.join(r.state_dir, "sandboxes"), sids, "sandbox state dir"),
                            (os.path.join(r.state_dir, "containers"), cids, "container state dir (bundle)")):
        for name in _listdir(base):
            if name not in ids:
                path = os.path.join(base, name)
                yield Finding("dir", path, f"{what} with no record", "unmount and remove it",
                              functools.partial(_rmtree, path))
    oci = os.path.join(r.state_dir, "oci")
    for sub in ("conmon", "exits"):
        for name in _listdir(os.path.join(oci, sub)):
            if name not in sids | cids:
                path = os.path.join(oci, sub, name)
                yield Finding("dir", path, f"conmon {sub} entry with no record", "remove it",
                              functools.partial(_rmtree, path))
    snaps = r.store.list_snapshots()
    known_dirs = {s.dir_id for s in snaps}
    for name in _listdir(r.images.snapshots.snapshots_dir):
        if name not in known_dirs:
            path = r.snapshot_dir(name)
            yield Finding("dir", path, "snapshot dir with no snapshot record", "unmount and remove it",
                          functools.partial(_rmtree, path))
    for s in snaps:
        if s.kind == "committed":
            continue
        owner = s.key.startswith(EXTRACT_PREFIX) or s.key in cids or any(
            s.key.startswith(f"{IMAGE_VOLUME_PREFIX}{c}-") for c in cids) or any(
            c.meta.snapshot_key == s.key for c in r.containers())
        if not owner or s.key.startswith(EXTRACT_PREFIX):
            def drop(key: str = s.key, d: str = r.snapshot_dir(s.dir_id)) -> None:
                _rmtree(d)
                r.images.snapshots.remove(key)
            why = "a half-extracted layer (an interrupted pull)" if s.key.startswith(EXTRACT_PREFIX) else \
                f"{s.kind} snapshot of no container"
            yield Finding("snapshot", s.key, why, "unmount and remove it", drop)


def _delete_image(r: Root, iid: str) -> None:
    r.store.delete_image(iid)


def _cni_del(cni: CNIManager, sid: str) -> None:
    asyncio.run(cni.teardown(sid, None))


def _drop_snapshot_tree(r: Root, key: str) -> None:
    """Remove ``key`` and every snapshot above it, and the images standing on them."""
    snaps = {s.key: s for s in r.store.list_snapshots()}
    doomed = {key}
    grew = True
    while grew:
        grew = False
        for s in snaps.values():
            if s.parent in doomed and s.key not in doomed:
                doomed.add(s.key)
                grew = True
    for img in r.store.list_images():
        if img.chain_id in doomed:
            r.store.delete_image(img.id)
    for k in doomed:
        d = r.snapshot_dir(snaps[k].dir_id) if k in snaps else ""
        if d:
            _rmtree(d)
        r.store.delete_snapshot(k)


def check_records(r: Root) -> Iterator[Finding]:
    """Records whose directories or content are missing."""
    for s in r.sandboxes():
        root = r.sandbox_root(s.meta.id)
        if not os.path.isdir(root):
            def pod_files(s: cli_root.SandboxRow = s, root: str = root) -> None:
                os.makedirs(root, mode=0o711, exist_ok=True)
                host_net = not s.status.netns_path
                hostname = s.meta.hostname or s.meta.config.hostname
                podfiles.write_atomic(os.path.join(root, "hostname"), hostname + "\n")
                podfiles.write_atomic(os.path.join(root, "resolv.conf"), podfiles.resolv_conf_content(
                    s.meta.config.dns_config, podfiles.read_host_file("/etc/resolv.conf")))
                podfiles.write_atomic(os.path.join(root, "hosts"), podfiles.hosts_content(
                    hostname, host_net, podfiles.read_host_file("/etc/hosts"), s.status.ip))
            yield Finding("record", f"pod {s.meta.id}", f"its pod files dir {root} is missing",
                          "write its hostname, hosts and resolv.conf again", pod_files)
    for c in r.containers():
        if c.status.state == ContainerState.CREATED and c.status.phase is None and not os.path.isfile(
                os.path.join(r.container_state(c.meta.id), "bundle", "config.json")):
            def gone(c: cli_root.ContainerRow = c) -> None:
                r.update_container(c, replace(c.status, state=ContainerState.EXITED, exit_code=255,
                                              finished_at=now_ns(), reason="Error", message="bundle lost"))
            yield Finding("record", f"container {c.meta.id}", "CREATED but its bundle is missing (it cannot start)",
                          "record it EXITED (255)", gone)
    for snap in r.store.list_snapshots():
        d = r.snapshot_dir(snap.dir_id)
        if not os.path.isdir(os.path.join(d, "fs")):
            yield Finding("record", f"snapshot {snap.key}", f"its dir {d} is missing",
                          "remove it, the snapshots above it and the images on them (pull again)",
                          functools.partial(_drop_snapshot_tree, r, snap.key))
    in_use = {c.meta.image_ref for c in r.containers()}
    snaps = {s.key for s in r.store.list_snapshots()}
    for img in r.store.list_images():
        missing = [d for d in dict.fromkeys([img.extra.get("root_digest", ""), img.manifest_digest, img.id,
                                             *img.layers]) if d and not r.images.content.exists(d)]
        if img.chain_id and img.chain_id not in snaps:
            missing.append(f"snapshot {img.chain_id}")
        if not missing:
            continue
        name = (img.repo_tags or img.repo_digests or [img.id])[0]
        shown = ", ".join(m[:19] for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
        if img.id in in_use:
            yield Finding("content", f"image {name}", f"missing {shown}",
                          "none while containers use it: pull it again (a pull restores what is missing)")
        else:
            yield Finding("content", f"image {name}", f"missing {shown}",
                          "remove the image record (pull it again)",
                          functools.partial(_delete_image, r, img.id))


def check_network(r: Root) -> Iterator[Finding]:
    """Pinned network namespaces and CNI cache entries without a sandbox."""
    sids = {s.meta.id for s in r.sandboxes()}
    cfg = r.cfg
    cni = CNIManager(cfg.cni.conf_dir, cfg.cni.bin_dirs, cfg.cni_cache_dir, cfg.cni.plugin_timeout,
                     cfg.cni.network_name or None)
    for sid in sorted(cni.cached_sandboxes() - sids):
        yield Finding("cni", sid, "CNI cache entry of no sandbox (its IP may still be allocated)",
                      "run CNI DEL from the cache and drop the entry",
                      functools.partial(_cni_del, cni, sid))
    for name in _listdir(r.netns_dir):
        path = os.path.join(r.netns_dir, name)
        if name in sids or (os.path.isdir(path) and not os.path.islink(path)):
            continue
        yield Finding("netns", path, "network namespace pin of no sandbox", "unmount and remove the pin",
                      functools.partial(netnsmod.remove_netns, path, r.netns_dir))


CHECKS: list[Callable[[Root], Iterator[Finding]]] = [check_processes, check_mounts, check_dirs, check_records,
                                                     check_network]


def fsck(r: Root, repair: bool) -> tuple[list[Finding], list[tuple[Finding, str]]]:
    """Run every check (repairing each finding right after its check when asked); returns the
    findings and the repairs that failed."""
    found: list[Finding] = []
    failed: list[tuple[Finding, str]] = []
    for check in CHECKS:
        for f in list(check(r)):
            found.append(f)
            print(f.line())
            if repair and f.repair is not None:
                try:
                    f.repair()
                    print("  repaired")
                except (MoorageError, OSError) as e:
                    msg = e.message if isinstance(e, MoorageError) else str(e)
                    failed.append((f, msg))
                    print(f"  repair failed: {msg}")
    return found, failed


def _cmd_fsck(args: argparse.Namespace) -> int:
    cfg = cli_root.load_config(args)
    if not os.path.isdir(cfg.root_dir):
        raise NotFound(f"no moorage root dir at {cfg.root_dir} (--root, or root_dir in the config)")
    pid = cli_root.daemon_pid(cfg.root_dir)
    lock = None
    if args.repair:
        if pid is not None:
            print(f"moorage: fsck --repair: a moorage daemon (pid {pid}) holds the root dir {cfg.root_dir}; "
                  "stop it first (repairs would change what it holds in memory)", file=sys.stderr)
            return 2
        from moorage.cri.server import DaemonLock  # no daemon may start while we repair

        lock = DaemonLock(cfg.root_dir)
        lock.acquire()
    elif pid is not None:
        print(f"note: a daemon (pid {pid}) runs on this root; work in flight may show up as findings",
              file=sys.stderr)
    try:
        with cli_root.opened(cfg) as r:
            found, failed = fsck(r, args.repair)
    finally:
        if lock is not None:
            lock.release()
    if not found:
        print("no inconsistencies found")
        return 0
    fixable = sum(1 for f in found if f.repair is not None)
    if args.repair:
        print(f"{len(found)} finding(s); {fixable - len(failed)} repaired, {len(failed)} repair(s) failed, "
              f"{len(found) - fixable} need a person")
        return 2 if failed else 1
    print(f"{len(found)} finding(s); `moorage fsck --repair` carries out {fixable} of the actions")
    return 1
