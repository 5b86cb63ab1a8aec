"""What the side-by-side benchmarks share: a local registry, a CNI bridge, moorage and containerd.

``bench_kubelet_startup.py`` and ``compare.py`` both run moorage and a containerd on temporary
dirs, each with its own config and socket, the same CNI conflist shape (a bridge owned by the
run) and the same images from one local ``docker-registry``; containerd's sandbox image is the
catatonit ``pause`` stand-in.  Everything here is removed again by its ``stop``/``remove``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc

from moorage.core.procs import cmdlines
from moorage.cri.api import api_pb2 as pb
from moorage.cri.api import api_pb2_grpc as pbg
from moorage.testing import kube
from moorage.testing.daemon import DaemonProcess, free_port, new_base
from moorage.testing.daemon import teardown as daemon_teardown
from moorage.testing.net import free_subnet, remove_rules_of_network
from moorage.testing.registry import DOCKER_REGISTRY, REPO_PREFIX, TestRegistry, push_layout
from moorage.testing.testimages import LayoutInfo

CNI_PLUGIN_DIR = "/usr/lib/cni"
SUBNET_OCTET = 238  # 10.238.x.0/24: critest 10.234, kubelet e2e 10.236, netlab 10.223
# Fixed paths containerd uses whatever its config says: the shim's socket dir (1.6) and
# libcni's result cache.  Removed afterwards if they did not exist before and hold nothing.
CONTAINERD_FIXED_PATHS = ("/run/containerd", "/var/lib/cni")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


def descendants(roots: list[int]) -> list[int]:
    """The given processes and all their descendants, parents before children."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    stack, tree = list(roots), []
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(kids.get(pid, []))
    return tree


def kill_tree(roots: list[int]) -> None:
    """SIGKILL the given processes and all their descendants, leaves first."""
    for pid in reversed(descendants(roots)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- registry and network ---------------------------------------------------------------------

@dataclass
class Registry:
    """docker-registry on 127.0.0.1 (plain HTTP) with busybox and the pause stand-in."""

    base: str
    host: str = ""
    proc: subprocess.Popen | None = None
    busybox: str = ""
    pause: str = ""

    def start(self) -> None:
        storage = os.path.join(self.base, "storage")
        os.makedirs(storage, exist_ok=True)
        port = free_port()
        cfg = {"version": "0.1", "log": {"level": "warn", "accesslog": {"disabled": True}},
               "storage": {"filesystem": {"rootdirectory": storage}},
               "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"}}
        path = os.path.join(self.base, "config.yml")
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        self.proc = kube.start_logged([DOCKER_REGISTRY, "serve", path], os.path.join(self.base, "registry.log"))
        self.host = f"127.0.0.1:{port}"
        kube.wait_for(lambda: self.proc is not None and self.proc.poll() is None and
                      kube.http_get(f"http://{self.host}/v2/")[0] == 200, 30, "docker-registry", 0.05)

    def push(self, layouts: dict[str, LayoutInfo]) -> None:
        async def go() -> None:
            reg = TestRegistry(host=self.host, scheme="http", base_dir=self.base)
            async with reg.client(retries=2, backoff=0.1) as c:
                for name, info in layouts.items():
                    await push_layout(c, f"{self.host}/{REPO_PREFIX}/{name}", info)
        asyncio.run(go())
        self.busybox = f"{self.host}/{REPO_PREFIX}/busybox:latest"
        self.pause = f"{self.host}/{REPO_PREFIX}/pause:3.9"

    def stop(self) -> None:
        kube.stop_process(self.proc, 10)


@dataclass
class Network(kube.BridgeNetwork):
    """The kubelet e2e harness's network shape, created and removed by the run.  ``hostports``
    adds the portmap plugin (the kubelet benchmark); without it no pod touches iptables."""

    hostports: bool = True

    def write(self, conf_dir: str) -> None:
        os.makedirs(conf_dir, exist_ok=True)
        with open(os.path.join(conf_dir, "10-bench.conflist"), "w") as f:
            json.dump(self.conflist(hostports=self.hostports), f)

    def create(self) -> None:
        net = free_subnet(SUBNET_OCTET)
        self.subnet, self.gateway = str(net), str(net.network_address + 1)
        kube.add_bridge(self.bridge, f"{self.gateway}/{net.prefixlen}")

    def remove(self) -> None:
        kube.delete_bridge(self.bridge)
        remove_rules_of_network(self.name)


# --- the two runtimes -----------------------------------------------------------------------------

class Runtime:
    """A CRI runtime on its own dirs and socket, with CRI stubs on it."""

    name = ""
    socket = ""
    channel: grpc.Channel | None = None
    rt: pbg.RuntimeServiceStub
    img: pbg.ImageServiceStub

    def connect(self) -> None:
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.rt = pbg.RuntimeServiceStub(self.channel)
        self.img = pbg.ImageServiceStub(self.channel)

    def pull(self, ref: str) -> None:
        self.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=300)

    def version(self) -> str:
        v = self.rt.Version(pb.VersionRequest(), timeout=10)
        return f"{v.runtime_name} {v.runtime_version}"

    def remove_all_pods(self) -> None:
        """Safety net after the kubelet: stop and remove every sandbox left."""
        try:
            items = self.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items
        except grpc.RpcError:
            return
        for p in items:
            try:
                self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p.id), timeout=60)
            except grpc.RpcError:
                pass
            try:
                self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p.id), timeout=60)
            except grpc.RpcError:
                pass

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> list[str]:
        raise NotImplementedError


class Moorage(Runtime):
    name = "moorage"

    def __init__(self, network: Network) -> None:
        self.d = DaemonProcess(base=new_base())
        self.d.write_config()
        # Stock config apart from dirs, socket and metrics port: the test helper turns debug
        # logging on, which containerd (at info) would not pay for.
        with open(self.d.config_path) as f:
            conf = f.read()
        with open(self.d.config_path, "w") as f:
            f.write(conf.replace('log_level = "debug"', 'log_level = "info"'))
        network.write(self.d.cni_conf_dir)
        self.socket = self.d.socket

    def start(self) -> None:
        self.d.start()
        self.connect()

    def stop(self) -> list[str]:
        if self.channel is not None:
            self.channel.close()
        daemon_teardown(self.d)  # pods via CRI, then the daemon by PID, its conmons, its mounts
        return []


class Containerd(Runtime):
    name = "containerd"

    def __init__(self, binary: str, network: Network, registry: Registry) -> None:
        self.binary = binary
        self.base = tempfile.mkdtemp(prefix="mrgc-", dir="/tmp")  # short: socket path limit
        self.socket = os.path.join(self.base, "containerd.sock")
        self.proc: subprocess.Popen | None = None
        self.log_file = os.path.join(self.base, "containerd.log")
        self.conf_dir = os.path.join(self.base, "cni", "net.d")
        network.write(self.conf_dir)
        hosts = os.path.join(self.base, "certs.d", registry.host)
        os.makedirs(hosts)
        with open(os.path.join(hosts, "hosts.toml"), "w") as f:
            f.write(f'server = "http://{registry.host}"\n\n[host."http://{registry.host}"]\n'
                    f'  capabilities = ["pull", "resolve"]\n')
        with open(os.path.join(self.base, "config.toml"), "w") as f:
            f.write(self.config(registry.pause))

    def config(self, sandbox_image: str) -> str:
        b = self.base
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        runc = shutil.which("runc") or "/usr/sbin/runc"
        # Everything on our own dirs; the CRI plugin with the same CNI dirs as moorage.
        # restrict_oom_score_adj: no CAP_SYS_RESOURCE here, so the kubelet's negative
        # oom_score_adj must be clamped to containerd's own.  Hugetlb: the kubelet always
        # sends hugepage limits and this host has no hugetlb hierarchy; with both switches
        # false CreateContainer fails ("huge pages limits are specified but hugetlb cgroup
        # controller is missing"), either one true drops the limits.  Both are containerd
        # 1.6's defaults, written out to be explicit.
        # netns pins under our state dir instead of /var/run/netns, runc's state under ours
        # instead of /run/containerd/runc.
        return f"""version = 2
root = "{b}/root"
state = "{b}/state"

[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  level = "info"
[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{b}/opt"
  {cri}]
    sandbox_image = "{sandbox_image}"
    restrict_oom_score_adj = true
    disable_hugetlb_controller = true
    tolerate_missing_hugetlb_controller = true
    netns_mounts_under_state_dir = true
    enable_selinux = false
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    {cri}.cni]
      bin_dir = "{CNI_PLUGIN_DIR}"
      conf_dir = "{self.conf_dir}"
      max_conf_num = 1
    {cri}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      {cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        {cri}.containerd.runtimes.runc.options]
          BinaryName = "{runc}"
          Root = "{b}/runc"
          SystemdCgroup = false
    {cri}.registry]
      config_path = "{b}/certs.d"
"""

    def start(self) -> None:
        self.proc = kube.start_logged([self.binary, "--config", os.path.join(self.base, "config.toml")], self.log_file)
        self.connect()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            self.rt.Version(pb.VersionRequest(), timeout=1)
            return True
        kube.wait_for(up, 60, "containerd's CRI socket", 0.1)

    def log_tail(self, n: int = 4000) -> str:
        return kube.read_from(self.log_file)[-n:]

    @staticmethod
    def fixed_paths_before() -> dict[str, bool]:
        return {p: os.path.lexists(p) for p in CONTAINERD_FIXED_PATHS}

    @staticmethod
    def remove_fixed_paths(before: dict[str, bool]) -> list[str]:
        """Remove the fixed dirs it created, only where they are empty (nobody else's data)."""
        problems = []
        for p, existed in before.items():
            if existed or not os.path.isdir(p):
                continue
            for dirpath, _d, _f in sorted(os.walk(p), key=lambda t: len(t[0]), reverse=True):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
            if os.path.lexists(p):
                problems.append(f"{p} left behind (not empty)")
        return problems

    def shims(self) -> list[int]:
        """containerd-shim processes of this containerd (their -address is our socket)."""
        return [pid for pid, argv in cmdlines()
                if argv and b"containerd-shim" in argv[0] and self.socket.encode() in argv]

    def stop(self) -> list[str]:
        if self.proc is not None and self.proc.poll() is None:
            self.remove_all_pods()
        if self.channel is not None:
            self.channel.close()
        kube.stop_process(self.proc)
        problems = []
        left = self.shims()
        if left:
            problems.append(f"containerd shims left after its pods went (killed): {left}")
            kill_tree(left)
            time.sleep(0.5)
        stuck = kube.unmount_under(self.base, lazy=True)
        if stuck:
            problems.append(f"containerd mounts left: {stuck}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        return problems


def ensure_containerd(install: bool) -> str:
    """$CONTAINERD (a 2.x build, the stronger reference), else Debian's, installed with apt when missing."""
    named = os.environ.get("CONTAINERD")
    if named:
        if not os.access(named, os.X_OK):
            raise SystemExit(f"CONTAINERD={named} is not an executable")
        return named
    found = shutil.which("containerd")
    if found and shutil.which("containerd-shim-runc-v2"):
        return found
    if not install:
        raise SystemExit("containerd is not installed (apt-get install containerd, "
                         "or drop --no-install)")
    log("installing Debian's containerd package")
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "containerd"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    found = shutil.which("containerd")
    if not found:
        raise SystemExit("containerd still missing after apt-get install")
    return found


def missing_tools() -> list[str]:
    need = ["runc", "conmon", "catatonit", "iptables", "ip6tables", "docker-registry"]
    out = [t for t in need if shutil.which(t) is None]
    return out + [p for p in ("bridge", "host-local", "portmap", "loopback")
                  if not os.path.exists(os.path.join(CNI_PLUGIN_DIR, p))]
