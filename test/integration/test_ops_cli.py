"""The operator tools against a real daemon's root: inspect, du, gc, fsck; and the Grafana
dashboard against a live /metrics scrape."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from moorage.core import netns as netnsmod
from moorage.core.procs import cmdlines
from moorage.core.store import SnapshotRecord, Store
from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config, run_container, status, wait_exited
from moorage.testing.daemon import REPO
from moorage.testing.imagesenv import pull
from moorage.testing.netlab import run_pod

pytestmark = pytest.mark.integration


def moorage(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moorage.cri.cli", *args, "--config", d.config_path],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def ok(d, *args: str) -> str:
    r = moorage(d, *args)
    assert r.returncode == 0, f"moorage {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _blob_path(d, digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    return os.path.join(d.root, "images", "content", "blobs", algo, hexd)


def _write_blob(d, data: bytes) -> str:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(_blob_path(d, digest), "wb") as f:
        f.write(data)
    return digest


def test_inspect_du_gc(daemon, registry):
    ref = registry.images["busybox"].ref
    iid = pull(daemon, ref)
    rt = daemon.runtime
    pcfg = pod_config()
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg), timeout=60).pod_sandbox_id
    cid = run_container(rt, sid, pcfg, container_config(ref, ["sleep", "3600"]))

    pod = json.loads(ok(daemon, "inspect", "pod", sid[:10]))
    assert pod["id"] == sid and pod["state"] == "SANDBOX_READY" and pod["containers"] == [cid]
    # no infra process (runtime.drop_infra): its namespaces are pinned files
    assert pod["infra"] is False and pod["spec"] is None and pod["processes"] is None
    assert pod["paths"]["netns"]["exists"] and pod["paths"]["ipc_ns"]["exists"] and pod["paths"]["uts_ns"]["exists"]
    # a pod sharing its PID namespace keeps its infra process
    icfg = pod_config(linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pb.NamespaceOption(pid=pb.POD))))
    isid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=icfg), timeout=60).pod_sandbox_id
    pod = json.loads(ok(daemon, "inspect", "pod", isid[:10]))
    assert pod["infra"] is True and pod["containers"] == []
    assert pod["spec"]["process"]["args"] and pod["paths"]["bundle"]["exists"] and pod["paths"]["netns"]["exists"]
    assert pod["processes"]["conmon"]["alive"] and pod["processes"]["init"]["alive"]
    assert pod["processes"]["runtime"]["status"] == "running"

    ctr = json.loads(ok(daemon, "inspect", "container", cid[:10]))
    assert ctr["id"] == cid and ctr["state"] == "CONTAINER_RUNNING" and ctr["sandbox_id"] == sid
    assert ctr["spec"]["process"]["args"] == ["sleep", "3600"]
    assert ctr["paths"]["rootfs"]["exists"] and ctr["snapshot"]["dir"]["exists"]
    assert ctr["snapshot"]["kind"] == "active"
    assert ctr["processes"]["init"]["alive"] and ctr["processes"]["conmon"]["alive"]
    assert ctr["record"]["metadata"]["image_name"] == ref and ctr["record"]["metadata"]["image_ref"] == iid

    img = json.loads(ok(daemon, "inspect", "image", ref))
    assert img["id"] == iid and img["containers"] == [cid]
    assert img["content"] and all(c["exists"] for c in img["content"])
    assert img["snapshots"] and all(s["dir"]["exists"] for s in img["snapshots"])
    assert json.loads(ok(daemon, "inspect", "image", iid.removeprefix("sha256:")[:12]))["id"] == iid

    for kind in ("pod", "container", "image"):
        r = moorage(daemon, "inspect", kind, "0000ffff")
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr, r.stderr

    # du: every blob and snapshot with its owners
    du = json.loads(ok(daemon, "du", "--json"))
    assert {b["digest"] for b in du["blobs"]} >= {c["digest"] for c in img["content"]}
    assert all(b["owners"] and not b["unreferenced"] for b in du["blobs"])
    owners = {s["key"]: s["owners"] for s in du["snapshots"]}
    assert any(f"container {cid[:12]}" in o for o in owners.values())
    assert any(f"image {ref}" in o for o in owners.values())
    assert du["totals"]["blobs"] > 500_000 and du["totals"]["unreferenced"] == 0

    # an unreferenced blob: listed, marked, removed, while the daemon runs
    stray = _write_blob(daemon, b"nobody needs me")
    assert f"would remove blob {stray}" in ok(daemon, "gc", "--dry-run")
    assert os.path.exists(_blob_path(daemon, stray))  # a dry run changes nothing
    table = ok(daemon, "du")
    assert re.search(rf"blob\s+{stray.removeprefix('sha256:')[:19]}.*UNREFERENCED", table), table
    out = ok(daemon, "gc")
    assert f"removed blob {stray}" in out and not os.path.exists(_blob_path(daemon, stray))
    assert "nothing to remove" in ok(daemon, "gc", "--dry-run")
    assert status(rt, cid).state == pb.CONTAINER_RUNNING

    # a partial download belongs to the daemon while it runs; once it is stopped, gc takes it
    ingest = os.path.join(daemon.root, "images", "content", "ingest", "leftover")
    with open(ingest, "wb") as f:
        f.write(b"x" * 1000)
    assert "ingest leftover" not in ok(daemon, "gc", "--dry-run")
    daemon.cleanup_pods()
    daemon.stop()
    assert "would remove ingest leftover" in ok(daemon, "gc", "--dry-run")
    out = ok(daemon, "gc")
    assert "removed ingest leftover" in out and not os.path.exists(ingest)
    assert all(os.path.exists(_blob_path(daemon, c["digest"])) for c in img["content"])  # the image is kept


def _kill_conmon(d, cid: str) -> None:
    with open(os.path.join(d.state, "oci", "conmon", cid, "conmon.pid")) as f:
        os.kill(int(f.read().strip()), signal.SIGKILL)


def test_fsck_finds_and_repairs_each_kind(daemon_factory, registry):
    d = daemon_factory()
    ref = registry.images["busybox"].ref
    pull(d, ref)
    other = registry.images["multilayer"].ref
    pull(d, other)
    rt = d.runtime
    pcfg = pod_config()
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg), timeout=60).pod_sandbox_id
    keep = run_container(rt, sid, pcfg, container_config(ref, ["sleep", "3600"]))
    lost = run_container(rt, sid, pcfg, container_config(ref, ["sleep", "3600"]))
    orphan = run_container(rt, sid, pcfg, container_config(ref, ["sleep", "3600"]))
    done = run_container(rt, sid, pcfg, container_config(ref, ["sh", "-c", "exit 7"]))
    wait_exited(rt, done)
    exits_later = run_container(rt, sid, pcfg, container_config(ref, ["sleep", "3600"]))
    unstarted = run_container(rt, sid, pcfg, container_config(ref, ["true"]), start=False)

    r = moorage(d, "fsck", "--repair")
    assert r.returncode == 2 and "stop it first" in r.stderr, r.stderr
    assert moorage(d, "fsck").returncode == 0  # a healthy running daemon: nothing to say

    d.stop()  # containers keep running under their conmons
    r = moorage(d, "fsck")
    assert r.returncode == 0 and "no inconsistencies found" in r.stdout, r.stdout

    # -- each kind of inconsistency, on purpose --------------------------------------------------
    store = Store(d.root)
    # a RUNNING container whose conmon and process are gone
    _kill_conmon(d, lost)
    subprocess.run(["runc", f"--root={d.state}/oci/runc", "delete", "--force", lost], check=True)
    # a RUNNING container that exited while no daemon watched (conmon wrote the exit file)
    subprocess.run(["runc", f"--root={d.state}/oci/runc", "kill", exits_later, "KILL"], check=True)
    # a process (and its bundle, rootfs mount, snapshot, conmon dir) whose record is gone
    store.delete_container(orphan)
    # a CREATED container whose bundle is gone; an exit file of no container
    os.unlink(os.path.join(d.state, "containers", unstarted, "bundle", "config.json"))
    stray_exit = os.path.join(d.state, "oci", "exits", "12" * 32)
    with open(stray_exit, "w") as f:
        f.write("0")
    # a snapshot dir with no record, a snapshot record with no dir
    os.makedirs(os.path.join(d.root, "images", "snapshotter", "snapshots", "9999", "fs"))
    ghost = "sha256:" + "ab" * 32
    store.put_snapshot(SnapshotRecord(key=ghost, kind="committed", dir_id="9998"))
    # sandbox dirs with no record
    stray_sb = "cd" * 32
    os.makedirs(os.path.join(d.root, "sandboxes", stray_sb))
    os.makedirs(os.path.join(d.state, "sandboxes", stray_sb))
    # a record whose pod files dir is gone
    subprocess.run(["rm", "-rf", os.path.join(d.root, "sandboxes", sid)], check=True)
    # content an image needs, gone
    ml = store.image_by_ref(other)
    assert ml is not None
    os.unlink(_blob_path(d, ml.layers[0]))
    store.close()
    # a mount nobody owns
    stray_mnt = os.path.join(d.state, "stray-mount")
    os.makedirs(stray_mnt)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", stray_mnt], check=True)
    # a pinned netns and a CNI cache entry of no sandbox
    netnsmod.create_netns("fsck-orphan", os.path.join(d.state, "netns"))
    results = os.path.join(d.state, "cni", "results")
    os.makedirs(results, exist_ok=True)
    gone_sb = "ef" * 32
    with open(os.path.join(results, f"fscknet-{gone_sb}-eth0"), "w") as f:
        json.dump({"kind": "cniCacheV1", "containerId": gone_sb, "ifName": "eth0", "netns": "",
                   "config": {"cniVersion": "1.0.0", "name": "fscknet", "plugins": [{"type": "loopback"}]},
                   "result": {"cniVersion": "1.0.0"}}, f)

    r = moorage(d, "fsck")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    expect = [
        f"[lost-process] container {lost}: RUNNING but neither conmon nor its process exists",
        f"[lost-process] container {exits_later}: RUNNING but it exited (code 137)",
        f"[orphan-process] {orphan}: conmon pid",
        f"[mount] {stray_mnt}:",
        f"[mount] {d.state}/containers/{orphan}/bundle/rootfs:",
        f"[dir] {d.state}/containers/{orphan}:",
        f"[dir] {d.root}/sandboxes/{stray_sb}:",
        f"[dir] {d.state}/sandboxes/{stray_sb}:",
        f"[dir] {d.root}/images/snapshotter/snapshots/9999:",
        f"[snapshot] {orphan}: active snapshot of no container",
        f"[record] pod {sid}: its pod files dir",
        f"[record] container {unstarted}: CREATED but its bundle is missing",
        f"[dir] {stray_exit}: conmon exits entry with no record",
        f"[record] snapshot {ghost}: its dir",
        f"[content] image {other}: missing {ml.layers[0][:19]}",
        f"[cni] {gone_sb}: CNI cache entry of no sandbox",
        f"[netns] {d.state}/netns/fsck-orphan:",
    ]
    for e in expect:
        assert e in out, f"{e!r} not in:\n{out}"
    assert keep not in out and done not in out  # healthy ones are not findings

    r = moorage(d, "fsck", "--repair")
    assert r.returncode == 1 and "repair failed" not in r.stdout, r.stdout + r.stderr
    assert "0 repair(s) failed" in r.stdout and r.stdout.count("  repaired") >= len(expect), r.stdout
    r = moorage(d, "fsck")
    assert r.returncode == 0 and "no inconsistencies found" in r.stdout, r.stdout

    # what the repairs did, seen from the disk and from a daemon started on the repaired root
    assert not os.path.ismount(stray_mnt)
    assert not os.path.exists(os.path.join(d.state, "netns", "fsck-orphan"))
    assert not os.listdir(results)
    assert os.path.isfile(os.path.join(d.root, "sandboxes", sid, "hosts"))
    d.start()
    rt = d.runtime
    assert status(rt, lost).state == pb.CONTAINER_EXITED and status(rt, lost).exit_code == 255
    assert status(rt, exits_later).state == pb.CONTAINER_EXITED and status(rt, exits_later).exit_code == 137
    assert status(rt, keep).state == pb.CONTAINER_RUNNING
    assert status(rt, done).exit_code == 7
    assert status(rt, unstarted).state == pb.CONTAINER_EXITED and not os.path.exists(stray_exit)
    ids = {c.id for c in rt.ListContainers(pb.ListContainersRequest()).containers}
    assert orphan not in ids
    assert not [pid for pid, args in cmdlines() if orphan.encode() in args]  # its conmon is gone
    assert d.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=other))).image.id == ""
    assert d.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref))).image.id


def _dashboard_metrics() -> set[str]:
    with open(os.path.join(REPO, "manifests", "grafana", "moorage.json")) as f:
        dash = json.load(f)
    exprs = []

    def walk(panels: list) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    exprs += [v["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    names = set()
    for e in exprs:
        # identifiers that are not functions, keywords, labels or variables
        e = re.sub(r"\{[^}]*\}", "", e)
        e = re.sub(r"\b(by|without)\s*\([^)]*\)", "", e)
        for tok in re.findall(r"(?<![\w$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", e):
            if tok not in ("le", "job", "instance"):
                names.add(tok)
    return names


def test_dashboard_metrics_exist_in_a_live_scrape(daemon_factory, netlab, registry):
    d = netlab.daemon(daemon_factory, conf=netlab.conflist(portmap=False, bandwidth=False))
    ref = registry.images["busybox"].ref
    pull(d, ref)
    pcfg = pod_config()
    sid = run_pod(d, pcfg)
    cid = run_container(d.runtime, sid, pcfg, container_config(ref, ["true"]))
    wait_exited(d.runtime, cid)
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    scraped = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    used = _dashboard_metrics()
    assert len(used) >= 10, used  # the parse found the queries' metrics
    assert {"moorage_cni_operation_duration_seconds_bucket", "process_resident_memory_bytes",
            "moorage_image_pull_bytes_total", "moorage_sandboxes", "moorage_containers"} <= used
    missing = used - scraped
    assert not missing, f"the dashboard queries metrics the daemon does not export: {sorted(missing)}"
