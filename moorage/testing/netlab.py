"""Shared fixtures and helpers for the end-to-end pod network tests.

Every network test runs a real daemon whose CNI conf dir holds a conflist for
a bridge and subnet the test owns:

- bridge ``mrgn<random>``, created by the test with the host address (.1) on
  it, so the bridge plugin runs with ``isGateway: false`` and never touches
  the host's ``ip_forward``; ``ipMasq`` off, portmap ``snat`` off;
- a random free ``10.223.x.0/24`` (never the default 10.88.0.0/16);
- host-local reservations in a test-owned ``dataDir``;
- traffic only between the host end of that bridge and the pods' namespaces.

The ``netlab`` fixture removes the pods (through the CRI), then the bridge,
every veth/ifb still attached to it, the iptables rules naming the network,
the portmap scaffolding if the test created it, and the temp dirs, even on
failure.  It holds the CNI tests' lock file while portmap rules may exist, so
parallel tests never race on the shared ``CNI-HOSTPORT-DNAT`` chain.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, image_client, run_container, runtime_client
from moorage.testing.daemon import DaemonProcess
from moorage.testing.net import free_subnet as _free_subnet
from moorage.testing.net import (
    iptables_state,
    remove_portmap_scaffolding_if_ours,
    remove_rules_of_network,
    reservations,
    sh,
)

PLUGIN_DIR = "/usr/lib/cni"


LOCK_PATH = "/run/lock/moorage-test-cni.lock"


NEEDS = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(os.path.join(PLUGIN_DIR, "bridge")),
    reason="needs root and the CNI plugins in /usr/lib/cni",
)


def free_subnet() -> ipaddress.IPv4Network:
    return _free_subnet(223)


def rules_of_network(network: str) -> set[str]:
    return {line for line in iptables_state() if f'name: \\"{network}\\"' in line}


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True, check=False).returncode == 0


def links_on_bridge(bridge: str) -> list[str]:
    out = sh("ip", "-o", "link", "show", "master", bridge, check=False)
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip())


def write_fake_plugin(bin_dir: str, name: str, body: str) -> str:
    """A shell CNI plugin; ``body`` sees $CNI_COMMAND and the config in $conf."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nconf=$(cat)\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_passthrough_body(on_add: str = "") -> str:
    """Chained fake plugin: runs ``on_add`` on ADD, then prints its prevResult; succeeds otherwise."""
    return (
        'case "$CNI_COMMAND" in\n'
        f"ADD)\n{on_add}\n"
        "  printf '%s' \"$conf\" | /usr/bin/python3 -c "
        "'import json,sys; print(json.dumps(json.load(sys.stdin).get(\"prevResult\") or {\"cniVersion\": \"1.0.0\"}))'\n"
        "  ;;\n"
        "VERSION) echo '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\"]}' ;;\n"
        "esac\nexit 0"
    )


class NetLab:
    """One test's bridge, subnet, conflist and fake plugins, and the daemons that use them."""

    def __init__(self, root: str) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.root = root
        self.bridge = f"mrgn{tag}"
        self.network = f"mrgn-net-{tag}"
        self.subnet = free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.data_dir = os.path.join(root, "ipam")
        self.bin_dir = os.path.join(root, "bin")  # fake plugins
        self.iptables_before: set[str] = set()
        self.daemons: list[DaemonProcess] = []
        self.fake_pids: list[int] = []

    # --- the network ----------------------------------------------------------------

    def make_bridge(self) -> None:
        sh("ip", "link", "add", "name", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def conflist(self, extra_plugins: list[dict[str, Any]] | None = None, *, portmap: bool = True,
                 bandwidth: bool = True, bridge_type: str = "bridge") -> dict[str, Any]:
        plugins: list[dict[str, Any]] = [{
            "type": bridge_type, "bridge": self.bridge, "isGateway": False, "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": self.data_dir,
                     "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]]},
        }]
        plugins += extra_plugins or []
        if portmap:
            plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": False})
        if bandwidth:
            plugins.append({"type": "bandwidth", "capabilities": {"bandwidth": True}})
        return {"cniVersion": "1.0.0", "name": self.network, "plugins": plugins}

    def write_conf(self, d: DaemonProcess, conf: dict[str, Any] | str | None = None, name: str = "10-test.conflist") -> str:
        conf = self.conflist() if conf is None else conf
        path = os.path.join(d.cni_conf_dir, name)
        os.makedirs(d.cni_conf_dir, exist_ok=True)
        tmp = path + ".tmp-write"
        with open(tmp, "w") as f:
            f.write(conf if isinstance(conf, str) else json.dumps(conf))
        os.replace(tmp, path)
        return path

    def reservations(self) -> list[str]:
        return reservations(self.data_dir, self.network)

    # --- daemons ------------------------------------------------------------------

    def daemon(self, factory: Callable[..., DaemonProcess], cni: str = "", conf: dict[str, Any] | str | None = None,
               start: bool = True) -> DaemonProcess:
        """A daemon with ``cni`` (TOML lines) added to its [cni] table and our conflist written."""
        d = factory(start=False)
        d.write_config()
        bin_dirs = json.dumps([self.bin_dir, PLUGIN_DIR])
        with open(d.config_path) as f:
            text = f.read()
        text = text.replace("[cni]\n", f"[cni]\nbin_dirs = {bin_dirs}\n{cni}\n", 1)
        with open(d.config_path, "w") as f:
            f.write(text)
        if conf != "":
            self.write_conf(d, conf)
        self.daemons.append(d)
        if start:
            d.start()
        return d

    @staticmethod
    def cache_entries(d: DaemonProcess) -> list[dict[str, Any]]:
        results = os.path.join(d.state, "cni", "results")
        out = []
        for n in sorted(os.listdir(results)) if os.path.isdir(results) else []:
            if n.startswith("."):
                continue
            with open(os.path.join(results, n)) as f:
                out.append(json.load(f))
        return out

    @staticmethod
    def netns_pins(d: DaemonProcess) -> list[str]:
        p = os.path.join(d.state, "netns")
        return sorted(os.listdir(p)) if os.path.isdir(p) else []

    def host_veth(self, d: DaemonProcess, sandbox_id: str) -> str:
        for e in self.cache_entries(d):
            if e["containerId"] == sandbox_id and e.get("result"):
                for i in e["result"].get("interfaces", []):
                    if not i.get("sandbox") and i["name"].startswith("veth"):
                        return i["name"]
        raise AssertionError(f"no host veth for {sandbox_id} in the CNI cache")

    def cleanup(self) -> None:
        for pid in self.fake_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                try:
                    d.cleanup_pods()
                except Exception:
                    pass
        for v in links_on_bridge(self.bridge) if link_exists(self.bridge) else []:
            sh("ip", "link", "del", v, check=False)
        if link_exists(self.bridge):
            sh("ip", "link", "del", self.bridge, check=False)
        remove_rules_of_network(self.network)
        remove_portmap_scaffolding_if_ours(self.iptables_before)


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    root = tempfile.mkdtemp(prefix="mrgn-")
    lab = NetLab(root)
    lock = open(LOCK_PATH, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        lab.iptables_before = iptables_state()
        lab.make_bridge()
        yield lab
    finally:
        try:
            lab.cleanup()
        finally:
            shutil.rmtree(root, ignore_errors=True)
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def run_pod(d: DaemonProcess, cfg: pb.PodSandboxConfig, timeout: float = 120) -> str:
    r: pb.RunPodSandboxResponse = runtime_client(d).RunPodSandbox(pb.RunPodSandboxRequest(config=cfg), timeout=timeout)
    return r.pod_sandbox_id


def pod_status(d: DaemonProcess, sid: str) -> pb.PodSandboxStatus:
    r: pb.PodSandboxStatusResponse = runtime_client(d).PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
    return r.status


def network_condition(d: DaemonProcess) -> pb.RuntimeCondition:
    st: pb.StatusResponse = runtime_client(d).Status(pb.StatusRequest())
    return {c.type: c for c in st.status.conditions}["NetworkReady"]


def pull(d: DaemonProcess, ref: str) -> None:
    image_client(d).PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)


def start_busybox(d: DaemonProcess, sid: str, sandbox_cfg: pb.PodSandboxConfig, image: str, script: str) -> str:
    return run_container(runtime_client(d), sid, sandbox_cfg, container_config(image, ["sh", "-c", script]))


def exec_sync(d: DaemonProcess, cid: str, cmd: list[str], timeout: int = 30) -> tuple[int, str, str]:
    r: pb.ExecSyncResponse = runtime_client(d).ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
                                                          timeout=timeout + 30)
    return r.exit_code, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def stop_and_remove(d: DaemonProcess, sid: str) -> None:
    rt = runtime_client(d)
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)


def rpc_error(fn: Callable[..., object], *args: Any, **kw: Any) -> grpc.RpcError:
    """The gRPC error ``fn(*args, **kw)`` must raise (the test fails if it returns)."""
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value

