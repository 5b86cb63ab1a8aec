"""Syntax checks of every CRI request field, before any side effect.

The servicers call these right after ``convert`` builds the domain model, so a
hostile or broken request is refused with INVALID_ARGUMENT and a message that
names the field (as the CRI spells it: ``config.linux.sysctls["kernel.x"]``)
before a directory, mount, netns or process exists.  The runtime keeps its own
checks of meaning and state (a pod that is not ready, an image that is not
there); the rules the domain owns (sysctl namespaces, uid ranges, id mappings,
cgroup names) are the runtime's functions, called from here, so there is one
rule and it runs first.

Every echo of the input goes through ``clip``: it is bounded and escaped, so a
message never carries a newline, a NUL or a 200 KB argv.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from moorage.core.errors import InvalidArgument, MoorageError, clip
from moorage.runtime import model, podfiles, spec

MAX_NAME = 253  # a DNS subdomain, the longest name the kubelet gives a pod or container
MAX_HOSTNAME = 64  # HOST_NAME_MAX: what sethostname(2) takes
MAX_PATH = 4096  # PATH_MAX
MAX_COMPONENT = 255  # NAME_MAX
MAX_ID = 128  # ids are 64 hex digits; a prefix is shorter
MAX_DNS_ITEMS = 32  # the kubelet sends at most 3 servers, 32 searches
MAX_DNS_ITEM = 253
MAX_KEY = 4096  # a label/annotation key, a SELinux or AppArmor word, a handler or image name
MAX_ID_VALUE = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to the kernel, so it is no id
# runc lets a container bind over these files of /proc only (lxcfs and the like); nothing
# else under /proc, and never /proc itself.
PROC_MOUNT_ALLOWED = frozenset((
    "/proc/cpuinfo", "/proc/diskstats", "/proc/meminfo", "/proc/stat", "/proc/swaps", "/proc/uptime",
    "/proc/loadavg", "/proc/slabinfo", "/proc/net/dev", "/proc/sys/kernel/ns_last_pid",
))

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_ID = re.compile(r"[A-Za-z0-9_.-]+")
_HANDLER = re.compile(r"[A-Za-z0-9_.-]+")
_CPUSET = re.compile(r"(\d+(-\d+)?)(,\d+(-\d+)?)*")
_PAGE_SIZE = re.compile(r"\d+[KMGT]?i?B?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PROTOCOLS = ("TCP", "UDP", "SCTP")


def bad(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {problem}")


# -- primitives -------------------------------------------------------------------------------


def no_nul(value: str, field: str) -> None:
    if "\x00" in value:
        raise bad(field, f"contains a NUL byte: {clip(value)}")


def printable(value: str, field: str, limit: int) -> None:
    """A word that reaches a file, an argv or a log line: bounded, no control characters."""
    if len(value) > limit:
        raise bad(field, f"is {len(value)} characters long, more than {limit}: {clip(value)}")
    if _CONTROL.search(value):
        raise bad(field, f"contains a control character (newline, NUL, ...): {clip(value)}")


def object_id(value: str, field: str) -> None:
    """A sandbox or container id (or a unique prefix of one); empty is left to the look-up (NOT_FOUND)."""
    if value and (len(value) > MAX_ID or not _ID.fullmatch(value)):
        raise bad(field, f"is not an id (letters, digits, '_', '.', '-'; at most {MAX_ID}): {clip(value)}")


def name(value: str, field: str, *, required: bool = True) -> None:
    if required and not value:
        raise bad(field, "is empty")
    printable(value, field, MAX_NAME)
    if "/" in value:
        raise bad(field, f"contains '/': {clip(value)}")


def hostname(value: str, field: str) -> None:
    """RFC 1123: dot-separated labels of letters, digits and '-', at most 64 bytes (the kernel's limit)."""
    if not value:
        return
    if len(value.encode()) > MAX_HOSTNAME:
        raise bad(field, f"is {len(value.encode())} bytes long, more than {MAX_HOSTNAME}: {clip(value)}")
    if not _HOSTNAME.fullmatch(value):
        raise bad(field, f"is not an RFC 1123 host name (labels of letters, digits and '-', "
                         f"separated by '.'): {clip(value)}")


def abs_path(value: str, field: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise bad(field, "is empty; an absolute path is needed")
        return
    no_nul(value, field)
    if not value.startswith("/"):
        raise bad(field, f"must be an absolute path: {clip(value)}")
    path_length(value, field)


def path_length(value: str, field: str) -> None:
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise bad(field, f"is longer than {MAX_PATH} bytes: {clip(value)}")
    long = next((c for c in value.split("/") if len(c.encode("utf-8", "surrogatepass")) > MAX_COMPONENT), None)
    if long is not None:
        raise bad(field, f"has a component longer than {MAX_COMPONENT} bytes: {clip(long)}")


def host_id(value: int | None, field: str) -> None:
    if value is not None and not 0 <= value <= MAX_ID_VALUE:
        raise bad(field, f"{value} is out of range (0..{MAX_ID_VALUE})")


def host_ids(values: Iterable[int], field: str) -> None:
    for i, v in enumerate(values):
        host_id(v, f"{field}[{i}]")


def strings(values: Sequence[str], field: str) -> None:
    """argv-like lists: each item goes to execve, which ends a string at NUL."""
    for i, v in enumerate(values):
        no_nul(v, f"{field}[{i}]")


def mapping_keys(values: Mapping[str, str], field: str) -> None:
    for k in values:
        if not k:
            raise bad(field, "has an empty key")
        no_nul(k, f"{field} key")
        if len(k) > MAX_KEY:
            raise bad(field, f"has a key longer than {MAX_KEY} characters: {clip(k)}")


def _domain(fn: Callable[..., object], field: str, *args: object, **kw: object) -> None:
    """Run one of the runtime's own checks; its message gets the field's name in front."""
    try:
        fn(*args, **kw)
    except MoorageError as e:
        raise type(e)(f"{field}: {e.message}") from None


# -- pieces of configs ------------------------------------------------------------------------


def dns_config(dns: model.DNSConfig | None, field: str) -> None:
    if dns is None:
        return
    for what, items in (("servers", dns.servers), ("searches", dns.searches), ("options", dns.options)):
        if len(items) > MAX_DNS_ITEMS:
            raise bad(f"{field}.{what}", f"has {len(items)} entries, more than {MAX_DNS_ITEMS}")
        for i, v in enumerate(items):
            f = f"{field}.{what}[{i}]"
            if not v or len(v) > MAX_DNS_ITEM or any(c.isspace() for c in v) or _CONTROL.search(v):
                raise bad(f, f"must be one word of at most {MAX_DNS_ITEM} characters, "
                             f"without spaces or control characters: {clip(v)}")
    for i, s in enumerate(dns.servers):
        ip(s, f"{field}.servers[{i}]")


def ip(value: str, field: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise bad(field, f"is not an IP address: {clip(value)}") from None


def pod_cidr(value: str, field: str) -> None:
    """The kubelet's pod CIDR: one network, or a comma-separated pair for dual stack."""
    if not value:
        return
    printable(value, field, MAX_DNS_ITEM)
    for part in value.split(","):
        try:
            ipaddress.ip_network(part.strip(), strict=False)
        except ValueError:
            raise bad(field, f"{clip(part)} is not a CIDR such as 10.244.0.0/24") from None


def port_mappings(ports: Sequence[model.PortMapping], field: str) -> None:
    for i, p in enumerate(ports):
        f = f"{field}[{i}]"
        if p.protocol not in PROTOCOLS:
            raise bad(f"{f}.protocol", f"unknown protocol {clip(p.protocol)}; expected one of {PROTOCOLS}")
        if not 0 <= p.container_port <= 65535:
            raise bad(f"{f}.container_port", f"{p.container_port} is not a port (0..65535)")
        if not 0 <= p.host_port <= 65535:
            raise bad(f"{f}.host_port", f"{p.host_port} is not a port (0..65535)")
        if p.host_ip:
            ip(p.host_ip, f"{f}.host_ip")


def selinux(opts: model.SELinuxOption | None, field: str) -> None:
    if opts is not None:
        for what in ("user", "role", "type", "level"):
            printable(getattr(opts, what), f"{field}.{what}", MAX_KEY)


def profile(p: model.SecurityProfile | None, field: str) -> None:
    if p is None:
        return
    if p.profile_type not in model.PROFILE_TYPES:
        raise bad(f"{field}.profile_type", f"unknown profile type {clip(p.profile_type)}")
    no_nul(p.localhost_ref, f"{field}.localhost_ref")
    printable(p.localhost_ref, f"{field}.localhost_ref", MAX_PATH)


def namespace_options(nso: model.NamespaceOption | None, field: str) -> None:
    if nso is None:
        return
    for what in ("network", "pid", "ipc"):
        mode = getattr(nso, what)
        if mode not in model.NAMESPACE_MODES:
            raise bad(f"{field}.{what}", f"unknown namespace mode {clip(mode)}")
    object_id(nso.target_id, f"{field}.target_id")
    u = nso.userns_options
    if u is not None:
        if u.mode not in model.NAMESPACE_MODES:
            raise bad(f"{field}.userns_options.mode", f"unknown namespace mode {clip(u.mode)}")
        for what, maps in (("uids", u.uids), ("gids", u.gids)):
            for i, m in enumerate(maps):
                for part in ("host_id", "container_id"):
                    host_id(getattr(m, part), f"{field}.userns_options.{what}[{i}].{part}")


def resources(res: model.LinuxContainerResources | None, field: str) -> None:
    if res is None:
        return
    if not -1000 <= res.oom_score_adj <= 1000:
        raise bad(f"{field}.oom_score_adj", f"{res.oom_score_adj} is out of range (-1000..1000)")
    for what in ("cpuset_cpus", "cpuset_mems"):
        v = getattr(res, what)
        if v and (len(v) > MAX_KEY or not _CPUSET.fullmatch(v)):
            raise bad(f"{field}.{what}", f"is not a cpu/node list such as \"0-3,7\": {clip(v)}")
    for i, h in enumerate(res.hugepage_limits):
        if h.page_size and not _PAGE_SIZE.fullmatch(h.page_size):
            raise bad(f"{field}.hugepage_limits[{i}].page_size", f"is not a page size such as \"2MB\": "
                                                                 f"{clip(h.page_size)}")
    for k, v in res.unified.items():
        if not k or "/" in k or k.startswith(".") or _CONTROL.search(k) or len(k) > MAX_COMPONENT:
            raise bad(f"{field}.unified", f"key {clip(k)} is not a cgroup v2 file name")
        if "\x00" in v or len(v) > MAX_KEY:
            raise bad(f"{field}.unified[{clip(k)}]", f"is not a cgroup file value: {clip(v)}")
    # the runtime's own range checks (negative sizes, swap below memory, ...), with the field's name
    _domain(spec.linux_resources, field, res)


# -- requests -----------------------------------------------------------------------------------


def runtime_handler(value: str, field: str = "runtime_handler") -> None:
    if value and (len(value) > MAX_NAME or not _HANDLER.fullmatch(value)):
        raise bad(field, f"is not a runtime handler name: {clip(value)}")


def sandbox_config(cfg: model.PodSandboxConfig, field: str = "config") -> None:
    """RunPodSandbox's config, whole."""
    md = cfg.metadata
    name(md.name, f"{field}.metadata.name")
    name(md.namespace, f"{field}.metadata.namespace", required=False)
    name(md.uid, f"{field}.metadata.uid", required=False)
    hostname(cfg.hostname, f"{field}.hostname")
    lx = cfg.linux
    nso = lx.security_context.namespace_options if lx and lx.security_context else None
    if not cfg.hostname and (nso is None or nso.network != "NODE"):
        # the pod's name becomes its /etc/hostname and /etc/hosts entry: one word
        _domain(podfiles.checked_hostname, f"{field}.metadata.name (the hostname, as config.hostname is empty)",
                md.name)
    abs_path(cfg.log_directory, f"{field}.log_directory", required=False)
    dns_config(cfg.dns_config, f"{field}.dns_config")
    port_mappings(cfg.port_mappings, f"{field}.port_mappings")
    mapping_keys(cfg.labels, f"{field}.labels")
    mapping_keys(cfg.annotations, f"{field}.annotations")
    if lx is None:
        return
    no_nul(lx.cgroup_parent, f"{field}.linux.cgroup_parent")
    printable(lx.cgroup_parent, f"{field}.linux.cgroup_parent", MAX_PATH)
    sc = lx.security_context
    host_network = host_ipc = False
    if sc is not None:
        f = f"{field}.linux.security_context"
        namespace_options(sc.namespace_options, f"{f}.namespace_options")
        nso = sc.namespace_options or model.NamespaceOption()
        host_network, host_ipc = nso.network == "NODE", nso.ipc == "NODE"
        selinux(sc.selinux_options, f"{f}.selinux_options")
        host_id(sc.run_as_user, f"{f}.run_as_user")
        host_id(sc.run_as_group, f"{f}.run_as_group")
        host_ids(sc.supplemental_groups, f"{f}.supplemental_groups")
        profile(sc.seccomp, f"{f}.seccomp")
        profile(sc.apparmor, f"{f}.apparmor")
    for k in lx.sysctls:
        _domain(spec.validate_sysctls, f"{field}.linux.sysctls[{clip(k, 64)}]", {k: lx.sysctls[k]},
                host_network=host_network, host_ipc=host_ipc)
    resources(lx.overhead, f"{field}.linux.overhead")
    resources(lx.resources, f"{field}.linux.resources")


def mount_destination(path: str, field: str) -> None:
    abs_path(path, field)
    clean = "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading '//'
    if ".." in path.split("/"):
        raise bad(field, f"must not contain '..': {clip(path)}")
    if clean == "/":
        raise bad(field, "is '/': a mount cannot replace the container's root")
    if (clean == "/proc" or clean.startswith("/proc/")) and clean not in PROC_MOUNT_ALLOWED:
        raise bad(field, f"{clip(path)} is /proc or under it; only "
                         f"{', '.join(sorted(PROC_MOUNT_ALLOWED))} may be mounted over (as runc allows)")


def container_config(cfg: model.ContainerConfig, field: str = "config") -> None:
    """CreateContainer's config, whole."""
    name(cfg.metadata.name, f"{field}.metadata.name")
    if not cfg.image:
        raise bad(f"{field}.image.image", "is empty")
    image_ref(cfg.image, f"{field}.image.image")
    printable(cfg.user_specified_image, f"{field}.image.user_specified_image", MAX_KEY)
    strings(cfg.command, f"{field}.command")
    strings(cfg.args, f"{field}.args")
    abs_path(cfg.working_dir, f"{field}.working_dir", required=False)
    for i, (k, v) in enumerate(cfg.envs):
        f = f"{field}.envs[{i}]"
        if not k:
            raise bad(f"{f}.key", "is empty")
        if "=" in k:
            raise bad(f"{f}.key", f"contains '=': {clip(k)}")
        no_nul(k, f"{f}.key")
        no_nul(v, f"{f}.value")
    for i, m in enumerate(cfg.mounts):
        f = f"{field}.mounts[{i}]"
        mount_destination(m.container_path, f"{f}.container_path")
        if m.image is None:
            abs_path(m.host_path, f"{f}.host_path")
        else:
            image_ref(m.image.image, f"{f}.image.image")
            no_nul(m.image_sub_path, f"{f}.image_sub_path")
            path_length(m.image_sub_path, f"{f}.image_sub_path")
        for j, o in enumerate(m.mount_options):
            printable(o, f"{f}.mount_options[{j}]", MAX_COMPONENT)
        for what in ("uid_mappings", "gid_mappings"):
            for j, idm in enumerate(getattr(m, what)):
                for part in ("host_id", "container_id"):
                    host_id(getattr(idm, part), f"{f}.{what}[{j}].{part}")
    for i, d in enumerate(cfg.devices):
        f = f"{field}.devices[{i}]"
        abs_path(d.container_path, f"{f}.container_path", required=False)  # empty: at host_path
        abs_path(d.host_path, f"{f}.host_path")
        if not set(d.permissions) <= set("rwm"):
            raise bad(f"{f}.permissions", f"must be letters of \"rwm\": {clip(d.permissions)}")
    mapping_keys(cfg.labels, f"{field}.labels")
    mapping_keys(cfg.annotations, f"{field}.annotations")
    log_path(cfg.log_path, f"{field}.log_path")
    for i, c in enumerate(cfg.cdi_devices):
        printable(c, f"{field}.CDI_devices[{i}].name", MAX_KEY)
    lx = cfg.linux
    if lx is None:
        return
    resources(lx.resources, f"{field}.linux.resources")
    sc = lx.security_context
    if sc is None:
        return
    f = f"{field}.linux.security_context"
    namespace_options(sc.namespace_options, f"{f}.namespace_options")
    selinux(sc.selinux_options, f"{f}.selinux_options")
    host_id(sc.run_as_user, f"{f}.run_as_user")
    host_id(sc.run_as_group, f"{f}.run_as_group")
    printable(sc.run_as_username, f"{f}.run_as_username", MAX_NAME)
    host_ids(sc.supplemental_groups, f"{f}.supplemental_groups")
    profile(sc.seccomp, f"{f}.seccomp")
    profile(sc.apparmor, f"{f}.apparmor")
    if sc.capabilities is not None:
        for what in ("add_capabilities", "drop_capabilities", "add_ambient_capabilities"):
            for i, c in enumerate(getattr(sc.capabilities, what)):
                printable(c, f"{f}.capabilities.{what}[{i}]", 64)
    for what in ("masked_paths", "readonly_paths"):
        for i, p in enumerate(getattr(sc, what) or ()):
            abs_path(p, f"{f}.{what}[{i}]")


def log_path(value: str, field: str) -> None:
    """Relative to the pod's log directory (a leading '/' is dropped, as containerd does);
    the runtime refuses a path that leaves it once normalised."""
    if not value:
        return
    no_nul(value, field)
    path_length(value, field)
    if _CONTROL.search(value):
        raise bad(field, f"contains a control character: {clip(value)}")


def image_ref(value: str, field: str) -> None:
    """An image reference or id, as far as its syntax is everyone's: the reference parser says the rest."""
    printable(value, field, MAX_KEY)
    if any(c.isspace() for c in value):
        raise bad(field, f"contains whitespace: {clip(value)}")


def command(cmd: Sequence[str], field: str = "cmd") -> None:
    """ExecSync/Exec: a non-empty argv without NULs."""
    if not cmd or not cmd[0]:
        raise bad(field, "is empty; a command to run is needed")
    strings(cmd, field)


def ports(values: Sequence[int], field: str = "port") -> None:
    for i, p in enumerate(values):
        if not 1 <= p <= 65535:
            raise bad(f"{field}[{i}]", f"{p} is not a port (1..65535)")
