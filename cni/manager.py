"""Pod network set-up and tear-down over a CNI plugin chain, with an on-disk result cache.

For every sandbox the manager keeps ``<cache_dir>/results/<network>-<sandbox_id>-<ifname>``
(JSON, like libcni's cache): the network config that was used, the runtime
args (netns, CNI_ARGS, capability args) and the final result.  The entry is
written *before* the first ADD (``"state": "adding"``) and completed after
the last one (``"state": "ready"``), so a daemon that crashes mid-ADD still
knows, after a restart, what to DEL.  Teardown uses only the cache, never the
current conf dir, so config changes do not strand IPs of running pods; no
cache entry means nothing was set up and teardown is a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moorage.core import netns as netns_mod
from moorage.core.errors import FailedPrecondition, Internal, InvalidArgument, MoorageError, NotFound, Unavailable
from moorage.core.network import Bandwidth, DNSConfig, PortMapping

from .config import (
    NOT_READY_REASON,
    NetworkConfig,
    NetworkConfigWatcher,
    parse_any,
    parse_conflist,
    plugin_config,
    render_template,
    version_tuple,
)
from .plugin import PluginExec, PluginNotFound, PluginUnavailable, RuntimeArgs
from .result import Interface, Result, parse_result, pod_ips

log = logging.getLogger("moorage.cni")

CACHE_KIND = "cniCacheV1"
TEMPLATE_CONF_NAME = "10-moorage-from-template"  # + .conflist or .conf
_MAX_BURST = 2**31 - 1  # bits; the bandwidth plugin's "no burst limit"


@dataclass(frozen=True)
class NetworkResult:
    ips: list[str]  # primary first
    interfaces: tuple[Interface, ...]
    raw: dict[str, Any] = field(repr=False)
    network: str = ""
    result: Result | None = field(default=None, repr=False)


def capability_args(
    port_mappings: Sequence[PortMapping] = (),
    bandwidth: Bandwidth | None = None,
    dns: DNSConfig | None = None,
    ip_ranges: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``runtimeConfig`` values by capability name (pure).

    Port mappings without a host port are dropped (nothing to publish), as
    containerd does.  A rate without a burst gets the largest burst the
    bandwidth plugin accepts, i.e. no burst limit.
    """
    caps: dict[str, Any] = {}
    pms = []
    for pm in port_mappings:
        if pm.host_port <= 0:
            continue
        if not (0 < pm.host_port < 65536 and 0 < pm.container_port < 65536):
            raise InvalidArgument(
                f"port mapping {pm.host_port}->{pm.container_port}: ports must be between 1 and 65535"
            )
        proto = (pm.protocol or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise InvalidArgument(f"port mapping protocol {pm.protocol!r} is not tcp, udp or sctp")
        entry: dict[str, Any] = {"hostPort": pm.host_port, "containerPort": pm.container_port, "protocol": proto}
        if pm.host_ip:
            entry["hostIP"] = pm.host_ip
        pms.append(entry)
    if pms:
        caps["portMappings"] = pms
    if bandwidth is not None and (bandwidth.ingress_rate or bandwidth.egress_rate):
        bw: dict[str, int] = {}
        if bandwidth.ingress_rate:
            bw["ingressRate"] = bandwidth.ingress_rate
            bw["ingressBurst"] = bandwidth.ingress_burst or _MAX_BURST
        if bandwidth.egress_rate:
            bw["egressRate"] = bandwidth.egress_rate
            bw["egressBurst"] = bandwidth.egress_burst or _MAX_BURST
        caps["bandwidth"] = bw
    if dns is not None and (dns.servers or dns.searches or dns.options):
        caps["dns"] = {"servers": list(dns.servers), "searches": list(dns.searches), "options": list(dns.options)}
    if ip_ranges:
        caps["ipRanges"] = [[dict(r) for r in rs] for rs in ip_ranges]
    if extra:
        caps.update(extra)
    return caps


class CNIManager:
    def __init__(
        self,
        conf_dir: str,
        bin_dirs: Sequence[str],
        cache_dir: str,
        plugin_timeout: float = 60.0,
        network_name: str | None = None,
        ifname: str = "eth0",
    ) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = list(bin_dirs)
        self.cache_dir = cache_dir
        self.ifname = ifname
        self.watcher = NetworkConfigWatcher(conf_dir, network_name)
        self.exec = PluginExec(self.bin_dirs, plugin_timeout)
        self._locks: dict[str, asyncio.Lock] = {}

    def reconfigure(self, conf_dir: str, bin_dirs: Sequence[str], plugin_timeout: float,
                    network_name: str | None) -> None:
        """Use another conf dir, plugin path, timeout or network from now on (a daemon reload).

        Safe on a running node: set-ups in flight keep the network they loaded, and teardown
        reads only the result cache (whose dir does not change here), never the conf dir.
        """
        self.conf_dir = conf_dir
        self.bin_dirs = list(bin_dirs)
        self.watcher = NetworkConfigWatcher(conf_dir, network_name)
        self.exec = PluginExec(self.bin_dirs, plugin_timeout, self.exec.extra_env)

    # --- status ---------------------------------------------------------------------

    def status(self) -> tuple[bool, str, str]:
        """NetworkReady from the conf dir: ``(ready, reason, message)``."""
        return self.watcher.status()

    def config_errors(self) -> list[str]:
        """Problems with the files in the conf dir (each message names its file); [] when none."""
        return [e.message for e in self.watcher.refresh().errors]

    async def plugin_status(self) -> tuple[bool, str, str]:
        """Conf dir status, plus the STATUS verb of every plugin when the network is CNI >= 1.1.0."""
        ready, reason, msg = self.status()
        net = self.watcher.current()
        if not ready or net is None or version_tuple(net.cni_version) < (1, 1, 0):
            return ready, reason, msg
        for i, p in enumerate(net.plugins):
            try:
                await self.exec.run(p["type"], "STATUS", plugin_config(net, i))
            except PluginUnavailable as exc:
                return False, NOT_READY_REASON, exc.message
            except MoorageError as exc:
                return False, NOT_READY_REASON, exc.message
        return True, "", ""

    # --- cache ----------------------------------------------------------------------

    def _results_dir(self) -> str:
        return os.path.join(self.cache_dir, "results")

    def _cache_path(self, network: str, sandbox_id: str) -> str:
        return os.path.join(self._results_dir(), f"{network}-{sandbox_id}-{self.ifname}")

    def _write_cache(self, path: str, entry: Mapping[str, Any]) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _cache_entries(self, sandbox_id: str) -> list[tuple[str, dict[str, Any]]]:
        suffix = f"-{sandbox_id}-{self.ifname}"
        out = []
        try:
            names = sorted(os.listdir(self._results_dir()))
        except FileNotFoundError:
            return []
        for n in names:
            if not n.endswith(suffix) or n.startswith("."):
                continue
            path = os.path.join(self._results_dir(), n)
            try:
                with open(path) as f:
                    entry = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("unreadable CNI cache entry %s: %s", path, exc)
                continue
            if not isinstance(entry, dict) or entry.get("containerId") != sandbox_id:
                continue
            out.append((path, entry))
        return out

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        lock = self._locks.get(sandbox_id)
        if lock is None:
            lock = self._locks[sandbox_id] = asyncio.Lock()
        return lock

    def cached_sandboxes(self) -> set[str]:
        """Ids of every sandbox that has a cache entry (set up, or interrupted mid-ADD)."""
        suffix = f"-{self.ifname}"
        out: set[str] = set()
        try:
            names = os.listdir(self._results_dir())
        except FileNotFoundError:
            return out
        for n in names:
            if n.startswith(".") or not n.endswith(suffix):
                continue
            try:
                with open(os.path.join(self._results_dir(), n)) as f:
                    entry = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(entry, dict) and isinstance(entry.get("containerId"), str) and entry["containerId"]:
                out.add(entry["containerId"])
        return out

    def cached_result(self, sandbox_id: str) -> NetworkResult | None:
        """The result of a finished set-up, from the cache (e.g. after a restart)."""
        for _, entry in self._cache_entries(sandbox_id):
            if entry.get("state") == "ready" and entry.get("result"):
                res = parse_result(entry["result"], f"cache of {sandbox_id}")
                return NetworkResult(pod_ips(res, self.ifname), res.interfaces, res.raw, entry.get("networkName", ""), res)
        return None

    # --- set-up ---------------------------------------------------------------------

    async def setup(
        self,
        sandbox_id: str,
        netns_path: str,
        pod_namespace: str,
        pod_name: str,
        pod_uid: str = "",
        port_mappings: Sequence[PortMapping] = (),
        bandwidth: Bandwidth | None = None,
        dns: DNSConfig | None = None,
        ip_ranges: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        extra_capabilities: Mapping[str, Any] | None = None,
    ) -> NetworkResult:
        """ADD the pod to the network: every plugin in order, each fed the previous result.

        On failure the plugins already run (and the failing one) get a DEL in
        reverse order before the error is raised.
        """
        if not sandbox_id or "/" in sandbox_id:
            raise InvalidArgument(f"invalid sandbox id {sandbox_id!r}")
        net = self.watcher.current()
        if net is None:
            _, _, msg = self.watcher.status()
            raise Unavailable(f"pod network is not ready: {msg}")
        if not netns_mod.is_netns(netns_path):
            raise FailedPrecondition(f"network namespace {netns_path} of sandbox {sandbox_id} does not exist")
        rt = RuntimeArgs.kubernetes(sandbox_id, netns_path, pod_namespace, pod_name, pod_uid, self.ifname)
        caps = capability_args(port_mappings, bandwidth, dns, ip_ranges, extra_capabilities)

        async with self._lock(sandbox_id):
            # Leftovers of an earlier, interrupted attempt hold addresses: release them first.
            if self._cache_entries(sandbox_id):
                log.info("sandbox %s has a CNI cache entry from an earlier attempt; tearing it down", sandbox_id)
                await self._teardown_locked(sandbox_id, netns_path)

            path = self._cache_path(net.name, sandbox_id)
            entry: dict[str, Any] = {
                "kind": CACHE_KIND,
                "containerId": sandbox_id,
                "ifName": self.ifname,
                "networkName": net.name,
                "netns": netns_path,
                "config": net.to_dict(),
                "cniArgs": [list(kv) for kv in rt.args],
                "capabilityArgs": caps,
                "state": "adding",
                "result": None,
            }
            await asyncio.to_thread(self._write_cache, path, entry)

            prev: dict[str, Any] | None = None
            for i, plugin in enumerate(net.plugins):
                conf = plugin_config(net, i, prev, caps)
                try:
                    out = await self.exec.run(plugin["type"], "ADD", conf, rt)
                    if out is not None:
                        parse_result(out, f"CNI plugin {plugin['type']} (ADD)")
                        prev = out
                except BaseException as exc:
                    log.warning("CNI ADD of sandbox %s failed at plugin %s: %s", sandbox_id, plugin["type"], exc)
                    entry["result"] = prev
                    # A plugin that could not even be found never ran: only its predecessors get a DEL
                    # (a DEL of the missing binary would fail too and strand the cache entry).
                    last = i - 1 if isinstance(exc, PluginNotFound) else i
                    await self._rollback(net, last, prev, rt, caps, path, entry)
                    raise

            entry["state"] = "ready"
            entry["result"] = prev
            await asyncio.to_thread(self._write_cache, path, entry)

        res = parse_result(prev or {"cniVersion": net.cni_version}, f"network {net.name}")
        return NetworkResult(pod_ips(res, self.ifname), res.interfaces, res.raw, net.name, res)

    async def _rollback(
        self,
        net: NetworkConfig,
        failed_index: int,
        prev: dict[str, Any] | None,
        rt: RuntimeArgs,
        caps: Mapping[str, Any],
        cache_path: str,
        entry: dict[str, Any],
    ) -> None:
        errors = await self._del_chain(net, net.plugins[: failed_index + 1], prev, rt, caps)
        if errors:
            log.error("undoing the failed CNI ADD of %s left errors: %s", rt.container_id, "; ".join(errors))
            await asyncio.to_thread(self._write_cache, cache_path, entry)  # keep for a later teardown
        else:
            await asyncio.to_thread(self._remove, cache_path)

    async def _del_chain(
        self,
        net: NetworkConfig,
        plugins: Sequence[dict[str, Any]],
        prev: Mapping[str, Any] | None,
        rt: RuntimeArgs,
        caps: Mapping[str, Any],
    ) -> list[str]:
        """DEL ``plugins`` (a prefix of ``net.plugins``) in reverse order; returns error texts."""
        errors: list[str] = []
        for i in reversed(range(len(plugins))):
            conf = plugin_config(net, i, prev, caps)
            try:
                await self.exec.run(plugins[i]["type"], "DEL", conf, rt)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- keep going: every plugin gets its DEL
                errors.append(str(exc))
        return errors

    # --- tear-down ------------------------------------------------------------------

    async def teardown(self, sandbox_id: str, netns_path: str | None = None) -> None:
        """DEL the pod from every network it was added to (per the cache).

        Idempotent; works from the cache alone (after a daemon restart, with the
        conf dir changed or gone).  When the namespace no longer exists the
        plugins get an empty CNI_NETNS and release what lives outside it (IPs,
        iptables rules).  The cache entry is removed only when every DEL succeeded.
        """
        async with self._lock(sandbox_id):
            await self._teardown_locked(sandbox_id, netns_path)

    async def _teardown_locked(self, sandbox_id: str, netns_path: str | None) -> None:
        failures: list[str] = []
        for path, entry in self._cache_entries(sandbox_id):
            try:
                net = parse_conflist(entry.get("config") or {}, path)
                args = tuple((str(k), str(v)) for k, v in entry.get("cniArgs") or [])
            except (MoorageError, TypeError, ValueError) as exc:
                failures.append(f"cache entry {path} is unusable: {exc}")
                continue
            ns = ""
            for candidate in (netns_path, entry.get("netns")):
                if candidate and netns_mod.is_netns(candidate):
                    ns = candidate
                    break
            rt = RuntimeArgs(sandbox_id, ns, entry.get("ifName") or self.ifname, args)
            prev = entry.get("result")
            errors = await self._del_chain(net, net.plugins, prev, rt, entry.get("capabilityArgs") or {})
            if errors:
                failures.extend(errors)
            else:
                await asyncio.to_thread(self._remove, path)
        if failures:
            raise Internal(f"tearing down the network of sandbox {sandbox_id} failed: " + "; ".join(failures))

    # --- check ----------------------------------------------------------------------

    async def check(self, sandbox_id: str, netns_path: str | None = None) -> None:
        """CHECK the pod's network against the cached result (no-op for CNI < 0.4.0 or disableCheck)."""
        async with self._lock(sandbox_id):
            entries = [(p, e) for p, e in self._cache_entries(sandbox_id) if e.get("state") == "ready"]
            if not entries:
                raise NotFound(f"sandbox {sandbox_id} has no pod network set up")
            for path, entry in entries:
                net = parse_conflist(entry.get("config") or {}, path)
                if net.disable_check or version_tuple(net.cni_version) < (0, 4, 0):
                    continue
                ns = netns_path or entry.get("netns") or ""
                if not netns_mod.is_netns(ns):
                    raise FailedPrecondition(f"network namespace {ns or '(none)'} of sandbox {sandbox_id} is gone")
                args = tuple((str(k), str(v)) for k, v in entry.get("cniArgs") or [])
                rt = RuntimeArgs(sandbox_id, ns, entry.get("ifName") or self.ifname, args)
                caps = entry.get("capabilityArgs") or {}
                for i, plugin in enumerate(net.plugins):
                    await self.exec.run(plugin["type"], "CHECK", plugin_config(net, i, entry.get("result"), caps), rt)

    # --- UpdateRuntimeConfig ----------------------------------------------------------

    def write_conf_from_template(self, template_path: str, pod_cidr: str) -> str | None:
        """Render ``template_path`` with the pod CIDR into the conf dir.

        Only when the conf dir has no valid network (an admin's config always
        wins).  The supported placeholder is ``{{.PodCIDR}}`` (see
        ``config.render_template``).  Returns the written path, or None when
        nothing was written.
        """
        if not pod_cidr:
            return None
        if self.watcher.current() is not None:
            return None
        try:
            with open(template_path) as f:
                template = f.read(1 << 20)
        except OSError as exc:
            raise FailedPrecondition(f"cannot read CNI config template {template_path}: {exc.strerror}") from None
        rendered = render_template(template, pod_cidr)
        parse_any(rendered, f"{template_path} (rendered with pod CIDR {pod_cidr})")
        ext = ".conflist" if "plugins" in json.loads(rendered) else ".conf"
        target = os.path.join(self.conf_dir, TEMPLATE_CONF_NAME + ext)
        os.makedirs(self.conf_dir, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.conf_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(rendered)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            self._remove(tmp)
            raise
        self.watcher.refresh(force=True)
        return target
