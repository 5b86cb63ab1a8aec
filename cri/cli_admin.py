"""``moorage inspect``, ``moorage du`` and ``moorage gc``: what is on disk, and pruning it.

All three work on the root dir's store and directories directly (``cli_root``), with or
without a running daemon.  ``gc`` is the image service's own GC (the rules the daemon applies
after RemoveImage), run under the GC lock the daemon and ``images import`` honour; the
start-up cleaning of interrupted pulls (ingests, half-extracted snapshots) is added only when
no daemon runs, since a running daemon's pulls own those.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import urllib.request
from typing import Any

from moorage.core.errors import InvalidArgument, MoorageError, NotFound, Unavailable
from moorage.cri import cli_root
from moorage.cri import config as configmod
from moorage.cri.cli_root import Root, alive
from moorage.images.service import EXTRACT_PREFIX
from moorage.images.snapshotter import disk_usage
from moorage.runtime import records

IMAGE_VOLUME_PREFIX = "imagevolume-"  # snapshot keys of image volumes: imagevolume-<cid>-<n> (runtime/container.py)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print a pod, container or image as JSON (record, spec, paths, processes)")
    p.add_argument("kind", choices=("pod", "container", "image"))
    p.add_argument("id", help="full id or unique prefix (images: also a reference)")
    cli_root.add_common(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("du", help="content blobs and snapshots with sizes and owners")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    cli_root.add_common(p)
    p.set_defaults(func=_cmd_du)

    p = sub.add_parser("gc", help="remove unreferenced content and snapshots (and leftovers of interrupted pulls)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cli_root.add_common(p)
    p.set_defaults(func=_cmd_gc)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _path(p: str) -> dict[str, Any]:
    return {"path": p, "exists": bool(p) and os.path.lexists(p)}


def _proc(pid: int) -> dict[str, Any]:
    return {"pid": pid, "alive": alive(pid)}


def _runtime_state(r: Root, handler: str, obj_id: str) -> dict[str, Any]:
    """What runc/crun says about ``obj_id`` (not found is an answer too)."""
    try:
        st = asyncio.run(r.oci(handler).state(obj_id))
    except NotFound:
        return {"status": "unknown to the runtime"}
    except MoorageError as e:
        return {"status": "error", "error": e.message}
    return {"status": st.status, "pid": st.pid}


def _oci_processes(r: Root, handler: str, obj_id: str, init_pid: int) -> dict[str, Any]:
    rt = r.oci(handler)
    conmon = rt.conmon_pid(obj_id)
    out: dict[str, Any] = {
        "conmon": {"pid": conmon or 0, "alive": conmon is not None},
        "init": _proc(init_pid),
        "runtime": _runtime_state(r, handler, obj_id),
    }
    ex = rt.exit_status(obj_id)
    if ex is not None:
        out["exit"] = {"code": ex.code, "finished_at": ex.finished_at.isoformat(), "oom_killed": ex.oom_killed}
    return out


# --- check: the cgroup driver against the init system ------------------------------------------------

WARNING = "warning: "  # a check item that passes but needs a look (`moorage check` prints "warn")


def pid1_name() -> str:
    """The name of PID 1 ("systemd" on a systemd host); "" when it cannot be read."""
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cgroup_driver_item(driver: str, init: str | None = None) -> tuple[str, bool, str]:
    """The kubelet and the runtime must use one cgroup driver, and on a systemd host that
    should be systemd: two managers of one hierarchy fight (and the kubelet refuses a mismatch)."""
    init = pid1_name() if init is None else init
    label = "cgroup driver"
    systemd = init == "systemd"
    if systemd and driver == "cgroupfs":
        return label, True, (f"{WARNING}systemd is PID 1 but runtime.cgroup_driver = \"cgroupfs\": set it to "
                             "\"systemd\" and the kubelet's cgroupDriver to systemd (they must match)")
    if not systemd and driver == "systemd":
        return label, True, (f"{WARNING}runtime.cgroup_driver = \"systemd\" but PID 1 is {init or 'unknown'}, not "
                             "systemd: containers will not start; use \"cgroupfs\" (and the kubelet's "
                             "cgroupDriver cgroupfs)")
    return label, True, f"{driver} (PID 1 is {init or 'unknown'}); the kubelet's cgroupDriver must be {driver} too"


# --- inspect ---------------------------------------------------------------------------------------

def inspect_pod(r: Root, sid: str) -> dict[str, Any]:
    s = r.find_sandbox(sid)
    sid = s.meta.id
    bundle = os.path.join(r.sandbox_state(sid), "bundle")
    rt = r.oci(s.meta.runtime_handler)
    paths = {
        "root": _path(r.sandbox_root(sid)), "state": _path(r.sandbox_state(sid)),
        "shm": _path(s.meta.shm_path), "netns": _path(s.status.netns_path),
        "log_directory": _path(s.meta.config.log_directory),
    }
    if s.meta.infra:
        paths.update({"bundle": _path(bundle), "conmon_dir": _path(rt.persist_dir(sid)),
                      "exit_file": _path(rt.exit_file(sid))})
    else:  # no process of its own: its namespaces are pinned files
        paths.update({f"{kind}_ns": _path(p) for kind, p in sorted(s.meta.ns_paths.items())})
    return {
        "kind": "pod", "id": sid, "name": s.meta.name, "state": s.status.state.value, "infra": s.meta.infra,
        "record": records.sandbox_row(s.meta, s.status).data,  # old rows in today's form
        "spec": _read_json(os.path.join(bundle, "config.json")) if s.meta.infra else None,
        "paths": paths,
        "processes": _oci_processes(r, s.meta.runtime_handler, sid, s.status.pid) if s.meta.infra else None,
        "containers": [c.meta.id for c in r.containers() if c.meta.sandbox_id == sid],
    }


def _snapshot_info(r: Root, key: str) -> dict[str, Any] | None:
    rec = r.store.get_snapshot(key)
    if rec is None:
        return None
    d = r.snapshot_dir(rec.dir_id)
    return {"key": key, "kind": rec.kind, "parent": rec.parent, "dir": _path(d)}


def inspect_container(r: Root, cid: str) -> dict[str, Any]:
    c = r.find_container(cid)
    cid = c.meta.id
    state = r.container_state(cid)
    bundle = os.path.join(state, "bundle")
    rt = r.oci(c.meta.runtime_handler)
    sandbox_netns = ""
    try:
        sandbox_netns = r.find_sandbox(c.meta.sandbox_id).status.netns_path
    except NotFound:
        pass
    volumes = [_snapshot_info(r, rec.key) for rec in r.store.list_snapshots()
               if rec.key.startswith(f"{IMAGE_VOLUME_PREFIX}{cid}-")]
    return {
        "kind": "container", "id": cid, "name": c.meta.name, "state": c.status.state.value,
        "sandbox_id": c.meta.sandbox_id,
        "record": records.container_row(c.meta, c.status).data,
        "spec": _read_json(os.path.join(bundle, "config.json")),
        "paths": {
            "state": _path(state), "bundle": _path(bundle), "rootfs": _path(os.path.join(bundle, "rootfs")),
            "log": _path(c.meta.log_path), "netns": _path(sandbox_netns),
            "conmon_dir": _path(rt.persist_dir(cid)), "exit_file": _path(rt.exit_file(cid)),
        },
        "snapshot": _snapshot_info(r, c.meta.snapshot_key or cid),
        "image_volume_snapshots": volumes,
        "processes": _oci_processes(r, c.meta.runtime_handler, cid, c.status.pid),
    }


def inspect_image(r: Root, ref: str) -> dict[str, Any]:
    rec = r.images.status(ref)
    if rec is None:
        raise NotFound(f"image {ref!r} not found")
    blobs = [rec.extra.get("root_digest", ""), rec.manifest_digest, rec.id, *rec.layers]
    content = []
    for d in dict.fromkeys(b for b in blobs if b):
        path = r.images.content.path(d)
        content.append({"digest": d, **_path(path), "size": os.path.getsize(path) if os.path.isfile(path) else 0})
    chain = []
    key: str | None = rec.chain_id
    while key:
        info = _snapshot_info(r, key)
        if info is None:
            chain.append({"key": key, "missing": True})
            break
        chain.append(info)
        key = info["parent"]
    users = [c.meta.id for c in r.containers() if c.meta.image_ref == rec.id]
    return {"kind": "image", "id": rec.id, "record": dataclasses.asdict(rec), "content": content,
            "snapshots": chain, "containers": users}


def _cmd_inspect(args: argparse.Namespace) -> int:
    cfg = cli_root.load_config(args)
    fn = {"pod": inspect_pod, "container": inspect_container, "image": inspect_image}[args.kind]
    try:
        with cli_root.opened(cfg) as r:
            out = fn(r, args.id)
    except (NotFound, InvalidArgument) as e:
        print(f"moorage: {e.code}: {e.message}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
    return 0


# --- du --------------------------------------------------------------------------------------------

def _image_name(img: Any) -> str:
    return (img.repo_tags or img.repo_digests or [img.id])[0]


def usage(r: Root) -> dict[str, Any]:
    """Every blob and snapshot with its size, owners and whether GC would take it."""
    plan = r.images.collect_garbage(dry_run=True)
    doomed_blobs, doomed_snaps = set(plan["blobs"]), set(plan["snapshots"])
    images = r.store.list_images()
    containers = r.containers()
    leased = r.store.leased_resources()
    blob_owners: dict[str, list[str]] = {}
    for img in images:
        for d in {img.id, img.manifest_digest, img.extra.get("root_digest", ""), *img.layers}:
            if d:
                blob_owners.setdefault(d, []).append(f"image {_image_name(img)}")
    snaps = {s.key: s for s in r.store.list_snapshots()}
    snap_owners: dict[str, list[str]] = {}

    def own_chain(top: str | None, who: str) -> None:
        while top and top in snaps:
            lst = snap_owners.setdefault(top, [])
            if who not in lst:
                lst.append(who)
            top = snaps[top].parent

    for img in images:
        own_chain(img.chain_id, f"image {_image_name(img)}")
    for c in containers:
        for key, s in snaps.items():
            if key in (c.meta.snapshot_key, c.meta.id) or key.startswith(f"{IMAGE_VOLUME_PREFIX}{c.meta.id}-"):
                own_chain(s.key, f"container {c.meta.id[:12]}")
    blobs: list[dict[str, Any]] = []
    for info in sorted(r.images.content.list(), key=lambda i: str(i.digest)):
        d = str(info.digest)
        owners = blob_owners.get(d, []) + (["lease"] if d in leased else [])
        blobs.append({"digest": d, "size": info.size, "owners": owners, "unreferenced": d in doomed_blobs})
    snapshots: list[dict[str, Any]] = []
    for key, s in sorted(snaps.items()):
        try:
            size = disk_usage(os.path.join(r.snapshot_dir(s.dir_id), "fs")).size
        except FileNotFoundError:
            size = 0
        owners = snap_owners.get(key, []) + (["lease"] if key in leased else [])
        if s.key.startswith(EXTRACT_PREFIX):
            owners.append("extraction (a pull)")
        snapshots.append({"key": key, "kind": s.kind, "dir": s.dir_id, "size": size, "owners": owners,
                          "unreferenced": key in doomed_snaps})
    known_dirs = {s.dir_id for s in snaps.values()}
    orphan_dirs: list[dict[str, Any]] = []
    with os.scandir(r.images.snapshots.snapshots_dir) as it:
        for e in it:
            if e.name not in known_dirs:
                orphan_dirs.append({"dir": e.name, "size": _tree_size(e.path)})
    ingests: list[dict[str, Any]] = []
    with os.scandir(r.images.content.ingest_dir) as it:
        for e in it:
            ingests.append({"name": e.name, "size": _tree_size(e.path)})
    return {
        "blobs": blobs, "snapshots": snapshots, "orphan_snapshot_dirs": orphan_dirs, "ingests": ingests,
        "totals": {
            "blobs": sum(b["size"] for b in blobs), "snapshots": sum(s["size"] for s in snapshots),
            "unreferenced": sum(b["size"] for b in blobs if b["unreferenced"])
            + sum(s["size"] for s in snapshots if s["unreferenced"]),
            "orphan_snapshot_dirs": sum(o["size"] for o in orphan_dirs),
            "ingests": sum(i["size"] for i in ingests),
        },
    }


def _tree_size(path: str) -> int:
    try:
        return disk_usage(path).size
    except OSError:
        return 0


def _cmd_du(args: argparse.Namespace) -> int:
    cfg = cli_root.load_config(args)
    with cli_root.opened(cfg) as r:
        u = usage(r)
    if args.json:
        json.dump(u, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    rows = [("TYPE", "ID", "SIZE", "OWNERS")]
    for b in u["blobs"]:
        rows.append(("blob", b["digest"].removeprefix("sha256:")[:19], _size(b["size"]),
                     ", ".join(b["owners"]) or "UNREFERENCED"))
    for s in u["snapshots"]:
        key = s["key"].removeprefix("sha256:")[:19] if s["key"].startswith("sha256:") else s["key"]
        owners = ", ".join(s["owners"]) or "-"
        rows.append((f"snapshot/{s['kind']}", key, _size(s["size"]), "UNREFERENCED" if s["unreferenced"] else owners))
    for o in u["orphan_snapshot_dirs"]:
        rows.append(("snapshot dir", o["dir"], _size(o["size"]), "NO RECORD (fsck)"))
    for i in u["ingests"]:
        rows.append(("ingest", i["name"], _size(i["size"]), "partial download"))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row[:3], widths)) + "  " + row[3])
    t = u["totals"]
    print(f"\ntotal: blobs {_size(t['blobs'])}, snapshots {_size(t['snapshots'])}, "
          f"unreferenced {_size(t['unreferenced'])} (moorage gc), orphan snapshot dirs "
          f"{_size(t['orphan_snapshot_dirs'])}, ingests {_size(t['ingests'])}")
    return 0


# --- gc --------------------------------------------------------------------------------------------

def _daemon_pulls_in_flight(cfg: configmod.Config) -> int | None:
    """Pulls the running daemon reports in flight (``/debug/pulls``); None if it cannot be asked."""
    if not cfg.metrics.enabled:
        return None
    host, _, port = cfg.metrics.address.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host.strip("[]"))
    url = f"http://[{host}]:{port}/debug/pulls" if ":" in host else f"http://{host}:{port}/debug/pulls"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=5) as resp:
            pulls = json.loads(resp.read()).get("pulls") or []
    except (OSError, ValueError):
        return None
    return sum(1 for p in pulls if not p.get("finished_at"))


def leftovers(r: Root) -> dict[str, list[str]]:
    """What interrupted pulls left: partial downloads, half-extracted snapshots, unrecorded dirs."""
    snaps = r.store.list_snapshots()
    known = {s.dir_id for s in snaps}
    return {
        "ingests": sorted(os.listdir(r.images.content.ingest_dir)),
        "extractions": sorted(s.key for s in snaps if s.key.startswith(EXTRACT_PREFIX)),
        "orphan_snapshot_dirs": sorted(n for n in os.listdir(r.images.snapshots.snapshots_dir) if n not in known),
    }


def _inventory(r: Root) -> dict[str, list[str]]:
    return {**leftovers(r), "snapshots": [s.key for s in r.store.list_snapshots()],
            "blobs": [str(i.digest) for i in r.images.content.list()]}


def gc_plan(r: Root, with_leftovers: bool) -> dict[str, list[str]]:
    plan = r.images.collect_garbage(dry_run=True)
    if with_leftovers:
        plan = {**leftovers(r), **plan}
    return plan


def _print_plan(plan: dict[str, list[str]], verb: str) -> None:
    for kind in ("ingests", "extractions", "orphan_snapshot_dirs", "snapshots", "blobs"):
        for item in plan.get(kind, []):
            print(f"{verb} {kind.rstrip('s').replace('_', ' ')} {item}")


def _cmd_gc(args: argparse.Namespace) -> int:
    cfg = cli_root.load_config(args)
    pid = cli_root.daemon_pid(cfg.root_dir) if os.path.isdir(cfg.root_dir) else None
    with cli_root.opened(cfg) as r:
        if args.dry_run:
            plan = gc_plan(r, with_leftovers=pid is None)
            _print_plan(plan, "would remove")
            if pid is not None:
                print(f"(a daemon, pid {pid}, runs on this root: leftovers of pulls are its own and not listed)")
            if not any(plan.values()):
                print("nothing to remove")
            return 0
        if pid is not None:
            # The daemon's pulls in flight hold their blobs and snapshots only in its memory.
            n = _daemon_pulls_in_flight(cfg)
            if n:
                raise Unavailable(f"the daemon (pid {pid}) has {n} pull(s) in flight; run `moorage gc` when "
                                  "they are done")
            removed = r.images.collect_garbage()
            _print_plan(removed, "removed")
        else:
            from moorage.cri.server import DaemonLock  # a daemon must not start while we clean

            lock = DaemonLock(cfg.root_dir)
            lock.acquire()
            try:
                before = _inventory(r)
                if r.images.clean_leftovers() is None:
                    raise Unavailable("an offline image import holds the GC lock; retry when it is done")
                after = _inventory(r)
                kept = gc_plan(r, with_leftovers=True)
            finally:
                lock.release()
            removed = {k: sorted(set(v) - set(after[k])) for k, v in before.items()}
            removed["snapshots"] = [k for k in removed["snapshots"] if k not in set(removed["extractions"])]
            _print_plan(removed, "removed")
            for k, v in kept.items():
                for item in v:
                    print(f"kept {k.rstrip('s').replace('_', ' ')} {item} (in use or mounted; see the log)")
        if not any(removed.values()):
            print("nothing to remove")
    return 0
