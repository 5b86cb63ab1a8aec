"""SIGKILL the daemon at a random point of a random RPC sequence, restart it, check what it reports.

Each round (a fixed seed per round, printed, so a failing round can be replayed with
MOORAGE_KILL_LOOP_SEED=<seed> MOORAGE_KILL_LOOP_ROUNDS=1) runs a pod lifecycle with a pull in a
thread: RunPodSandbox, CreateContainer, StartContainer, StopContainer, RemoveContainer,
StopPodSandbox, RemovePodSandbox, in a random shape, SIGKILLs the daemon after a random delay
within the sequence's measured length, and starts it again on the same dirs.  Then:

* every record the daemon lists agrees with runc and the mounts: a READY pod's infra runs (or,
  without one, its IPC/UTS pins are mounted) and it holds its shm and netns; a NOTREADY one holds
  none of them (recovery completed its stop); a RUNNING
  container runs; any other is not running in runc;
* ``moorage fsck`` finds nothing;
* after stopping and removing everything, nothing is left: mounts, netns pins, processes
  (conmon, runc, catatonit, containers), cgroups, bundle dirs, pod dirs, exit files, runc
  state, snapshots beyond the images' own, and on the test's own CNI bridge no veth, IP
  reservation or CNI cache entry.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import threading
import time
import uuid

import grpc
import pytest

from moorage.cri import cli_fsck, cli_root
from moorage.cri import config as configmod
from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, image_client, pod_config, runtime_client, with_infra
from moorage.testing.netlab import NetLab, links_on_bridge
from moorage.testing.runtime_env import RuntimeEnv, own_cgroup_parent, remove_cgroup_tree

ROUNDS = int(os.environ.get("MOORAGE_KILL_LOOP_ROUNDS", "20"))
BASE_SEED = int(os.environ.get("MOORAGE_KILL_LOOP_SEED", "1400"))
#: Kill only inside this RPC (to replay one kind of round), e.g. StartContainer.
ONLY_STEP = os.environ.get("MOORAGE_KILL_LOOP_STEP", "")


def mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def runc_states(d) -> dict[str, str]:
    root = os.path.join(d.state, "oci", "runc")
    if not os.path.isdir(root):
        return {}
    out = subprocess.run(["runc", "--root", root, "list", "--format", "json"], capture_output=True, check=True)
    return {c["id"]: c["status"] for c in json.loads(out.stdout or b"null") or []}


def fsck(d) -> list[str]:
    """``moorage fsck``'s findings (in this process: a second interpreter start costs seconds here)."""
    cfg = configmod.load(d.config_path)
    with cli_root.opened(cfg) as r:
        found, _ = cli_fsck.fsck(r, repair=False)
    return [f.line() for f in found]


def listdir(path: str) -> set[str]:
    return set(os.listdir(path)) if os.path.isdir(path) else set()


class Sequence:
    """One random pod lifecycle against the daemon, run in a thread until it ends or the daemon dies.

    ``at_step`` is set when step ``kill_at`` of the plan begins: the killer waits for it, then
    sleeps a random part of that step's measured length, so every RPC of the plan gets killed
    inside, StopPodSandbox and RemovePodSandbox included.
    """

    def __init__(self, env: RuntimeEnv, rng: random.Random, pull_ref: str, shape: dict | None = None) -> None:
        self.env = env
        self.pull_ref = pull_ref
        self.done: list[str] = []
        self.took: dict[str, float] = {}
        self.error: BaseException | None = None
        self.shape = shape or {
            "pull_first": rng.random() < 0.5,
            "containers": rng.randint(0, 2),
            "stop_containers": rng.random() < 0.5,  # else StopPodSandbox stops them
            "remove_containers": rng.random() < 0.5,  # else RemovePodSandbox removes them
            "stop_pod": rng.random() < 0.8,  # else RemovePodSandbox stops it
            "infra": rng.random() < 0.5,  # a shared PID namespace: the pod runs an infra process
        }
        if ONLY_STEP:  # every step in the plan
            self.shape.update(containers=max(1, self.shape["containers"]), stop_containers=True,
                              remove_containers=True, stop_pod=True)
        s = self.shape
        per_container = ["CreateContainer", "StartContainer"]
        ends = (["StopContainer"] if s["stop_containers"] else []) + (
            ["RemoveContainer"] if s["remove_containers"] else [])
        self.plan = ((["PullImage"] if s["pull_first"] else []) + ["RunPodSandbox"]
                     + per_container * s["containers"] + ([] if s["pull_first"] else ["PullImage"])
                     + ends * s["containers"] + (["StopPodSandbox"] if s["stop_pod"] else []) + ["RemovePodSandbox"])
        self.kill_at = self.plan.index(ONLY_STEP) if ONLY_STEP in self.plan else rng.randrange(len(self.plan))
        self.at_step = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
                self.error = e
        except ValueError as e:  # the killer closed the shared channel between two calls
            if "closed channel" not in str(e):
                self.error = e
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.at_step.set()  # never leave the killer waiting

    def _call(self, name: str, fn, *args, **kw):
        if len(self.done) == self.kill_at:
            self.at_step.set()
        t0 = time.monotonic()
        r = fn(*args, timeout=60, **kw)
        self.took[name] = time.monotonic() - t0
        self.done.append(name)
        return r

    def _run(self) -> None:
        rt = runtime_client(self.env.d)
        img = image_client(self.env.d)
        s = self.shape
        if s["pull_first"]:
            self._call("PullImage", img.PullImage, pb.PullImageRequest(image=pb.ImageSpec(image=self.pull_ref)))
        pcfg = pod_config(name=f"k-{uuid.uuid4().hex[:8]}", linux=with_infra() if s.get("infra") else None)
        sid = self._call("RunPodSandbox", rt.RunPodSandbox, pb.RunPodSandboxRequest(config=pcfg)).pod_sandbox_id
        cids = []
        for i in range(s["containers"]):
            cfg = container_config(self.env.busybox, ["sleep", "1000"], name=f"c{i}")
            cid = self._call("CreateContainer", rt.CreateContainer, pb.CreateContainerRequest(
                pod_sandbox_id=sid, config=cfg, sandbox_config=pcfg)).container_id
            self._call("StartContainer", rt.StartContainer, pb.StartContainerRequest(container_id=cid))
            cids.append(cid)
        if not s["pull_first"]:
            self._call("PullImage", img.PullImage, pb.PullImageRequest(image=pb.ImageSpec(image=self.pull_ref)))
        for cid in cids:
            if s["stop_containers"]:
                self._call("StopContainer", rt.StopContainer, pb.StopContainerRequest(container_id=cid, timeout=0))
            if s["remove_containers"]:
                self._call("RemoveContainer", rt.RemoveContainer, pb.RemoveContainerRequest(container_id=cid))
        if s["stop_pod"]:
            self._call("StopPodSandbox", rt.StopPodSandbox, pb.StopPodSandboxRequest(pod_sandbox_id=sid))
        self._call("RemovePodSandbox", rt.RemovePodSandbox, pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
        assert self.done == self.plan, (self.done, self.plan)


def check_consistent(env: RuntimeEnv) -> list[str]:
    """What the restarted daemon reports against runc and the mounts: a list of problems."""
    d, rt = env.d, env.rt
    problems = []
    states = runc_states(d)
    mnt = mounts()
    netns_dir = os.path.join(d.state, "netns")
    for sb in rt.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        shm = os.path.join(d.state, "sandboxes", sb.id, "shm")
        holds = {"shm": shm in mnt, "netns": os.path.exists(os.path.join(netns_dir, sb.id))}
        # A pod without an infra process (runtime.drop_infra) is its pinned IPC/UTS namespaces.
        pins = {k: os.path.join(d.state, "sandboxes", sb.id, "ns", k) in mnt for k in ("ipc", "uts")}
        if sb.state == pb.SANDBOX_READY:
            alive = states.get(sb.id) == "running" or (sb.id not in states and all(pins.values()))
            if not alive or not all(holds.values()):
                problems.append(f"READY pod {sb.id[:12]}: runc {states.get(sb.id)}, pins {pins}, holds {holds}")
        elif any(holds.values()) or any(pins.values()) or states.get(sb.id) == "running":
            problems.append(f"NOTREADY pod {sb.id[:12]}: runc {states.get(sb.id)}, still holds {holds}")
    for c in rt.ListContainers(pb.ListContainersRequest()).containers:
        running = states.get(c.id) == "running"
        if (c.state == pb.CONTAINER_RUNNING) != running:
            problems.append(f"container {c.id[:12]} is {pb.ContainerState.Name(c.state)} but runc says "
                            f"{states.get(c.id)}")
    problems += [f"fsck: {line}" for line in fsck(d)]
    return problems


def leftovers(env: RuntimeEnv, lab: NetLab, snapshots_before: set[str]) -> dict[str, object]:
    d = env.d
    out: dict[str, object] = dict(env.leaks())
    for what, found in (("veths", links_on_bridge(lab.bridge)), ("IP reservations", lab.reservations()),
                        ("CNI cache entries", lab.cache_entries(d))):
        if found:
            out[what] = found
    for what, path in (("container bundles", os.path.join(d.state, "containers")),
                       ("sandbox state", os.path.join(d.state, "sandboxes")),
                       ("pod files", os.path.join(d.root, "sandboxes")),
                       ("exit files", os.path.join(d.state, "oci", "exits")),
                       ("conmon dirs", os.path.join(d.state, "oci", "conmon"))):
        if listdir(path):
            out[what] = listdir(path)
    snaps = listdir(os.path.join(d.root, "images", "snapshotter", "snapshots")) - snapshots_before
    if snaps:
        out["snapshots"] = snaps
    if runc_states(d):
        out["runc"] = runc_states(d)
    return out


@pytest.fixture
def loop_env(daemon_factory, registry, netlab):
    """A daemon with a cgroup parent of its own and the test's own CNI bridge network."""
    parent, runtime_table = own_cgroup_parent()
    d = netlab.daemon(functools.partial(daemon_factory, extra_config=runtime_table),
                      conf=netlab.conflist(portmap=False, bandwidth=False))
    env = RuntimeEnv(d, registry, parent)
    env.pull("busybox")
    try:
        yield env, netlab
    finally:
        if d.proc is not None and d.proc.poll() is None:
            env.cleanup()
        remove_cgroup_tree(parent)


def cleanup_all(env: RuntimeEnv, pull_ref: str) -> None:
    rt = env.rt
    for c in rt.ListContainers(pb.ListContainersRequest()).containers:
        rt.StopContainer(pb.StopContainerRequest(container_id=c.id, timeout=0), timeout=60)
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id), timeout=60)
    for sb in rt.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
    img = image_client(env.d)
    if img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=pull_ref))).HasField("image"):
        img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=pull_ref)), timeout=60)


def test_kill_loop(loop_env):
    env, lab = loop_env
    d = env.d
    pull_ref = env.reg.images["nonroot"].ref
    env.begin()
    snapshots_before = listdir(os.path.join(d.root, "images", "snapshotter", "snapshots"))
    # How long each step takes here (the kill delays are spread over the step chosen).
    full = {"pull_first": False, "containers": 1, "stop_containers": True, "remove_containers": True,
            "stop_pod": True}
    seq = Sequence(env, random.Random(BASE_SEED - 1), pull_ref, shape=full)
    seq.run()
    assert seq.error is None, seq.error
    took = dict(seq.took)
    cleanup_all(env, pull_ref)
    clean, report = 0, []
    killed_in: dict[str, int] = {}
    for i in range(ROUNDS):
        seed = BASE_SEED + i
        rng = random.Random(seed)
        seq = Sequence(env, rng, pull_ref)
        step = seq.plan[seq.kill_at]
        delay = rng.uniform(0, took.get(step, 0.5))
        worker = threading.Thread(target=seq.run, daemon=True)
        worker.start()
        assert seq.at_step.wait(120)
        time.sleep(delay)
        n = len(seq.done)
        d.kill9()
        step = seq.plan[n] if n < len(seq.plan) else "nothing (the sequence had ended)"
        worker.join(120)
        assert not worker.is_alive()
        killed_in[step] = killed_in.get(step, 0) + 1
        d.start()
        env.rt = d.runtime
        problems = check_consistent(env)
        if seq.error is not None:
            problems.append(f"the sequence failed before the kill: {seq.error!r}")
        cleanup_all(env, pull_ref)
        left = leftovers(env, lab, snapshots_before)
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:  # processes take a moment to be reaped
            time.sleep(0.2)
            left = leftovers(env, lab, snapshots_before)
        if left:
            problems.append(f"left after removing everything: {left}")
        ok = not problems
        clean += ok
        line = (f"kill loop round {i + 1}/{ROUNDS} seed {seed}: killed {delay:.2f}s into {step} "
                f"(done: {', '.join(seq.done) or 'nothing'}): {'clean' if ok else problems}")
        print(line)
        report.append(line)
        if not ok:
            env.begin()  # judge the next rounds on their own
    print(f"kill loop: {clean}/{ROUNDS} rounds clean; killed in {killed_in}; step lengths "
          f"{ {k: round(v, 2) for k, v in took.items()} }")
    assert clean == ROUNDS, "\n".join(r for r in report if not r.endswith("clean")) + "\n" + d.log()[-3000:]
