"""A real kubelet (standalone, static pods) on top of a real moorage daemon.

Skipped unless a ``kubelet`` binary is named by $KUBELET or found on PATH (CI has none;
build one yourself, see README.md), and unless running as root with docker-registry,
runc, conmon and the CNI plugins installed.

Each test gets its own moorage (``DaemonProcess``, stock config plus our CNI conflist)
and its own kubelet (own root dir, ports, cgroup root, pod-logs dir, manifests dir), on a
bridge and subnet this module owns.  Pods are checked through the kubelet's read-only
API (``/pods``, ``/stats/summary``, ``/metrics``) and through moorage's CRI socket.
Traffic goes only to pod IPs on our bridge and to 127.0.0.1.

After each test the fixture removes every manifest, waits for the kubelet to tear the
pods down, checks moorage's log for error lines not in ``EXPECTED_MOORAGE_ERRORS``,
stops the kubelet and moorage by PID, and undoes what the kubelet changed on the host
(sysctls, KUBE-* iptables chains, /var/lib/kubelet/device-plugins, /var/log/containers,
the rshared bind mount of its root dir, its cgroups).  Kubelet tests run one at a time
across xdist workers (a lock file): the kubelet changes host-wide state.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest

import moorage.testing.registry as regmod  # not the class itself: pytest would collect Test*
from moorage.core.procs import cmdlines
from moorage.cri.api import api_pb2 as pb
from moorage.testing.daemon import DaemonProcess, free_port, new_base
from moorage.testing.daemon import teardown as daemon_teardown
from moorage.testing.kube import (
    CNI_LOCK,
    KUBELET_LOCK,
    BridgeNetwork,
    HostSnapshot,
    KubeletDirs,
    add_bridge,
    cgroup_hierarchies,
    delete_bridge,
    host_lock,
    http_get,
    kubelet_config,
    list_containers,
    list_sandboxes,
    make_cgroup_root,
    moorage_errors,
    mountpoints,
    read_from,
    remove_kubelet_leftovers,
    start_logged,
    stop_process,
    wait_for,
)
from moorage.testing.net import free_subnet, iptables_state, remove_rules_of_network

CNI_PLUGIN_DIR = "/usr/lib/cni"
SUBNET_OCTET = 236  # 10.236.x.0/24: critest uses 10.234, netlab 10.223

# moorage error-level log lines that a kubelet run is allowed to cause; everything else fails
# the test.  Each entry: (regexp on the JSON line, why it is expected).  Empty today: the
# NOT_FOUND answers to the kubelet's double deletes and to status calls for containers its GC
# just removed are logged at info level, and moorage logs error level only for UNKNOWN and
# INTERNAL answers and its own failures.
EXPECTED_MOORAGE_ERRORS: list[tuple[str, str]] = [
]


def _kubelet() -> str | None:
    k = os.environ.get("KUBELET") or shutil.which("kubelet")
    return k if k and os.access(k, os.X_OK) else None


def _missing_tools() -> list[str]:
    need = ["runc", "conmon", "catatonit", "iptables", "docker-registry"]
    missing = [t for t in need if shutil.which(t) is None and not os.path.exists(f"/usr/bin/{t}")]
    missing += [p for p in ("bridge", "host-local", "portmap", "loopback")
                if not os.path.exists(os.path.join(CNI_PLUGIN_DIR, p))]
    return missing


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_kubelet() is None, reason="no kubelet binary ($KUBELET or PATH)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a kubelet against moorage needs root"),
    pytest.mark.skipif(bool(_missing_tools()), reason=f"missing: {' '.join(_missing_tools())}"),
    # The first test may wait for another kubelet-running module (test/e2e/cluster) to release
    # KUBELET_LOCK; that wait counts against pytest-timeout.  Every wait in a test is bounded.
    pytest.mark.timeout(1800),
]


# --- the network this module owns ---------------------------------------------------------------

@pytest.fixture(scope="module")
def network() -> Iterator[BridgeNetwork]:
    tag = uuid.uuid4().hex[:6]
    net = free_subnet(SUBNET_OCTET)
    root = tempfile.mkdtemp(prefix="mrgk-net-")
    n = BridgeNetwork(f"mrgk{tag}", f"mrgk-net-{tag}", str(net), str(net.network_address + 1), os.path.join(root, "ipam"))
    try:
        add_bridge(n.bridge, f"{n.gateway}/{net.prefixlen}")
        yield n
    finally:
        delete_bridge(n.bridge)
        remove_rules_of_network(n.name)
        shutil.rmtree(root, ignore_errors=True)


# --- a kubelet node -----------------------------------------------------------------------------

@dataclass
class Node(KubeletDirs):
    """One moorage + one standalone kubelet, each on its own dirs and ports."""

    base: str
    daemon: DaemonProcess
    network: BridgeNetwork
    image: str
    feature_gates: dict[str, bool] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    proc: subprocess.Popen | None = None
    port: int = 0
    read_only_port: int = 0
    healthz_port: int = 0

    @property
    def name(self) -> str:
        return f"mrgk{self.tag}"

    @property
    def cgroup_root(self) -> str:
        return f"/mrgk-{self.tag}"

    def config(self) -> dict:
        return kubelet_config(
            self.daemon.socket, self, self.cgroup_root,
            address="127.0.0.1", port=self.port, readOnlyPort=self.read_only_port, healthzPort=self.healthz_port,
            authentication={"anonymous": {"enabled": True}, "webhook": {"enabled": False}, "x509": {}},
            staticPodPath=self.manifests, fileCheckFrequency="1s",
            featureGates=dict(self.feature_gates), **self.config_overrides)

    # -- lifecycle --

    def start(self) -> None:
        for d in (self.root_dir, self.manifests, self.pod_logs, self.path("volume-plugins")):
            os.makedirs(d, exist_ok=True)
        self.port, self.read_only_port, self.healthz_port = free_port(), free_port(), free_port()
        with open(self.path("kubelet.json"), "w") as f:
            json.dump(self.config(), f, indent=1)
        make_cgroup_root(self.cgroup_root)
        kubelet = _kubelet()
        assert kubelet is not None
        self.proc = start_logged(
            [kubelet, f"--config={self.path('kubelet.json')}", f"--root-dir={self.root_dir}",
             f"--cert-dir={self.path('pki')}", f"--hostname-override={self.name}", "--v=2"], self.log_file)
        wait_for(self._healthy, 60, "the kubelet's healthz and read-only port")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"kubelet exited with {self.proc.returncode}:\n{self.kubelet_log()[-4000:]}")
        return (http_get(f"http://127.0.0.1:{self.healthz_port}/healthz")[0] == 200
                and http_get(f"http://127.0.0.1:{self.read_only_port}/pods")[0] == 200)

    def stop_kubelet(self) -> None:
        stop_process(self.proc)

    def kubelet_log(self) -> str:
        return read_from(self.log_file)

    # -- static pods --

    def pod_name(self, name: str) -> str:
        return f"{name}-{self.name}"

    def apply(self, manifest: dict) -> None:
        """Write a static pod manifest (JSON is YAML) atomically into staticPodPath."""
        manifest.setdefault("apiVersion", "v1")
        manifest.setdefault("kind", "Pod")
        manifest["metadata"].setdefault("namespace", "default")
        name = manifest["metadata"]["name"]
        tmp = os.path.join(self.base, f".{name}.json")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, os.path.join(self.manifests, f"{name}.json"))

    def delete(self, name: str) -> None:
        os.unlink(os.path.join(self.manifests, f"{name}.json"))

    def get(self, path: str) -> Any:
        code, body = http_get(f"http://127.0.0.1:{self.read_only_port}{path}", timeout=30)
        assert code == 200, f"GET {path}: {code} {body[:500]}"
        return json.loads(body) if path != "/metrics" else body

    def pods(self) -> dict[str, dict]:
        return {p["metadata"]["name"]: p for p in self.get("/pods").get("items") or []}

    def pod(self, name: str) -> dict | None:
        return self.pods().get(self.pod_name(name))

    def container_status(self, name: str, container: str, init: bool = False) -> dict:
        pod = self.pod(name) or {}
        key = "initContainerStatuses" if init else "containerStatuses"
        for cs in pod.get("status", {}).get(key) or []:
            if cs["name"] == container:
                return cs
        return {}

    def wait_running(self, name: str, timeout: float = 120, ready: bool = True) -> dict:
        def ok() -> dict | None:
            pod = self.pod(name)
            if not pod or pod.get("status", {}).get("phase") != "Running":
                return None
            statuses = pod["status"].get("containerStatuses") or []
            if not statuses or not all("running" in cs.get("state", {}) for cs in statuses):
                return None
            if ready and not all(cs.get("ready") for cs in statuses):
                return None
            return pod
        return wait_for(ok, timeout, f"pod {name} running{' and ready' if ready else ''}")

    # -- CRI view --

    @property
    def rt(self) -> Any:
        assert self.daemon.runtime is not None
        return self.daemon.runtime

    def cri_sandboxes(self, name: str | None = None, ready_only: bool = False) -> list[pb.PodSandbox]:
        labels = {} if name is None else {"io.kubernetes.pod.name": self.pod_name(name)}
        return list_sandboxes(self.rt, labels, ready_only)

    def cri_containers(self, name: str, container: str | None = None) -> list[pb.Container]:
        labels = {"io.kubernetes.pod.name": self.pod_name(name)}
        if container is not None:
            labels["io.kubernetes.container.name"] = container
        return list_containers(self.rt, labels)

    def cri_running(self, name: str, container: str) -> pb.Container:
        running = [c for c in self.cri_containers(name, container) if c.state == pb.CONTAINER_RUNNING]
        assert len(running) == 1, f"{name}/{container}: {len(running)} running containers in CRI"
        return running[0]

    def cri_info(self, cid: str) -> dict:
        r = self.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid, verbose=True), timeout=10)
        return json.loads(r.info["info"])

    def exec(self, cid: str, *cmd: str, timeout: int = 20) -> tuple[int, str]:
        r = self.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout),
                             timeout=timeout + 30)
        return r.exit_code, (r.stdout + r.stderr).decode(errors="replace")

    # -- logs --

    def moorage_errors(self) -> list[str]:
        """Error-level lines of moorage's log that no EXPECTED_MOORAGE_ERRORS entry explains."""
        if not self.daemon.log_file:
            return []
        return moorage_errors(_full_daemon_log(self.daemon), EXPECTED_MOORAGE_ERRORS)

def _full_daemon_log(d: DaemonProcess) -> str:
    return read_from(d.log_file)


def _restore_host(node: Node, before: HostSnapshot) -> list[str]:
    """Undo the kubelet's host changes; returns what could not be undone."""
    problems = remove_kubelet_leftovers(node.base, node.cgroup_root)
    # this network's portmap rules, so that portmap's top chain is empty when restore looks
    remove_rules_of_network(node.network.name)
    return problems + before.restore([node.pod_logs])

@pytest.fixture(scope="module")
def kubelet_lock() -> Iterator[None]:
    """Held for the whole module: one kubelet-running module at a time on this host."""
    with host_lock(KUBELET_LOCK):
        yield


@pytest.fixture
def node_factory(kubelet_lock: None, registry: regmod.TestRegistry, network: BridgeNetwork,
                 tmp_path: Any) -> Iterator[Callable[..., Node]]:
    """``make(feature_gates={...}, **kubelet_config)`` -> a started Node (one per test)."""
    made: list[Node] = []
    locks = ExitStack()
    locks.enter_context(host_lock(CNI_LOCK))  # per test, so the CNI tests are not kept waiting for the module
    before = HostSnapshot.take()

    def make(feature_gates: dict[str, bool] | None = None, **overrides: Any) -> Node:
        d = DaemonProcess(base=new_base())
        d.write_config()
        with open(os.path.join(d.cni_conf_dir, "10-kubelet-e2e.conflist"), "w") as f:
            # portmap with snat (its default) so that hostPorts answer on 127.0.0.1 too; the
            # masquerade chains it adds for that are removed after each test if they are ours.
            json.dump(network.conflist(hostports=True), f)
        n = Node(base=tempfile.mkdtemp(prefix="mrgk-"), daemon=d, network=network,
                 image=registry.images["busybox"].ref, feature_gates=feature_gates or {},
                 config_overrides=overrides)
        made.append(n)
        d.start()
        n.start()
        return n

    problems: list[str] = []
    try:
        yield make
    finally:
        for n in made:
            problems += _teardown_node(n, before, str(tmp_path))
        locks.close()
    if problems:
        pytest.fail("kubelet e2e teardown:\n  " + "\n  ".join(problems))


def _teardown_node(n: Node, before: HostSnapshot, keep_dir: str) -> list[str]:
    problems: list[str] = []
    try:
        # Pods go through the kubelet first (what a user does), then moorage's log is checked.
        if n.proc is not None and n.proc.poll() is None and n.daemon.proc is not None \
                and n.daemon.proc.poll() is None:
            for manifest in os.listdir(n.manifests):
                os.unlink(os.path.join(n.manifests, manifest))
            try:
                wait_for(lambda: not n.pods() and not n.cri_sandboxes(ready_only=True), 120,
                         "the kubelet to stop every pod")
            except AssertionError as e:
                problems.append(str(e))
        if n.daemon.log_file:
            errors = n.moorage_errors()
            problems += [f"moorage error: {line[:600]}" for line in errors[:10]]
            if len(errors) > 10:
                problems.append(f"... and {len(errors) - 10} more moorage error lines (daemon.log in tmp_path)")
    finally:
        n.stop_kubelet()
        for name, text in (("kubelet.log", n.kubelet_log()), ("daemon.log", _full_daemon_log(n.daemon))):
            with open(os.path.join(keep_dir, name), "w") as f:  # kept by pytest's tmp_path
                f.write(text)
        daemon_teardown(n.daemon)
        problems += _restore_host(n, before)
        shutil.rmtree(n.base, ignore_errors=True)
    return problems


@pytest.fixture
def node(node_factory: Callable[..., Node]) -> Node:
    return node_factory()


# --- manifests ------------------------------------------------------------------------------------

def container(name: str, image: str, script: str, **kw: Any) -> dict:
    c = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "command": ["sh", "-c", script]}
    c.update(kw)
    return c


def pod_manifest(name: str, containers: list[dict], **spec: Any) -> dict:
    return {"metadata": {"name": name}, "spec": {"containers": containers,
                                                 "terminationGracePeriodSeconds": 2, **spec}}


WEB_SCRIPT = ("mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html && "
              "exec httpd -f -p 8080 -h /www")


# --- tests ------------------------------------------------------------------------------------------

def test_web_pod_host_port_and_pod_ip(node: Node) -> None:
    host_port = random.randint(20000, 29999)
    node.apply(pod_manifest("web", [container(
        "httpd", node.image, WEB_SCRIPT,
        ports=[{"containerPort": 8080, "hostPort": host_port, "protocol": "TCP"}])]))
    pod = node.wait_running("web")
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(node.network.subnet), (ip, node.network.subnet)
    sb = node.cri_sandboxes("web", ready_only=True)
    assert len(sb) == 1
    st = node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sb[0].id), timeout=10).status
    assert st.network.ip == ip
    want = "hello from web-" + node.name
    assert wait_for(lambda: http_get(f"http://{ip}:8080/")[1].strip() == want, 30, "the pod IP to serve")
    assert wait_for(lambda: http_get(f"http://127.0.0.1:{host_port}/")[1].strip() == want, 30,
                    "the hostPort on 127.0.0.1 to serve")
    assert any(str(host_port) in line for line in iptables_state())


def test_shared_empty_dir_and_cgroup_limits(node: Node) -> None:
    limits = {"cpu": "250m", "memory": "64Mi"}
    node.apply(pod_manifest("share", [
        container("writer", node.image, "echo shared-data > /data/file; exec sleep 100000",
                  volumeMounts=[{"name": "scratch", "mountPath": "/data"}],
                  resources={"limits": limits}),
        container("reader", node.image, "exec sleep 100000",
                  volumeMounts=[{"name": "scratch", "mountPath": "/mnt/scratch"}],
                  resources={"limits": {"cpu": "100m", "memory": "32Mi"}}),
    ], volumes=[{"name": "scratch", "emptyDir": {}}]))
    pod = node.wait_running("share")
    assert pod["status"]["qosClass"] == "Guaranteed"
    reader = node.cri_running("share", "reader")
    assert wait_for(lambda: node.exec(reader.id, "cat", "/mnt/scratch/file") == (0, "shared-data\n"), 30,
                    "the reader to see the writer's file")
    writer = node.cri_running("share", "writer")
    for cid, mem, quota, shares in ((writer.id, 64 << 20, 25000, 256), (reader.id, 32 << 20, 10000, 102)):
        pid = node.cri_info(cid)["pid"]
        with open(f"/proc/{pid}/cgroup") as f:
            paths = {ctl: p for _, ctls, p in (ln.strip().split(":", 2) for ln in f) for ctl in ctls.split(",")}
        assert paths["memory"].startswith(f"{node.cgroup_root}/kubepods/pod{pod['metadata']['uid']}/"), paths
        with open(f"/sys/fs/cgroup/memory{paths['memory']}/memory.limit_in_bytes") as f:
            assert int(f.read()) == mem
        with open(f"/sys/fs/cgroup/cpu{paths['cpu']}/cpu.cfs_quota_us") as f:
            assert int(f.read()) == quota
        with open(f"/sys/fs/cgroup/cpu{paths['cpu']}/cpu.shares") as f:
            assert int(f.read()) == shares
        # the pod cgroup carries the sum of the limits
    pod_mem = f"/sys/fs/cgroup/memory{node.cgroup_root}/kubepods/pod{pod['metadata']['uid']}/memory.limit_in_bytes"
    with open(pod_mem) as f:
        assert int(f.read()) == (64 + 32) << 20


def test_probes_exec_and_http_liveness_restart(node: Node) -> None:
    web = "mkdir -p /www && echo ok > /www/index.html && touch /tmp/alive && exec httpd -f -p {port} -h /www"
    probe = {"periodSeconds": 1, "failureThreshold": 1, "timeoutSeconds": 2}
    node.apply(pod_manifest("probes", [
        container("execlive", node.image, web.format(port=8081),
                  livenessProbe={"exec": {"command": ["cat", "/tmp/alive"]}, **probe},
                  readinessProbe={"httpGet": {"path": "/index.html", "port": 8081}, **probe}),
        container("httplive", node.image, web.format(port=8082),
                  livenessProbe={"httpGet": {"path": "/index.html", "port": 8082}, **probe},
                  readinessProbe={"exec": {"command": ["test", "-e", "/tmp/alive"]}, **probe}),
    ]))
    node.wait_running("probes")
    # readiness: the httpGet probe fails when the page goes; the container stays, not ready
    c = node.cri_running("probes", "execlive")
    assert node.exec(c.id, "mv", "/www/index.html", "/www/away.html")[0] == 0
    wait_for(lambda: node.container_status("probes", "execlive").get("ready") is False, 30,
             "execlive to turn unready")
    assert node.container_status("probes", "execlive")["restartCount"] == 0
    assert node.exec(c.id, "mv", "/www/away.html", "/www/index.html")[0] == 0
    wait_for(lambda: node.container_status("probes", "execlive").get("ready"), 30, "execlive ready again")
    # exec liveness failure: restarted, a new CRI container, ready again
    assert node.exec(c.id, "rm", "/tmp/alive")[0] == 0
    wait_for(lambda: node.container_status("probes", "execlive").get("restartCount", 0) >= 1, 60,
             "the exec liveness failure to restart execlive")
    wait_for(lambda: node.cri_running("probes", "execlive").id != c.id, 60, "a new execlive container")
    # httpGet liveness failure
    h = node.cri_running("probes", "httplive")
    assert node.exec(h.id, "rm", "/www/index.html")[0] == 0
    wait_for(lambda: node.container_status("probes", "httplive").get("restartCount", 0) >= 1, 60,
             "the httpGet liveness failure to restart httplive")
    pod = node.wait_running("probes", timeout=60)
    counts = {cs["name"]: cs["restartCount"] for cs in pod["status"]["containerStatuses"]}
    assert counts["execlive"] >= 1 and counts["httplive"] >= 1, counts
    for cs in pod["status"]["containerStatuses"]:
        assert cs["lastState"]["terminated"]["reason"] in ("Error", "Completed"), cs


def test_crash_loop_back_off(node_factory: Callable[..., Node]) -> None:
    # A short back-off cap (beta, on by default since 1.35) keeps the test under a minute.
    node = node_factory(crashLoopBackOff={"maxContainerRestartPeriod": "5s"})
    node.apply(pod_manifest("crash", [container("crash", node.image, "echo crashing; exit 3")]))
    seen_backoff = wait_for(
        lambda: node.container_status("crash", "crash").get("state", {}).get("waiting", {}).get("reason")
        == "CrashLoopBackOff", 60, "CrashLoopBackOff")
    assert seen_backoff
    wait_for(lambda: node.container_status("crash", "crash").get("restartCount", 0) >= 3, 90,
             "three restarts")
    cs = node.container_status("crash", "crash")
    assert cs["lastState"]["terminated"]["exitCode"] == 3
    exited = [c for c in node.cri_containers("crash", "crash") if c.state == pb.CONTAINER_EXITED]
    assert exited, "no exited crash container in the CRI"
    for c in exited:
        st = node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=c.id), timeout=10).status
        assert st.exit_code == 3
    attempts = sorted(c.metadata.attempt for c in node.cri_containers("crash", "crash"))
    assert attempts == sorted(set(attempts)), f"duplicate attempts {attempts}"
    assert max(attempts) >= 2


def test_init_containers(node: Node) -> None:
    vol = [{"name": "work", "mountPath": "/work"}]
    node.apply(pod_manifest("init", [
        container("main", node.image, "cat /work/order; exec sleep 100000", volumeMounts=vol),
    ], initContainers=[
        container("first", node.image, "echo first >> /work/order", volumeMounts=vol),
        container("second", node.image, "test -s /work/order && echo second >> /work/order", volumeMounts=vol),
    ], volumes=[{"name": "work", "emptyDir": {}}]))
    node.wait_running("init")
    for name in ("first", "second"):
        t = node.container_status("init", name, init=True)["state"]["terminated"]
        assert (t["exitCode"], t["reason"]) == (0, "Completed"), t
    main = node.cri_running("init", "main")
    assert node.exec(main.id, "cat", "/work/order") == (0, "first\nsecond\n")


def _pod_traces(node: Node, sid: str, cids: list[str], uid: str) -> list[str]:
    """What would be left of a pod on the host: netns pins, mounts, conmons, cgroups, kubelet dir."""
    ids = [sid, *cids]
    pins = os.path.join(node.daemon.state, "netns")
    out = [f"netns pin {p}" for p in (os.listdir(pins) if os.path.isdir(pins) else []) if sid in p]
    out += [f"mount {m}" for m in mountpoints() if any(i in m for i in ids) or uid in m]
    out += [f"process {pid} {b' '.join(a)[:200]!r}" for pid, a in cmdlines()
            if any(i.encode() in arg for arg in a for i in ids)]
    for h in cgroup_hierarchies():
        for dirpath, dirs, _ in os.walk(h + node.cgroup_root):
            out += [f"cgroup {dirpath}/{d}" for d in dirs if uid in d or any(i in d for i in ids)]
    return out


def test_manifest_removal_leaves_nothing(node: Node) -> None:
    node.apply(pod_manifest("gone", [container("web", node.image, WEB_SCRIPT)],
                            volumes=[{"name": "v", "emptyDir": {}}]))
    pod = node.wait_running("gone")
    uid = pod["metadata"]["uid"]
    (sb,) = node.cri_sandboxes("gone", ready_only=True)
    cids = [c.id for c in node.cri_containers("gone")]
    st = node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sb.id, verbose=True), timeout=10)
    netns_path = json.loads(st.info["info"])["netNamespacePath"]
    assert netns_path and os.path.exists(netns_path)
    assert _pod_traces(node, sb.id, cids, uid), "the trace finder sees nothing of a running pod"
    node.delete("gone")
    wait_for(lambda: node.pod("gone") is None, 60, "the pod to leave /pods")
    wait_for(lambda: not node.cri_sandboxes("gone", ready_only=True), 60, "the sandbox to stop")
    wait_for(lambda: not _pod_traces(node, sb.id, cids, uid), 60, "every trace of the pod to go")
    assert not os.path.exists(netns_path)
    assert not [c for c in node.cri_containers("gone") if c.state == pb.CONTAINER_RUNNING]
    wait_for(lambda: not os.path.exists(os.path.join(node.root_dir, "pods", uid)), 90,
             "the kubelet to remove its pod dir")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_moorage_restart_with_running_pods(node: Node, sig: int) -> None:
    node.apply(pod_manifest("survivor", [
        container("long", node.image, "exec sleep 100000"),
        container("short", node.image, "while [ ! -e /tmp/go ]; do sleep 0.2; done; exit 7"),
    ], restartPolicy="Never"))
    node.wait_running("survivor")
    (sb,) = node.cri_sandboxes("survivor", ready_only=True)
    long_id = node.cri_running("survivor", "long").id
    short = node.cri_running("survivor", "short")
    short_pid = node.cri_info(short.id)["pid"]
    node.daemon.stop(sig=sig)
    assert node.daemon.proc is not None and node.daemon.proc.poll() is not None
    # The container exits while moorage is down: its conmon records the exit code.
    with open(f"/proc/{short_pid}/root/tmp/go", "w"):
        pass
    wait_for(lambda: not os.path.exists(f"/proc/{short_pid}"), 30, "the short container to exit")
    node.daemon.start()
    wait_for(lambda: node.container_status("survivor", "short").get("state", {}).get("terminated"), 90,
             "the kubelet to see the exit that happened while moorage was down")
    t = node.container_status("survivor", "short")["state"]["terminated"]
    assert t["exitCode"] == 7, t
    assert node.container_status("survivor", "long")["restartCount"] == 0
    assert "running" in node.container_status("survivor", "long")["state"]
    # No duplicates: still one sandbox and one container per name, the same ids as before.
    assert [s.id for s in node.cri_sandboxes("survivor")] == [sb.id]
    by_name: dict[str, list[pb.Container]] = {}
    for c in node.cri_containers("survivor"):
        by_name.setdefault(c.metadata.name, []).append(c)
    assert {k: [c.id for c in v] for k, v in by_name.items()} == {"long": [long_id], "short": [short.id]}
    st = node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=short.id), timeout=10).status
    assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 7)
    # and the kubelet keeps working against the restarted daemon
    node.apply(pod_manifest("after", [container("c", node.image, "exec sleep 100000")]))
    node.wait_running("after")


# Holds ~4 MB in a shell variable, then says so (the readiness probe waits for that).
STATS_SCRIPT = "x=$(head -c 4000000 /dev/zero | tr '\\0' a); touch /tmp/ready; while true; do sleep 1; done"


@pytest.mark.parametrize("from_cri", [False, True], ids=["cadvisor-pod-stats", "PodAndContainerStatsFromCRI"])
def test_stats_summary(node_factory: Callable[..., Node], from_cri: bool) -> None:
    node = node_factory(feature_gates={"PodAndContainerStatsFromCRI": from_cri})
    node.apply(pod_manifest("stats", [container(
        "busy", node.image, STATS_SCRIPT,
        readinessProbe={"exec": {"command": ["test", "-e", "/tmp/ready"]}, "periodSeconds": 1})]))
    node.wait_running("stats")

    def summary_pod() -> dict | None:
        for p in node.get("/stats/summary").get("pods") or []:
            if p["podRef"]["name"] == node.pod_name("stats"):
                cs = {c["name"]: c for c in p.get("containers") or []}
                c = cs.get("busy") or {}
                # Pod-level numbers come from cadvisor's pod cgroup (without the CRI gate), whose
                # first sample is taken at pod creation and refreshed every 10-15 s.
                if all((x.get("cpu") or {}).get("usageCoreNanoSeconds") and
                       (x.get("memory") or {}).get("workingSetBytes", 0) > 4_000_000 for x in (c, p)):
                    return p
        return None

    p = wait_for(summary_pod, 90, "stats of the pod's container in /stats/summary", interval=2)
    c = {c["name"]: c for c in p["containers"]}["busy"]
    assert c["memory"]["workingSetBytes"] > 4_000_000, c["memory"]
    assert c["cpu"]["usageCoreNanoSeconds"] > 0
    assert p["cpu"]["usageCoreNanoSeconds"] > 0, json.dumps({k: v for k, v in p.items() if k != "containers"})
    assert p["memory"]["workingSetBytes"] > 0
    if from_cri:
        assert p.get("network", {}).get("interfaces"), p.get("network")
    cri = node.rt.ListContainerStats(pb.ListContainerStatsRequest(), timeout=10).stats
    busy = node.cri_running("stats", "busy")
    (cs,) = [s for s in cri if s.attributes.id == busy.id]
    assert cs.memory.working_set_bytes.value > 4_000_000
    summary_node = node.get("/stats/summary")["node"]
    assert summary_node["nodeName"] == node.name


def test_log_rotation(node_factory: Callable[..., Node]) -> None:
    node = node_factory(containerLogMaxSize="4Ki", containerLogMaxFiles=3, containerLogMonitorInterval="3s")
    node.apply(pod_manifest("chatty", [container(
        "talk", node.image, "i=0; while true; do echo \"line $i padding padding padding\"; i=$((i+1)); sleep 0.01; done")]))
    pod = node.wait_running("chatty")
    d = os.path.join(node.pod_logs, f"default_{node.pod_name('chatty')}_{pod['metadata']['uid']}", "talk")
    rotated = wait_for(lambda: [n for n in os.listdir(d) if re.match(r"\d+\.log\.", n)], 60,
                       "rotated .log.* files", interval=1)
    assert rotated
    wait_for(lambda: re.search(r'"method":"[^"]*/ReopenContainerLog","code":"OK"', _full_daemon_log(node.daemon)), 30,
             "a ReopenContainerLog call that succeeded")
    live = [n for n in os.listdir(d) if re.fullmatch(r"\d+\.log", n)]
    assert len(live) == 1, os.listdir(d)

    def still_written() -> bool:
        size = os.path.getsize(os.path.join(d, live[0]))
        time.sleep(1)
        return os.path.getsize(os.path.join(d, live[0])) != size
    # Reopened: conmon writes to the new file (a rotation may truncate it in between).
    assert wait_for(still_written, 20, "the live log to keep growing")
    time.sleep(8)  # a few more rotations: the kubelet keeps at most containerLogMaxFiles
    files = os.listdir(d)
    assert len(files) <= 3 + 1, files  # max files, plus a brief .tmp while compressing


def test_evented_pleg(node_factory: Callable[..., Node]) -> None:
    node = node_factory(feature_gates={"EventedPLEG": True})
    node.apply(pod_manifest("events", [container(
        "c", node.image, "while [ ! -e /tmp/exit ]; do sleep 0.2; done; exit 5")], restartPolicy="Never"))
    node.wait_running("events")
    c = node.cri_running("events", "c")
    assert node.exec(c.id, "touch", "/tmp/exit")[0] == 0
    t0 = time.monotonic()
    # With EventedPLEG the generic relist runs every 300 s: only an event makes this quick.
    wait_for(lambda: node.container_status("events", "c").get("state", {}).get("terminated"), 60,
             "the kubelet to see the exit")
    assert time.monotonic() - t0 < 60
    assert node.container_status("events", "c")["state"]["terminated"]["exitCode"] == 5
    metrics = node.get("/metrics")

    def metric(name: str) -> float:
        m = re.search(rf"^kubelet_{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M)
        return float(m.group(1)) if m else 0.0
    assert metric("evented_pleg_connection_success_count") >= 1, "the kubelet never streamed events"
    assert metric("evented_pleg_connection_error_count") == 0


def test_ten_pods_at_once(node: Node) -> None:
    names = [f"many{i}" for i in range(10)]
    for n in names:
        node.apply(pod_manifest(n, [container("c", node.image, "exec sleep 100000")]))
    ips = {n: node.wait_running(n, timeout=240)["status"]["podIP"] for n in names}
    assert len(set(ips.values())) == 10, ips
    assert len(node.cri_sandboxes(ready_only=True)) == 10
    for n in names:
        assert len(node.cri_containers(n)) == 1
    for n in names:
        node.delete(n)
    wait_for(lambda: not node.pods() and not node.cri_sandboxes(ready_only=True), 180, "all ten pods gone")


def test_kubelet_knows_the_default_runtime_handler(node: Node) -> None:
    node.apply(pod_manifest("handler", [container("c", node.image, "exec sleep 100000")]))
    node.wait_running("handler")
    # A standalone kubelet has no RuntimeClass manager (that needs an API server), so it never
    # looks the handler up and this line stays absent here; it is checked anyway.
    log = node.kubelet_log()
    assert "Unknown runtime handler" not in log, [ln for ln in log.splitlines() if "Unknown runtime handler" in ln][:3]
    handlers = [h.name for h in node.rt.Status(pb.StatusRequest(), timeout=10).runtime_handlers]
    assert "" in handlers, f"the kubelet looks up handler \"\"; moorage lists {handlers}"
