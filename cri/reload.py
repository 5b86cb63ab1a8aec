"""SIGHUP: read the config files again and apply what a running daemon can change safely.

Only the keys in ``RELOADABLE`` are applied, each because the part that uses it can take a
new value between calls without stranding anything it made with the old one (the reason is
the entry's text, printed in docs/config.md).  Every other changed key is refused: the
running value stays and one warning line names the key and says "restart to apply".  A file
that does not load or validate changes nothing at all.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from moorage.cri import config as configmod
from moorage.cri import logs

log = logging.getLogger("moorage.reload")

#: Key -> why reloading it is safe (and what takes the new value).
RELOADABLE: dict[str, str] = {
    "log_level": "The daemon's own log lines at once; conmon of containers created afterwards.",
    "log_format": "The daemon's log lines from the next one on (one process writes them all).",
    "images.registry_config_path": "Read on every pull; certificates are read again (connections are renewed).",
    "images.insecure_registries": "Read on every pull; pulls in flight finish with the hosts they resolved.",
    "cni.conf_dir": "NetworkReady and new pods use it; teardown reads only the result cache, so pods "
                    "set up earlier are unaffected.",
    "cni.bin_dirs": "Plugins are looked up on each call.",
    "cni.plugin_timeout": "Applies to plugin calls started afterwards.",
    "cni.network_name": "New pods use it; teardown reads only the result cache.",
    "cni.conf_template": "Read by each UpdateRuntimeConfig call.",
    "images.pinned_images": "Pinned is decided each time an image is listed or collected; nothing is stored per image.",
}


class RegistryTarget(Protocol):
    async def reconfigure_registries(self, hosts_dir: str, insecure_registries: Sequence[str]) -> None: ...

    def set_pinned(self, refs: Sequence[str]) -> None: ...


class NetworkTarget(Protocol):
    def reconfigure(self, conf_dir: str, bin_dirs: Sequence[str], plugin_timeout: float,
                    network_name: str | None) -> None: ...


class LogLevelTarget(Protocol):
    def set_log_level(self, level: str) -> None: ...


@dataclass
class ReloadTargets:
    """The running parts that take reloaded values (built by ``cri.services.build_services``)."""

    images: RegistryTarget
    network: NetworkTarget
    runtime: LogLevelTarget


@dataclass
class ReloadOutcome:
    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    error: str = ""  # the config did not load: nothing was applied


def leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A config as {dotted key: value}; tables of entries (like runtime.handlers) and lists are one value."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update(leaves(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(old: configmod.Config, new: configmod.Config) -> list[str]:
    a, b = leaves(old), leaves(new)
    return [k for k in a if a[k] != b[k]]


def _value(cfg: configmod.Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def _assign(cfg: configmod.Config, key: str, value: Any) -> None:
    *parents, name = key.split(".")
    obj: Any = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, name, copy.deepcopy(value))


class Reloader:
    """Applies a fresh load of the config files to the running ``cfg`` (changed in place)."""

    def __init__(self, running: configmod.Config, load: Callable[[], configmod.LoadedConfig],
                 targets: ReloadTargets,
                 set_logging: Callable[[str, str], None] = logs.setup) -> None:
        self.cfg = running
        self.load = load
        self.targets = targets
        self.set_logging = set_logging
        self._lock = asyncio.Lock()

    async def reload(self) -> ReloadOutcome:
        async with self._lock:  # two quick SIGHUPs apply one after the other
            try:
                return await self._reload()
            except Exception as e:  # a bug here must not end the daemon: log it, keep serving
                log.exception("config reload failed")
                return ReloadOutcome(error=str(e) or type(e).__name__)

    async def _reload(self) -> ReloadOutcome:
        try:
            loaded = self.load()
        except configmod.ConfigError as e:
            log.error("config reload failed, keeping the running config: %s", e.message,
                      extra={"fields": {"error": e.message}})
            return ReloadOutcome(error=e.message)
        new = loaded.config
        out = ReloadOutcome()
        for key in changed_keys(self.cfg, new):
            (out.applied if key in RELOADABLE else out.refused).append(key)
        now = leaves(self.cfg)
        for key in out.refused:
            where = loaded.origin(key)
            log.warning("config key %r changed (in %s): restart to apply; keeping the running value", key, where,
                        extra={"fields": {"key": key, "file": where, "running": now[key]}})
        candidate = copy.deepcopy(self.cfg)
        for key in out.applied:
            _assign(candidate, key, _value(new, key))
        try:
            configmod.validate(candidate, "reload")
        except configmod.ConfigError as e:  # a mix of running and new values no file had
            log.error("config reload failed, keeping the running config: %s", e.message)
            return ReloadOutcome(refused=out.refused, error=e.message)
        await self._apply(candidate)
        for key in out.applied:
            _assign(self.cfg, key, _value(candidate, key))
        log.info("config reloaded", extra={"fields": {"files": loaded.files, "applied": out.applied,
                                                      "refused": out.refused}})
        return out

    async def _apply(self, c: configmod.Config) -> None:
        # Every part is told on every reload, changed or not: the registry hosts config and its
        # certificates are files outside the config that a reload is also the signal to re-read.
        self.set_logging(c.log_level, c.log_format)
        self.targets.runtime.set_log_level(c.log_level)
        self.targets.network.reconfigure(c.cni.conf_dir, c.cni.bin_dirs, c.cni.plugin_timeout,
                                         c.cni.network_name or None)
        await self.targets.images.reconfigure_registries(c.images.registry_config_path, c.images.insecure_registries)
        self.targets.images.set_pinned(configmod.pinned_refs(c))
