"""Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox, status and list.

A sandbox owns a pinned network namespace (CNI-configured unless host network),
the pod's hostname/hosts/resolv.conf files, a /dev/shm tmpfs, and its infra
process: the host's ``catatonit -P`` in an empty read-only rootfs under conmon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from moorage.core import mount as mountmod
from moorage.core import netns as netnsmod
from moorage.core.errors import FailedPrecondition, InvalidArgument, MoorageError, NotFound
from moorage.core.store import SandboxRecord, now_ns
from moorage.runtime import events, podfiles, spec
from moorage.runtime.model import PodSandboxConfig
from moorage.runtime.modelio import sandbox_config_from, to_plain

if TYPE_CHECKING:
    from moorage.runtime.service import Runtime

log = logging.getLogger("moorage.sandbox")

READY, NOTREADY = "SANDBOX_READY", "SANDBOX_NOTREADY"
SHM_SIZE = 64 * 1024 * 1024


def _ns_modes(cfg: PodSandboxConfig) -> tuple[str, str, str]:
    sc = cfg.linux.security_context if cfg.linux else None
    nso = sc.namespace_options if sc else None
    if nso is None:
        return "POD", "CONTAINER", "POD"
    return nso.network, nso.pid, nso.ipc


def sandbox_name(cfg: PodSandboxConfig) -> str:
    md = cfg.metadata
    return f"{md.name}_{md.namespace}_{md.uid}_{md.attempt}"


class SandboxOps:
    # -- RunPodSandbox ---------------------------------------------------------------------

    async def run_sandbox(self: Runtime, cfg: PodSandboxConfig, handler: str = "") -> str:
        md = cfg.metadata
        missing = [k for k in ("name", "namespace", "uid") if not getattr(md, k)]
        if missing:
            raise InvalidArgument(f"pod sandbox metadata is missing {', '.join(missing)}")
        handler = handler or self.s.default_handler
        self.oci(handler)  # unknown handler: INVALID_ARGUMENT before anything is made
        name = sandbox_name(cfg)
        return await self.dedup(name, lambda: self._run_sandbox(cfg, name, handler))

    async def _run_sandbox(self: Runtime, cfg: PodSandboxConfig, name: str, handler: str) -> str:
        sid = self.new_sandbox_id()
        net_mode, pid_mode, ipc_mode = _ns_modes(cfg)
        host_net = net_mode == "NODE"
        parent = (cfg.linux.cgroup_parent if cfg.linux else "") or self.s.default_cgroup_parent
        rec = SandboxRecord(
            id=sid, name=name, state=NOTREADY, created_at=now_ns(), metadata=to_plain(cfg.metadata),
            config=to_plain(cfg), runtime_handler=handler, labels=dict(cfg.labels),
            annotations=dict(cfg.annotations), cgroup_parent=parent, extra={"phase": "creating"},
        )
        self.store.add_sandbox(rec)  # reserves the name, or ALREADY_EXISTS naming the holder
        self.sandboxes[sid] = rec
        try:
            async with self.lock(sid):
                await self._setup_sandbox(rec, cfg, handler, host_net, pid_mode, ipc_mode, parent)
        except BaseException as exc:
            log.warning("RunPodSandbox %s failed, cleaning up: %s", name, getattr(exc, "message", exc))
            try:
                await asyncio.shield(self._teardown_sandbox(rec, remove=True))
            except Exception:
                log.exception("cleanup of failed sandbox %s", sid)
            raise
        # As containerd does, sandbox lifecycle events carry the sandbox id as container_id.
        self.events.publish(sid, events.CREATED, sid)
        self.events.publish(sid, events.STARTED, sid)
        return sid

    def new_sandbox_id(self: Runtime) -> str:
        from moorage.core.ids import new_id

        return new_id()

    async def _setup_sandbox(self: Runtime, rec: SandboxRecord, cfg: PodSandboxConfig, handler: str,
                             host_net: bool, pid_mode: str, ipc_mode: str, parent: str) -> None:
        sid = rec.id
        root, state = self.sandbox_root(sid), self.sandbox_state(sid)
        os.makedirs(root, mode=0o711, exist_ok=True)
        os.makedirs(state, mode=0o711, exist_ok=True)

        # Files the pod's containers bind-mount.
        hostname = cfg.hostname or (os.uname().nodename if host_net else cfg.metadata.name)
        podfiles.write_atomic(os.path.join(root, "hostname"), hostname + "\n")
        podfiles.write_atomic(os.path.join(root, "resolv.conf"), podfiles.resolv_conf_content(
            cfg.dns_config, podfiles.read_host_file("/etc/resolv.conf")))
        podfiles.write_atomic(os.path.join(root, "hosts"), podfiles.hosts_content(
            hostname, host_net, podfiles.read_host_file("/etc/hosts")))

        # A per-pod /dev/shm, unless the pod shares the host's IPC namespace.
        shm = None
        if ipc_mode != "NODE":
            shm = os.path.join(state, "shm")
            os.makedirs(shm, exist_ok=True)
            mountmod.mount([mountmod.Mount("tmpfs", "shm", ("nosuid", "nodev", "noexec", "mode=1777",
                                                          f"size={SHM_SIZE}"))], shm)
        else:
            shm = "/dev/shm"

        # The network: a pinned namespace, configured by CNI when a network is set up.
        netns_path = None
        if not host_net:
            netns_path = await asyncio.to_thread(netnsmod.create_netns, sid, self.s.netns_dir)
            rec.netns_path = netns_path
            rec.extra["phase"] = "network"
            self.store.update_sandbox(rec)
            net_ready, _, net_msg = self.cni.status() if self.cni is not None else (False, "", "")
            if self.cni is not None and not net_ready and self.cni.config_errors():
                # A broken config is not "no network": never hand out a loopback-only pod for it.
                raise FailedPrecondition(f"pod network is not ready: {net_msg}")
            if self.cni is not None and net_ready:
                res = await self.timed("cni_add", self.cni.setup(
                    sid, netns_path, pod_namespace=cfg.metadata.namespace, pod_name=cfg.metadata.name,
                    pod_uid=cfg.metadata.uid, port_mappings=cni_port_mappings(cfg),
                    bandwidth=cni_bandwidth(cfg), dns=cni_dns(cfg)))
                ips = list(res.ips)
                rec.ip = ips[0] if ips else ""
                rec.additional_ips = ips[1:]
                podfiles.write_atomic(os.path.join(root, "hosts"), podfiles.hosts_content(
                    hostname, False, None, rec.ip))
            elif self.cni is not None:
                log.info("no CNI network configured: pod %s gets loopback only", rec.name)

        # The infra process.
        bundle = os.path.join(state, "bundle")
        rootfs = os.path.join(bundle, "rootfs")
        os.makedirs(rootfs, mode=0o755, exist_ok=True)
        cg_path = spec.cgroups_path(self.s.cgroup_driver, parent, sid)
        sb_spec = spec.build_sandbox_spec(
            cfg, sandbox_id=sid, rootfs=rootfs, infra_binary_path=self.s.infra_binary, netns_path=netns_path,
            cgroups_path=cg_path, runtime_cfg=self.s.spec, shm_path=shm if ipc_mode != "NODE" else None,
            resolv_conf_path=os.path.join(root, "resolv.conf"), hosts_path=os.path.join(root, "hosts"),
            hostname_path=os.path.join(root, "hostname"), host=self.host,
        )
        from moorage.runtime.oom import restrict_oom_score_adj

        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(restrict_oom_score_adj(sb_spec), f)
        rt = self.oci(handler)
        rec.extra.update(phase="infra", cgroups_path=cg_path, hostname=hostname, shm=shm or "")
        self.store.update_sandbox(rec)
        pid = await self.timed("oci_create", rt.create(sid, bundle, log_path=os.path.join(state, "infra.log"),
                                                      name=rec.name))
        await self.timed("oci_start", rt.start(sid))
        rec.pid = pid
        rec.state = READY
        rec.extra.pop("phase", None)
        self.store.update_sandbox(rec)
        self.watch_exit(sid, handler, self._on_infra_exit)
        log.info("pod sandbox ready", extra={"fields": {"id": sid, "name": rec.name, "pid": pid, "ip": rec.ip}})

    async def _on_infra_exit(self: Runtime, sid: str) -> None:
        rec = self.sandboxes.get(sid)
        if rec is None or rec.state != READY:
            return
        rec.state = NOTREADY
        self.store.update_sandbox(rec)
        self.events.publish(sid, events.STOPPED, sid)
        log.info("pod sandbox infra process exited", extra={"fields": {"id": sid}})

    # -- StopPodSandbox -----------------------------------------------------------------------

    def get_sandbox(self: Runtime, sid: str) -> SandboxRecord:
        """By full id or unique prefix."""
        rec = self.sandboxes.get(sid)
        if rec is not None:
            return rec
        if sid:
            matches = [s for s in self.sandboxes if s.startswith(sid)]
            if len(matches) == 1:
                return self.sandboxes[matches[0]]
            if len(matches) > 1:
                raise InvalidArgument(f"pod sandbox id prefix {sid!r} is ambiguous ({len(matches)} sandboxes)")
        raise NotFound(f"pod sandbox {sid!r} not found")

    async def stop_sandbox(self: Runtime, sid: str) -> None:
        rec = self.get_sandbox(sid)
        for c in [c for c in self.containers.values() if c.sandbox_id == rec.id]:
            await self.stop_container(c.id, 0)
        async with self.lock(rec.id):
            await self._teardown_sandbox(rec, remove=False)

    async def _teardown_sandbox(self: Runtime, rec: SandboxRecord, remove: bool) -> None:
        """Stop the infra process and release the network and mounts; idempotent."""
        sid = rec.id
        rt = self.oci(rec.runtime_handler)
        lost = False
        try:
            st = await rt.state(sid)
            if st.status in ("running", "created", "paused"):
                await rt.kill(sid, signal.SIGKILL)
        except NotFound:
            # The runtime does not know the infra: with no conmon either, no exit will ever be
            # recorded (state lost, e.g. after a reboot); do not wait for one.
            lost = rt.conmon_pid(sid) is None
        except MoorageError as e:
            log.warning("killing infra of %s: %s", sid, e.message)
        if lost:
            self.forget_watcher(sid)
        else:
            await self.wait_exited(sid, 10)
        if rec.netns_path:
            if self.cni is not None:
                try:
                    await self.timed("cni_del", self.cni.teardown(sid, rec.netns_path))
                except MoorageError as e:
                    if not remove:
                        raise
                    log.warning("CNI teardown of %s: %s", sid, e.message)
            await asyncio.to_thread(netnsmod.remove_netns, rec.netns_path, self.s.netns_dir)
        shm = os.path.join(self.sandbox_state(sid), "shm")
        if os.path.isdir(shm):
            mountmod.unmount_all(shm)
        was_ready = rec.state == READY and not rec.extra.get("phase")
        rec.state = NOTREADY
        if was_ready:  # the infra exit was not seen (e.g. state lost): say it stopped now
            self.events.publish(sid, events.STOPPED, sid)
        if remove:
            try:
                await rt.delete(sid, force=True)
            except MoorageError as e:
                log.warning("deleting infra of %s: %s", sid, e.message)
            from moorage.core.fs import remove_tree

            remove_tree(self.sandbox_state(sid))
            remove_tree(self.sandbox_root(sid))
            self.store.delete_sandbox(sid)
            self.sandboxes.pop(sid, None)
            self._locks.pop(sid, None)
            self._exit_events.pop(sid, None)
        else:
            self.store.update_sandbox(rec)

    # -- RemovePodSandbox -----------------------------------------------------------------------

    async def remove_sandbox(self: Runtime, sid: str) -> None:
        try:
            rec = self.get_sandbox(sid)
        except NotFound:
            return  # the CRI asks Remove of an unknown sandbox to succeed
        # Mark it first (under its lock, which CreateContainer takes for its last check): a
        # container created from here on is refused, and every earlier one is listed below.
        async with self.lock(rec.id):
            self._removing_sandboxes.add(rec.id)
        try:
            for c in [c for c in self.containers.values() if c.sandbox_id == rec.id]:
                await self.remove_container(c.id)
            async with self.lock(rec.id):
                if rec.id in self.sandboxes:
                    await self._teardown_sandbox(rec, remove=True)
                    self.events.publish(rec.id, events.DELETED, rec.id)
        finally:
            self._removing_sandboxes.discard(rec.id)

    # -- status and list ----------------------------------------------------------------------

    def sandbox_status(self: Runtime, sid: str, verbose: bool = False) -> tuple[SandboxRecord, dict[str, str]]:
        rec = self.get_sandbox(sid)
        info: dict[str, str] = {}
        if verbose:
            bundle = os.path.join(self.sandbox_state(rec.id), "bundle", "config.json")
            try:
                with open(bundle) as f:
                    runtime_spec = json.load(f)
            except (OSError, ValueError):
                runtime_spec = None
            info["info"] = json.dumps({
                "pid": rec.pid, "netNamespacePath": rec.netns_path, "runtimeHandler": rec.runtime_handler,
                "cgroupParent": rec.cgroup_parent, "config": rec.config, "runtimeSpec": runtime_spec,
                "image": self.s.infra_binary,
            })
        return rec, info

    def list_sandboxes(self: Runtime, id_prefix: str = "", state: str | None = None,
                       labels: dict[str, str] | None = None) -> list[SandboxRecord]:
        out = []
        for rec in self.sandboxes.values():
            if rec.extra.get("phase"):
                continue  # still being created
            if id_prefix and not rec.id.startswith(id_prefix):
                continue
            if state is not None and rec.state != state:
                continue
            if labels and any(rec.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(rec)
        return out

    def sandbox_config(self: Runtime, rec: SandboxRecord) -> PodSandboxConfig:
        return sandbox_config_from(rec.config)

    # -- recovery --------------------------------------------------------------------------------

    async def recover_sandbox(self: Runtime, rec: SandboxRecord) -> None:
        if rec.extra.get("phase"):
            log.info("removing sandbox %s left half-made by a crash (phase %s)", rec.id, rec.extra["phase"])
            await self._teardown_sandbox(rec, remove=True)
            return
        if rec.state != READY:
            return
        try:
            st = await self.oci(rec.runtime_handler).state(rec.id)
            alive = st.status in ("running", "created", "paused")
        except NotFound:
            alive = False
        if alive:
            self.watch_exit(rec.id, rec.runtime_handler, self._on_infra_exit)
        else:
            rec.state = NOTREADY
            self.store.update_sandbox(rec)
            self.events.publish(rec.id, events.STOPPED, rec.id)

    def collect_stale_netns(self: Runtime) -> None:
        try:
            removed = netnsmod.collect_stale(set(self.sandboxes), self.s.netns_dir)
        except OSError:
            return
        if removed:
            log.info("removed stale network namespaces", extra={"fields": {"netns": removed}})
        if self.cni is not None:
            orphans = self.cni.cached_sandboxes() - set(self.sandboxes)
            if orphans:
                self._cni_orphan_task = asyncio.ensure_future(cni_release_orphans(self.cni, sorted(orphans)))


def cni_port_mappings(cfg: PodSandboxConfig) -> list:
    from moorage.cni.manager import PortMapping

    return [PortMapping(host_port=p.host_port, container_port=p.container_port, protocol=p.protocol.lower(),
                        host_ip=p.host_ip) for p in cfg.port_mappings if p.host_port]


async def cni_release_orphans(cni: Any, sandbox_ids: list[str]) -> None:
    """DEL networks whose sandbox is gone from the store (a teardown that failed during a forced
    RemovePodSandbox, or a crash): their cache entries still hold addresses and host rules."""
    for sid in sandbox_ids:
        try:
            await cni.teardown(sid, None)
            log.info("released the pod network of vanished sandbox %s", sid)
        except MoorageError as e:
            log.warning("releasing the pod network of vanished sandbox %s: %s", sid, e.message)
        except Exception:
            log.exception("releasing the pod network of vanished sandbox %s", sid)


def cni_dns(cfg: PodSandboxConfig) -> Any:
    """The pod's DNS config for the CNI ``dns`` capability (None when the pod sets none)."""
    from moorage.cni.manager import DNSConfig

    dns = cfg.dns_config
    if dns is None or not (dns.servers or dns.searches or dns.options):
        return None
    return DNSConfig(servers=tuple(dns.servers), searches=tuple(dns.searches), options=tuple(dns.options))


def cni_bandwidth(cfg: PodSandboxConfig) -> Any:
    """Traffic shaping from the kubernetes.io/{ingress,egress}-bandwidth annotations."""
    from moorage.cni.manager import Bandwidth

    ann = cfg.annotations
    ingress = parse_quantity(ann.get("kubernetes.io/ingress-bandwidth", ""), "kubernetes.io/ingress-bandwidth")
    egress = parse_quantity(ann.get("kubernetes.io/egress-bandwidth", ""), "kubernetes.io/egress-bandwidth")
    if not ingress and not egress:
        return None
    unlimited = 2**31 - 1
    return Bandwidth(ingress_rate=ingress, ingress_burst=unlimited if ingress else 0,
                     egress_rate=egress, egress_burst=unlimited if egress else 0)


_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def parse_quantity(text: str, what: str) -> int:
    """A Kubernetes resource quantity such as "10M" or "1Gi" as an integer (0 if empty)."""
    text = text.strip()
    if not text:
        return 0
    num = text.rstrip("kMGTPi")
    suffix = text[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if suffix not in _SUFFIXES or value < 0:
        raise InvalidArgument(f"annotation {what}: {text!r} is not a quantity like 10M or 1Gi")
    return int(value * _SUFFIXES[suffix])
