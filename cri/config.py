"""Daemon configuration: TOML at /etc/moorage/config.toml and its config.d/*.toml drop-ins, every key optional.

The schema is the dataclass tree below; the defaults make a daemon that works
with no file at all.  ``load`` reports unknown keys and bad values by name,
with the file and the dotted key, so a typo is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moorage.core.errors import InvalidArgument
from moorage.images.reference import parse_reference
from moorage.runtime import features as featuresmod
from moorage.runtime import spec as specmod

DEFAULT_CONFIG_PATH = "/etc/moorage/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class HandlerConfig:
    """An OCI runtime handler (RuntimeClass handler name → binary)."""

    path: str = ""
    root: str = ""  # runtime state root; empty: <state_dir>/oci/<handler name>


@dataclass
class RuntimeConfig:
    default_handler: str = "runc"
    handlers: dict[str, HandlerConfig] = field(
        default_factory=lambda: {
            "runc": HandlerConfig(path="/usr/sbin/runc"),
            "crun": HandlerConfig(path="/usr/bin/crun"),
        }
    )
    conmon: str = "/usr/bin/conmon"
    infra_binary: str = "/usr/bin/catatonit"
    sandbox_image: str = ""  # optional; by default no pause image is needed
    cgroup_driver: str = "cgroupfs"  # cgroupfs | systemd
    default_cgroup_parent: str = "/moorage"
    seccomp_default: bool = False  # apply RuntimeDefault when a pod asks for nothing
    default_capabilities: list[str] = field(
        default_factory=lambda: [
            "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
            "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
        ]
    )
    exec_sync_max_output: int = 16 * 1024 * 1024
    default_sysctls: dict[str, str] = field(default_factory=dict)
    seccomp_arch: str = ""  # empty: this host's
    apparmor_default_profile: str = ""
    selinux_enabled: bool = False
    cgroup_namespace: str = "auto"  # auto | private | host
    masked_paths: list[str] = field(default_factory=lambda: list(specmod.DEFAULT_MASKED_PATHS))
    readonly_paths: list[str] = field(default_factory=lambda: list(specmod.DEFAULT_READONLY_PATHS))
    tmpfs_size: str = "65536k"
    sandbox_cpu_shares: int = 2
    privileged_without_host_devices: bool = False
    rlimits: dict[str, list[int]] = field(default_factory=dict)  # RLIMIT_NOFILE = [soft, hard]
    allowed_annotations: list[str] = field(default_factory=list)
    pod_annotations: list[str] = field(default_factory=list)
    disable_hugetlb_controller: bool = False
    tolerate_missing_hugetlb_controller: bool = True
    disabled_features: list[str] = field(default_factory=list)
    enable_cdi: bool = True
    cdi_spec_dirs: list[str] = field(default_factory=lambda: ["/etc/cdi", "/var/run/cdi"])
    userns_length_multiple: int = specmod.USERNS_LENGTH_MULTIPLE
    drop_infra: bool = True


@dataclass
class ImagesConfig:
    snapshotter: str = "overlayfs"  # overlayfs | native (copying fallback)
    registry_config_path: str = "/etc/moorage/certs.d"
    insecure_registries: list[str] = field(default_factory=list)
    max_concurrent_downloads: int = 3
    pull_retries: int = 3
    stall_timeout: float = 60.0  # seconds without progress before a download is cancelled
    gc_on_remove: bool = True
    # Where the kubelet looks for node-wide credentials (its --root-dir): one file serves both.
    auth_file: str = "/var/lib/kubelet/config.json"
    credential_helper_timeout: float = 10.0
    pinned_images: list[str] = field(default_factory=list)
    container_root: str = ""  # empty: containers' writable layers beside the image snapshots
    sync_snapshots: bool = True
    fs_usage_period: float = 10.0  # seconds between background measurements of writable layers


@dataclass
class CNIConfig:
    conf_dir: str = "/etc/cni/net.d"
    bin_dirs: list[str] = field(default_factory=lambda: ["/opt/cni/bin", "/usr/lib/cni"])
    cache_dir: str = ""  # empty: <state_dir>/cni
    plugin_timeout: float = 60.0
    network_name: str = ""  # empty: the first valid network in conf_dir
    conf_template: str = ""  # written for UpdateRuntimeConfig's pod CIDR when conf_dir is empty
    netns_dir: str = ""  # empty: <state_dir>/netns


@dataclass
class NRIConfig:
    enable: bool = True
    socket_path: str = "/var/run/nri/nri.sock"
    plugin_path: str = "/opt/nri/plugins"
    plugin_config_path: str = "/etc/nri/conf.d"
    plugin_registration_timeout: float = 5.0
    plugin_request_timeout: float = 2.0
    disable_connections: bool = False
    fail_on_plugin_loss: bool = False


@dataclass
class StreamingConfig:
    address: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    token_ttl: float = 60.0
    tls_cert: str = ""
    tls_key: str = ""


@dataclass
class MetricsConfig:
    enabled: bool = True
    address: str = "127.0.0.1:9464"


@dataclass
class LimitsConfig:
    grpc_max_recv_message_size: int = 16 * 1024 * 1024
    max_labels_annotations_bytes: int = 512 * 1024


@dataclass
class TracingConfig:
    enabled: bool = False
    endpoint: str = ""  # OTLP/HTTP endpoint; empty: OTEL_EXPORTER_OTLP_ENDPOINT or nothing
    sampling_ratio: float = 1.0
    service_name: str = "moorage"


@dataclass
class Config:
    socket: str = "/run/moorage/moorage.sock"
    socket_mode: str = "0660"
    root_dir: str = "/var/lib/moorage"
    state_dir: str = "/run/moorage"
    log_level: str = "info"
    log_format: str = "json"  # json | logfmt
    namespace: str = "k8s.io"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    cni: CNIConfig = field(default_factory=CNIConfig)
    nri: NRIConfig = field(default_factory=NRIConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def cni_cache_dir(self) -> str:
        return self.cni.cache_dir or f"{self.state_dir}/cni"

    @property
    def netns_dir(self) -> str:
        return self.cni.netns_dir or f"{self.state_dir}/netns"

    def handler(self, name: str) -> HandlerConfig:
        name = name or self.runtime.default_handler
        if name not in self.runtime.handlers:
            known = ", ".join(sorted(self.runtime.handlers))
            raise InvalidArgument(f"unknown runtime handler {name!r}; configured handlers: {known}")
        return self.runtime.handlers[name]


class ConfigError(InvalidArgument):
    """A bad config; ``key`` and ``detail`` let a merged load name the file that set the key."""

    def __init__(self, message: str, key: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.detail = detail


def _check(where: str, key: str, cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: key {key!r}: {msg}", key, msg)


def _convert(where: str, key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        _check(where, key, isinstance(value, dict), f"expected a table, got {type(value).__name__}")
        return _build(tp, value, where, key)
    if origin is dict:
        _check(where, key, isinstance(value, dict), f"expected a table, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {k: _convert(where, f"{key}.{k}", vt, v) for k, v in value.items()}
    if origin is list:
        _check(where, key, isinstance(value, list), f"expected a list, got {type(value).__name__}")
        (it,) = typing.get_args(tp)
        return [_convert(where, f"{key}[{i}]", it, v) for i, v in enumerate(value)]
    if tp is bool:
        _check(where, key, isinstance(value, bool), f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(where, key, isinstance(value, int) and not isinstance(value, bool), f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(
            where, key, isinstance(value, (int, float)) and not isinstance(value, bool), f"expected a number, got {value!r}"
        )
        return float(value)
    if tp is str:
        _check(where, key, isinstance(value, str), f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: key {key!r}: unsupported type {tp}", key)  # pragma: no cover


def _build(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"{where}: unknown key {key!r}", key, "unknown key")
        kwargs[k] = _convert(where, key, hints[k], v)
    return cls(**kwargs)


def validate(cfg: Config, where: str = "config") -> Config:
    """Checks that need more than a type."""
    _check(where, "log_level", cfg.log_level in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}")
    _check(where, "log_format", cfg.log_format in ("json", "logfmt"), "must be json or logfmt")
    try:
        mode = int(cfg.socket_mode, 8)
    except ValueError:
        mode = -1
    _check(where, "socket_mode", 0 <= mode <= 0o777, f"must be an octal file mode like \"0660\", got {cfg.socket_mode!r}")
    for k in ("socket", "root_dir", "state_dir"):
        _check(where, k, getattr(cfg, k).startswith("/"), "must be an absolute path")
    _check(where, "runtime.cgroup_driver", cfg.runtime.cgroup_driver in ("cgroupfs", "systemd"), "must be cgroupfs or systemd")
    _check(
        where,
        "runtime.default_handler",
        cfg.runtime.default_handler in cfg.runtime.handlers,
        f"names no handler in [runtime.handlers] ({', '.join(sorted(cfg.runtime.handlers))})",
    )
    for name, h in cfg.runtime.handlers.items():
        _check(where, f"runtime.handlers.{name}.path", bool(h.path), "must name the runtime binary")
    _validate_runtime(cfg.runtime, where)
    _check(where, "images.snapshotter", cfg.images.snapshotter in ("overlayfs", "native"), "must be overlayfs or native")
    _check(where, "images.max_concurrent_downloads", cfg.images.max_concurrent_downloads >= 1, "must be at least 1")
    _check(where, "images.stall_timeout", cfg.images.stall_timeout > 0, "must be positive")
    _validate_images(cfg, where)
    _check(where, "cni.plugin_timeout", cfg.cni.plugin_timeout > 0, "must be positive")
    for k in ("plugin_registration_timeout", "plugin_request_timeout"):
        _check(where, f"nri.{k}", getattr(cfg.nri, k) > 0, "must be positive")
    for k in ("socket_path", "plugin_path", "plugin_config_path"):
        _check(where, f"nri.{k}", getattr(cfg.nri, k).startswith("/"), "must be an absolute path")
    _check(where, "streaming.port", 0 <= cfg.streaming.port <= 65535, "must be a port number (0 for a free one)")
    _check(
        where, "streaming.tls_key", bool(cfg.streaming.tls_cert) == bool(cfg.streaming.tls_key), "tls_cert and tls_key go together"
    )
    host, _, port = cfg.metrics.address.rpartition(":")
    _check(where, "metrics.address", bool(host) and port.isdigit(), f"must be host:port, got {cfg.metrics.address!r}")
    _check(where, "limits.grpc_max_recv_message_size", 1024 * 1024 <= cfg.limits.grpc_max_recv_message_size <= 1 << 30,
           "must be between 1 MiB and 1 GiB")
    _check(where, "limits.max_labels_annotations_bytes",
           1024 <= cfg.limits.max_labels_annotations_bytes < cfg.limits.grpc_max_recv_message_size,
           "must be at least 1024 and below limits.grpc_max_recv_message_size")
    _check(where, "tracing.sampling_ratio", 0.0 <= cfg.tracing.sampling_ratio <= 1.0, "must be between 0 and 1")
    return cfg


RLIMIT_TYPES = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
                "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_RSS",
                "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK")
CGROUP_NAMESPACE_MODES = ("auto", "private", "host")
_TMPFS_SIZE = re.compile(r"^[1-9][0-9]*[kmg]?$")
_MACHINE = re.compile(r"^[a-z0-9_]+$")


def rlimit_type(name: str) -> str:
    """``NOFILE`` or ``RLIMIT_NOFILE`` → ``RLIMIT_NOFILE`` (the OCI spelling)."""
    n = name.strip().upper()
    return n if n.startswith("RLIMIT_") else "RLIMIT_" + n


def _validate_runtime(rt: RuntimeConfig, where: str) -> None:
    """The knobs that shape every OCI spec; a bad value would otherwise fail each container."""
    def domain(key: str, fn: Any) -> None:
        # Reuse the spec builder's own checks, so the config accepts exactly what it can build.
        try:
            fn()
        except InvalidArgument as e:
            raise ConfigError(f"{where}: key {key!r}: {e.message}", key, e.message) from None

    if rt.cgroup_driver == "cgroupfs":
        # (With systemd the kubelet always names a slice; the default parent is not checked there.)
        domain("runtime.default_cgroup_parent", lambda: specmod.cgroups_path("cgroupfs", rt.default_cgroup_parent, "x"))
    known_caps = set(specmod.ALL_CAPABILITIES)
    for i, c in enumerate(rt.default_capabilities):
        _check(where, f"runtime.default_capabilities[{i}]", specmod.normalize_capability(c or "?") in known_caps,
               f"unknown capability {c!r}; use a Linux capability name such as CHOWN or NET_BIND_SERVICE")
    _check(where, "runtime.exec_sync_max_output", rt.exec_sync_max_output > 0, "must be positive")
    for name, value in rt.default_sysctls.items():
        domain(f"runtime.default_sysctls.{name}",
               lambda n=name, v=value: specmod.validate_sysctls({n: v}, host_network=False, host_ipc=False))
    _check(where, "runtime.seccomp_arch", rt.seccomp_arch == "" or bool(_MACHINE.match(rt.seccomp_arch)),
           f"must be a machine name like x86_64 or aarch64 (empty: this host's), got {rt.seccomp_arch!r}")
    _check(where, "runtime.apparmor_default_profile", not any(ch in rt.apparmor_default_profile for ch in " \n\0"),
           "must be an AppArmor profile name (no spaces)")
    _check(where, "runtime.cgroup_namespace", rt.cgroup_namespace in CGROUP_NAMESPACE_MODES,
           f"must be one of {', '.join(CGROUP_NAMESPACE_MODES)}")
    for key in ("masked_paths", "readonly_paths"):
        for i, p in enumerate(getattr(rt, key)):
            _check(where, f"runtime.{key}[{i}]", p.startswith("/") and ".." not in p.split("/") and "\0" not in p,
                   f"must be an absolute path without '..', got {p!r}")
    _check(where, "runtime.tmpfs_size", bool(_TMPFS_SIZE.match(rt.tmpfs_size)),
           f"must be a size like 65536k, 64m or 1g, got {rt.tmpfs_size!r}")
    _check(where, "runtime.sandbox_cpu_shares", rt.sandbox_cpu_shares == 0 or 2 <= rt.sandbox_cpu_shares <= 262144,
           "must be 0 (unset) or within 2..262144")
    for name, pair in rt.rlimits.items():
        key = f"runtime.rlimits.{name}"
        _check(where, key, rlimit_type(name) in RLIMIT_TYPES,
               f"unknown rlimit; use one of {', '.join(t.removeprefix('RLIMIT_') for t in RLIMIT_TYPES)}")
        _check(where, key, len(pair) == 2 and 0 <= pair[0] <= pair[1],
               f"must be [soft, hard] with 0 <= soft <= hard, got {pair!r}")
    for i, name in enumerate(rt.disabled_features):
        _check(where, f"runtime.disabled_features[{i}]", name in featuresmod.ALL_FEATURES,
               f"unknown feature {name!r}; use one of {', '.join(featuresmod.ALL_FEATURES)}")
    _check(where, "runtime.userns_length_multiple", rt.userns_length_multiple >= 1,
           f"must be 1 (any length) or more, got {rt.userns_length_multiple}")
    for key in ("allowed_annotations", "pod_annotations"):
        for i, pat in enumerate(getattr(rt, key)):
            _check(where, f"runtime.{key}[{i}]", bool(pat.strip()), "must be a non-empty glob pattern")
    for i, d in enumerate(rt.cdi_spec_dirs):
        _check(where, f"runtime.cdi_spec_dirs[{i}]", d.startswith("/") and "\0" not in d,
               f"must be an absolute directory path, got {d!r}")
    dup = [d for i, d in enumerate(rt.cdi_spec_dirs) if os.path.normpath(d) in map(os.path.normpath, rt.cdi_spec_dirs[:i])]
    _check(where, "runtime.cdi_spec_dirs", not dup, f"lists {dup[0] if dup else ''!r} twice")


def _validate_images(cfg: Config, where: str) -> None:
    im = cfg.images
    for key in ("auth_file", "container_root"):
        v = getattr(im, key)
        _check(where, f"images.{key}", v == "" or v.startswith("/"), f"must be an absolute path (or empty), got {v!r}")
    if im.container_root:
        root = os.path.normpath(cfg.root_dir)
        ctr = os.path.normpath(im.container_root)
        # inside <root_dir>/images the snapshotter would see the container layers as its own dirs
        _check(where, "images.container_root", ctr != root and not ctr.startswith(os.path.join(root, "images") + "/")
               and ctr != os.path.join(root, "images"), f"must not be root_dir or lie under {root}/images")
    _check(where, "images.credential_helper_timeout", im.credential_helper_timeout > 0, "must be positive")
    _check(where, "images.fs_usage_period", 0 <= im.fs_usage_period <= 3600, "must be 0 to 3600 seconds")
    for i, ref in enumerate(im.pinned_images):
        try:
            parse_reference(ref)
        except InvalidArgument as e:
            raise ConfigError(f"{where}: key 'images.pinned_images[{i}]': {e.message}") from None


def loads(text: str, where: str = "config") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    return validate(_build(Config, data, where), where)


def load(path: str | None) -> Config:
    """Load ``path`` and its drop-ins; None means the default path (which may be absent)."""
    return load_layers(path).config


# -- drop-ins ------------------------------------------------------------------------------
#
# ``config.d/*.toml`` next to the main file is merged over it in lexical order of the file
# names, key by key: tables merge recursively (a drop-in adds or overrides single keys or
# entries, e.g. one [runtime.handlers.<name>]); a scalar or a list replaces the earlier value
# whole (a drop-in's list is never appended to the main file's).  Each file is checked alone
# for unknown keys and types, the merged result for everything else, and an error names the
# file that set the offending key.

DROPIN_DIR = "config.d"
DEFAULT_ORIGIN = "default"


def dropin_dir(path: str) -> str:
    """The drop-in directory of the main config file ``path``."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), DROPIN_DIR)


def dropin_files(path: str) -> list[str]:
    """The drop-ins of ``path`` in merge order (``*.toml`` only; hidden files skipped)."""
    d = dropin_dir(path)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{d}: cannot read: {e.strerror}") from None
    return [os.path.join(d, n) for n in names
            if n.endswith(".toml") and not n.startswith(".") and os.path.isfile(os.path.join(d, n))]


@dataclass
class LoadedConfig:
    """A merged config with, per key, the file that set it."""

    config: Config
    files: list[str]  # read, in merge order
    origins: dict[str, str]  # dotted key (a scalar, a list, or an entry of a plain table) -> file

    def origin(self, key: str) -> str:
        """The file that set ``key`` (for a table: the last file that set anything in it), or "default"."""
        key = re.sub(r"(\[\d+\])+$", "", key)
        if key in self.origins:
            return self.origins[key]
        below = [f for k, f in self.origins.items() if k.startswith(key + ".")]
        return max(below, key=self._rank) if below else DEFAULT_ORIGIN

    def _rank(self, f: str) -> int:
        return self.files.index(f) if f in self.files else len(self.files)

    def blame(self, key: str) -> str:
        """The file to name in an error about ``key``: its own, else its closest table's."""
        while key:
            where = self.origin(key)
            if where != DEFAULT_ORIGIN:
                return where
            key = key.rpartition(".")[0]
        return self.files[-1] if self.files else "config"


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    _build(Config, data, path)  # unknown keys and types, named by this file
    return data


def _forget(origins: dict[str, str], key: str) -> None:
    for k in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[k]


def _merge(into: dict[str, Any], over: dict[str, Any], origin: str, origins: dict[str, str], prefix: str = "") -> None:
    for k, v in over.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            cur = into.get(k)
            if not isinstance(cur, dict):
                cur = into[k] = {}
                _forget(origins, key)
            _merge(cur, v, origin, origins, key)
        else:
            into[k] = v
            _forget(origins, key)
            origins[key] = origin


def load_layers(path: str | None) -> LoadedConfig:
    """The main file (``path``; None: the default path, which may be absent) merged with its drop-ins."""
    main = path or DEFAULT_CONFIG_PATH
    files = [main] if path is not None or os.path.exists(main) else []
    files += dropin_files(main)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for f in files:
        _merge(merged, _read_file(f), f, origins)
    loaded = LoadedConfig(Config(), files, origins)
    where = "\0merged"  # replaced by the file that set the key an error is about
    try:
        loaded.config = validate(_build(Config, merged, where), where)
    except ConfigError as e:
        blamed = loaded.blame(e.key) if e.key else (files[-1] if files else "config")
        raise ConfigError(blamed + e.message.removeprefix(where), e.key, e.detail) from None
    return loaded


# -- TOML output -------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    """A TOML literal of a config value (string, number, boolean or list of them)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)  # pragma: no cover


#: One comment per key, printed above it by ``dumps`` (``moorage config default``).  A
#: ``*`` stands for any name in a table of named entries.
DOCS: dict[str, str] = {
    "socket": "The CRI gRPC socket (the kubelet's --container-runtime-endpoint).",
    "socket_mode": "File mode of the socket, octal.",
    "root_dir": "Persistent data: the metadata store, images, snapshots.",
    "state_dir": "Runtime state (lost on reboot): bundles, conmon and runtime state, network namespaces.",
    "log_level": "debug | info | warning | error",
    "log_format": "json | logfmt",
    "namespace": "containerd-style namespace name reported to tools.",
    "runtime": "How pods and containers are run.",
    "runtime.default_handler": "The handler used when a pod names no RuntimeClass handler.",
    "runtime.handlers": "OCI runtime handlers: [runtime.handlers.<RuntimeClass handler name>].",
    "runtime.handlers.*.path": "The OCI runtime binary.",
    "runtime.handlers.*.root": "Its --root; empty: <state_dir>/oci/<name>.",
    "runtime.conmon": "The conmon binary that supervises each container.",
    "runtime.infra_binary": "The pod infra process (catatonit), bind-mounted into each sandbox.",
    "runtime.sandbox_image": "An image kept from garbage collection (e.g. the kubelet's pause image); optional.",
    "runtime.cgroup_driver": "cgroupfs | systemd; must match the kubelet's cgroupDriver.",
    "runtime.default_cgroup_parent": "Cgroup parent of pods that name none.",
    "runtime.seccomp_default": "Apply the RuntimeDefault seccomp profile when a pod asks for none.",
    "runtime.default_capabilities": "Capabilities of a non-privileged container before the pod's add/drop.",
    "runtime.exec_sync_max_output":
        "Bytes kept of stdout and stderr of an ExecSync together (the rest is dropped and a marker ends\n"
        "stderr, as CRI-O caps both at 16 MiB); never more than fits a 16 MiB response.",
    "runtime.default_sysctls": "Sysctls set in every pod sandbox (namespaced ones only; the pod's own override them).",
    "runtime.seccomp_arch": "Machine the RuntimeDefault seccomp profile is made for (x86_64, aarch64); empty: this host's.",
    "runtime.apparmor_default_profile": "AppArmor profile for RuntimeDefault; empty: no AppArmor.",
    "runtime.selinux_enabled": "Turn the pod's selinux_options into SELinux labels.",
    "runtime.cgroup_namespace": "auto (private on cgroup v2 hosts) | private | host: the containers' cgroup namespace.",
    "runtime.masked_paths": "Paths masked in non-privileged containers (unless the pod sets its own).",
    "runtime.readonly_paths": "Paths made read-only in non-privileged containers (unless the pod sets its own).",
    "runtime.tmpfs_size": "Size of the tmpfs /dev and of the default /dev/shm (k, m or g).",
    "runtime.sandbox_cpu_shares": "cpu.shares of the pod infra process (0: unset).",
    "runtime.privileged_without_host_devices": "Privileged containers do not get the host's devices (e.g. VM runtimes).",
    "runtime.rlimits": "POSIX rlimits of every process, NAME = [soft, hard], e.g. NOFILE = [1048576, 1048576].",
    "runtime.allowed_annotations": "Glob patterns of otherwise reserved container annotations passed to the OCI spec.",
    "runtime.pod_annotations": "Glob patterns of pod annotations copied into sandbox and container OCI specs.",
    "runtime.disable_hugetlb_controller": "Never set hugepage limits (the kubelet's are dropped).",
    "runtime.tolerate_missing_hugetlb_controller":
        "Where the hugetlb cgroup controller is not usable: drop hugepage limits (true, logged once)\n"
        "or refuse such containers with FAILED_PRECONDITION (false).",
    "runtime.disabled_features":
        "CRI features never advertised in Status even where this node has them (`moorage check` lists them):\n"
        "recursive_read_only_mounts, user_namespaces, supplemental_groups_policy, mount_options,\n"
        "user_namespaces_host_network.",
    "runtime.enable_cdi":
        "Resolve CDI devices (ContainerConfig.CDI_devices and cdi.k8s.io/ annotations) from the spec files\n"
        "in cdi_spec_dirs. When false, CDI requests are ignored (logged), as containerd does.",
    "runtime.drop_infra":
        "Pods that share no PID namespace and have no user namespace of their own run no infra process:\n"
        "their network, IPC and UTS namespaces are pinned files (as CRI-O's drop_infra_ctr). false: every pod\n"
        "runs catatonit as its infra process.",
    "runtime.cdi_spec_dirs":
        "Directories of CDI spec files (*.json, *.yaml), re-read when they change. A later directory\n"
        "overrides an earlier one for the same device; two files of one directory defining it conflict.",
    "runtime.userns_length_multiple":
        "A user-namespaced pod's uid/gid mapping lengths must be a multiple of this (the kubelet\n"
        "allocates 65536 ids per pod); 1 accepts any length (critest's specs map 100000 ids).",
    "images": "Image pulls and storage.",
    "images.snapshotter": "overlayfs | native (copying fallback where overlayfs is missing).",
    "images.registry_config_path": "hosts.toml and certificates per registry (<path>/<host>/...).",
    "images.insecure_registries": "Registries reached over plain HTTP or with unverified TLS.",
    "images.max_concurrent_downloads": "Layers downloaded at once per pull.",
    "images.pull_retries": "Retries of a failed download.",
    "images.stall_timeout": "Seconds without progress before a download is cancelled.",
    "images.gc_on_remove": "Remove unreferenced layers and snapshots when an image is removed.",
    "images.auth_file":
        "Node registry credentials: a Docker-style config.json (auths, credHelpers, credsStore), used when\n"
        "a pull brings no credentials for the registry. A missing file means none. The default is where\n"
        "the kubelet reads its node-wide config.json, so one file serves both; empty: none.",
    "images.credential_helper_timeout": "Seconds a docker-credential-<helper> may take to answer.",
    "images.pinned_images":
        "Image references never garbage-collected and reported pinned (the kubelet's image GC skips them);\n"
        "runtime.sandbox_image is pinned too. RemoveImage of a pinned image is refused (FAILED_PRECONDITION).",
    "images.container_root":
        "Where containers' writable layers live, e.g. on a disk of their own (ImageFsInfo then reports\n"
        "separate image and container filesystems); empty: beside the image snapshots under root_dir.\n"
        "Change it only with no containers on the node.",
    "images.sync_snapshots": "syncfs each unpacked layer before its snapshot is committed (crash-safe pulls).",
    "images.fs_usage_period":
        "Seconds between background measurements of running containers' writable layers: ImageFsInfo\n"
        "sums accounted figures, so their writes show within this bound (a layer is measured again at\n"
        "once when its container starts or exits). 0: walk every layer on each ImageFsInfo.",
    "cni": "Pod networking.",
    "cni.conf_dir": "CNI network configurations.",
    "cni.bin_dirs": "Where the CNI plugin binaries are looked up.",
    "cni.cache_dir": "CNI results cache; empty: <state_dir>/cni.",
    "cni.plugin_timeout": "Seconds a CNI plugin may take.",
    "cni.network_name": "The network to use; empty: the first valid one in conf_dir.",
    "cni.conf_template": "Written for UpdateRuntimeConfig's pod CIDR when conf_dir is empty.",
    "cni.netns_dir": "Where pod network namespaces are pinned; empty: <state_dir>/netns.",
    "nri": "NRI (Node Resource Interface): plugins that observe and adjust pods and containers.",
    "nri.enable": "Run NRI: serve plugins and call them at each pod and container event.",
    "nri.socket_path": "Unix socket external NRI plugins connect to.",
    "nri.plugin_path": "Pre-installed plugins (executables named NN-name), launched at start.",
    "nri.plugin_config_path": "Configs of pre-installed plugins: NN-name.conf or name.conf.",
    "nri.plugin_registration_timeout": "Seconds a plugin may take to register and synchronize.",
    "nri.plugin_request_timeout": "Seconds a plugin may take to answer an event; then it is dropped.",
    "nri.disable_connections": "Do not listen on socket_path: only pre-installed plugins.",
    "nri.fail_on_plugin_loss": ("A plugin that times out or disconnects during a CRI call fails that call "
                                "(DEADLINE_EXCEEDED/UNAVAILABLE); false: the call goes on without it, as containerd."),
    "streaming": "The exec/attach/port-forward streaming server.",
    "streaming.address": "Listen address.",
    "streaming.port": "Listen port; 0: a free one.",
    "streaming.token_ttl": "Seconds a streaming URL stays valid.",
    "streaming.tls_cert": "TLS certificate (with tls_key); empty: plain HTTP.",
    "streaming.tls_key": "TLS key (with tls_cert).",
    "metrics": "Prometheus metrics.",
    "metrics.enabled": "Serve /metrics.",
    "metrics.address": "host:port of the metrics endpoint.",
    "limits": "Sizes of requests to the CRI socket (responses are capped at the kubelet's 16 MiB).",
    "limits.grpc_max_recv_message_size":
        "Largest CRI request accepted, bytes (gRPC max receive size; containerd's default, 16 MiB).",
    "limits.max_labels_annotations_bytes":
        "Labels plus annotations of one pod sandbox or container, bytes of keys and values together:\n"
        "over it RunPodSandbox/CreateContainer answer RESOURCE_EXHAUSTED. The default is twice the\n"
        "Kubernetes API's 256 KiB annotation limit, so every pod the API server admits fits.",
    "tracing": "OpenTelemetry tracing.",
    "tracing.enabled": "Export spans.",
    "tracing.endpoint": "OTLP/HTTP endpoint; empty: OTEL_EXPORTER_OTLP_ENDPOINT or nothing.",
    "tracing.sampling_ratio": "Fraction of traces sampled, 0..1.",
    "tracing.service_name": "service.name of the spans.",
}


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    # A sysctl name like net.ipv4.ping_group_range must be quoted, or TOML reads nested tables.
    return k if _BARE_KEY.match(k) else toml_value(k)


def dumps(cfg: Config, comments: bool = True, origin: Callable[[str], str] | None = None) -> str:
    """Render a config as TOML (every key, tables after plain keys), each key under its comment.

    With ``origin`` (dotted key -> where it came from, e.g. ``LoadedConfig.origin``) each key
    line ends with ``# <origin>``.
    """
    out: list[str] = []

    def comment(doc_key: str) -> None:
        doc = DOCS.get(doc_key) if comments else None
        if doc:
            out.extend(f"# {line}" for line in doc.splitlines())

    def table(obj: Any, name: str, doc_name: str, entries: bool, header_doc: str | None = None,
              parts: tuple[str, ...] = ()) -> None:
        # obj: a config dataclass, or a dict that is a table of named entries (entries=True: each
        # value a dataclass, like runtime.handlers) or of plain values (like runtime.rlimits).
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        else:
            items = list(obj.items())
        plain = [(k, v) for k, v in items if not isinstance(v, dict) and not dataclasses.is_dataclass(v)]
        sub = [(k, v) for k, v in items if isinstance(v, dict) or dataclasses.is_dataclass(v)]
        if name and (plain or not sub):
            out.append("")
            comment(doc_name if header_doc is None else header_doc)
            out.append(f"[{'.'.join(_toml_key(p) for p in parts)}]")
        for k, v in plain:
            if not entries and dataclasses.is_dataclass(obj):
                comment(f"{doc_name}.{k}" if doc_name else k)
            line = f"{_toml_key(k)} = {toml_value(v)}"
            out.append(f"{line}  # {origin(f'{name}.{k}' if name else k)}" if origin else line)
        for i, (k, v) in enumerate(sub):
            key = f"{name}.{k}" if name else k
            if entries:  # a named entry: the first one carries its table's comment
                table(v, key, f"{doc_name}.*", False, header_doc=doc_name if i == 0 else "", parts=(*parts, k))
            elif isinstance(v, dict) and v and all(dataclasses.is_dataclass(x) for x in v.values()):
                table(v, key, key, True, parts=(*parts, k))
            else:
                table(v, key, key, False, parts=(*parts, k))

    table(cfg, "", "", False)
    return "\n".join(out).lstrip("\n") + "\n"


def as_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def pinned_refs(cfg: Config) -> list[str]:
    """What is pinned: the sandbox image and images.pinned_images (ImageService.set_pinned, also on a reload)."""
    return ([cfg.runtime.sandbox_image] if cfg.runtime.sandbox_image else []) + list(cfg.images.pinned_images)
