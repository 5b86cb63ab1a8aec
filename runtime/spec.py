"""The OCI runtime spec builder: (CRI config, image config, runtime config) → ``config.json``.

Everything here is a pure function of its arguments (DESIGN.md, principle 6).
The few facts that need the host - does a mount source exist, what are a device
node's major/minor numbers, which devices does a privileged container get, what
does a ``Localhost`` seccomp profile say - come through :class:`HostLookups`,
whose defaults do the real look-ups and which tests replace with fakes.

Behaviour follows containerd's CRI plugin where Kubernetes depends on it
(command/args rules, capability add/drop with ``ALL``, the default mount set,
masked paths, mount propagation, namespace joining) and deviates only where
moorage's design asks (an empty infra rootfs running ``catatonit -P``).
"""

from __future__ import annotations

import copy
import logging
import os
import posixpath
import re
import stat as _stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from moorage.core.errors import FailedPrecondition, InvalidArgument, NotFound, clip
from moorage.runtime import cgroups as _cgroups
from moorage.runtime import seccomp as _seccomp
from moorage.runtime.adjust import ContainerAdjustment
from moorage.runtime.cdi import CdiMount, Injection
from moorage.runtime.cdi import DeviceNode as CdiDeviceNode
from moorage.runtime.model import (
    NAMESPACE_MODES,
    PROFILE_TYPES,
    PROPAGATIONS,
    Capability,
    ContainerConfig,
    IDMapping,
    ImageConfig,
    LinuxContainerResources,
    LinuxContainerSecurityContext,
    LinuxSandboxSecurityContext,
    Mount,
    NamespaceOption,
    PodSandboxConfig,
    SecurityProfile,
    SELinuxOption,
)

log = logging.getLogger("moorage.runtime.spec")

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Where the infra binary is bind-mounted inside the (empty) sandbox rootfs.
INFRA_PATH_IN_CONTAINER = "/catatonit"
SANDBOX_OOM_SCORE_ADJ = -998
#: The node's shared memory, bind-mounted into pods that use the host IPC namespace.
HOST_DEV_SHM = "/dev/shm"

# Annotation keys (the same ones containerd sets, which tools such as
# cAdvisor and NRI plugins read).
ANN_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANN_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANN_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANN_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
ANN_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
ANN_SANDBOX_LOG_DIR = "io.kubernetes.cri.sandbox-log-directory"
# The pod-level resources the kubelet sends (LinuxPodSandboxConfig.resources), as containerd passes
# them to the infra spec: VM-based runtimes size the VM from these; runc and crun ignore them.
ANN_SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
ANN_SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
ANN_SANDBOX_CPU_SHARES = "io.kubernetes.cri.sandbox-cpu-shares"
ANN_SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
ANN_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANN_IMAGE_NAME = "io.kubernetes.cri.image-name"

#: Annotation prefixes that OCI runtimes (crun, runc, CRIU) interpret.  CRI
#: annotations under them are dropped unless allowed in RuntimeSpecConfig,
#: so that a pod author cannot steer the low-level runtime.
RESERVED_ANNOTATION_PREFIXES = ("io.kubernetes.cri.", "run.oci.", "org.criu.", "module.wasm.image/")

#: containerd's default capability set for non-privileged containers.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

#: Every capability Linux knows (numbers 0..40), in kernel order.
ALL_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
_CAP_ORDER = {c: i for i, c in enumerate(ALL_CAPABILITIES)}

#: Paths hidden from non-privileged containers (bind-mounted over with /dev/null or an empty tmpfs).
DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
#: Paths made read-only in non-privileged containers.
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# Sysctl name prefixes isolated by a namespace (the kernel's namespaced sysctls,
# as Kubernetes classifies them).
_IPC_SYSCTL_PREFIXES = ("kernel.shm", "kernel.msg", "fs.mqueue.")
_IPC_SYSCTLS = ("kernel.sem",)
_NET_SYSCTL_PREFIX = "net."
#: /proc/sys path pieces: no whitespace, control characters or '=' (sysctl(8)'s separator).
_SYSCTL_NAME_CHARS = re.compile(r"[A-Za-z0-9_.:@+/-]+")
MAX_SYSCTL_NAME = 1024
MAX_SYSCTL_VALUE = 4096  # a /proc/sys write takes at most a page

# Host /dev entries a privileged container does not get as device nodes
# (runc provides its own console, pts, shm and mqueue).
_PRIVILEGED_DEV_SKIP = ("/dev/pts", "/dev/shm", "/dev/mqueue", "/dev/console", "/dev/fd",
                        "/dev/.lxc", "/dev/.udev")


# --- configuration and host look-ups -----------------------------------------------


@dataclass(frozen=True)
class HostDevice:
    """A device node on the host, as ``stat`` reports it."""

    path: str
    type: str  # "c", "b" or "p"
    major: int
    minor: int
    file_mode: int = 0o666
    uid: int = 0
    gid: int = 0


def _real_devices_at(path: str) -> list[HostDevice] | None:
    """Device nodes at ``path`` (one) or beneath it (a directory); None if it doesn't exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    dev = _device_from_stat(path, st)
    if dev is not None:
        return [dev]
    out: list[HostDevice] = []
    if _stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                try:
                    lst = os.lstat(p)
                except OSError:
                    continue
                d = _device_from_stat(p, lst)
                if d is not None:
                    out.append(d)
            dirnames.sort()
    return out


def _device_from_stat(path: str, st: os.stat_result) -> HostDevice | None:
    mode = st.st_mode
    if _stat.S_ISCHR(mode):
        kind = "c"
    elif _stat.S_ISBLK(mode):
        kind = "b"
    elif _stat.S_ISFIFO(mode):
        kind = "p"
    else:
        return None
    return HostDevice(
        path=path,
        type=kind,
        major=os.major(st.st_rdev),
        minor=os.minor(st.st_rdev),
        file_mode=_stat.S_IMODE(mode),
        uid=st.st_uid,
        gid=st.st_gid,
    )


def _current_capabilities() -> frozenset[str] | None:
    try:
        with open("/proc/self/status") as f:
            bnd = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    except (OSError, StopIteration, ValueError):
        return None
    return frozenset(c for i, c in enumerate(ALL_CAPABILITIES) if bnd & (1 << i))


@dataclass(frozen=True)
class HostLookups:
    """The spec builder's only window onto the host; replace with fakes in tests."""

    #: Does this host path exist (mount sources)?
    path_exists: Callable[[str], bool] = os.path.exists
    #: Device node(s) at a host path: ``None`` if absent, ``[]`` if not a device.
    devices_at: Callable[[str], list[HostDevice] | None] = _real_devices_at
    #: Read a Localhost seccomp profile: ``(path, capabilities) -> linux.seccomp``.
    load_seccomp: Callable[[str, Iterable[str]], dict] = _seccomp.load_localhost
    #: Capabilities in the daemon's own bounding set (None: unknown, assume all).  A
    #: privileged container gets these, as containerd's WithAllCurrentCapabilities does:
    #: asking runc for more fails with "unable to apply caps".
    current_capabilities: Callable[[], frozenset[str] | None] = _current_capabilities
    #: Create a missing bind-mount source as a directory (kubelet hostPath type ""), as
    #: containerd and CRI-O do.
    ensure_dir: Callable[[str], None] = lambda p: os.makedirs(p, mode=0o755, exist_ok=True)
    #: Why the hugetlb cgroup controller cannot take limits for a container at this
    #: ``linux.cgroupsPath`` (None: it can).  The kubelet sends hugepage limits for every
    #: container; runc fails on a host without the controller.
    hugetlb_missing: Callable[[str], str | None] = _cgroups.hugetlb_missing
    #: Is SELinux enabled on this host (selinuxfs mounted)?  Decides what Mount.selinux_relabel means.
    selinux_active: Callable[[], bool] = lambda: os.path.exists("/sys/fs/selinux/enforce")


#: What the kubelet allocates per pod (and a multiple of): ranges of 65536 ids.
USERNS_LENGTH_MULTIPLE = 65536
_MAX_ID = 1 << 32

@dataclass(frozen=True)
class RuntimeSpecConfig:
    """Runtime-wide knobs that shape every spec (filled from the daemon config)."""

    #: Capabilities of a non-privileged container before CRI add/drop.
    default_capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    #: Sysctls set in every sandbox (pod sysctls override; a sysctl whose
    #: namespace the pod shares with the host is skipped).
    default_sysctls: Mapping[str, str] = field(default_factory=dict)
    #: Apply RuntimeDefault seccomp when the CRI request leaves seccomp unset.
    seccomp_default: bool = False
    #: Machine name for the RuntimeDefault profile (None: this host).
    seccomp_arch: str | None = None
    #: AppArmor profile name for RuntimeDefault ("" = no AppArmor).
    apparmor_default_profile: str = ""
    #: Produce SELinux labels from CRI selinux_options.
    selinux_enabled: bool = False
    #: Give containers a private cgroup namespace (set on cgroup v2 hosts).
    cgroupns: bool = False
    masked_paths: tuple[str, ...] = DEFAULT_MASKED_PATHS
    readonly_paths: tuple[str, ...] = DEFAULT_READONLY_PATHS
    #: Size of the tmpfs /dev and default /dev/shm.
    tmpfs_size: str = "65536k"
    #: cpu.shares for the infra process (it does nothing).
    sandbox_cpu_shares: int = 2
    #: Privileged containers do not get the host's /dev (e.g. for VM runtimes).
    privileged_without_host_devices: bool = False
    #: POSIX rlimits for every process: (type, soft, hard), e.g. ("RLIMIT_NOFILE", 1024, 1024).
    rlimits: tuple[tuple[str, int, int], ...] = ()
    #: Glob patterns of otherwise reserved annotations allowed through from CRI.
    allowed_annotations: tuple[str, ...] = ()
    #: Pod annotations (glob patterns) copied into sandbox and container specs.
    pod_annotations: tuple[str, ...] = ()
    #: Never set hugepage limits (the kubelet's are dropped), as containerd's
    #: disable_hugetlb_controller.
    disable_hugetlb_controller: bool = False
    #: Where the hugetlb controller is not usable, drop hugepage limits (True) or refuse
    #: the container with FAILED_PRECONDITION (False).
    tolerate_missing_hugetlb_controller: bool = True
    #: A pod user namespace's mapping lengths must be a multiple of this (the kubelet allocates
    #: ranges of 65536 ids); 1 accepts any length.
    userns_length_multiple: int = USERNS_LENGTH_MULTIPLE


# --- small helpers ----------------------------------------------------------------


def _clean_abs(path: str, what: str) -> str:
    if not path or not path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    if "\x00" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL byte")
    if ".." in path.split("/"):
        raise InvalidArgument(f"{what} {path!r} must not contain '..'")
    return posixpath.normpath(path).replace("//", "/")


def normalize_capability(name: str) -> str:
    c = name.strip().upper()
    if not c:
        raise InvalidArgument("empty capability name")
    return c if c.startswith("CAP_") else "CAP_" + c


def _check_cap(c: str) -> str:
    if c not in _CAP_ORDER:
        raise InvalidArgument(
            f"unknown capability {c!r}; use a Linux capability name such as NET_ADMIN or ALL"
        )
    return c


def _sorted_caps(caps: Iterable[str]) -> list[str]:
    return sorted(set(caps), key=lambda c: _CAP_ORDER.get(c, 999))


def compute_capabilities(
    cap: Capability | None, defaults: Sequence[str], privileged: bool
) -> tuple[list[str], list[str]]:
    """Return ``(capabilities, ambient)`` for a container.

    ``ALL`` in ``add`` starts from every capability, ``ALL`` in ``drop`` from
    none; individual adds then drops apply on top, so ``drop: [ALL], add:
    [NET_BIND_SERVICE]`` yields just that one.  Privileged containers get all
    capabilities and ignore add/drop.
    """
    if privileged:
        return list(ALL_CAPABILITIES), []
    caps = {_check_cap(normalize_capability(c)) for c in defaults}
    if cap is None:
        return _sorted_caps(caps), []
    adds = [normalize_capability(c) for c in cap.add_capabilities]
    drops = [normalize_capability(c) for c in cap.drop_capabilities]
    if "CAP_ALL" in adds:
        caps = set(ALL_CAPABILITIES)
    if "CAP_ALL" in drops:
        caps = set()
    for c in adds:
        if c != "CAP_ALL":
            caps.add(_check_cap(c))
    for c in drops:
        if c != "CAP_ALL":
            caps.discard(_check_cap(c))
    ambient: list[str] = []
    for c in cap.add_ambient_capabilities:
        n = normalize_capability(c)
        if n == "CAP_ALL":
            raise InvalidArgument("ambient capabilities must be named one by one; ALL is not allowed")
        ambient.append(_check_cap(n))
        caps.add(n)  # an ambient capability must also be permitted
    return _sorted_caps(caps), _sorted_caps(ambient)


def _caps_object(caps: list[str], ambient: list[str]) -> dict:
    return {
        "bounding": list(caps),
        "effective": list(caps),
        "permitted": list(caps),
        # Inheritable stays empty (CVE-2022-24769) except for ambient capabilities,
        # which the kernel only keeps when they are inheritable too.
        "inheritable": list(ambient),
        "ambient": list(ambient),
    }


def linux_resources(res: LinuxContainerResources | None, *, hugepages: bool = False) -> dict:
    """``linux.resources`` (cpu, memory, hugepages, unified) from CRI resources.

    Zero means "not set" for every CRI field, so only non-zero values appear:
    the same dict serves CreateContainer and UpdateContainerResources.  Hugepage
    limits (always validated) are included only with *hugepages*: they are set once,
    at creation, where ``build_container_spec`` knows whether the host can take
    them; an update leaves them out (hugepages are not resizable, runc's update
    ignores them and crun's fails on a host without the hugetlb controller).
    """
    out: dict = {}
    if res is None:
        return out
    if res.cpu_shares < 0:
        raise InvalidArgument(f"cpu_shares {res.cpu_shares} must not be negative")
    if res.cpu_period < 0:
        raise InvalidArgument(f"cpu_period {res.cpu_period} must not be negative")
    if res.cpu_quota < -1:
        raise InvalidArgument(f"cpu_quota {res.cpu_quota} must be -1 (no limit) or more")
    if res.memory_limit_in_bytes < 0:
        raise InvalidArgument(f"memory_limit_in_bytes {res.memory_limit_in_bytes} must not be negative")
    if res.memory_swap_limit_in_bytes < -1:
        raise InvalidArgument(
            f"memory_swap_limit_in_bytes {res.memory_swap_limit_in_bytes} must be -1 (no limit) or more"
        )
    cpu: dict = {}
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    mem: dict = {}
    if res.memory_limit_in_bytes:
        mem["limit"] = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes:
        if (
            res.memory_swap_limit_in_bytes > 0
            and res.memory_limit_in_bytes
            and res.memory_swap_limit_in_bytes < res.memory_limit_in_bytes
        ):
            raise InvalidArgument(
                "memory_swap_limit_in_bytes is memory plus swap and cannot be below "
                f"memory_limit_in_bytes ({res.memory_swap_limit_in_bytes} < {res.memory_limit_in_bytes})"
            )
        mem["swap"] = res.memory_swap_limit_in_bytes
    if mem:
        out["memory"] = mem
    if res.hugepage_limits:
        hp = []
        for h in res.hugepage_limits:
            if not h.page_size:
                raise InvalidArgument("hugepage limit without a page size (e.g. \"2MB\")")
            if h.limit < 0:
                raise InvalidArgument(f"hugepage limit for {h.page_size} must not be negative")
            hp.append({"pageSize": h.page_size, "limit": h.limit})
        if hugepages:
            out["hugepageLimits"] = hp
    if res.unified:
        for k in res.unified:
            if not k or "/" in k or k.startswith("."):
                raise InvalidArgument(f"unified cgroup key {k!r} is not a cgroup v2 file name")
        out["unified"] = dict(res.unified)
    return out


_noted: set[str] = set()


def _note_once(message: str) -> None:
    """Log a host condition once per daemon, not once per container."""
    if message not in _noted:
        _noted.add(message)
        log.warning(message)


def use_hugepage_limits(runtime_cfg: RuntimeSpecConfig, host: HostLookups, cgroups_path: str) -> bool:
    """Whether a container at *cgroups_path* gets the hugepage limits it asks for.

    As containerd: never when ``disable_hugetlb_controller``; else only where the hugetlb
    controller is usable for the container's cgroup parent.  Where it is not, the limits
    are dropped (logged once) when ``tolerate_missing_hugetlb_controller``, else the
    container is refused - runc would fail later with "cannot set hugetlb limit".
    """
    if runtime_cfg.disable_hugetlb_controller:
        return False
    why = host.hugetlb_missing(cgroups_path)
    if why is None:
        return True
    if runtime_cfg.tolerate_missing_hugetlb_controller:
        _note_once(f"hugepage limits are dropped from every container: {why} "
                   "(runtime.tolerate_missing_hugetlb_controller = true)")
        return False
    raise FailedPrecondition(
        f"the container asks for hugepage limits but the hugetlb cgroup controller is missing: {why}; "
        "mount the hugetlb controller, or set runtime.tolerate_missing_hugetlb_controller = true "
        "to run containers without hugepage limits"
    )


def cgroups_path(driver: str, parent: str, id: str, *, scope_prefix: str = "moorage") -> str:
    """``linux.cgroupsPath`` for a sandbox or container.

    ``cgroupfs``: ``<parent>/<id>`` (parent defaults to ``/moorage``).
    ``systemd``: ``<slice>:<prefix>:<id>``; the parent must name a ``.slice``
    (the kubelet passes e.g. ``kubepods-besteffort-pod<uid>.slice``; a path of
    slices is reduced to its last element), default ``system.slice``.
    """
    if not id or "/" in id or ":" in id or id in (".", ".."):
        raise InvalidArgument(f"invalid id {id!r} for a cgroup name")
    if driver == "cgroupfs":
        p = parent or "/moorage"
        if ":" in p:
            raise InvalidArgument(
                f"cgroup parent {parent!r} looks like a systemd name but the cgroup driver is cgroupfs"
            )
        if ".." in p.split("/"):
            raise InvalidArgument(f"cgroup parent {parent!r} must not contain '..'")
        if not p.startswith("/"):
            p = "/" + p
        return posixpath.join(posixpath.normpath(p), id)
    if driver == "systemd":
        p = (parent or "system.slice").rstrip("/")
        slice_name = p.rsplit("/", 1)[-1]
        if not slice_name.endswith(".slice") or ".." in p.split("/"):
            raise InvalidArgument(
                f"cgroup parent {parent!r} is not a systemd slice (expected e.g. "
                "\"kubepods.slice\"); is the kubelet configured with the same cgroup driver?"
            )
        return f"{slice_name}:{scope_prefix}:{id}"
    raise InvalidArgument(f"unknown cgroup driver {driver!r}; expected \"cgroupfs\" or \"systemd\"")


def normalize_sysctl_name(name: str) -> str:
    """Accept ``net/ipv4/ip_forward`` as well as ``net.ipv4.ip_forward``.

    In the slash form dots belong to a component (``net/ipv4/conf/eth0.100/...``),
    so separators and dots swap.
    """
    if not name:
        raise InvalidArgument("empty sysctl name")
    first_dot, first_slash = name.find("."), name.find("/")
    if first_slash != -1 and (first_dot == -1 or first_slash < first_dot):
        name = name.translate(str.maketrans("./", "/."))
    parts = name.split(".")
    # A '/' left in a component came from a '.' of the slash form (an interface such as
    # eth0.100); empty pieces there mean '.' or '..' was written: a path game, refused.
    if (any(p == "" or "" in p.split("/") for p in parts) or len(name) > MAX_SYSCTL_NAME
            or not _SYSCTL_NAME_CHARS.fullmatch(name)):
        raise InvalidArgument(f"invalid sysctl name {clip(name)}")
    return name


def _sysctl_namespace(name: str) -> str | None:
    if name.startswith(_NET_SYSCTL_PREFIX):
        return "network"
    if name in _IPC_SYSCTLS or name.startswith(_IPC_SYSCTL_PREFIXES):
        return "ipc"
    return None


def validate_sysctls(
    sysctls: Mapping[str, str], *, host_network: bool, host_ipc: bool
) -> dict[str, str]:
    """Check pod sysctls: only namespaced ones, and not in a namespace shared with the host."""
    out: dict[str, str] = {}
    for raw, value in sysctls.items():
        name = normalize_sysctl_name(raw)
        if not isinstance(value, str) or "\n" in value or "\x00" in value or len(value) > MAX_SYSCTL_VALUE:
            raise InvalidArgument(f"invalid value {clip(value)} for sysctl {name}")
        ns = _sysctl_namespace(name)
        if ns is None:
            raise InvalidArgument(
                f"sysctl {name} is not namespaced: setting it would change the whole node, "
                "so it cannot be set for a pod (set it on the node instead)"
            )
        if ns == "network" and host_network:
            raise InvalidArgument(
                f"sysctl {name} cannot be set in a pod that uses the host network (hostNetwork: true)"
            )
        if ns == "ipc" and host_ipc:
            raise InvalidArgument(
                f"sysctl {name} cannot be set in a pod that uses the host IPC namespace (hostIPC: true)"
            )
        out[name] = value
    return out


def _ns_mode(v: str, what: str) -> str:
    if v not in NAMESPACE_MODES:
        raise InvalidArgument(f"unknown {what} namespace mode {v!r}; expected one of {NAMESPACE_MODES}")
    return v


def _profile(p: SecurityProfile | None, what: str) -> SecurityProfile | None:
    if p is not None and p.profile_type not in PROFILE_TYPES:
        raise InvalidArgument(f"unknown {what} profile type {p.profile_type!r}; expected one of {PROFILE_TYPES}")
    return p


def _seccomp_for(
    profile: SecurityProfile | None,
    *,
    privileged: bool,
    caps: Iterable[str],
    runtime_cfg: RuntimeSpecConfig,
    host: HostLookups,
) -> dict | None:
    _profile(profile, "seccomp")
    if privileged:
        return None
    if profile is None:
        if not runtime_cfg.seccomp_default:
            return None
        return _seccomp.default_profile(caps, arch=runtime_cfg.seccomp_arch)
    if profile.profile_type == "Unconfined":
        return None
    if profile.profile_type == "RuntimeDefault":
        return _seccomp.default_profile(caps, arch=runtime_cfg.seccomp_arch)
    return host.load_seccomp(profile.localhost_ref, caps)


def _apparmor_for(
    profile: SecurityProfile | None, *, privileged: bool, runtime_cfg: RuntimeSpecConfig
) -> str:
    _profile(profile, "apparmor")
    if profile is None:
        return "" if privileged else runtime_cfg.apparmor_default_profile
    if profile.profile_type == "Unconfined":
        return ""
    if profile.profile_type == "RuntimeDefault":
        return runtime_cfg.apparmor_default_profile
    ref = profile.localhost_ref
    if ref.startswith("localhost/"):
        ref = ref[len("localhost/"):]
    if not ref:
        raise InvalidArgument("AppArmor profile type Localhost needs a localhost_ref (a profile name)")
    return ref


def _selinux_label(opts: SELinuxOption | None, runtime_cfg: RuntimeSpecConfig) -> tuple[str, str]:
    """(process label, mount label) or ("", "")."""
    if not runtime_cfg.selinux_enabled or opts is None:
        return "", ""
    user = opts.user or "system_u"
    role = opts.role or "system_r"
    typ = opts.type or "container_t"
    label = f"{user}:{role}:{typ}"
    mount = f"{user}:object_r:container_file_t"
    if opts.level:
        label += f":{opts.level}"
        mount += f":{opts.level}"
    return label, mount


def _filter_annotations(
    annotations: Mapping[str, str], allowed: Sequence[str], *, only_allowed: bool = False
) -> dict[str, str]:
    out = {}
    for k, v in annotations.items():
        ok = any(fnmatchcase(k, pat) for pat in allowed)
        if only_allowed and not ok:
            continue
        if not ok and k.startswith(RESERVED_ANNOTATION_PREFIXES):
            continue
        out[k] = v
    return out


def _merge_env(base: list[str], updates: Iterable[str]) -> list[str]:
    """Replace ``KEY=...`` entries by key, append new keys (order kept).

    An update without ``=`` (an image's ``Env: ["FOO"]``) unsets ``FOO`` and is itself
    dropped, as containerd applies image env: runc refuses an entry without ``=``.
    """
    out: list[str | None] = list(base)
    index = {e.split("=", 1)[0]: i for i, e in enumerate(base)}
    for e in updates:
        k, sep, _ = e.partition("=")
        if not sep:
            if k in index:
                out[index.pop(k)] = None
            continue
        if k in index:
            out[index[k]] = e
        else:
            index[k] = len(out)
            out.append(e)
    return [e for e in out if e is not None]


def _user_obj(uid: int, gid: int, additional_gids: Sequence[int]) -> dict:
    for v, what in ((uid, "uid"), (gid, "gid")):
        if not (0 <= v <= 0xFFFFFFFE):
            raise InvalidArgument(f"{what} {v} is out of range")
    user: dict = {"uid": uid, "gid": gid}
    extra = []
    for g in additional_gids:
        if not (0 <= g <= 0xFFFFFFFE):
            raise InvalidArgument(f"additional gid {g} is out of range")
        if g not in extra:
            extra.append(g)
    if extra:
        user["additionalGids"] = extra
    return user


def _rlimits(runtime_cfg: RuntimeSpecConfig) -> list[dict]:
    return [{"type": t, "soft": s, "hard": h} for t, s, h in runtime_cfg.rlimits]


def _id_mappings(maps: Sequence[IDMapping]) -> list[dict]:
    return [{"containerID": m.container_id, "hostID": m.host_id, "size": m.length} for m in maps]


USERNS_FIELD = "linux.security_context.namespace_options.userns_options"


@dataclass(frozen=True)
class PodUserns:
    """A pod's checked user-namespace mapping (one range each for uids and gids, container 0 mapped)."""

    uid: IDMapping
    gid: IDMapping

    def host_ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """[start, end) of the host uids, then of the host gids."""
        return ((self.uid.host_id, self.uid.host_id + self.uid.length),
                (self.gid.host_id, self.gid.host_id + self.gid.length))

    def same(self, other: PodUserns) -> bool:
        return self.host_ranges() == other.host_ranges() and (
            self.uid.container_id, self.gid.container_id) == (other.uid.container_id, other.gid.container_id)

    def overlaps(self, other: PodUserns) -> bool:
        return any(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(self.host_ranges(), other.host_ranges(),
                                                                      strict=True))


def _check_id_ranges(maps: Sequence[IDMapping], where: str, multiple: int) -> IDMapping:
    if not maps:
        raise InvalidArgument(f"{where}: a pod user namespace needs uid and gid mappings")
    for i, m in enumerate(maps):
        at = f"{where}[{i}]"
        if m.length <= 0:
            raise InvalidArgument(f"{at}.length: must be positive, got {m.length}")
        if multiple > 1 and m.length % multiple:
            raise InvalidArgument(f"{at}.length: {m.length} is not a multiple of {multiple} "
                                  "(runtime.userns_length_multiple; the kubelet allocates ranges of 65536)")
        for what, start in (("container_id", m.container_id), ("host_id", m.host_id)):
            if start < 0 or start + m.length > _MAX_ID:
                raise InvalidArgument(f"{at}.{what}: range {start}+{m.length} leaves the 32-bit id space")
        if m.host_id == 0:
            raise InvalidArgument(f"{at}.host_id: 0 would map the pod's ids onto the host's root")
    for i, a in enumerate(maps):
        for j in range(i):
            b = maps[j]
            for what, s1, s2 in (("container_id", a.container_id, b.container_id),
                                 ("host_id", a.host_id, b.host_id)):
                if s1 < s2 + b.length and s2 < s1 + a.length:
                    raise InvalidArgument(f"{where}[{i}].{what}: range {s1}+{a.length} overlaps "
                                          f"{where.rsplit('.', 1)[-1]}[{j}] ({s2}+{b.length})")
    if len(maps) != 1:
        raise InvalidArgument(f"{where}: {len(maps)} ranges given; moorage needs exactly one "
                              "(as the kubelet sends), so that the rootfs can be id-mapped by one offset")
    if maps[0].container_id != 0:
        raise InvalidArgument(f"{where}[0].container_id: must be 0 (the container's root must be mapped), "
                              f"got {maps[0].container_id}")
    return maps[0]


def pod_userns(nso: NamespaceOption | None, multiple: int = USERNS_LENGTH_MULTIPLE, *,
               where: str = USERNS_FIELD) -> PodUserns | None:
    """The pod user namespace ``nso`` asks for (None: the host's), or INVALID_ARGUMENT naming the field."""
    userns = nso.userns_options if nso is not None else None
    if userns is None:
        return None
    mode = _ns_mode(userns.mode, "user")
    if mode == "NODE":
        if userns.uids or userns.gids:
            raise InvalidArgument(f"{where}: mode NODE (the host's user namespace) takes no uid/gid mappings")
        return None
    if mode != "POD":
        raise InvalidArgument(f"{where}.mode: user namespace mode {mode} is not supported; use POD or NODE")
    uid = _check_id_ranges(userns.uids, f"{where}.uids", multiple)
    gid = _check_id_ranges(userns.gids, f"{where}.gids", multiple)
    return PodUserns(uid, gid)


def sandbox_userns(cfg: PodSandboxConfig, multiple: int = USERNS_LENGTH_MULTIPLE) -> PodUserns | None:
    sc = cfg.linux.security_context if cfg.linux else None
    return pod_userns(sc.namespace_options if sc else None, multiple)


def container_userns(nso: NamespaceOption | None, sandbox_cfg: PodSandboxConfig,
                     multiple: int = USERNS_LENGTH_MULTIPLE) -> PodUserns | None:
    """A container's user namespace: its pod's.  A container that names another is refused (it
    cannot have its own: it joins the pod's network, IPC and UTS namespaces, which that one owns)."""
    pod = sandbox_userns(sandbox_cfg, multiple)
    asked = nso.userns_options if nso is not None else None
    if asked is None:
        return pod
    mine = pod_userns(nso, multiple)
    if (mine is None) != (pod is None) or (mine is not None and pod is not None and not mine.same(pod)):
        raise InvalidArgument(f"{USERNS_FIELD}: the container's user namespace must be its pod's "
                              f"({'mode POD with the same mappings' if pod else 'the host one: mode NODE'})")
    return pod


def _base_mounts(
    runtime_cfg: RuntimeSpecConfig, *, privileged: bool, shm_path: str | None, cgroup: bool = True,
    host_sysfs: bool = False,
) -> list[dict]:
    size = runtime_cfg.tmpfs_size
    ro = [] if privileged else ["ro"]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", f"size={size}"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        # sysfs cannot be mounted from a user namespace that does not own the network namespace
        # (a user-namespaced pod on the host network): bind the host's /sys, read-only.
        {"destination": "/sys", "type": "bind", "source": "/sys",
         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]} if host_sysfs else
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", *ro]},
    ]
    if cgroup:
        mounts.append(
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", *ro],
            }
        )
    if shm_path:
        mounts.append(
            {"destination": "/dev/shm", "type": "bind", "source": shm_path, "options": ["rbind", "rprivate", "rw"]}
        )
    else:
        mounts.append(
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={size}"],
            }
        )
    return mounts


def _file_bind(dest: str, source: str, readonly: bool) -> dict:
    return {"destination": dest, "type": "bind", "source": source,
            "options": ["rbind", "rprivate", "ro" if readonly else "rw"]}


def _resources_with_devices(res: dict, device_rules: list[dict]) -> dict:
    out = dict(res)
    out["devices"] = device_rules
    return out


# --- sandbox ------------------------------------------------------------------------


def pod_resource_annotations(overhead: LinuxContainerResources | None,
                             resources: LinuxContainerResources | None) -> dict[str, str]:
    """The infra spec's sizing annotations from the pod-level ``resources``; both are checked.

    The pod's cgroup is the kubelet's (it writes the pod limits, overhead included, on the
    cgroup parent before RunPodSandbox and before UpdatePodSandboxResources): like containerd,
    moorage only records these and passes ``resources`` on, and the infra keeps its own small
    ``sandbox_cpu_shares``.
    """
    linux_resources(overhead)  # INVALID_ARGUMENT on a negative value, as for a container
    linux_resources(resources)
    if resources is None:
        return {}
    return {ANN_SANDBOX_CPU_PERIOD: str(resources.cpu_period), ANN_SANDBOX_CPU_QUOTA: str(resources.cpu_quota),
            ANN_SANDBOX_CPU_SHARES: str(resources.cpu_shares), ANN_SANDBOX_MEMORY: str(resources.memory_limit_in_bytes)}


def sandbox_sysctls(cfg: PodSandboxConfig, runtime_cfg: RuntimeSpecConfig = RuntimeSpecConfig()) -> dict[str, str]:
    """The pod's sysctls: the runtime defaults that apply to it, then the pod's own (validated)."""
    sc = (cfg.linux.security_context if cfg.linux else None) or LinuxSandboxSecurityContext()
    nso = sc.namespace_options or NamespaceOption()
    host_network = _ns_mode(nso.network, "network") == "NODE"
    host_ipc = _ns_mode(nso.ipc, "ipc") == "NODE"
    sysctls: dict[str, str] = {}
    for k, v in runtime_cfg.default_sysctls.items():
        name = normalize_sysctl_name(k)
        ns = _sysctl_namespace(name)
        if (ns == "network" and host_network) or (ns == "ipc" and host_ipc) or ns is None:
            continue
        sysctls[name] = v
    sysctls.update(validate_sysctls(cfg.linux.sysctls if cfg.linux else {}, host_network=host_network,
                                    host_ipc=host_ipc))
    return sysctls


def split_sysctls(sysctls: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(network, ipc) sysctls: which pinned namespace each is written in."""
    net = {k: v for k, v in sysctls.items() if _sysctl_namespace(k) == "network"}
    ipc = {k: v for k, v in sysctls.items() if _sysctl_namespace(k) == "ipc"}
    return net, ipc


def sandbox_needs_infra(cfg: PodSandboxConfig, multiple: int = USERNS_LENGTH_MULTIPLE) -> bool:
    """Whether a pod needs an infra process even when infra processes are dropped: a shared PID
    namespace needs a PID 1, and a pod user namespace is made (and its network namespace owned)
    by the infra."""
    sc = cfg.linux.security_context if cfg.linux else None
    nso = sc.namespace_options if sc else None
    if nso is not None and _ns_mode(nso.pid, "pid") == "POD":
        return True
    return sandbox_userns(cfg, multiple) is not None


def build_sandbox_spec(
    cfg: PodSandboxConfig,
    *,
    sandbox_id: str,
    rootfs: str,
    infra_binary_path: str,
    netns_path: str | None,
    cgroups_path: str,
    runtime_cfg: RuntimeSpecConfig = RuntimeSpecConfig(),
    shm_path: str | None = None,
    resolv_conf_path: str | None = None,
    hosts_path: str | None = None,
    hostname_path: str | None = None,
    host: HostLookups = HostLookups(),
) -> dict:
    """The spec of a pod's infra process: ``catatonit -P`` in an empty read-only rootfs.

    Namespace modes come from ``cfg.linux.security_context.namespace_options``:
    network NODE = host network (no network or UTS namespace, ``netns_path``
    must be None); POD = join ``netns_path`` (a pinned namespace from the CNI
    layer) or, when it is None, a fresh one.  IPC and PID get a new namespace
    unless NODE.
    """
    if not sandbox_id:
        raise InvalidArgument("sandbox id is empty")
    linux = cfg.linux
    sc = (linux.security_context if linux else None) or LinuxSandboxSecurityContext()
    nso = sc.namespace_options or NamespaceOption()
    net_mode = _ns_mode(nso.network, "network")
    pid_mode = _ns_mode(nso.pid, "pid")
    ipc_mode = _ns_mode(nso.ipc, "ipc")
    for mode, what in ((net_mode, "network"), (ipc_mode, "ipc"), (pid_mode, "pid")):
        if mode == "TARGET":
            raise InvalidArgument(f"a pod sandbox cannot use {what} namespace mode TARGET")
    host_network = net_mode == "NODE"
    host_ipc = ipc_mode == "NODE"
    host_pid = pid_mode == "NODE"
    if host_network and netns_path:
        raise InvalidArgument("the pod uses the host network but a network namespace path was given")
    privileged = sc.privileged

    # Namespaces.
    namespaces: list[dict] = [{"type": "mount"}]
    if not host_network:
        namespaces.append({"type": "network", "path": netns_path} if netns_path else {"type": "network"})
        namespaces.append({"type": "uts"})
    if not host_ipc:
        namespaces.append({"type": "ipc"})
    if not host_pid:
        namespaces.append({"type": "pid"})
    if runtime_cfg.cgroupns:
        namespaces.append({"type": "cgroup"})
    userns = pod_userns(nso, runtime_cfg.userns_length_multiple)
    uid_maps: list[dict] = []
    gid_maps: list[dict] = []
    if userns is not None:
        namespaces.append({"type": "user"})
        uid_maps, gid_maps = _id_mappings([userns.uid]), _id_mappings([userns.gid])

    sysctls = sandbox_sysctls(cfg, runtime_cfg)

    # Mounts.  With host IPC the pod shares the node's /dev/shm unless told otherwise.
    if host_ipc and not shm_path:
        shm_path = HOST_DEV_SHM
    mounts = _base_mounts(runtime_cfg, privileged=privileged, shm_path=shm_path, cgroup=False,
                          host_sysfs=userns is not None and host_network)
    mounts.append(_file_bind(INFRA_PATH_IN_CONTAINER, infra_binary_path, True))
    for dest, src in (("/etc/resolv.conf", resolv_conf_path), ("/etc/hosts", hosts_path),
                      ("/etc/hostname", hostname_path)):
        if src:
            mounts.append(_file_bind(dest, src, True))

    # Process.
    caps = list(ALL_CAPABILITIES) if privileged else []
    if privileged and (have := host.current_capabilities()) is not None:
        caps = [c for c in caps if c in have]
    uid = sc.run_as_user if sc.run_as_user is not None else 0
    gid = sc.run_as_group if sc.run_as_group is not None else 0
    process: dict = {
        "terminal": False,
        "user": _user_obj(uid, gid, [gid, *sc.supplemental_groups]),
        "args": [INFRA_PATH_IN_CONTAINER, "-P"],
        "env": [f"PATH={DEFAULT_PATH}"],
        "cwd": "/",
        "capabilities": _caps_object(caps, []),
        "noNewPrivileges": True,
        "oomScoreAdj": SANDBOX_OOM_SCORE_ADJ,
    }
    if runtime_cfg.rlimits:
        process["rlimits"] = _rlimits(runtime_cfg)
    apparmor = _apparmor_for(sc.apparmor, privileged=privileged, runtime_cfg=runtime_cfg)
    if apparmor:
        process["apparmorProfile"] = apparmor
    label, mount_label = _selinux_label(sc.selinux_options, runtime_cfg)
    if label:
        process["selinuxLabel"] = label

    resources: dict = {"devices": [{"allow": False, "access": "rwm"}]}
    if runtime_cfg.sandbox_cpu_shares:
        resources["cpu"] = {"shares": runtime_cfg.sandbox_cpu_shares}

    linux_obj: dict = {
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": cgroups_path,
    }
    if uid_maps:
        linux_obj["uidMappings"], linux_obj["gidMappings"] = uid_maps, gid_maps
    if sysctls:
        linux_obj["sysctl"] = sysctls  # the OCI runtime-spec key is singular
    if not privileged:
        linux_obj["maskedPaths"] = list(runtime_cfg.masked_paths)
        linux_obj["readonlyPaths"] = list(runtime_cfg.readonly_paths)
    seccomp = _seccomp_for(sc.seccomp, privileged=privileged, caps=caps, runtime_cfg=runtime_cfg, host=host)
    if seccomp is not None:
        linux_obj["seccomp"] = seccomp
    if mount_label:
        linux_obj["mountLabel"] = mount_label

    md = cfg.metadata
    annotations = _filter_annotations(cfg.annotations, runtime_cfg.pod_annotations, only_allowed=True)
    annotations.update(pod_resource_annotations(linux.overhead if linux else None,
                                                linux.resources if linux else None))
    annotations.update(
        {
            ANN_CONTAINER_TYPE: "sandbox",
            ANN_SANDBOX_ID: sandbox_id,
            ANN_SANDBOX_NAME: md.name,
            ANN_SANDBOX_NAMESPACE: md.namespace,
            ANN_SANDBOX_UID: md.uid,
            ANN_SANDBOX_LOG_DIR: cfg.log_directory,
        }
    )

    spec: dict = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs, "readonly": True},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux_obj,
    }
    if not host_network and cfg.hostname:
        spec["hostname"] = cfg.hostname
    return spec


# --- container ----------------------------------------------------------------------


def container_args(cfg: ContainerConfig, image: ImageConfig) -> list[str]:
    """Kubernetes command/args against the image's Entrypoint/Cmd.

    command set → command + args (image Cmd ignored); only args → Entrypoint +
    args; neither → Entrypoint + Cmd.
    """
    if cfg.command:
        args = list(cfg.command) + list(cfg.args)
    elif cfg.args:
        args = list(image.entrypoint) + list(cfg.args)
    else:
        args = list(image.entrypoint) + list(image.cmd)
    if not args or not args[0]:
        raise InvalidArgument(
            "no command specified: the container sets no command and the image "
            f"{cfg.image or '(unknown)'} has no Entrypoint or Cmd"
        )
    return args


def container_env(
    cfg: ContainerConfig, image: ImageConfig, *, hostname: str = "", home: str | None = None
) -> list[str]:
    env = [f"PATH={DEFAULT_PATH}"]
    if hostname:
        env.append(f"HOSTNAME={hostname}")
    env = _merge_env(env, [e for e in image.env if e and not e.startswith("=")])
    cri: list[str] = []
    for k, v in cfg.envs:
        if not k or "=" in k or "\x00" in k or "\x00" in v:
            raise InvalidArgument(f"invalid environment variable name {k!r}")
        cri.append(f"{k}={v}")
    env = _merge_env(env, cri)
    if home and not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={home}")
    return env


def check_image_strings(image: ImageConfig, ref: str) -> None:
    """No NUL in what the image config hands the kernel (argv, env, cwd, user).

    Pulls refuse such configs (images/oci.py); this covers images recorded before that
    check, so they fail as INVALID_ARGUMENT naming the field, not inside runc.
    """
    fields: list[tuple[str, Iterable[str]]] = [
        ("Entrypoint", image.entrypoint), ("Cmd", image.cmd), ("Env", image.env),
        ("WorkingDir", [image.working_dir]), ("User", [image.user])]
    for name, values in fields:
        if any("\x00" in v for v in values):
            raise InvalidArgument(f"image {ref or '(unknown)'}: config.{name} contains a NUL character")


#: CRI ``Mount.mount_options`` a bind mount takes, each with the option it contradicts.  They are
#: per-mount flags runc and crun apply by remounting the bind (the recursive ``r*`` forms and
#: filesystem data options make no sense for a kubelet volume); anything else is refused.
BIND_MOUNT_OPTIONS: dict[str, str] = {
    "ro": "rw", "rw": "ro", "nosuid": "suid", "suid": "nosuid", "nodev": "dev", "dev": "nodev",
    "noexec": "exec", "exec": "noexec", "noatime": "atime", "atime": "noatime",
    "nodiratime": "diratime", "diratime": "nodiratime", "relatime": "norelatime", "norelatime": "relatime",
    "strictatime": "nostrictatime", "nostrictatime": "strictatime", "nosymfollow": "symfollow",
    "symfollow": "nosymfollow",
}


def _bind_mount_options(m: Mount, dest: str) -> tuple[bool, list[str]]:
    """(read-only, the extra OCI options) of a CRI mount's ``mount_options``, checked."""
    wanted = list(dict.fromkeys(o.strip() for o in m.mount_options))
    for o in wanted:
        if o not in BIND_MOUNT_OPTIONS:
            raise InvalidArgument(f"mount at {dest}: unknown mount option {o!r}; a bind mount takes "
                                  f"{', '.join(sorted(BIND_MOUNT_OPTIONS))}")
        if BIND_MOUNT_OPTIONS[o] in wanted:
            raise InvalidArgument(f"mount at {dest}: mount options {o!r} and {BIND_MOUNT_OPTIONS[o]!r} contradict")
    if "rw" in wanted and (m.readonly or m.recursive_read_only):
        raise InvalidArgument(f"mount at {dest}: mount option 'rw' contradicts readonly: true")
    return m.readonly or "ro" in wanted, [o for o in wanted if o not in ("ro", "rw")]


def _cri_mount(m: Mount, host: HostLookups) -> dict:
    dest = _clean_abs(m.container_path, "mount container path")
    if not m.host_path:
        if m.image is not None:
            raise InvalidArgument(
                f"image volume {m.image.image!r} at {dest} was not mounted before building the spec"
            )
        raise InvalidArgument(f"mount at {dest} has no host path")
    src = _clean_abs(m.host_path, f"host path of the mount at {dest}:")
    if not host.path_exists(src):
        # A missing source becomes an empty directory, as containerd and CRI-O do.
        try:
            host.ensure_dir(src)
        except OSError as e:
            raise FailedPrecondition(f"mount source {src} (for {dest}) does not exist on this node and "
                                     f"could not be created: {e.strerror or e}") from None
    if m.propagation not in PROPAGATIONS:
        raise InvalidArgument(f"unknown mount propagation {m.propagation!r} for {dest}; expected one of {PROPAGATIONS}")
    if m.recursive_read_only:
        if not m.readonly:
            raise InvalidArgument(f"recursive read-only mount at {dest} must also be read-only")
        if m.propagation != "private":
            raise InvalidArgument(f"recursive read-only mount at {dest} needs private propagation")
    if m.selinux_relabel and host.selinux_active():
        # Where SELinux is off, relabeling is a no-op (as in containerd, whose relabel does nothing
        # then); where it is on, a volume left unlabeled would be denied inside: say so now.
        raise FailedPrecondition(f"mount at {dest} asks for an SELinux relabel of {src}, but moorage does not "
                                 "relabel mount sources; label it container_file_t beforehand")
    readonly, extra = _bind_mount_options(m, dest)
    options = ["rbind", "r" + m.propagation if m.propagation == "private" else m.propagation]
    if m.recursive_read_only:
        options.append("rro")
    else:
        options.append("ro" if readonly else "rw")
    options.extend(extra)
    out: dict = {"destination": dest, "type": "bind", "source": src, "options": options}
    if m.uid_mappings or m.gid_mappings:
        out["uidMappings"] = _id_mappings(m.uid_mappings)
        out["gidMappings"] = _id_mappings(m.gid_mappings)
    return out


def _depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def build_container_spec(
    cfg: ContainerConfig,
    image: ImageConfig,
    *,
    container_id: str,
    sandbox_id: str,
    sandbox_cfg: PodSandboxConfig,
    rootfs: str,
    sandbox_pid: int | None,
    netns_path: str | None,
    uid: int,
    gid: int,
    additional_gids: Sequence[int] = (),
    cgroups_path: str,
    runtime_cfg: RuntimeSpecConfig = RuntimeSpecConfig(),
    hostname_path: str | None = None,
    hosts_path: str | None = None,
    resolv_conf_path: str | None = None,
    shm_path: str | None = None,
    target_pid: int | None = None,
    home: str | None = None,
    hostname: str | None = None,
    host: HostLookups = HostLookups(),
    cdi: Injection | None = None,
    adjust: ContainerAdjustment | None = None,
    sandbox_ns_paths: Mapping[str, str] | None = None,
) -> dict:
    """The spec of an application container in a running sandbox.

    ``sandbox_pid`` is the infra process (host pid); the container joins its
    namespaces as ``/proc/<pid>/ns/<type>`` - except the network namespace,
    which is ``netns_path`` when given.  A pod without an infra process passes
    ``sandbox_ns_paths`` (its pinned ``ipc``/``uts`` namespaces; ``{}`` for none):
    the container joins those by path, and the host's where the pod shares the
    host's (``NODE``), as it would through an infra process in them.  ``target_pid`` is the process of the
    container named by ``NamespaceOption.target_id`` (pid mode TARGET).
    ``uid``/``gid``/``additional_gids``/``home`` come from ``users.resolve_user``.
    ``cdi`` is the container's resolved CDI request (runtime/cdi.py): its edits are applied
    on top of what the CRI config asks (its env wins, its device nodes and mounts are added).
    ``adjust`` is what NRI plugins asked (runtime/adjust.py), applied last, over everything.
    """
    if not container_id:
        raise InvalidArgument("container id is empty")
    lc = cfg.linux
    sc = (lc.security_context if lc else None) or LinuxContainerSecurityContext()
    res = lc.resources if lc else None
    sb_linux = sandbox_cfg.linux
    sb_sc = (sb_linux.security_context if sb_linux else None) or LinuxSandboxSecurityContext()
    privileged = sc.privileged
    if privileged and not sb_sc.privileged:
        raise InvalidArgument(
            "a privileged container needs a privileged pod sandbox; "
            "the sandbox was created without privileged: true"
        )

    # --- process -----------------------------------------------------------------
    check_image_strings(image, cfg.image)
    args = container_args(cfg, image)
    host_name = hostname if hostname is not None else sandbox_cfg.hostname
    env = container_env(cfg, image, hostname=host_name, home=home)
    edits = cdi.edits if cdi is not None else None
    if edits is not None:
        env = _merge_env(env, edits.env)
        if edits.net_devices:
            nd = edits.net_devices[0]
            raise FailedPrecondition(f"CDI {nd.origin} moves host network interface {nd.host_interface_name} into "
                                     "the container (netDevices); moorage does not support that: pods share the "
                                     "sandbox's network namespace, set up by CNI")
        for origin in edits.intel_rdt:
            _note_once(f"CDI {origin}: intelRdt edits are ignored (moorage does not manage resctrl classes)")
        additional_gids = [*additional_gids, *edits.additional_gids]
    cwd = cfg.working_dir or image.working_dir or "/"
    if not cwd.startswith("/"):
        raise InvalidArgument(f"working directory {cwd!r} must be an absolute path")

    caps, ambient = compute_capabilities(sc.capabilities, runtime_cfg.default_capabilities, privileged)
    all_added = sc.capabilities is not None and any(
        normalize_capability(c) == "CAP_ALL" for c in sc.capabilities.add_capabilities)
    if privileged or all_added:
        # "Everything" means everything this daemon holds, as containerd does: runc
        # cannot grant a capability its caller lacks.
        have = host.current_capabilities()
        if have is not None:
            caps = [c for c in caps if c in have]
    process: dict = {
        "terminal": bool(cfg.tty),
        "user": _user_obj(uid, gid, additional_gids),
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": _caps_object(caps, ambient),
        "noNewPrivileges": bool(sc.no_new_privs),
    }
    if res is not None:
        if not (-1000 <= res.oom_score_adj <= 1000):
            raise InvalidArgument(f"oom_score_adj {res.oom_score_adj} must be within -1000..1000")
        process["oomScoreAdj"] = res.oom_score_adj
    if runtime_cfg.rlimits:
        process["rlimits"] = _rlimits(runtime_cfg)
    apparmor = _apparmor_for(sc.apparmor, privileged=privileged, runtime_cfg=runtime_cfg)
    if apparmor:
        process["apparmorProfile"] = apparmor
    label, mount_label = _selinux_label(sc.selinux_options or sb_sc.selinux_options, runtime_cfg)
    if label and not privileged:
        process["selinuxLabel"] = label

    # --- namespaces ----------------------------------------------------------------
    nso = sc.namespace_options or NamespaceOption()
    net_mode = _ns_mode(nso.network, "network")
    pid_mode = _ns_mode(nso.pid, "pid")
    ipc_mode = _ns_mode(nso.ipc, "ipc")

    pod_nso = sb_sc.namespace_options or NamespaceOption()
    pod_host = {"net": pod_nso.network == "NODE", "uts": pod_nso.network == "NODE", "ipc": pod_nso.ipc == "NODE"}

    def sandbox_ns(kind: str) -> str | None:
        """The path to join for the pod's namespace of ``kind``; None: the host's (no entry)."""
        if sandbox_ns_paths is not None:
            if kind in sandbox_ns_paths:
                return sandbox_ns_paths[kind]
            if pod_host.get(kind):
                return None
        if sandbox_pid is None or sandbox_pid <= 0:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} has no running infra process to share its {kind} namespace with; "
                "is the pod sandbox ready?"
            )
        return f"/proc/{sandbox_pid}/ns/{kind}"

    namespaces: list[dict] = [{"type": "mount"}]

    def join(oci_type: str, path: str | None) -> None:
        if path is not None:
            namespaces.append({"type": oci_type, "path": path})

    if net_mode == "POD":
        join("network", netns_path or sandbox_ns("net"))
        join("uts", sandbox_ns("uts"))
    elif net_mode == "NODE":
        pass  # host network and host UTS
    else:
        raise InvalidArgument(f"network namespace mode {net_mode} is not supported for containers; use POD or NODE")
    if ipc_mode == "POD":
        join("ipc", sandbox_ns("ipc"))
    elif ipc_mode == "CONTAINER":
        namespaces.append({"type": "ipc"})
    elif ipc_mode == "TARGET":
        raise InvalidArgument("ipc namespace mode TARGET is not supported; use POD, CONTAINER or NODE")
    if pid_mode == "POD":
        join("pid", sandbox_ns("pid"))
    elif pid_mode == "CONTAINER":
        namespaces.append({"type": "pid"})
    elif pid_mode == "TARGET":
        if not nso.target_id:
            raise InvalidArgument("pid namespace mode TARGET needs a target container id")
        if target_pid is None or target_pid <= 0:
            raise FailedPrecondition(
                f"target container {nso.target_id} is not running; cannot share its pid namespace"
            )
        namespaces.append({"type": "pid", "path": f"/proc/{target_pid}/ns/pid"})
    if runtime_cfg.cgroupns:
        namespaces.append({"type": "cgroup"})
    uid_maps: list[dict] = []
    gid_maps: list[dict] = []
    userns = container_userns(nso, sandbox_cfg, runtime_cfg.userns_length_multiple)
    if userns is not None:
        join("user", sandbox_ns("user"))
        uid_maps, gid_maps = _id_mappings([userns.uid]), _id_mappings([userns.gid])

    # --- mounts ------------------------------------------------------------------------
    cri_mounts: list[dict] = []
    seen: set[str] = set()
    for m in cfg.mounts:
        cm = _cri_mount(m, host)
        if cm["destination"] in seen:
            raise InvalidArgument(f"duplicate mount point {cm['destination']}")
        seen.add(cm["destination"])
        cri_mounts.append(cm)
    for cdm in edits.mounts if edits is not None else ():
        cm = _cdi_mount(cdm, host)
        if cm["destination"] in seen:
            raise InvalidArgument(f"CDI {cdm.origin} mounts {cm['source']} at {cm['destination']}, where the "
                                  "container already has a mount")
        seen.add(cm["destination"])
        cri_mounts.append(cm)
    # Deeper mounts after shallower ones, so a parent never hides a child.
    cri_mounts.sort(key=lambda mm: _depth(mm["destination"]))

    if ipc_mode == "NODE" and not shm_path:
        shm_path = HOST_DEV_SHM
    defaults = _base_mounts(runtime_cfg, privileged=privileged, shm_path=shm_path,
                            host_sysfs=userns is not None and net_mode == "NODE")
    for dest, src in (("/etc/hostname", hostname_path), ("/etc/hosts", hosts_path),
                      ("/etc/resolv.conf", resolv_conf_path)):
        if src:
            defaults.append(_file_bind(dest, src, bool(sc.readonly_rootfs)))
    mounts = [d for d in defaults if d["destination"] not in seen] + cri_mounts

    rootfs_propagation = ""
    if any("rshared" in mm["options"] for mm in cri_mounts):
        rootfs_propagation = "rshared"
    elif any("rslave" in mm["options"] for mm in cri_mounts):
        rootfs_propagation = "rslave"

    # --- devices -------------------------------------------------------------------------
    devices: dict[str, dict] = {}
    device_rules: list[dict] = [{"allow": False, "access": "rwm"}]
    requested: dict[str, str] = {}  # container path -> host path, of the CRI-requested devices
    if privileged:
        device_rules = [{"allow": True, "access": "rwm"}]
        if not runtime_cfg.privileged_without_host_devices:
            for hd in host.devices_at("/dev") or []:
                if hd.type == "p" or hd.path in _PRIVILEGED_DEV_SKIP or hd.path.startswith(
                    tuple(p + "/" for p in _PRIVILEGED_DEV_SKIP)
                ):
                    continue
                devices[hd.path] = _device_obj(hd.path, hd)
    for d in cfg.devices:
        hp = _clean_abs(d.host_path, "device host path")
        cp = _clean_abs(d.container_path or d.host_path, "device container path")
        perms = d.permissions or "rwm"
        if not set(perms) <= set("rwm") or len(set(perms)) != len(perms):
            raise InvalidArgument(f"device {hp}: permissions {perms!r} must be a combination of r, w and m")
        found = host.devices_at(hp)
        if found is None:
            raise NotFound(f"device {hp} does not exist on this node")
        found = [hd for hd in found if hd.type in ("c", "b")]
        if not found:
            raise InvalidArgument(f"{hp} is not a device node (nor a directory of device nodes)")
        for hd in found:
            dest = cp if hd.path == hp else posixpath.join(cp, posixpath.relpath(hd.path, hp))
            devices[dest] = _device_obj(dest, hd)
            requested[dest] = hp
            if not privileged:
                device_rules.append(
                    {"allow": True, "type": hd.type, "major": hd.major, "minor": hd.minor, "access": perms}
                )
    for node in edits.device_nodes if edits is not None else ():
        dobj = _cdi_device(node, host)
        prev = devices.get(node.path)
        if node.path in requested and prev is not None and (prev["type"], prev["major"], prev["minor"]) != (
                dobj["type"], dobj["major"], dobj["minor"]):
            raise InvalidArgument(f"CDI {node.origin} puts device {dobj['major']}:{dobj['minor']} at {node.path}, "
                                  f"where the container's devices put {requested[node.path]} "
                                  f"({prev['major']}:{prev['minor']})")
        devices[node.path] = dobj  # over a privileged container's host node of the same path
        access = node.permissions or "rwm"
        if not privileged and dobj["type"] != "p" and access != "none":
            device_rules.append({"allow": True, "type": "c" if dobj["type"] == "u" else dobj["type"],
                                 "major": dobj["major"], "minor": dobj["minor"], "access": access})

    # --- linux -------------------------------------------------------------------------
    hugepages = bool(res is not None and res.hugepage_limits) and use_hugepage_limits(runtime_cfg, host, cgroups_path)
    linux_obj: dict = {
        "namespaces": namespaces,
        "resources": _resources_with_devices(linux_resources(res, hugepages=hugepages), device_rules),
        "cgroupsPath": cgroups_path,
    }
    if devices:
        linux_obj["devices"] = sorted(devices.values(), key=lambda dd: dd["path"])
    if uid_maps:
        linux_obj["uidMappings"], linux_obj["gidMappings"] = uid_maps, gid_maps
    if not privileged:
        masked = sc.masked_paths if sc.masked_paths is not None else runtime_cfg.masked_paths
        readonly = sc.readonly_paths if sc.readonly_paths is not None else runtime_cfg.readonly_paths
        linux_obj["maskedPaths"] = [_clean_abs(p, "masked path") for p in masked]
        linux_obj["readonlyPaths"] = [_clean_abs(p, "read-only path") for p in readonly]
    seccomp = _seccomp_for(sc.seccomp, privileged=privileged, caps=caps, runtime_cfg=runtime_cfg, host=host)
    if seccomp is not None:
        linux_obj["seccomp"] = seccomp
    if rootfs_propagation:
        linux_obj["rootfsPropagation"] = rootfs_propagation
    if mount_label and not privileged:
        linux_obj["mountLabel"] = mount_label

    # --- annotations -------------------------------------------------------------------
    md = sandbox_cfg.metadata
    annotations = _filter_annotations(sandbox_cfg.annotations, runtime_cfg.pod_annotations, only_allowed=True)
    annotations.update(_filter_annotations(cfg.annotations, runtime_cfg.allowed_annotations))
    annotations.update(
        {
            ANN_CONTAINER_TYPE: "container",
            ANN_SANDBOX_ID: sandbox_id,
            ANN_SANDBOX_NAME: md.name,
            ANN_SANDBOX_NAMESPACE: md.namespace,
            ANN_SANDBOX_UID: md.uid,
            ANN_CONTAINER_NAME: cfg.metadata.name,
            ANN_IMAGE_NAME: cfg.image,
        }
    )

    out = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs, "readonly": bool(sc.readonly_rootfs)},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux_obj,
    }
    if edits is not None and edits.hooks:
        hooks: dict[str, list[dict]] = {}
        for h in edits.hooks:
            hook: dict = {"path": h.path}
            if h.args:
                hook["args"] = list(h.args)
            if h.env:
                hook["env"] = list(h.env)
            if h.timeout is not None:
                hook["timeout"] = h.timeout
            hooks.setdefault(h.hook_name, []).append(hook)
        out["hooks"] = hooks
    if adjust is not None:
        apply_adjustment(out, adjust)
    return out


def _deep_merge(base: dict, over: Mapping[str, Any]) -> dict:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def apply_adjustment(out: dict, adj: ContainerAdjustment) -> None:
    """Apply an NRI adjustment to a built container spec, in place: removals first, then
    additions, each replacing what has the same key (env name, mount destination, device path,
    rlimit type)."""
    ann = out.setdefault("annotations", {})
    for k in adj.remove_annotations:
        ann.pop(k, None)
    ann.update(adj.annotations)
    proc = out["process"]
    if adj.args is not None:
        if not adj.args:
            raise InvalidArgument("NRI adjustment: args must not be empty")
        proc["args"] = list(adj.args)
    if adj.remove_env or adj.env:
        gone = set(adj.remove_env) | {k for k, _ in adj.env}
        proc["env"] = [e for e in proc.get("env", []) if e.split("=", 1)[0] not in gone]
        proc["env"] += [f"{k}={v}" for k, v in adj.env]
    if adj.rlimits:
        kinds = {r.type for r in adj.rlimits}
        proc["rlimits"] = [r for r in proc.get("rlimits", []) if r["type"] not in kinds]
        proc["rlimits"] += [{"type": r.type, "hard": r.hard, "soft": r.soft} for r in adj.rlimits]
    if adj.oom_score_adj is not None:
        proc["oomScoreAdj"] = adj.oom_score_adj
    if adj.remove_mounts or adj.mounts:
        gone = {_clean_abs(d, "NRI mount destination") for d in (*adj.remove_mounts, *(m.destination for m in adj.mounts))}
        out["mounts"] = [m for m in out.get("mounts", []) if m["destination"] not in gone]
        for m in adj.mounts:
            mobj: dict = {"destination": _clean_abs(m.destination, "NRI mount destination"), "type": m.type or "bind",
                          "source": m.source}
            if m.options:
                mobj["options"] = list(m.options)
            out["mounts"].append(mobj)
        out["mounts"].sort(key=lambda mm: _depth(mm["destination"]))
    for name, hooks in adj.hooks.items():
        lst = out.setdefault("hooks", {}).setdefault(name, [])
        for h in hooks:
            hobj: dict = {"path": _clean_abs(h.path, "NRI hook path")}
            if h.args:
                hobj["args"] = list(h.args)
            if h.env:
                hobj["env"] = list(h.env)
            if h.timeout is not None:
                hobj["timeout"] = h.timeout
            lst.append(hobj)
    linux = out.setdefault("linux", {})
    if adj.remove_devices or adj.devices:
        gone = set(adj.remove_devices) | {d.path for d in adj.devices}
        devs = [d for d in linux.get("devices", []) if d["path"] not in gone]
        rules = linux.setdefault("resources", {}).setdefault("devices", [])
        for d in adj.devices:
            dobj: dict = {"path": _clean_abs(d.path, "NRI device path"), "type": d.type, "major": d.major,
                          "minor": d.minor}
            for key, val in (("fileMode", d.file_mode), ("uid", d.uid), ("gid", d.gid)):
                if val is not None:
                    dobj[key] = val
            devs.append(dobj)
            if d.type in ("c", "b"):
                rules.append({"allow": True, "type": d.type, "major": d.major, "minor": d.minor, "access": "rwm"})
        linux["devices"] = sorted(devs, key=lambda dd: dd["path"])
    if adj.resources:
        _deep_merge(linux.setdefault("resources", {}), adj.resources)
    if adj.cgroups_path is not None:
        linux["cgroupsPath"] = adj.cgroups_path
    if adj.sysctl:
        linux.setdefault("sysctl", {}).update(adj.sysctl)
    _apply_adjustment_kinds(out, proc, linux, adj)


def _apply_adjustment_kinds(out: dict, proc: dict, linux: dict, adj: ContainerAdjustment) -> None:
    """The OCI fields NRI sets as containerd's adaptation does: namespaces replace those of their
    type, seccomp/scheduler/ioPriority/memoryPolicy replace the whole object, intelRdt merges per
    key, netDevices per host interface.  (CDI devices are resolved by the caller into ``cdi``.)"""
    if adj.remove_namespaces or adj.namespaces:
        gone = set(adj.remove_namespaces) | {t for t, _ in adj.namespaces}
        nss = [n for n in linux.get("namespaces", []) if n["type"] not in gone]
        for t, path in adj.namespaces:
            nss.append({"type": t, "path": _clean_abs(path, f"NRI {t} namespace path")} if path else {"type": t})
        linux["namespaces"] = nss
    if adj.seccomp is not None:
        linux["seccomp"] = copy.deepcopy(dict(adj.seccomp))
    if adj.scheduler is not None:
        proc["scheduler"] = copy.deepcopy(dict(adj.scheduler))
    if adj.io_priority is not None:
        proc["ioPriority"] = dict(adj.io_priority)
    if adj.memory_policy is not None:
        linux["memoryPolicy"] = copy.deepcopy(dict(adj.memory_policy))
    if adj.remove_intel_rdt:
        linux.pop("intelRdt", None)
    if adj.intel_rdt:
        _deep_merge(linux.setdefault("intelRdt", {}), adj.intel_rdt)
    if adj.remove_net_devices or adj.net_devices:
        nd = {k: v for k, v in linux.get("netDevices", {}).items() if k not in adj.remove_net_devices}
        nd.update({host: {"name": name} for host, name in adj.net_devices.items()})
        if nd:
            linux["netDevices"] = nd
        else:
            linux.pop("netDevices", None)


def _cdi_device(n: CdiDeviceNode, host: HostLookups) -> dict:
    """A CDI device node as an OCI ``linux.devices`` entry; what the spec leaves out comes from
    the host node (type and numbers unless the spec gives both, mode and owner unless given)."""
    src = n.source
    hd: HostDevice | None = None
    complete = bool(n.type) and (n.major is not None or n.type == "p")
    found = host.devices_at(src)
    if found is not None:
        hd = next((d for d in found if d.path == src), None)
    if not complete:
        if found is None:
            raise FailedPrecondition(f"device node {src} of CDI {n.origin} does not exist on this node")
        if hd is None:
            raise InvalidArgument(f"{src} (device node of CDI {n.origin}) is not a device node")
        if n.type and n.type != hd.type and not (n.type == "u" and hd.type == "c"):
            raise InvalidArgument(f"device node {src} of CDI {n.origin}: the spec says type {n.type!r}, "
                                  f"the node is {hd.type!r}")
    typ = n.type or (hd.type if hd else "c")
    major = n.major if n.major is not None else (hd.major if hd else 0)
    minor = n.minor if n.minor is not None else (hd.minor if hd else 0)
    return {
        "path": n.path,
        "type": typ,
        "major": major,
        "minor": minor,
        # Unset: the host node's, else what runc and crun default to.
        "fileMode": n.file_mode if n.file_mode is not None else (hd.file_mode if hd else 0o666),
        "uid": n.uid if n.uid is not None else (hd.uid if hd else 0),
        "gid": n.gid if n.gid is not None else (hd.gid if hd else 0),
    }


def _cdi_mount(m: CdiMount, host: HostLookups) -> dict:
    """A CDI mount as an OCI mount: a bind unless the spec names another type; a bind's source
    must exist now (the CDI spec: resources need to exist when the container is created)."""
    dest = _clean_abs(m.container_path, f"container path of the mount of CDI {m.origin}:")
    options = list(m.options)
    typ = m.type or "bind"
    if typ == "bind" or "bind" in options or "rbind" in options:
        src = _clean_abs(m.host_path, f"host path of the mount of CDI {m.origin} at {dest}:")
        if not host.path_exists(src):
            raise FailedPrecondition(f"mount source {src} of CDI {m.origin} (for {dest}) does not exist on this node")
        if "bind" not in options and "rbind" not in options:
            options.insert(0, "rbind")
    return {"destination": dest, "type": typ, "source": m.host_path, "options": options}


def _device_obj(path: str, hd: HostDevice) -> dict:
    return {
        "path": path,
        "type": hd.type,
        "major": hd.major,
        "minor": hd.minor,
        "fileMode": hd.file_mode,
        "uid": hd.uid,
        "gid": hd.gid,
    }
