"""CNI network configuration: loading, validation, per-plugin config building.

Files in the conf dir are read in lexical order; ``.conflist`` holds a network
(a list of plugins), ``.conf`` and ``.json`` hold either a single plugin (wrapped
into a one-plugin network) or, for ``.json``, a conflist.  The first valid
network wins, unless a network name is configured, in which case that one is
used.  Everything here except :class:`NetworkConfigWatcher` is pure.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moorage.core.errors import InvalidArgument

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CONFIG_EXTENSIONS = (".conflist", ".conf", ".json")
MAX_CONFIG_BYTES = 1 << 20
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")

NOT_READY_REASON = "NetworkPluginNotReady"


class ConfigError(InvalidArgument):
    """A network config file is unusable; the message names the file and the problem."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


def version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (0,)


@dataclass(frozen=True)
class NetworkConfig:
    """One CNI network (a plugin chain)."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: str = ""
    disable_check: bool = False
    disable_gc: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def plugin_types(self) -> list[str]:
        return [p["type"] for p in self.plugins]

    def to_dict(self) -> dict[str, Any]:
        """The conflist form (what gets cached next to a result)."""
        d = copy.deepcopy(self.raw) if self.raw else {}
        d.update(
            cniVersion=self.cni_version,
            name=self.name,
            plugins=[copy.deepcopy(p) for p in self.plugins],
        )
        if self.disable_check:
            d["disableCheck"] = True
        if self.disable_gc:
            d["disableGC"] = True
        return d


def _decode(data: bytes | str | Mapping[str, Any], source: str) -> dict[str, Any]:
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, bytes):
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(source, f"file is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(source, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not data.strip():
        raise ConfigError(source, "file is empty")
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            source, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(source, f"expected a JSON object at top level, got {type(obj).__name__}")
    return obj


def _check_version(obj: Mapping[str, Any], source: str, where: str = "") -> str:
    v = obj.get("cniVersion")
    if v is None or v == "":
        raise ConfigError(source, f"{where}missing \"cniVersion\"")
    if not isinstance(v, str):
        raise ConfigError(source, f"{where}\"cniVersion\" must be a string, got {v!r}")
    if v not in SUPPORTED_VERSIONS:
        raise ConfigError(
            source,
            f"{where}cniVersion {v!r} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})",
        )
    return v


def _check_name(obj: Mapping[str, Any], source: str) -> str:
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(source, "missing network \"name\"")
    if not _NAME_RE.match(name):
        raise ConfigError(
            source,
            f"network name {name!r} is invalid: use letters, digits, '_', '.', '-' "
            "and start with a letter or digit",
        )
    return name


def _check_plugin(p: Any, source: str, idx: int | None) -> dict[str, Any]:
    where = "" if idx is None else f"plugins[{idx}]: "
    if not isinstance(p, dict):
        raise ConfigError(source, f"{where}each plugin must be a JSON object, got {type(p).__name__}")
    t = p.get("type")
    if not isinstance(t, str) or not t:
        raise ConfigError(source, f"{where}missing plugin \"type\"")
    if "/" in t or t in (".", ".."):
        raise ConfigError(source, f"{where}plugin type {t!r} must be a binary name, not a path")
    caps = p.get("capabilities")
    if caps is not None and not isinstance(caps, dict):
        raise ConfigError(source, f"{where}\"capabilities\" must be an object of name: bool")
    return p


def _bool(obj: Mapping[str, Any], key: str, source: str) -> bool:
    v = obj.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(source, f"\"{key}\" must be true or false, got {v!r}")
    return v


def parse_conflist(data: bytes | str | Mapping[str, Any], source: str = "<conflist>") -> NetworkConfig:
    """Parse and validate a network configuration list."""
    obj = _decode(data, source)
    version = _check_version(obj, source)
    name = _check_name(obj, source)
    plugins = obj.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise ConfigError(source, "\"plugins\" must be a non-empty list")
    checked = tuple(copy.deepcopy(_check_plugin(p, source, i)) for i, p in enumerate(plugins))
    disable_check = _bool(obj, "disableCheck", source)
    disable_gc = _bool(obj, "disableGC", source)
    return NetworkConfig(
        name=name,
        cni_version=version,
        plugins=checked,
        source=source,
        disable_check=disable_check,
        disable_gc=disable_gc,
        raw={k: v for k, v in obj.items() if k not in ("plugins",)},
    )


def parse_conf(data: bytes | str | Mapping[str, Any], source: str = "<conf>") -> NetworkConfig:
    """Parse a single-plugin ``.conf`` and wrap it into a one-plugin network."""
    obj = _decode(data, source)
    if "plugins" in obj:
        raise ConfigError(source, "a .conf file holds one plugin; rename it to .conflist for a plugin list")
    version = _check_version(obj, source)
    name = _check_name(obj, source)
    plugin = copy.deepcopy(_check_plugin(obj, source, None))
    plugin.pop("name", None)
    plugin.pop("cniVersion", None)
    return NetworkConfig(
        name=name,
        cni_version=version,
        plugins=(plugin,),
        source=source,
        raw={"cniVersion": version, "name": name},
    )


def parse_any(data: bytes | str | Mapping[str, Any], source: str) -> NetworkConfig:
    """Parse by extension: ``.conflist`` as a list, ``.conf`` as one plugin, ``.json`` either way."""
    if source.endswith(".conflist"):
        return parse_conflist(data, source)
    if source.endswith(".conf"):
        return parse_conf(data, source)
    obj = _decode(data, source)
    if "plugins" in obj:
        return parse_conflist(obj, source)
    return parse_conf(obj, source)


def load_file(path: str) -> NetworkConfig:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    return parse_any(data, path)


def config_files(conf_dir: str) -> list[str]:
    """Candidate files in lexical order (hidden files and other extensions skipped)."""
    try:
        names = os.listdir(conf_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [
        os.path.join(conf_dir, n)
        for n in sorted(names)
        if not n.startswith(".") and n.endswith(CONFIG_EXTENSIONS)
    ]


@dataclass(frozen=True)
class LoadResult:
    network: NetworkConfig | None
    errors: tuple[ConfigError, ...]

    def message(self, conf_dir: str, network_name: str | None) -> str:
        if self.network is not None:
            return ""
        what = f"network {network_name!r}" if network_name else "network config"
        if not self.errors:
            return f"cni config uninitialized: no valid {what} found in {conf_dir}"
        return f"cni config uninitialized: no valid {what} found in {conf_dir}; " + "; ".join(
            e.message for e in self.errors
        )


def load_dir(conf_dir: str, network_name: str | None = None) -> LoadResult:
    """Pick the network to use from ``conf_dir``.

    Without ``network_name`` the first file (lexical order) that parses wins;
    with it, the first valid file whose network has that name.  Files that fail
    to parse are reported in ``errors`` (all of them, in order).
    """
    errors: list[ConfigError] = []
    for path in config_files(conf_dir):
        try:
            net = load_file(path)
        except ConfigError as exc:
            errors.append(exc)
            continue
        if network_name and net.name != network_name:
            continue
        return LoadResult(net, tuple(errors))
    return LoadResult(None, tuple(errors))


def plugin_config(
    net: NetworkConfig,
    index: int,
    prev_result: Mapping[str, Any] | None = None,
    capability_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The stdin document for plugin ``index`` of ``net``.

    Adds ``name``, ``cniVersion``, ``prevResult`` (when given) and a
    ``runtimeConfig`` holding only the capabilities the plugin declares as
    enabled (``"capabilities": {"portMappings": true}``).
    """
    conf = copy.deepcopy(net.plugins[index])
    conf["name"] = net.name
    conf["cniVersion"] = net.cni_version
    if prev_result is not None:
        conf["prevResult"] = copy.deepcopy(dict(prev_result))
    else:
        conf.pop("prevResult", None)
    caps = conf.get("capabilities") or {}
    rt = {}
    for cap, enabled in caps.items():
        if enabled is True and capability_args and cap in capability_args:
            rt[cap] = copy.deepcopy(capability_args[cap])
    if rt:
        existing = conf.get("runtimeConfig")
        merged = dict(existing) if isinstance(existing, dict) else {}
        merged.update(rt)
        conf["runtimeConfig"] = merged
    return conf


# --- template for UpdateRuntimeConfig -------------------------------------------------

POD_CIDR_PLACEHOLDER = "{{.PodCIDR}}"
_PLACEHOLDER_RE = re.compile(r"\{\{\s*\.PodCIDR\s*\}\}")


def render_template(template: str, pod_cidr: str) -> str:
    """Replace every ``{{.PodCIDR}}`` (spaces inside the braces allowed) with ``pod_cidr``.

    ``pod_cidr`` is what the kubelet sends; when it holds several
    comma-separated CIDRs (dual stack) the first one is used.  It must be a
    valid network address.  Only this placeholder is supported.
    """
    import ipaddress

    first = pod_cidr.split(",")[0].strip()
    try:
        ipaddress.ip_network(first, strict=False)
    except ValueError as exc:
        raise InvalidArgument(f"pod CIDR {pod_cidr!r} is not a valid CIDR: {exc}") from None
    if not _PLACEHOLDER_RE.search(template):
        raise InvalidArgument(f"CNI config template has no {POD_CIDR_PLACEHOLDER} placeholder")
    return _PLACEHOLDER_RE.sub(first, template)


# --- watcher ---------------------------------------------------------------------------


class NetworkConfigWatcher:
    """Keeps the chosen network of a conf dir current.

    Rescans lazily: every ``status()``/``current()`` call compares a cheap
    signature of the directory (names, sizes, mtimes, inodes of candidate files)
    with the previous one and re-parses only when it changed, so edits are
    seen on the next call without a background task.
    """

    def __init__(self, conf_dir: str, network_name: str | None = None) -> None:
        self.conf_dir = conf_dir
        self.network_name = network_name
        self._lock = threading.Lock()
        self._sig: tuple | None = None
        self._loaded = LoadResult(None, ())

    def _signature(self) -> tuple:
        sig = []
        for path in config_files(self.conf_dir):
            try:
                st = os.stat(path)
            except OSError:
                continue
            sig.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def refresh(self, force: bool = False) -> LoadResult:
        with self._lock:
            sig = self._signature()
            if force or sig != self._sig:
                self._loaded = load_dir(self.conf_dir, self.network_name)
                self._sig = sig
            return self._loaded

    def current(self) -> NetworkConfig | None:
        return self.refresh().network

    def status(self) -> tuple[bool, str, str]:
        """``(ready, reason, message)`` for the CRI NetworkReady condition."""
        loaded = self.refresh()
        if loaded.network is not None:
            return True, "", ""
        return False, NOT_READY_REASON, loaded.message(self.conf_dir, self.network_name)
