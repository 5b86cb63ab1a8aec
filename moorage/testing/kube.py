"""Support for end-to-end tests that run real Kubernetes binaries against moorage.

A kubelet changes host-wide state (sysctls, iptables chains, a few paths under /var, an
rshared bind mount of its root dir, cgroups under its cgroupRoot); :class:`HostSnapshot`
records that state before a kubelet starts and :meth:`HostSnapshot.restore` puts it back.
:class:`Pki` issues the certificates a small cluster needs with ``openssl``, and the log
scanners turn moorage's JSON lines and the components' klog lines into the error lines a
test did not expect.  Nothing of Kubernetes itself lives here: tests name binaries through
environment variables and skip without them.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import grpc

from moorage.cri.api import api_pb2 as pb
from moorage.testing.net import iptables_state, remove_portmap_scaffolding_if_ours, sh

# netlab's lock: held while a kubelet's KUBE-* chains exist, so that the CNI tests comparing
# iptables before/after never see them.
CNI_LOCK = "/run/lock/moorage-test-cni.lock"
# One kubelet-running test module at a time on this host: sysctls, /var/lib/kubelet and the
# KUBE-* chains are host-wide.
KUBELET_LOCK = "/run/lock/moorage-test-kubelet.lock"

# Sysctls the kubelet sets when protectKernelDefaults is false.
KUBELET_SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
                   "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes")
KUBELET_HOST_PATHS = ("/var/lib/kubelet", "/var/lib/kubelet/device-plugins", "/var/log/containers")


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``fn`` until it returns something truthy; its last exception or value goes in the failure."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            v = fn()
            if v:
                return v
            last = v
        except (OSError, grpc.RpcError, KeyError, ValueError, IndexError, AssertionError,
                subprocess.SubprocessError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}"[:4000])
        time.sleep(interval)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """GET without any proxy from the environment (tests talk to 127.0.0.1 and test bridges only)."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as r:
            return int(r.status), r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@contextmanager
def host_lock(path: str) -> Iterator[None]:
    """An exclusive flock held for the block (across xdist workers and test runs)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- host state ------------------------------------------------------------------------------

def read_sysctl(name: str) -> str:
    with open("/proc/sys/" + name.replace(".", "/")) as f:
        return f.read().strip()


def write_sysctl(name: str, value: str) -> None:
    with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
        f.write(value)


def mountpoints() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f]


def cgroup_hierarchies() -> list[str]:
    """Mount points of the v1 controller hierarchies and of the v2 one (hybrid hosts have both)."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[2] in ("cgroup", "cgroup2"):
                out.append(parts[1])
    return out


def make_cgroup_root(cgroup_root: str) -> None:
    """The kubelet requires its cgroupRoot to exist in every hierarchy."""
    for h in cgroup_hierarchies():
        d = h + cgroup_root
        os.makedirs(d, exist_ok=True)
        if os.path.basename(h) == "cpuset":  # a new v1 cpuset is empty until told otherwise
            for name in ("cpuset.cpus", "cpuset.mems"):
                with open(os.path.join(h, name)) as src:
                    v = src.read().strip()
                with open(os.path.join(d, name), "w") as dst:
                    dst.write(v)


def remove_cgroup_tree(cgroup_root: str) -> list[str]:
    """Remove ``cgroup_root`` in every hierarchy, leaves first; returns the ones still busy."""
    busy = []
    for h in cgroup_hierarchies():
        top = h + cgroup_root
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: len(t[0]), reverse=True):
            for _ in range(20):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.25)
            else:
                busy.append(dirpath)
    return busy


def unmount_under(*prefixes: str, lazy: bool = False) -> list[str]:
    """Unmount everything at or below the given paths, deepest first; returns what stayed mounted.
    ``lazy``: detach (``umount -l``) what a plain umount refuses, for callers that must not
    leave anything behind even while a straggler still uses it."""
    def mine() -> list[str]:
        return sorted((m for m in mountpoints() if any(m == p or m.startswith(p.rstrip("/") + "/")
                                                        for p in prefixes)), key=len, reverse=True)
    for _ in range(5):
        left = mine()
        if not left:
            return []
        for m in left:
            if subprocess.run(["umount", m], check=False, capture_output=True).returncode != 0 and lazy:
                subprocess.run(["umount", "-l", m], check=False, capture_output=True)
    return mine()


def remove_kubelet_leftovers(base: str, cgroup_root: str, lazy: bool = False) -> list[str]:
    """After a kubelet stopped: unmount what it left under its dir ``base`` (pod volumes, the
    rshared bind of its root dir) and remove its ``cgroup_root``; returns teardown problems."""
    problems: list[str] = []
    left = unmount_under(base, lazy=lazy)
    if left:
        problems.append(f"mounts left: {left}")
    return problems + [f"cgroup busy: {d}" for d in remove_cgroup_tree(cgroup_root)]


def iptables_chains(binary: str) -> dict[str, set[str]]:
    """table -> user chain names, for one of iptables/ip6tables."""
    out: dict[str, set[str]] = {}
    for table in ("filter", "nat", "mangle"):
        r = subprocess.run([binary, "-w", "-t", table, "-S"], check=False, capture_output=True, text=True)
        if r.returncode == 0:
            out[table] = {ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("-N ")}
    return out


def remove_new_chains(binary: str, before: dict[str, set[str]], prefixes: tuple[str, ...]) -> None:
    """Delete the chains named ``prefixes*`` that appeared since ``before``, and every jump into them."""
    for table, chains in iptables_chains(binary).items():
        new = {c for c in chains - before.get(table, set()) if c.startswith(prefixes)}
        if not new:
            continue
        rules = subprocess.run([binary, "-w", "-t", table, "-S"], check=False, capture_output=True, text=True).stdout
        for ln in rules.splitlines():
            args = ln.split()
            if args[:1] == ["-A"] and "-j" in args and args[args.index("-j") + 1] in new:
                subprocess.run([binary, "-w", "-t", table, "-D", *args[1:]], check=False, capture_output=True)
        for c in new:
            subprocess.run([binary, "-w", "-t", table, "-F", c], check=False, capture_output=True)
        for c in new:
            subprocess.run([binary, "-w", "-t", table, "-X", c], check=False, capture_output=True)


@dataclass
class HostSnapshot:
    """What kubelets may change on the host, taken before the first one starts."""

    sysctls: dict[str, str]
    chains_v4: dict[str, set[str]]
    chains_v6: dict[str, set[str]]
    paths: dict[str, bool]
    iptables: set[str]

    @classmethod
    def take(cls) -> HostSnapshot:
        return cls({s: read_sysctl(s) for s in KUBELET_SYSCTLS}, iptables_chains("iptables"),
                   iptables_chains("ip6tables"), {p: os.path.lexists(p) for p in KUBELET_HOST_PATHS},
                   iptables_state())

    def restore(self, pod_logs_dirs: Iterable[str] = ()) -> list[str]:
        """Undo the kubelets' host-wide changes (their mounts and cgroups are the caller's);
        returns what could not be undone.  ``pod_logs_dirs``: the kubelets' podLogsDirs, whose
        symlinks in a pre-existing /var/log/containers are removed."""
        for name, value in self.sysctls.items():
            if read_sysctl(name) != value:
                write_sysctl(name, value)
        remove_new_chains("iptables", self.chains_v4, ("KUBE-",))
        remove_new_chains("ip6tables", self.chains_v6, ("KUBE-",))
        if not self.paths["/var/lib/kubelet"]:
            shutil.rmtree("/var/lib/kubelet", ignore_errors=True)
        elif not self.paths["/var/lib/kubelet/device-plugins"]:
            shutil.rmtree("/var/lib/kubelet/device-plugins", ignore_errors=True)
        if not self.paths["/var/log/containers"]:
            shutil.rmtree("/var/log/containers", ignore_errors=True)
        elif os.path.isdir("/var/log/containers"):
            dirs = tuple(d.rstrip("/") + "/" for d in pod_logs_dirs)
            for n in os.listdir("/var/log/containers"):
                p = os.path.join("/var/log/containers", n)
                if dirs and os.path.islink(p) and os.readlink(p).startswith(dirs):
                    os.unlink(p)
        # portmap's masquerade scaffolding (for 127.0.0.1 hostPorts), if created meanwhile
        remove_new_chains("iptables", {"nat": {c.split(":", 1)[1] for c in self.iptables
                                               if c.startswith("nat :")}},
                          ("CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK"))
        remove_portmap_scaffolding_if_ours(self.iptables)
        return self.differences()

    def differences(self) -> list[str]:
        """What differs from this snapshot now, in the parts :meth:`restore` owns."""
        problems: list[str] = []
        after = HostSnapshot.take()
        for name, value in self.sysctls.items():
            if after.sysctls[name] != value:
                problems.append(f"sysctl {name} is {after.sysctls[name]}, was {value}")
        for label, b, a in (("v4", self.chains_v4, after.chains_v4), ("v6", self.chains_v6, after.chains_v6)):
            for table in a:
                extra = {c for c in a[table] - b.get(table, set()) if c.startswith(("KUBE-", "CNI-"))}
                if extra:
                    problems.append(f"iptables {label} {table}: chains left {sorted(extra)}")
        for p, existed in self.paths.items():
            if not existed and os.path.lexists(p):
                problems.append(f"{p} left behind")
        return problems


# --- a kubelet's dirs and configuration ---------------------------------------------------------

class KubeletDirs:
    """The layout of one kubelet's own directory ``base`` (mixed into the harnesses' node classes)."""

    base: str

    def path(self, *p: str) -> str:
        return os.path.join(self.base, *p)

    @property
    def root_dir(self) -> str:
        return self.path("root")

    @property
    def manifests(self) -> str:
        return self.path("manifests")

    @property
    def pod_logs(self) -> str:
        return self.path("pod-logs")

    @property
    def log_file(self) -> str:
        return self.path("kubelet.log")


def kubelet_config(socket: str, dirs: KubeletDirs, cgroup_root: str, **settings: Any) -> dict[str, Any]:
    """A KubeletConfiguration for a test kubelet on the CRI ``socket``: cgroupfs under its own
    ``cgroup_root``, its pod logs and volume plugins under ``dirs``, healthz on 127.0.0.1;
    ``settings`` (ports, address, authentication, static pods, feature gates...) go on top."""
    endpoint = f"unix://{socket}"
    cfg: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": endpoint, "imageServiceEndpoint": endpoint,
        "cgroupDriver": "cgroupfs", "cgroupRoot": cgroup_root,
        "failSwapOn": False, "failCgroupV1": False,
        "healthzBindAddress": "127.0.0.1",
        "authorization": {"mode": "AlwaysAllow"},
        "podLogsDir": dirs.pod_logs, "volumePluginDir": dirs.path("volume-plugins"),
        # Explicit thresholds: the defaults include disk percentages that a busy shared disk
        # could cross, and eviction would then kill test pods.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
    }
    cfg.update(settings)
    return cfg


# --- links -------------------------------------------------------------------------------------

def add_bridge(name: str, *cidrs: str) -> None:
    """A Linux bridge with the given host addresses (``10.1.2.1/24``), up."""
    sh("ip", "link", "add", "name", name, "type", "bridge")
    for c in cidrs:
        sh("ip", "addr", "add", c, "dev", name)
    sh("ip", "link", "set", name, "up")


def delete_bridge(name: str) -> None:
    """Delete a bridge and whatever veths are still enslaved to it."""
    out = sh("ip", "-o", "link", "show", "master", name, check=False)
    for line in out.splitlines():
        sh("ip", "link", "del", line.split(":")[1].strip().split("@")[0], check=False)
    sh("ip", "link", "del", name, check=False)


@dataclass
class BridgeNetwork:
    """A CNI network on one Linux bridge and subnet (host address ``gateway`` on the bridge);
    host-local IPAM keeps its leases in ``data_dir``, not in the host-wide default."""

    bridge: str
    name: str
    subnet: str
    gateway: str
    data_dir: str

    def conflist(self, hostports: bool = False) -> dict[str, Any]:
        """bridge (no gateway forwarding, no masquerade), host-local, loopback; ``hostports``
        adds portmap and hairpin mode so that a pod reaches itself through its hostPort."""
        bridge: dict[str, Any] = {"type": "bridge", "bridge": self.bridge, "isGateway": False, "ipMasq": False,
                                  "ipam": {"type": "host-local", "dataDir": self.data_dir,
                                           "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]]}}
        plugins: list[dict[str, Any]] = [bridge]
        if hostports:
            bridge["hairpinMode"] = True
            plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
        plugins.append({"type": "loopback"})
        return {"cniVersion": "1.0.0", "name": self.name, "plugins": plugins}


# --- CRI -----------------------------------------------------------------------------------------

def list_sandboxes(rt: Any, labels: dict[str, str] | None = None, ready_only: bool = False,
                   timeout: float = 10) -> list[pb.PodSandbox]:
    """The sandboxes on a RuntimeService stub carrying ``labels`` (only SANDBOX_READY ones if asked)."""
    f = pb.PodSandboxFilter(label_selector=labels or {})
    if ready_only:
        f.state.state = pb.SANDBOX_READY
    return list(rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=f), timeout=timeout).items)


def list_containers(rt: Any, labels: dict[str, str], timeout: float = 10) -> list[pb.Container]:
    """The containers on a RuntimeService stub carrying ``labels``."""
    f = pb.ContainerFilter(label_selector=labels)
    return list(rt.ListContainers(pb.ListContainersRequest(filter=f), timeout=timeout).containers)


# --- certificates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cert:
    cert: str
    key: str


class Pki:
    """A throwaway CA and the leaf certificates a test cluster needs (EC P-256, via openssl)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", "ca.key", "-out", "ca.crt", "-days", "30", "-subj", "/CN=moorage e2e CA",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
        self.ca = Cert(self.path("ca.crt"), self.path("ca.key"))

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _openssl(self, *args: str) -> None:
        r = subprocess.run(["openssl", *args], cwd=self.dir, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")

    def issue(self, name: str, cn: str, orgs: Iterable[str] = (), ips: Iterable[str] = (),
              dns: Iterable[str] = (), server: bool = False, client: bool = False) -> Cert:
        """A leaf signed by the CA: ``name.crt``/``name.key``; O= for each of ``orgs``."""
        subj = "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"
        self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj)
        usages = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
        sans = [f"IP:{i}" for i in ips] + [f"DNS:{d}" for d in dns]
        ext = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
               f"extendedKeyUsage={','.join(usages)}", "authorityKeyIdentifier=keyid"]
        if sans:
            ext.append("subjectAltName=" + ",".join(sans))
        with open(self.path(f"{name}.ext"), "w") as f:
            f.write("\n".join(ext) + "\n")
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                      "-CAcreateserial", "-out", f"{name}.crt", "-days", "30", "-extfile", f"{name}.ext")
        return Cert(self.path(f"{name}.crt"), self.path(f"{name}.key"))

    def keypair(self, name: str) -> Cert:
        """An RSA key pair (``name.key``, ``name.pub``) for service-account token signing."""
        self._openssl("genrsa", "-out", f"{name}.key", "2048")
        self._openssl("rsa", "-in", f"{name}.key", "-pubout", "-out", f"{name}.pub")
        return Cert(self.path(f"{name}.pub"), self.path(f"{name}.key"))

    def kubeconfig(self, name: str, server: str, user: Cert) -> str:
        """A kubeconfig (JSON is YAML) for ``server`` with ``user``'s client certificate."""
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
               "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": self.ca.cert}}],
               "users": [{"name": "u", "user": {"client-certificate": user.cert, "client-key": user.key}}],
               "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}
        p = self.path(f"{name}.kubeconfig")
        with open(p, "w") as f:
            json.dump(cfg, f, indent=1)
        return p


# --- logs --------------------------------------------------------------------------------------

# klog's header: severity letter, MMDD, time, thread id, file:line]
_KLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [^\]]+\] ")


def klog_errors(text: str, allowed: Iterable[tuple[str, str]]) -> list[str]:
    """Error and fatal klog lines of ``text`` that no ``(regexp, reason)`` in ``allowed`` matches."""
    pats = [re.compile(p) for p, _ in allowed]
    out = []
    for line in text.splitlines():
        m = _KLOG.match(line)
        if m and m.group(1) in "EF" and not any(p.search(line) for p in pats):
            out.append(line)
    return out


def moorage_errors(text: str, allowed: Iterable[tuple[str, str]]) -> list[str]:
    """Error-level lines of moorage's JSON log (and tracebacks) that no ``allowed`` regexp matches."""
    pats = [re.compile(p) for p, _ in allowed]
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            if ("Traceback" in line or "Error" in line) and not any(p.search(line) for p in pats):
                out.append(line)
            continue
        if isinstance(rec, dict) and rec.get("level") in ("error", "critical") \
                and not any(p.search(line) for p in pats):
            out.append(line)
    return out


def read_from(path: str, offset: int = 0) -> str:
    """The text of ``path`` from byte ``offset`` on ("" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 30) -> None:
    """SIGTERM one process we started (by its PID), then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_logged(argv: list[str], log_path: str, **kw: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with stdout and stderr appended to ``log_path``."""
    log: IO[bytes] = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)
    finally:
        log.close()
