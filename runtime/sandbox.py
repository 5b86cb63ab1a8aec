"""Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox, status and list.

A sandbox owns a pinned network namespace (CNI-configured unless host network),
the pod's hostname/hosts/resolv.conf files, a /dev/shm tmpfs, and either an infra
process (the host's ``catatonit -P`` in an empty read-only rootfs under conmon)
or, with ``drop_infra`` for a pod that shares no PID namespace and has no user
namespace, pinned IPC and UTS namespaces (``core.nspin``) its containers join.
The pod-wide verbs that also touch containers (stop and remove) are composed by
the ``Runtime`` facade in runtime/service.py; this module knows only sandboxes.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal

from moorage.core import mount as mountmod
from moorage.core import netns as netnsmod
from moorage.core import nspin
from moorage.core.errors import FailedPrecondition, InvalidArgument, MoorageError, NotFound
from moorage.core.fs import open_private, remove_tree
from moorage.core.ids import new_id
from moorage.core.network import Bandwidth, DNSConfig, PortMapping
from moorage.core.store import now_ns
from moorage.runtime import cgroups as cg
from moorage.runtime import events, podfiles, spec
from moorage.runtime.context import RuntimeContext, error_text
from moorage.runtime.model import LinuxContainerResources, PodSandboxConfig
from moorage.runtime.modelio import to_plain
from moorage.runtime.oom import restrict_oom_score_adj
from moorage.runtime.ports import PodNetwork
from moorage.runtime.records import (
    CREATE_FAILED,
    Sandbox,
    SandboxMeta,
    SandboxPhase,
    SandboxState,
    SandboxStatus,
    replace,
)

log = logging.getLogger("moorage.sandbox")

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


class Sandboxes:
    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        self._cgroup_mounts: list[cg.CgroupMount] | None = None  # the host's, read once

    # -- RunPodSandbox ---------------------------------------------------------------------

    async def run(self, cfg: PodSandboxConfig, handler: str = "") -> str:
        md = cfg.metadata
        missing = [k for k, v in (("name", md.name), ("namespace", md.namespace), ("uid", md.uid)) if not v]
        if missing:
            raise InvalidArgument(f"pod sandbox metadata is missing {', '.join(missing)}")
        handler = handler or self.ctx.s.default_handler
        self.ctx.oci(handler)  # unknown handler: INVALID_ARGUMENT before anything is made
        if cfg.linux:
            spec.pod_resource_annotations(cfg.linux.overhead, cfg.linux.resources)  # likewise bad pod resources
        if spec.sandbox_userns(cfg, self.ctx.s.spec.userns_length_multiple):  # likewise bad id mappings
            for d in (self.ctx.s.state_dir, self.ctx.s.root_dir):
                _check_traversable(d)
        name = sandbox_name(cfg)
        return await self.ctx.dedup(name, lambda: self._run(cfg, name, handler))

    async def _run(self, cfg: PodSandboxConfig, name: str, handler: str) -> str:
        sid = new_id()
        net_mode, _pid_mode, ipc_mode = _ns_modes(cfg)
        host_net = net_mode == "NODE"
        parent = (cfg.linux.cgroup_parent if cfg.linux else "") or self.ctx.s.default_cgroup_parent
        infra = not self.ctx.s.drop_infra or spec.sandbox_needs_infra(cfg, self.ctx.s.spec.userns_length_multiple)
        pins = os.path.join(self.ctx.sandbox_state(sid), "ns")
        kinds = [] if infra else [k for k, shared in (("ipc", ipc_mode == "NODE"), ("uts", host_net)) if not shared]
        meta = SandboxMeta(
            id=sid, name=name, created_at=now_ns(), config=copy.deepcopy(cfg), runtime_handler=handler,
            cgroup_parent=parent, cgroups_path=spec.cgroups_path(self.ctx.s.cgroup_driver, parent, sid),
            hostname=cfg.hostname or (os.uname().nodename if host_net else cfg.metadata.name),
            shm_path=os.path.join(self.ctx.sandbox_state(sid), "shm") if ipc_mode != "NODE" else "/dev/shm",
            infra=infra, ns_paths={k: nspin.pin_path(pins, k) for k in kinds},
        )
        podfiles.checked_hostname(meta.hostname)  # the edge checked it; a last guard before any file
        # No await from this check to add_sandbox: two pods cannot both take the same host ids.
        self._check_userns_free(cfg)
        async with self.ctx.hooks.creating():  # an NRI plugin synchronizing sees it or its event
            # Reserves the name, or ALREADY_EXISTS naming the holder.
            rec = self.ctx.add_sandbox(meta, SandboxStatus(phase=SandboxPhase.CREATING))
            try:
                # On disk before anything is made for it (one fsync shared with concurrent calls, in a
                # thread), so that recovery finds what a crash leaves half-made.
                await self.ctx.durable()
                async with self.ctx.lock(sid):
                    await self._setup(rec, host_net, ipc_mode)
            except BaseException as exc:
                log.warning("RunPodSandbox %s failed, cleaning up: %s", name, error_text(exc))
                try:
                    await asyncio.shield(self.teardown(rec, remove=True))
                except Exception as cleanup:
                    log.exception("cleanup of failed sandbox %s", sid)
                    self._mark_create_failed(rec, exc, cleanup)
                raise
        # As containerd does, sandbox lifecycle events carry the sandbox id as container_id.
        self.ctx.events.publish(sid, events.EventType.CREATED, sid)
        self.ctx.events.publish(sid, events.EventType.STARTED, sid)
        return sid

    def _userns(self, cfg: PodSandboxConfig) -> spec.PodUserns | None:
        return spec.sandbox_userns(cfg, self.ctx.s.spec.userns_length_multiple)

    def _owner(self, cfg: PodSandboxConfig) -> tuple[int, int] | None:
        """Host (uid, gid) of the pod's root when it has its own user namespace."""
        u = self._userns(cfg)
        return (u.uid.host_id, u.gid.host_id) if u is not None else None

    def _check_userns_free(self, cfg: PodSandboxConfig) -> None:
        """INVALID_ARGUMENT if another pod's user namespace maps any of the host ids this one asks for.
        Sandboxes of the same pod (same uid: a new attempt) share their pod's mapping, as the kubelet
        keeps it for the pod's life."""
        mine = self._userns(cfg)
        if mine is None:
            return
        for other in self.ctx.sandboxes.values():
            ocfg = other.metadata.config
            if ocfg.metadata.uid == cfg.metadata.uid:
                continue
            try:
                theirs = self._userns(ocfg)
            except InvalidArgument:
                continue  # recorded before a stricter config: not ours to judge here
            if theirs is not None and mine.overlaps(theirs):
                (u0, u1), (g0, g1) = theirs.host_ranges()
                raise InvalidArgument(
                    f"{spec.USERNS_FIELD}: host ids already mapped by pod sandbox {other.id} "
                    f"({ocfg.metadata.namespace}/{ocfg.metadata.name}: uids {u0}-{u1 - 1}, gids {g0}-{g1 - 1})")

    def _mark_create_failed(self, rec: Sandbox, exc: BaseException, cleanup: BaseException) -> None:
        """Creation failed and so did its clean-up: leave a visible NOTREADY sandbox that
        RemovePodSandbox can clean, instead of a hidden one that holds its name."""
        message = (f"RunPodSandbox failed: {error_text(exc)}; cleaning up failed too: {error_text(cleanup)}; "
                   f"remove it with RemovePodSandbox {rec.id}")
        try:
            rec.update(lambda s: replace(s, state=SandboxState.NOTREADY, phase=None, reason=CREATE_FAILED,
                                         message=message))
        except MoorageError as e:
            log.warning("recording the failed creation of sandbox %s: %s", rec.id, e.message)

    async def _setup(self, rec: Sandbox, host_net: bool, ipc_mode: str) -> None:
        sid, meta = rec.id, rec.metadata
        cfg = meta.config
        root, state = self.ctx.sandbox_root(sid), self.ctx.sandbox_state(sid)
        os.makedirs(root, mode=0o711, exist_ok=True)
        os.makedirs(state, mode=0o711, exist_ok=True)

        # Files the pod's containers bind-mount; in a pod user namespace, owned by the pod's root.
        owner = self._owner(cfg)
        hostname = meta.hostname

        def files_and_shm() -> None:
            # In a thread: file creation on the root dir's filesystem can wait for its journal.
            podfiles.write_atomic(os.path.join(root, "hostname"), podfiles.hostname_content(hostname), owner=owner)
            podfiles.write_atomic(os.path.join(root, "resolv.conf"), podfiles.resolv_conf_content(
                cfg.dns_config, podfiles.read_host_file("/etc/resolv.conf")), owner=owner)
            podfiles.write_atomic(os.path.join(root, "hosts"), podfiles.hosts_content(
                hostname, host_net, podfiles.read_host_file("/etc/hosts")), owner=owner)
            # A per-pod /dev/shm, unless the pod shares the host's IPC namespace (root-owned as the pod sees it).
            if ipc_mode != "NODE":
                os.makedirs(meta.shm_path, exist_ok=True)
                ids = (f"uid={owner[0]}", f"gid={owner[1]}") if owner else ()
                mountmod.mount([mountmod.Mount("tmpfs", "shm", ("nosuid", "nodev", "noexec", "mode=1777",
                                                              f"size={SHM_SIZE}", *ids))], meta.shm_path)

        await asyncio.to_thread(files_and_shm)

        # Without an infra process the pod's IPC and UTS namespaces are pinned files (the hostname
        # and the IPC sysctls set inside them as they are made).
        net_sysctls: dict[str, str] = {}
        if not meta.infra:
            net_sysctls, ipc_sysctls = spec.split_sysctls(spec.sandbox_sysctls(cfg, self.ctx.s.spec))
            if meta.ns_paths:
                await asyncio.to_thread(
                    nspin.pin_namespaces, os.path.join(state, "ns"), tuple(meta.ns_paths),
                    # As the infra's spec: the kernel hostname only when the pod names one.
                    hostname=cfg.hostname if cfg.hostname and "uts" in meta.ns_paths else None,
                    sysctls=ipc_sysctls)

        # The network: a pinned namespace, configured by CNI when a network is set up.  A pod with
        # its own user namespace gets one its infra makes inside that user namespace (pinned and
        # configured below, before the infra starts): the pod's containers join the user namespace
        # first and could not enter a network namespace the host's user namespace owns, nor mount
        # a sysfs for it.
        own_netns = owner is not None
        if not host_net and not own_netns:
            netns_path = await asyncio.to_thread(netnsmod.create_netns, sid, self.ctx.s.netns_dir)
            rec.update(lambda s: replace(s, netns_path=netns_path, phase=SandboxPhase.NETWORK))
            await self._setup_network(rec, self.ctx.network, netns_path)

        if not meta.infra:
            await self._finish_without_infra(rec, host_net, ipc_mode, net_sysctls)
            return

        # The infra process.
        bundle = os.path.join(state, "bundle")
        rootfs = os.path.join(bundle, "rootfs")
        os.makedirs(rootfs, mode=0o755, exist_ok=True)
        if owner is not None:  # the runtime makes the mount points in it as the pod's root
            os.chown(rootfs, owner[0], owner[1])
        sb_spec = spec.build_sandbox_spec(
            cfg, sandbox_id=sid, rootfs=rootfs, infra_binary_path=self.ctx.s.infra_binary,
            netns_path=rec.status.netns_path or None, cgroups_path=meta.cgroups_path, runtime_cfg=self.ctx.s.spec,
            shm_path=meta.shm_path if ipc_mode != "NODE" else None,
            resolv_conf_path=os.path.join(root, "resolv.conf"), hosts_path=os.path.join(root, "hosts"),
            hostname_path=os.path.join(root, "hostname"), host=self.ctx.host,
        )
        with open_private(os.path.join(bundle, "config.json")) as f:
            json.dump(restrict_oom_score_adj(sb_spec), f)
        rt = self.ctx.oci(meta.runtime_handler)
        rec.update(lambda s: replace(s, phase=SandboxPhase.INFRA))
        pid = await self.ctx.timed("oci_create", rt.create(sid, bundle, log_path=os.path.join(state, "infra.log"),
                                                          name=rec.name))
        if not host_net and own_netns:
            netns_path = await asyncio.to_thread(netnsmod.pin_netns, sid, f"/proc/{pid}/ns/net",
                                                 self.ctx.s.netns_dir)
            rec.update(lambda s: replace(s, netns_path=netns_path, pid=pid, phase=SandboxPhase.NETWORK))
            await self._setup_network(rec, self.ctx.network, netns_path)
        await self.ctx.timed("oci_start", rt.start(sid))
        rec.update(lambda s: replace(s, pid=pid))
        # NRI plugins see the pod while it is still hidden and not ready; a plugin error fails the call.
        await self.ctx.hooks.run_pod_sandbox(rec)
        rec.update(lambda s: replace(s, pid=pid, state=SandboxState.READY, phase=None))
        self.ctx.watch_exit(sid, meta.runtime_handler, self._on_infra_exit)
        log.info("pod sandbox ready", extra={"fields": {"id": sid, "name": rec.name, "pid": pid,
                                                        "ip": rec.status.ip}})

    async def _finish_without_infra(self, rec: Sandbox, host_net: bool, ipc_mode: str,
                                    net_sysctls: dict[str, str]) -> None:
        """A pod with pinned namespaces is READY once they exist: no process is started."""
        meta = rec.metadata
        root = self.ctx.sandbox_root(rec.id)
        # The infra spec is still built (not run): it is where a pod's config is checked, so a pod
        # is refused for the same reasons with or without an infra process.
        spec.build_sandbox_spec(
            meta.config, sandbox_id=rec.id, rootfs="/", infra_binary_path=self.ctx.s.infra_binary,
            netns_path=rec.status.netns_path or None, cgroups_path=meta.cgroups_path, runtime_cfg=self.ctx.s.spec,
            shm_path=meta.shm_path if ipc_mode != "NODE" else None,
            resolv_conf_path=os.path.join(root, "resolv.conf"), hosts_path=os.path.join(root, "hosts"),
            hostname_path=os.path.join(root, "hostname"), host=self.ctx.host)
        if net_sysctls and rec.status.netns_path:
            await asyncio.to_thread(nspin.set_sysctls_in, rec.status.netns_path, "net", net_sysctls)
        if self.ctx.s.cgroup_driver == "cgroupfs":
            # The pod cgroup exists from the start, as the infra's runc would have made it: pod stats
            # read it before any container runs.
            if self._cgroup_mounts is None:  # parsing mountinfo is CPU work that holds the GIL
                self._cgroup_mounts = await asyncio.to_thread(cg.host_mounts)
            await asyncio.to_thread(_make_cgroup, cg.parent_of_cgroups_path(meta.cgroups_path), self._cgroup_mounts)
        # NRI plugins see the pod while it is still hidden and not ready; a plugin error fails the call.
        await self.ctx.hooks.run_pod_sandbox(rec)
        rec.update(lambda s: replace(s, state=SandboxState.READY, phase=None))
        log.info("pod sandbox ready", extra={"fields": {"id": rec.id, "name": rec.name, "infra": False,
                                                        "ip": rec.status.ip}})

    def pinned_alive(self, rec: Sandbox) -> bool:
        """A pod without an infra process is alive while each of its pinned namespaces is."""
        if rec.status.netns_path and not netnsmod.is_netns(rec.status.netns_path):
            return False
        return all(nspin.is_pinned(p, k) for k, p in rec.metadata.ns_paths.items())

    async def _setup_network(self, rec: Sandbox, net: PodNetwork | None, netns_path: str) -> None:
        if net is None:
            return
        cfg = rec.metadata.config
        net_ready, _, net_msg = net.status()
        if not net_ready and net.config_errors():
            # A broken config is not "no network": never hand out a loopback-only pod for it.
            raise FailedPrecondition(f"pod network is not ready: {net_msg}")
        if not net_ready:
            log.info("no CNI network configured: pod %s gets loopback only", rec.name)
            return
        res = await self.ctx.timed("cni_add", net.setup(
            rec.id, netns_path, pod_namespace=cfg.metadata.namespace, pod_name=cfg.metadata.name,
            pod_uid=cfg.metadata.uid, port_mappings=cni_port_mappings(cfg),
            bandwidth=cni_bandwidth(cfg), dns=cni_dns(cfg)))
        ips = list(res.ips)
        rec.update(lambda s: replace(s, ip=ips[0] if ips else "", additional_ips=tuple(ips[1:])))
        podfiles.write_atomic(os.path.join(self.ctx.sandbox_root(rec.id), "hosts"), podfiles.hosts_content(
            rec.metadata.hostname, False, None, rec.status.ip), owner=self._owner(cfg))

    async def _on_infra_exit(self, sid: str) -> None:
        rec = self.ctx.sandboxes.get(sid)
        if rec is None or rec.status.state != SandboxState.READY:
            return
        # The same rule as for containers: without its conmon, runc says whether the infra
        # still runs, and a live one is killed rather than reported gone.
        if await self.ctx.settle_exit(sid, rec.metadata.runtime_handler) is None:
            asyncio.get_running_loop().call_soon(self.ctx.watch_exit, sid, rec.metadata.runtime_handler,
                                                 self._on_infra_exit)
            return
        if rec.status.state != SandboxState.READY:
            return
        rec.update(lambda s: replace(s, state=SandboxState.NOTREADY))
        self.ctx.events.publish(sid, events.EventType.STOPPED, sid)
        log.info("pod sandbox infra process exited", extra={"fields": {"id": sid}})

    # -- StopPodSandbox and RemovePodSandbox (the containers are the facade's) ---------------------

    async def stop(self, rec: Sandbox) -> None:
        async with self.ctx.lock(rec.id):
            # Its containers are stopped already (the facade's order); the pod is still there.
            await self.ctx.hooks.stop_pod_sandbox(rec)
            await self.teardown(rec, remove=False)

    async def remove(self, rec: Sandbox) -> None:
        async with self.ctx.lock(rec.id):
            if rec.id in self.ctx.sandboxes:
                await self.ctx.hooks.stop_pod_sandbox(rec)  # once per pod: a no-op after StopPodSandbox
                await self.teardown(rec, remove=True)
                await self.ctx.hooks.remove_pod_sandbox(rec)
                self.ctx.events.publish(rec.id, events.EventType.DELETED, rec.id)

    async def teardown(self, rec: Sandbox, remove: bool) -> None:
        """Stop the infra process and release the network and mounts; idempotent.

        The intent is recorded first (``teardown``), so that a crash anywhere in here leaves a
        sandbox whose teardown recovery completes (``recover``), not one that holds its shm,
        netns and network while it looks stopped.
        """
        sid = rec.id
        infra = rec.metadata.infra
        rt = self.ctx.oci(rec.metadata.runtime_handler)
        intent = "remove" if remove else "stop"
        if rec.status.phase is None and rec.status.teardown not in (intent, "remove"):
            rec.update(lambda s: replace(s, teardown=intent))
        lost = False
        if infra:
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
                self.ctx.forget_watcher(sid)
            else:
                await self.ctx.wait_exited(sid, 10)
            if rt.exit_status(sid) is None and rt.conmon_pid(sid) is None:
                # No conmon records this exit (it was killed, or the state was lost): runc is the witness.
                self.ctx.forget_watcher(sid)
                if not await self.ctx.end_process(sid, rec.metadata.runtime_handler):
                    raise FailedPrecondition(f"infra process of pod sandbox {sid} still runs after SIGKILL")
        netns_path = rec.status.netns_path
        if netns_path:
            if self.ctx.network is not None:
                try:
                    await self.ctx.timed("cni_del", self.ctx.network.teardown(sid, netns_path))
                except MoorageError as e:
                    if not remove:
                        raise
                    log.warning("CNI teardown of %s: %s", sid, e.message)
            await asyncio.to_thread(netnsmod.remove_netns, netns_path, self.ctx.s.netns_dir)
        if rec.metadata.ns_paths:
            await asyncio.to_thread(nspin.unpin_all, os.path.join(self.ctx.sandbox_state(sid), "ns"))
        shm = os.path.join(self.ctx.sandbox_state(sid), "shm")
        if os.path.isdir(shm):
            mountmod.unmount_all(shm)
        was_ready = rec.status.state == SandboxState.READY and rec.status.phase is None
        rec.update(lambda s: replace(s, state=SandboxState.NOTREADY, teardown="remove" if remove else ""))
        if was_ready:  # the infra exit was not seen (e.g. state lost): say it stopped now
            self.ctx.events.publish(sid, events.EventType.STOPPED, sid)
        if remove:
            if infra:
                try:
                    await rt.delete(sid, force=True)
                except MoorageError as e:
                    log.warning("deleting infra of %s: %s", sid, e.message)
            await self.ctx.release_cgroup(sid, rec.metadata.cgroup_parent)
            # Off the event loop: unlinks on the root dir's filesystem wait for its journal.
            await asyncio.to_thread(remove_tree, self.ctx.sandbox_state(sid))
            await asyncio.to_thread(remove_tree, self.ctx.sandbox_root(sid))
            self.ctx.forget_sandbox(sid)

    # -- UpdatePodSandboxResources ------------------------------------------------------------

    async def update_resources(self, rec: Sandbox, overhead: LinuxContainerResources | None,
                               resources: LinuxContainerResources | None) -> None:
        """Record the pod-level resources the kubelet has just written on the pod's cgroup.

        As containerd: nothing on the host changes (the pod cgroup is the kubelet's, the infra
        keeps its own shares); the new values are kept for PodSandboxStatus and recovery.  The
        same request twice writes once.
        """
        spec.pod_resource_annotations(overhead, resources)  # INVALID_ARGUMENT before anything changes
        async with self.ctx.lock(rec.id):
            if self.ctx.sandboxes.get(rec.id) is not rec:
                raise NotFound(f"pod sandbox {rec.id} not found (it was removed)")
            if rec.status.resources_updated and rec.pod_resources() == (overhead, resources):
                return
            await self.ctx.hooks.update_pod_sandbox(rec, overhead, resources)  # a plugin error fails the call
            rec.update(lambda s: replace(s, overhead=copy.deepcopy(overhead), resources=copy.deepcopy(resources),
                                         resources_updated=True))
        log.info("pod sandbox resources updated", extra={"fields": {"id": rec.id}})
        await self.ctx.hooks.post_update_pod_sandbox(rec)

    # -- status and list ----------------------------------------------------------------------

    def status(self, sid: str, verbose: bool = False) -> tuple[Sandbox, dict[str, str]]:
        rec = self.ctx.get_sandbox(sid)
        info: dict[str, str] = {}
        if verbose:
            bundle = os.path.join(self.ctx.sandbox_state(rec.id), "bundle", "config.json")
            try:
                with open(bundle) as f:
                    runtime_spec = json.load(f)
            except (OSError, ValueError):
                runtime_spec = None
            meta, st = rec.metadata, rec.status
            overhead, resources = rec.pod_resources()
            info["info"] = json.dumps({
                "pid": st.pid, "infra": meta.infra, "namespacePaths": meta.ns_paths,
                "netNamespacePath": st.netns_path, "runtimeHandler": meta.runtime_handler,
                "cgroupParent": meta.cgroup_parent, "config": to_plain(meta.config), "runtimeSpec": runtime_spec,
                "overhead": _plain_or_none(overhead), "resources": _plain_or_none(resources),
                "image": self.ctx.s.infra_binary,
            })
        return rec, info

    def query(self, id_prefix: str = "", state: SandboxState | None = None,
             labels: dict[str, str] | None = None) -> list[Sandbox]:
        out = []
        for rec in self.ctx.sandboxes.values():
            if rec.status.phase is not None:
                continue  # still being created
            if id_prefix and not rec.id.startswith(id_prefix):
                continue
            if state is not None and rec.status.state != state:
                continue
            if labels and any(rec.metadata.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(rec)
        return out

    # -- recovery --------------------------------------------------------------------------------

    async def recover(self, rec: Sandbox) -> None:
        if rec.status.phase is not None:
            log.info("removing sandbox %s left half-made by a crash (phase %s)", rec.id, rec.status.phase.value)
            await self.teardown(rec, remove=True)
            return
        if rec.status.teardown:
            # StopPodSandbox or RemovePodSandbox was cut short: finish what it had begun.
            log.info("completing the %s of sandbox %s cut short by a crash", rec.status.teardown, rec.id)
            await self.teardown(rec, remove=rec.status.teardown == "remove")
            return
        if rec.status.state != SandboxState.READY:
            return
        if not rec.metadata.infra:
            if not self.pinned_alive(rec):  # e.g. the pins were unmounted by hand
                rec.update(lambda s: replace(s, state=SandboxState.NOTREADY))
                self.ctx.events.publish(rec.id, events.EventType.STOPPED, rec.id)
            return
        handler = rec.metadata.runtime_handler
        rt = self.ctx.oci(handler)
        if rt.conmon_pid(rec.id) is not None:
            self.ctx.watch_exit(rec.id, handler, self._on_infra_exit)
            return
        # No conmon: the same rule as a live watcher's (a live infra without one is killed).
        await self.ctx.settle_exit(rec.id, handler)
        rec.update(lambda s: replace(s, state=SandboxState.NOTREADY))
        self.ctx.events.publish(rec.id, events.EventType.STOPPED, rec.id)

    def collect_stale_netns(self) -> None:
        try:
            removed = netnsmod.collect_stale(set(self.ctx.sandboxes), self.ctx.s.netns_dir)
        except OSError:
            return
        if removed:
            log.info("removed stale network namespaces", extra={"fields": {"netns": removed}})
        net = self.ctx.network
        if net is not None:
            orphans = net.cached_sandboxes() - set(self.ctx.sandboxes)
            if orphans:
                task = asyncio.ensure_future(cni_release_orphans(net, sorted(orphans)))
                self.ctx.background.add(task)
                task.add_done_callback(self.ctx.background.discard)


def _check_traversable(path: str) -> None:
    """FAILED_PRECONDITION unless every existing directory on ``path`` lets others through: the OCI
    runtime mounts the rootfs and the pod files from inside the pod's user namespace, as its root,
    which is no one on the host (containerd has the same rule for its state dirs)."""
    d = os.path.abspath(path)
    while True:
        try:
            st = os.stat(d)
        except OSError:
            st = None
        if st is not None and not st.st_mode & 0o001:
            raise FailedPrecondition(
                f"{d} is not searchable by others (mode {st.st_mode & 0o7777:o}): a pod with its own user "
                f"namespace needs every directory above moorage's root and state dirs to have o+x (e.g. 0711)")
        if d == "/":
            return
        d = os.path.dirname(d)


def _make_cgroup(path: str, mounts: list[cg.CgroupMount]) -> None:
    for d in cg.cgroup_dirs_for_path(path, mounts).values():
        os.makedirs(d, exist_ok=True)


def _plain_or_none(res: LinuxContainerResources | None) -> dict | None:
    return to_plain(res) if res is not None else None


def cni_port_mappings(cfg: PodSandboxConfig) -> list[PortMapping]:
    return [PortMapping(host_port=p.host_port, container_port=p.container_port, protocol=p.protocol.lower(),
                        host_ip=p.host_ip) for p in cfg.port_mappings if p.host_port]


async def cni_release_orphans(cni: PodNetwork, sandbox_ids: list[str]) -> None:
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


def cni_dns(cfg: PodSandboxConfig) -> DNSConfig | None:
    """The pod's DNS config for the CNI ``dns`` capability (None when the pod sets none)."""
    dns = cfg.dns_config
    if dns is None or not (dns.servers or dns.searches or dns.options):
        return None
    return DNSConfig(servers=tuple(dns.servers), searches=tuple(dns.searches), options=tuple(dns.options))


def cni_bandwidth(cfg: PodSandboxConfig) -> Bandwidth | None:
    """Traffic shaping from the kubernetes.io/{ingress,egress}-bandwidth annotations."""
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
