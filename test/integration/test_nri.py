"""NRI against the real daemon: moorage's own plugin (moorage.testing.nri) over the real socket.

One daemon per module with a 1-second plugin request timeout; each test's plugins are
closed after it (so the next test starts with none).  What a plugin asks must land in the
container's OCI spec (ContainerStatus verbose shows it) and in the running container; a
plugin that crashes, hangs or conflicts must never wedge the daemon.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing import registry as registrymod
from moorage.testing.cri import pod_config, wait_for
from moorage.testing.daemon import DaemonProcess, new_base, teardown
from moorage.testing.nri import NRIPlugin, RPCError, hang, nri
from moorage.testing.runtime_env import RuntimeEnv, memory_limit_file, own_cgroup_parent, proc_cgroups, remove_cgroup_tree

pytestmark = pytest.mark.integration

SLEEP = ["sleep", "1000"]
ZERO = os.stat("/dev/zero")


class NRIEnv:
    def __init__(self, env: RuntimeEnv, cdi_dir: str) -> None:
        self.env = env
        self.cdi_dir = cdi_dir  # the daemon's only runtime.cdi_spec_dirs entry (empty)
        self.plugins: list[NRIPlugin] = []

    @property
    def d(self) -> DaemonProcess:
        return self.env.d

    def plugin(self, name: str, idx: str = "50", **kw: Any) -> NRIPlugin:
        p = NRIPlugin(self.d.nri_socket, f"{name}-{uuid.uuid4().hex[:6]}", idx, **kw)
        self.plugins.append(p)
        return p.start()

    def spec(self, cid: str) -> dict:
        info = json.loads(self.env.status(cid, verbose=True).info["info"])
        spec: dict = info["runtimeSpec"]
        return spec

    def close_plugins(self) -> None:
        for p in self.plugins:
            p.close()
        self.plugins.clear()


def _daemon(registry: registrymod.TestRegistry, nri_config: str) -> Iterator[NRIEnv]:
    parent, runtime_table = own_cgroup_parent()
    base = new_base()
    cdi_dir = os.path.join(base, "cdi")
    os.makedirs(cdi_dir)
    d = DaemonProcess(base=base, extra_config=runtime_table + f'cdi_spec_dirs = ["{cdi_dir}"]\n',
                      nri_config=nri_config)
    try:
        d.start()
        env = RuntimeEnv(d, registry, parent)
        env.pull("busybox")
        yield NRIEnv(env, cdi_dir)
    finally:
        teardown(d)
        remove_cgroup_tree(parent)


@pytest.fixture(scope="module")
def nri_module(registry: registrymod.TestRegistry) -> Iterator[NRIEnv]:
    yield from _daemon(registry, "plugin_request_timeout = 1.0\n")


@pytest.fixture
def nenv(nri_module: NRIEnv) -> Iterator[NRIEnv]:
    nri_module.env.begin()
    yield nri_module
    nri_module.close_plugins()
    nri_module.env.cleanup()
    nri_module.env.check_no_leaks()


def _names(items: Any) -> list[str]:
    return sorted(x.id for x in items)


def test_registration_configures_and_synchronizes_existing_pods_and_containers(nenv: NRIEnv) -> None:
    env = nenv.env
    empty = nenv.plugin("empty")  # zero pods and containers
    sync = empty.seen("Synchronize")
    assert len(sync) == 1 and list(sync[0].pods) == [] and list(sync[0].containers) == []
    conf = empty.seen("Configure")[0]
    assert (conf.runtime_name, conf.request_timeout, conf.registration_timeout) == ("moorage", 1000, 5000)

    sid, pcfg = env.run_pod()
    c1 = env.run(sid, pcfg, SLEEP)
    c2 = env.create(sid, pcfg, SLEEP)
    late = nenv.plugin("late")
    req = late.seen("Synchronize")[0]
    assert _names(req.pods) == [sid] and req.pods[0].name == pcfg.metadata.name
    assert req.pods[0].uid == pcfg.metadata.uid and req.pods[0].namespace == pcfg.metadata.namespace
    # No infra process (runtime.drop_infra): no pid, and the pinned namespaces are named instead.
    assert req.pods[0].pid == 0 and req.pods[0].linux.cgroup_parent == env.cgroup_parent
    assert {n.type for n in req.pods[0].linux.namespaces} == {"network", "ipc", "uts"}
    assert _names(req.containers) == sorted([c1, c2])
    states = {c.id: c.state for c in req.containers}
    assert states == {c1: nri.CONTAINER_RUNNING, c2: nri.CONTAINER_CREATED}
    running = next(c for c in req.containers if c.id == c1)
    assert list(running.args) == SLEEP and running.pod_sandbox_id == sid and running.pid > 0
    # the one connected before sees the new ones by their events instead
    assert {r.container.id for r in empty.seen("CreateContainer")} == {c1, c2}


def test_every_lifecycle_event_once_and_in_order(nenv: NRIEnv) -> None:
    env = nenv.env
    p = nenv.plugin("events")
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP)
    env.rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(cpu_shares=300)), timeout=30)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)  # again: no event
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)  # again: no event
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    assert [m for m in p.methods() if m not in ("Configure", "Synchronize")] == [
        "RunPodSandbox", "CreateContainer", "ValidateContainerAdjustment", "PostCreateContainer", "StartContainer",
        "PostStartContainer",
        "UpdateContainer", "PostUpdateContainer", "StopContainer", "RemoveContainer", "StopPodSandbox",
        "RemovePodSandbox"]
    upd = p.seen("UpdateContainer")[0]
    assert upd.container.id == cid and upd.linux_resources.cpu.shares.value == 300
    assert p.seen("RunPodSandbox")[0].pod.id == sid
    assert p.seen("StopContainer")[0].container.state == nri.CONTAINER_STOPPED


def test_a_container_that_exits_on_its_own_is_reported_stopped(nenv: NRIEnv) -> None:
    env = nenv.env
    p = nenv.plugin("exits")
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sh", "-c", "exit 3"])
    stop = p.wait_for("StopContainer", lambda r: r.container.id == cid)
    assert stop.container.exit_code == 3


def test_every_kind_of_adjustment_lands_in_the_spec_and_the_container(nenv: NRIEnv, tmp_path: Any) -> None:
    env = nenv.env
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("from an NRI mount\n")
    os.chmod(tmp_path, 0o755)
    cg = f"{env.cgroup_parent}/nri-{uuid.uuid4().hex[:8]}"

    def adjust(req: Any) -> nri.CreateContainerResponse:
        a = nri.ContainerAdjustment(
            annotations={"nri.test/adjusted": "yes"},
            env=[nri.KeyValue(key="NRI_ENV", value="set"), nri.KeyValue(key="-DROPPED")],
            mounts=[nri.Mount(destination="/mnt/nri", source=str(share), type="bind", options=["rbind", "ro"])],
            rlimits=[nri.POSIXRlimit(type="RLIMIT_NOFILE", hard=1234, soft=567)])
        a.hooks.poststop.add(path="/bin/true", args=["true"])
        a.linux.devices.add(path="/dev/nri-zero", type="c", major=os.major(ZERO.st_rdev), minor=os.minor(ZERO.st_rdev))
        a.linux.resources.memory.limit.value = 96 << 20
        a.linux.resources.cpu.shares.value = 333
        a.linux.cgroups_path = cg
        a.linux.oom_score_adj.value = 456
        a.linux.sysctl["net.ipv4.ping_group_range"] = "0 0"
        return nri.CreateContainerResponse(adjust=a)

    p = nenv.plugin("adjuster", handlers={"CreateContainer": adjust})
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, envs=[pb.KeyValue(key="DROPPED", value=b"1"), pb.KeyValue(key="KEPT", value=b"1")])
    spec = nenv.spec(cid)
    assert spec["annotations"]["nri.test/adjusted"] == "yes"
    env_list = spec["process"]["env"]
    assert "NRI_ENV=set" in env_list and "KEPT=1" in env_list and not any(e.startswith("DROPPED=") for e in env_list)
    assert {"destination": "/mnt/nri", "type": "bind", "source": str(share), "options": ["rbind", "ro"]} in spec["mounts"]
    assert {"type": "RLIMIT_NOFILE", "hard": 1234, "soft": 567} in spec["process"]["rlimits"]
    assert spec["hooks"]["poststop"] == [{"path": "/bin/true", "args": ["true"]}]
    assert {"path": "/dev/nri-zero", "type": "c", "major": os.major(ZERO.st_rdev),
            "minor": os.minor(ZERO.st_rdev)} in spec["linux"]["devices"]
    assert spec["linux"]["resources"]["memory"]["limit"] == 96 << 20
    assert spec["linux"]["resources"]["cpu"]["shares"] == 333
    assert spec["linux"]["cgroupsPath"] == cg
    assert spec["process"]["oomScoreAdj"] == 456
    assert spec["linux"]["sysctl"]["net.ipv4.ping_group_range"] == "0 0"
    # ... and in the running container
    assert env.sh(cid, "echo $NRI_ENV x$DROPPED").strip() == "set x"
    assert env.sh(cid, "cat /mnt/nri/hello") == "from an NRI mount\n"
    # The container's init: runc 1.1 applies an exec'd process's rlimits racily (its Go runtime
    # raises the NOFILE soft limit to the hard one at start), so an exec may see 1234/1234.
    nofile = next(ln for ln in env.sh(cid, "cat /proc/1/limits").splitlines() if ln.startswith("Max open files"))
    assert nofile.split()[3:5] == ["567", "1234"]
    assert env.sh(cid, "cat /proc/self/oom_score_adj").strip() == "456"
    assert env.sh(cid, "head -c 3 /dev/nri-zero | tr '\\0' z") == "zzz"
    assert env.sh(cid, "cat /proc/sys/net/ipv4/ping_group_range").split() == ["0", "0"]
    pid = env.pid(cid)
    cgroups = proc_cgroups(pid)
    assert any(path == cg for path in cgroups.values()), cgroups
    with open(memory_limit_file(cgroups)) as f:
        assert int(f.read()) == 96 << 20
    # the plugin saw the container as the CRI config made it, before its own changes
    seen = p.seen("CreateContainer")[0].container
    assert "DROPPED=1" in seen.env and "nri.test/adjusted" not in seen.annotations


def test_cdi_devices_seccomp_and_namespaces_from_a_plugin(nenv: NRIEnv) -> None:
    env = nenv.env
    kind = f"moorage.test/nri{uuid.uuid4().hex[:6]}"
    path = os.path.join(nenv.cdi_dir, "nri.json")
    with open(path, "w") as f:
        json.dump({"cdiVersion": "0.6.0", "kind": kind, "devices": [{"name": "zero", "containerEdits": {
            "deviceNodes": [{"path": "/dev/nri-cdi-zero", "type": "c", "major": os.major(ZERO.st_rdev),
                             "minor": os.minor(ZERO.st_rdev), "permissions": "rw"}],
            "env": ["NRI_CDI=zero"]}}]}, f)
    wanted = [f"{kind}=zero"]

    def adjust(req: Any) -> nri.CreateContainerResponse:
        a = nri.ContainerAdjustment(CDI_devices=[nri.CDIDevice(name=n) for n in wanted])
        sp = a.linux.seccomp_policy
        sp.default_action = "SCMP_ACT_ALLOW"
        sp.syscalls.add(names=["mkdir", "mkdirat"], action="SCMP_ACT_ERRNO").errno_ret.value = 1  # EPERM
        a.linux.namespaces.add(type="-cgroup")
        return nri.CreateContainerResponse(adjust=a)

    try:
        nenv.plugin("cdi", handlers={"CreateContainer": adjust})
        sid, pcfg = env.run_pod()
        cid = env.run(sid, pcfg, SLEEP)
        spec = nenv.spec(cid)
        assert "NRI_CDI=zero" in spec["process"]["env"]
        assert any(d["path"] == "/dev/nri-cdi-zero" for d in spec["linux"]["devices"])
        assert spec["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
        assert "cgroup" not in {n["type"] for n in spec["linux"]["namespaces"]}
        assert "mount" in {n["type"] for n in spec["linux"]["namespaces"]}
        # ... and in the running container
        assert env.sh(cid, "echo $NRI_CDI; head -c 2 /dev/nri-cdi-zero | tr '\\0' z") == "zero\nzz"
        assert "Operation not permitted" in env.sh(cid, "mkdir /tmp/nri-denied 2>&1; true")
        assert os.readlink(f"/proc/{env.pid(cid)}/ns/cgroup") == os.readlink(f"/proc/{os.getpid()}/ns/cgroup")
        # an unknown CDI device from a plugin is the same error as from the CRI
        wanted[:] = [f"{kind}=missing"]
        with pytest.raises(grpc.RpcError) as e:
            env.create(sid, pcfg, SLEEP)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"{kind}=missing" in (e.value.details() or "")
    finally:
        os.unlink(path)


def test_updates_from_update_container_resources_and_from_the_plugin(nenv: NRIEnv) -> None:
    env = nenv.env

    def on_update(req: Any) -> nri.UpdateContainerResponse:
        u = nri.ContainerUpdate(container_id=req.container.id)
        u.linux.resources.memory.limit.value = 80 << 20  # the plugin raises what the kubelet asked
        return nri.UpdateContainerResponse(update=[u])

    p = nenv.plugin("updater", handlers={"UpdateContainer": on_update})
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP)
    limit = memory_limit_file(proc_cgroups(env.pid(cid)))
    env.rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=64 << 20)), timeout=30)
    with open(limit) as f:
        assert int(f.read()) == 80 << 20
    assert env.status(cid).status.resources.linux.memory_limit_in_bytes == 80 << 20

    # unsolicited: one update that works, one for a container that does not exist
    good = nri.ContainerUpdate(container_id=cid)
    good.linux.resources.memory.limit.value = 72 << 20
    bad = nri.ContainerUpdate(container_id="nosuchcontainer")
    bad.linux.resources.memory.limit.value = 1 << 20
    failed = p.update_containers([good, bad])
    assert [f.container_id for f in failed] == ["nosuchcontainer"]
    with open(limit) as f:
        assert int(f.read()) == 72 << 20
    assert len(p.seen("UpdateContainer")) == 1  # a plugin's own update does not come back to it


def test_eviction_stops_the_container(nenv: NRIEnv) -> None:
    env = nenv.env
    p = nenv.plugin("evictor")
    sid, pcfg = env.run_pod()
    victim, other = env.run(sid, pcfg, SLEEP), env.run(sid, pcfg, SLEEP)
    assert p.update_containers(evict=[nri.ContainerEviction(container_id=victim, reason="test eviction")]) == []
    assert env.status(victim).status.state == pb.CONTAINER_EXITED
    assert env.status(other).status.state == pb.CONTAINER_RUNNING
    p.wait_for("StopContainer", lambda r: r.container.id == victim)


def test_two_plugins_adjusting_one_field_conflict(nenv: NRIEnv) -> None:
    env = nenv.env

    def setter(value: str) -> Any:
        return lambda req: nri.CreateContainerResponse(adjust=nri.ContainerAdjustment(annotations={"nri.test/k": value}))

    a = nenv.plugin("first", "10", handlers={"CreateContainer": setter("a")})
    b = nenv.plugin("second", "20", handlers={"CreateContainer": setter("b")})
    sid, pcfg = env.run_pod()
    with pytest.raises(grpc.RpcError) as e:
        env.create(sid, pcfg, SLEEP, name="conflicted")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"NRI plugins 10-{a.name} and 20-{b.name} conflict: both adjust annotation nri.test/k" in e.value.details()
    listed = env.rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers
    assert [c for c in listed if c.metadata.name == "conflicted"] == []
    # both answered its creation: both hear that it is gone (a plugin may have reserved something for it)
    for p in (a, b):
        gone = p.wait_for("RemoveContainer", lambda r: r.container.name == "conflicted")
        assert gone.container.id == p.seen("CreateContainer")[0].container.id


def test_a_plugin_error_fails_run_pod_sandbox_and_leaves_nothing(nenv: NRIEnv) -> None:
    env = nenv.env

    def refuse(req: Any) -> None:
        raise RPCError(2, "policy says no\x1b[31m")

    p = nenv.plugin("refuser", handlers={"RunPodSandbox": refuse})
    pcfg_name = f"refused-{uuid.uuid4().hex[:6]}"
    with pytest.raises(grpc.RpcError) as e:
        env.run_pod(pod_config(name=pcfg_name))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"NRI plugin 50-{p.name} failed RunPodSandbox: policy says no?[31m" in e.value.details()
    pods = env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items
    assert [x for x in pods if x.metadata.name == pcfg_name] == []


def test_a_plugin_crashing_mid_request_is_dropped_and_the_call_goes_on(nenv: NRIEnv) -> None:
    env = nenv.env
    crasher: list[NRIPlugin] = []

    def crash(req: Any) -> Any:
        crasher[0].crash()
        return hang(req)

    p = NRIPlugin(nenv.d.nri_socket, "crasher", "10", handlers={"CreateContainer": crash})
    crasher.append(p)
    nenv.plugins.append(p)
    p.start()
    witness = nenv.plugin("witness", "20")
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP)  # the crash does not fail it
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    assert witness.seen("CreateContainer")[0].container.id == cid
    assert not p.connected
    cid2 = env.create(sid, pcfg, SLEEP)
    assert [r.container.id for r in p.seen("CreateContainer")] == [cid]  # dropped: nothing more for it
    assert [r.container.id for r in witness.seen("CreateContainer")] == [cid, cid2]


def test_a_plugin_that_never_answers_times_out_and_the_daemon_stays_responsive(nenv: NRIEnv) -> None:
    env = nenv.env
    p = nenv.plugin("sleeper", handlers={"CreateContainer": hang})
    sid, pcfg = env.run_pod()
    answered: list[int] = []

    def other_calls() -> None:
        # while the plugin hangs, the daemon answers others
        answered.append(len(env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=5).items))

    t = threading.Thread(target=lambda: (time.sleep(0.3), other_calls()))
    t.start()
    cid = env.create(sid, pcfg, SLEEP)  # goes on after the 1 s request timeout, without the plugin
    t.join()
    assert answered and answered[0] >= 1
    assert env.status(cid).status.state == pb.CONTAINER_CREATED
    wait_for(lambda: not p.connected, timeout=10, what="the hung plugin to be disconnected")


@pytest.fixture(scope="module")
def strict_module(registry: registrymod.TestRegistry) -> Iterator[NRIEnv]:
    yield from _daemon(registry, "plugin_request_timeout = 1.0\nfail_on_plugin_loss = true\n")


def test_with_fail_on_plugin_loss_a_hung_plugin_fails_the_call_clearly(strict_module: NRIEnv) -> None:
    nenv, env = strict_module, strict_module.env
    env.begin()
    try:
        p = nenv.plugin("sleeper", handlers={"CreateContainer": hang})
        sid, pcfg = env.run_pod()
        with pytest.raises(grpc.RpcError) as e:
            env.create(sid, pcfg, SLEEP, name="timed-out")
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"plugin 50-{p.name} did not answer CreateContainer within 1s; the plugin was dropped" in e.value.details()
        listed = env.rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers
        assert [c for c in listed if c.metadata.name == "timed-out"] == []
        cid = env.create(sid, pcfg, SLEEP, name="after")  # the plugin is gone: the next one works
        assert env.status(cid).status.state == pb.CONTAINER_CREATED
    finally:
        nenv.close_plugins()
        env.cleanup()
        env.check_no_leaks()


def test_a_pre_installed_plugin_is_launched_with_its_config(registry: registrymod.TestRegistry) -> None:
    parent, runtime_table = own_cgroup_parent()
    d = DaemonProcess(base=new_base(), extra_config=runtime_table)
    record = os.path.join(d.base, "recorder.jsonl")
    os.makedirs(d.nri_plugin_dir)
    os.makedirs(d.nri_conf_dir)
    script = os.path.join(d.nri_plugin_dir, "05-recorder")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\nexec {sys.executable} -m moorage.testing.nri\n")
    os.chmod(script, 0o755)
    with open(os.path.join(d.nri_plugin_dir, "not-a-plugin"), "w") as f:
        f.write("#!/bin/sh\nexit 1\n")
    os.chmod(os.path.join(d.nri_plugin_dir, "not-a-plugin"), stat.S_IRWXU)
    with open(os.path.join(d.nri_conf_dir, "05-recorder.conf"), "w") as f:
        f.write(record + "\n")
    try:
        d.start()
        env = RuntimeEnv(d, registry, parent)

        def lines() -> list[dict]:
            try:
                with open(record) as f:
                    return [json.loads(x) for x in f]
            except FileNotFoundError:
                return []

        wait_for(lambda: any(x["method"] == "Synchronize" for x in lines()), timeout=20, what="the plugin to sync")
        sid, _ = env.run_pod()
        run = wait_for(lambda: [x for x in lines() if x["method"] == "RunPodSandbox"], what="RunPodSandbox")
        assert run[0]["request"]["pod"]["id"] == sid
        env_seen = run[0]["env"]
        assert (env_seen["NRI_PLUGIN_NAME"], env_seen["NRI_PLUGIN_IDX"]) == ("recorder", "05")
        assert "ignoring not-a-plugin" in d.log()
        env.cleanup()
    finally:
        teardown(d)
        remove_cgroup_tree(parent)


def test_a_validator_sees_the_merged_adjustment_and_may_reject_it(nenv: NRIEnv) -> None:
    env = nenv.env

    def adjust(req: Any) -> nri.CreateContainerResponse:
        return nri.CreateContainerResponse(adjust=nri.ContainerAdjustment(annotations={"nri.test/v": req.container.name}))

    def validate(req: Any) -> nri.ValidateContainerAdjustmentResponse:
        bad = req.adjust.annotations.get("nri.test/v") == "rejected"
        return nri.ValidateContainerAdjustmentResponse(reject=bad, reason="no rejected containers here")

    adjuster = nenv.plugin("adj", "10", handlers={"CreateContainer": adjust})
    validator = nenv.plugin("validator", "90", events=[nri.VALIDATE_CONTAINER_ADJUSTMENT],
                            handlers={"ValidateContainerAdjustment": validate})
    sid, pcfg = env.run_pod()
    with pytest.raises(grpc.RpcError) as e:
        env.create(sid, pcfg, SLEEP, name="rejected")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"NRI validator 90-{validator.name} rejected the adjustment of container" in e.value.details()
    assert "no rejected containers here" in e.value.details()
    cid = env.create(sid, pcfg, SLEEP, name="accepted")
    assert nenv.spec(cid)["annotations"]["nri.test/v"] == "accepted"
    req = validator.seen("ValidateContainerAdjustment")[-1]
    assert req.container.id == cid and [(p.name, p.index) for p in req.plugins] == [(adjuster.name, "10")]
    assert validator.seen("CreateContainer") == []  # it subscribed to validation only


def test_pod_resource_updates_reach_plugins(nenv: NRIEnv) -> None:
    env = nenv.env
    p = nenv.plugin("podupdates")
    sid, _ = env.run_pod()
    env.rt.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=sid, resources=pb.LinuxContainerResources(memory_limit_in_bytes=128 << 20, cpu_shares=512)),
        timeout=30)
    upd = p.wait_for("UpdatePodSandbox", lambda r: r.pod.id == sid)
    assert upd.linux_resources.memory.limit.value == 128 << 20 and upd.linux_resources.cpu.shares.value == 512
    assert not upd.HasField("overhead_linux_resources")
    p.wait_for("PostUpdatePodSandbox", lambda r: r.pod.id == sid)
