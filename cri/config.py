"""Daemon configuration: TOML at /etc/moorage/config.toml, every key optional.

The schema is the dataclass tree below; the defaults make a daemon that works
with no file at all.  ``load`` reports unknown keys and bad values by name,
with the file and the dotted key, so a typo is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from moorage.core.errors import InvalidArgument

DEFAULT_CONFIG_PATH = "/etc/moorage/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class HandlerConfig:
    """An OCI runtime handler (RuntimeClass handler name → binary)."""

    path: str = ""
    root: str = ""  # runtime state root; empty: <state_dir>/<handler name>


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
    stop_timeout_grace: float = 2.0
    exec_sync_max_output: int = 16 * 1024 * 1024


@dataclass
class ImagesConfig:
    snapshotter: str = "overlayfs"  # overlayfs | native (copying fallback)
    registry_config_path: str = "/etc/moorage/certs.d"
    insecure_registries: list[str] = field(default_factory=list)
    max_concurrent_downloads: int = 3
    pull_retries: int = 3
    stall_timeout: float = 60.0  # seconds without progress before a download is cancelled
    gc_on_remove: bool = True


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
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

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
    pass


def _check(where: str, key: str, cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: key {key!r}: {msg}")


def _convert(where: str, key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
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
    raise ConfigError(f"{where}: key {key!r}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"{where}: unknown key {key!r}")
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
    _check(where, "images.snapshotter", cfg.images.snapshotter in ("overlayfs", "native"), "must be overlayfs or native")
    _check(where, "images.max_concurrent_downloads", cfg.images.max_concurrent_downloads >= 1, "must be at least 1")
    _check(where, "images.stall_timeout", cfg.images.stall_timeout > 0, "must be positive")
    _check(where, "cni.plugin_timeout", cfg.cni.plugin_timeout > 0, "must be positive")
    _check(where, "streaming.port", 0 <= cfg.streaming.port <= 65535, "must be a port number (0 for a free one)")
    _check(
        where, "streaming.tls_key", bool(cfg.streaming.tls_cert) == bool(cfg.streaming.tls_key), "tls_cert and tls_key go together"
    )
    host, _, port = cfg.metrics.address.rpartition(":")
    _check(where, "metrics.address", bool(host) and port.isdigit(), f"must be host:port, got {cfg.metrics.address!r}")
    _check(where, "tracing.sampling_ratio", 0.0 <= cfg.tracing.sampling_ratio <= 1.0, "must be between 0 and 1")
    return cfg


def loads(text: str, where: str = "config") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    return validate(_build(Config, data, where), where)


def load(path: str | None) -> Config:
    """Load ``path``; None means the default path if it exists, else the defaults."""
    import os

    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            return validate(Config())
        path = DEFAULT_CONFIG_PATH
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return loads(text, path)


# -- TOML output -------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)  # pragma: no cover


def dumps(cfg: Config) -> str:
    """Render a config as TOML (every key, tables after plain keys)."""
    out: list[str] = []

    def table(obj: Any, name: str) -> None:
        plain, sub = [], []
        items = dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else obj.items()
        for k, v in items:
            (sub if isinstance(v, dict) else plain).append((k, v))
        if name and (plain or not sub):
            out.append(f"\n[{name}]")
        for k, v in plain:
            out.append(f"{k} = {_toml_value(v)}")
        for k, v in sub:
            table(v, f"{name}.{k}" if name else k)

    table(cfg, "")
    return "\n".join(out).lstrip("\n") + "\n"


def as_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
