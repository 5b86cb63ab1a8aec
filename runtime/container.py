"""Containers: create, start, stop, remove, status, list, exec-sync, update, reopen log.

As containerd's CRI plugin does, CreateContainer prepares the rootfs snapshot and
the OCI spec (so bad configs fail early), and StartContainer creates the runc
container under its conmon and starts it (so a missing executable fails at start,
leaving the container EXITED with the runtime's message).  The sandbox a container
lives in is read through the shared ``RuntimeContext``; this module never imports
runtime/sandbox.py or the ``Runtime`` facade.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence

from moorage.core.errors import FailedPrecondition, InvalidArgument, MoorageError, NotFound
from moorage.core.fs import open_private, remove_tree
from moorage.core.idmap import UserNS
from moorage.core.ids import new_id
from moorage.core.store import ImageRecord, now_ns
from moorage.runtime import cdi, events, procsig, spec, users
from moorage.runtime.context import LOST_STATE_MESSAGE, ExitOutcome, RuntimeContext, error_text
from moorage.runtime.model import ContainerConfig, ImageConfig, LinuxContainerResources, Mount
from moorage.runtime.modelio import to_plain
from moorage.runtime.oci import OCIRuntimeAPI
from moorage.runtime.oom import restrict_oom_score_adj
from moorage.runtime.records import (
    CREATE_FAILED,
    Container,
    ContainerMeta,
    ContainerPhase,
    ContainerState,
    ContainerStatus,
    ContainerUser,
    Sandbox,
    SandboxState,
    replace,
)

log = logging.getLogger("moorage.container")

def _signal_number(name: str) -> int:
    if not name:
        return signal.SIGTERM
    n = name.upper()
    if n.isdigit():
        return int(n)
    if not n.startswith("SIG"):
        n = "SIG" + n
    try:
        return int(signal.Signals[n])
    except KeyError:
        return signal.SIGTERM


_ID = re.compile(r"[0-9a-f]{64}")
#: A runtime handler name as a journal may carry it ("" is the default handler).
_HANDLER = re.compile(r"[A-Za-z0-9_.-]{0,64}")
#: RemoveContainer's pending clean-ups, one JSON file per container, under <root_dir> (they must
#: outlive a reboot: the writable layer they release lives under root_dir too).
REMOVING_DIR = "removing"


def _image_volume_key(cid: str, index: int) -> str:
    return f"imagevolume-{cid}-{index}"


def _check_sub_path(sub: str, ref: str) -> None:
    """An image sub path is relative and stays inside the image: no '..', not absolute."""
    if not sub:
        return
    if "\0" in sub or os.path.isabs(sub) or ".." in sub.split("/"):
        raise InvalidArgument(f"image_sub_path {sub!r} of image volume {ref!r} must be a relative path "
                              "inside the image, without '..'")


def _resolve_sub_path(root: str, sub: str, ref: str) -> str:
    """The host path of ``sub`` inside the mounted image at ``root``; symlinks must not lead out."""
    if not sub:
        return root
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, sub))
    if os.path.commonpath([path, real_root]) != real_root:
        raise InvalidArgument(f"image_sub_path {sub!r} of image volume {ref!r} leads outside the image "
                              "(through a symlink)")
    if not os.path.exists(path):
        raise NotFound(f"image_sub_path {sub!r} does not exist in image volume {ref!r}")
    return path


def container_log_path(log_directory: str, log_path: str) -> str:
    """The host path of a container's log: ``log_path`` inside the pod's ``log_directory``.

    As containerd does, the path is always joined under the log directory (a leading '/' is
    dropped), and anything that leaves it once normalised is refused: the daemon creates the
    parent directories as root.  No log directory: no log file, unless a path was asked for.
    """
    if not log_path:
        return ""
    if "\0" in log_path or "\0" in log_directory:
        raise InvalidArgument(f"log path {log_path!r} contains a NUL byte")
    if not log_directory:
        if os.path.isabs(log_path):
            raise InvalidArgument(f"log path {log_path!r} is set but the pod sandbox has no log_directory; "
                                  "a container's log path is relative to its pod's log directory")
        return ""
    if not os.path.isabs(log_directory):
        raise InvalidArgument(f"pod log_directory {log_directory!r} must be an absolute path")
    base = os.path.normpath(log_directory)
    path = os.path.normpath(os.path.join(base, log_path.lstrip("/")))
    if path == base or os.path.commonpath([path, base]) != base:
        raise InvalidArgument(f"log path {log_path!r} leads outside the pod's log directory {log_directory!r}")
    return path


class Containers:
    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        #: The runtime's init as it was before ``runc start``, per container started by this daemon:
        #: a stop waits until the program has replaced it (runtime/procsig.py).
        self._exec_probes: dict[str, procsig.ExecProbe] = {}
        # RemoveContainer's background work: container id -> (its sandbox id, the task)
        self._cleanups: dict[str, tuple[str, asyncio.Task]] = {}
        # The runtime's state released after an exit, in flight: container id -> the task (True: done)
        self._releases: dict[str, asyncio.Task[bool]] = {}

    # -- CreateContainer ---------------------------------------------------------------------

    async def create(self, sandbox_id: str, cfg: ContainerConfig) -> str:
        if not cfg.metadata.name:
            raise InvalidArgument("container metadata.name is empty")
        if not cfg.image:
            raise InvalidArgument(f"container {cfg.metadata.name!r}: image is empty")
        sc = cfg.linux.security_context if cfg.linux else None
        if sc is not None and sc.run_as_group is not None and sc.run_as_user is None and not sc.run_as_username:
            raise InvalidArgument(f"container {cfg.metadata.name!r}: run_as_group is set without run_as_user "
                                  "or run_as_username; a group needs a user")
        sb = self.ctx.get_sandbox(sandbox_id)

        self._check_sandbox_accepts(sb)
        name = f"{cfg.metadata.name}_{sb.name}_{cfg.metadata.attempt}"
        return await self.ctx.dedup(name, lambda: self._create(sb, cfg, name))

    def _check_sandbox_accepts(self, sb: Sandbox) -> None:
        """A container may be created in ``sb`` only while it exists, is ready and is not being removed."""
        pod = sb.metadata.config.metadata.name
        if self.ctx.sandboxes.get(sb.id) is not sb:
            raise NotFound(f"pod sandbox {sb.id} ({pod}) was removed; cannot create containers in it")
        if sb.status.state != SandboxState.READY or sb.id in self.ctx.removing_sandboxes:
            raise FailedPrecondition(f"pod sandbox {sb.id} ({pod}) is not ready; cannot create containers in it")

    async def _create(self, sb: Sandbox, cfg: ContainerConfig, name: str) -> str:
        image = self.ctx.images.get_local(cfg.image)  # NOT_FOUND with the reference
        volume_images = self._image_volume_images(cfg)  # bad input fails before anything is made
        cdi_req = await self._resolve_cdi(cfg)  # so does an unknown or conflicting CDI device
        cid = new_id()
        log_path = container_log_path(sb.metadata.config.log_directory or "", cfg.log_path)
        meta = ContainerMeta(
            id=cid, name=name, sandbox_id=sb.id, created_at=now_ns(), config=copy.deepcopy(cfg),
            image_ref=image.id, image_name=cfg.image, log_path=log_path,
            runtime_handler=sb.metadata.runtime_handler, snapshot_key=cid,
            # The container's own stop signal overrides the image's STOPSIGNAL (as containerd).
            stop_signal=cfg.stop_signal or ImageConfig.from_oci(image.config).stop_signal,
        )
        async with self.ctx.hooks.creating():  # an NRI plugin synchronizing sees it or its event
            rec = await self._create_hidden(sb, cfg, meta, image, volume_images, cdi_req)
        self.ctx.events.publish(cid, events.EventType.CREATED, sb.id)
        await self.ctx.hooks.post_create_container(sb, rec)
        return cid

    async def _create_hidden(self, sb: Sandbox, cfg: ContainerConfig, meta: ContainerMeta, image: ImageRecord,
                             volume_images: dict[int, ImageRecord], cdi_req: cdi.Injection | None) -> Container:
        cid = meta.id
        self._check_sandbox_accepts(sb)  # removed or stopped while we waited to run
        rec = self.ctx.add_container(meta, ContainerStatus(phase=ContainerPhase.CREATING))  # reserves the name
        async with self.ctx.lock(cid):
            try:
                # A working copy: image volumes fill in host paths; the record keeps what was asked.
                await self._prepare(rec, sb, copy.deepcopy(cfg), image, volume_images, cdi_req)
                # RemovePodSandbox may have run meanwhile: it marks the sandbox under its lock and
                # then removes the containers it lists, so a container that passes this check is
                # one it will find; one that does not is cleaned up here (under our own lock, so a
                # concurrent RemoveContainer finds it gone).
                async with self.ctx.lock(sb.id):
                    self._check_sandbox_accepts(sb)
            except BaseException as exc:
                seen_by_hooks = rec.status.phase != ContainerPhase.CREATING  # its CreateContainer hook may have run
                try:
                    await asyncio.shield(self._destroy(rec))
                except Exception as cleanup:
                    log.exception("cleanup of failed container %s", cid)
                    self._mark_create_failed(rec, exc, cleanup)
                if seen_by_hooks:
                    # NRI plugins that answered its creation (and perhaps reserved something for it) learn
                    # it is gone, as containerd undoes a failed create; never raises.
                    await asyncio.shield(self.ctx.hooks.remove_container(sb, rec))
                raise
        return rec

    def _mark_create_failed(self, rec: Container, exc: BaseException, cleanup: BaseException) -> None:
        """Creation failed and so did its clean-up: leave a visible EXITED container that
        RemoveContainer can clean, instead of a hidden one that holds its name."""
        message = (f"CreateContainer failed: {error_text(exc)}; cleaning up failed too: {error_text(cleanup)}; "
                   f"remove it with RemoveContainer {rec.id}")
        try:
            rec.update(lambda s: replace(s, state=ContainerState.EXITED, phase=None, exit_code=128,
                                         finished_at=now_ns(), reason=CREATE_FAILED, message=message))
        except MoorageError as e:
            log.warning("recording the failed creation of container %s: %s", rec.id, e.message)

    async def _resolve_cdi(self, cfg: ContainerConfig, extra: Sequence[str] = (),
                           required: bool = False) -> cdi.Injection | None:
        """The container's CDI devices (``CDI_devices``, then ``cdi.k8s.io/`` annotations, then
        ``extra`` from NRI plugins) resolved against the spec directories, which are re-read first
        if they changed.  ``required``: FAILED_PRECONDITION rather than a warning when CDI is off
        (a plugin asked for the devices; nothing sends them another way)."""
        names = list(dict.fromkeys([*cdi.requested_devices(cfg.cdi_devices, cfg.annotations), *extra]))
        if not names:
            return None
        if self.ctx.cdi is None and required:
            raise FailedPrecondition(f"an NRI plugin injects CDI devices {', '.join(extra)[:300]!r} into container "
                                     f"{cfg.metadata.name}, but runtime.enable_cdi is false")
        if self.ctx.cdi is None:
            # As containerd with enable_cdi off: the kubelet also sends such devices as plain
            # Devices where a device plugin can, so the request is not refused.
            log.warning("container %s asks for CDI devices %s, ignored: runtime.enable_cdi is false",
                        cfg.metadata.name, ", ".join(names))
            return None
        registry = await asyncio.to_thread(self.ctx.cdi.registry)
        return cdi.resolve(registry, names)

    async def _prepare(self, rec: Container, sb: Sandbox, cfg: ContainerConfig, image: ImageRecord,
                       volume_images: dict[int, ImageRecord], cdi_req: cdi.Injection | None = None) -> None:
        cid = rec.id
        state = self.ctx.container_state(cid)
        bundle = os.path.join(state, "bundle")
        rootfs = os.path.join(bundle, "rootfs")
        os.makedirs(rootfs, mode=0o755, exist_ok=True)
        nso = cfg.linux.security_context.namespace_options if cfg.linux and cfg.linux.security_context else None
        userns = spec.container_userns(nso, sb.metadata.config, self.ctx.s.spec.userns_length_multiple)
        if userns is None:
            await self.ctx.images.prepare_rootfs(cid, image, rootfs)
        else:
            # The image's layers are id-mapped into the pod's user namespace (held by its infra process).
            if not sb.status.pid:
                raise FailedPrecondition(f"pod sandbox {sb.id} has no running infra process holding its "
                                         "user namespace; is it ready?")
            await self.ctx.images.prepare_rootfs(cid, image, rootfs, userns=UserNS(
                f"/proc/{sb.status.pid}/ns/user", userns.uid.host_id, userns.gid.host_id))
        mounts: list[Mount] | None = None
        if volume_images:
            mounts = await self._mount_image_volumes(rec, cfg, volume_images)
        rec.update(lambda s: replace(s, phase=ContainerPhase.SPEC, mounts=mounts))
        img_cfg = ImageConfig.from_oci(image.config)
        sc = cfg.linux.security_context if cfg.linux else None
        uid, gid, gids, home = await asyncio.to_thread(
            users.resolve_user, rootfs, sc.run_as_user if sc else None, sc.run_as_username if sc else None,
            sc.run_as_group if sc else None, list(sc.supplemental_groups) if sc else [], img_cfg.user,
            supplemental_groups_policy=sc.supplemental_groups_policy if sc else "Merge")
        target_pid = None
        nso = sc.namespace_options if sc else None
        if nso is not None and nso.pid == "TARGET":
            target = self.ctx.containers.get(nso.target_id)
            if target is None or not target.status.pid:
                raise NotFound(f"target container {nso.target_id!r} for the pid namespace is not running")
            target_pid = target.status.pid
        root = self.ctx.sandbox_root(sb.id)
        s = self.ctx.s
        build = functools.partial(
            spec.build_container_spec,
            cfg, img_cfg, container_id=cid, sandbox_id=sb.id, sandbox_cfg=sb.metadata.config, rootfs=rootfs,
            sandbox_pid=sb.status.pid or None, netns_path=sb.status.netns_path or None, uid=uid, gid=gid,
            additional_gids=gids, home=home,
            cgroups_path=spec.cgroups_path(s.cgroup_driver, sb.metadata.cgroup_parent or s.default_cgroup_parent, cid),
            runtime_cfg=s.spec, hostname_path=os.path.join(root, "hostname"),
            hosts_path=os.path.join(root, "hosts"), resolv_conf_path=os.path.join(root, "resolv.conf"),
            shm_path=sb.metadata.shm_path or None, target_pid=target_pid, hostname=sb.metadata.hostname or None,
            host=self.ctx.host, cdi=cdi_req, sandbox_ns_paths=None if sb.metadata.infra else sb.metadata.ns_paths,
        )
        c_spec = build()
        # NRI plugins see the container as the CRI config makes it and may adjust it; their
        # changes go through the same pure builder.  A plugin error fails the create.
        adjustment = await self.ctx.hooks.create_container(sb, rec, c_spec)
        if adjustment is not None and not adjustment.empty():
            if adjustment.cdi_devices:
                # Plugins' CDI devices join the CRI's, resolved the same way (same errors).
                cdi_req = await self._resolve_cdi(cfg, extra=adjustment.cdi_devices, required=True)
            c_spec = build(adjust=adjustment, cdi=cdi_req)
        await self._check_handler_features(cfg, sb.metadata.runtime_handler)
        with open_private(os.path.join(bundle, "config.json")) as f:  # it holds the env: root-only
            json.dump(restrict_oom_score_adj(c_spec), f)
        user = ContainerUser(uid=uid, gid=gid, additional_gids=list(gids))
        rec.update(lambda s: replace(s, phase=None, user=user))

    async def _check_handler_features(self, cfg: ContainerConfig, handler: str) -> None:
        """Refuse what the pod's handler does not advertise, rather than let the OCI runtime fail
        obscurely (or, worse, quietly mount read-write what was asked read-only)."""
        rro = [m.container_path for m in cfg.mounts if m.recursive_read_only]
        if not rro:
            return
        feats = (await self.ctx.features.areport()).handler(handler or self.ctx.s.default_handler)
        if feats is None or not feats.recursive_read_only_mounts.advertised:
            why = feats.recursive_read_only_mounts.describe() if feats else "unknown handler"
            raise FailedPrecondition(f"recursive read-only mount at {rro[0]}: runtime handler {handler!r} "
                                     f"cannot make one: {why}")

    # -- image volumes (CRI Mount.image) ---------------------------------------------------------

    def _image_volume_images(self, cfg: ContainerConfig) -> dict[int, ImageRecord]:
        """Check the image volumes of ``cfg`` and look their images up: {mount index: image record}."""
        out: dict[int, ImageRecord] = {}
        for i, m in enumerate(cfg.mounts):
            if m.image is None:
                if m.image_sub_path:
                    raise InvalidArgument(f"mount at {m.container_path!r}: image_sub_path is set but image is not")
                continue
            ref = m.image.image or m.image.user_specified_image
            if not ref:
                raise InvalidArgument(f"image volume at {m.container_path!r}: the image reference is empty")
            if not m.readonly:
                raise InvalidArgument(f"image volume {ref!r} at {m.container_path!r} must be read-only "
                                      "(readonly: true); image volumes cannot be written")
            _check_sub_path(m.image_sub_path, ref)
            out[i] = self.ctx.images.get_local(ref)  # NOT_FOUND with the reference
        return out

    def image_volume_dir(self, cid: str, index: int) -> str:
        return os.path.join(self.ctx.container_state(cid), "image-volumes", str(index))

    async def _mount_image_volumes(self, rec: Container, cfg: ContainerConfig,
                                   volume_images: dict[int, ImageRecord]) -> list[Mount]:
        """Mount a read-only view of each volume's image under the container's state dir and point
        the mount's host path at it (or at its sub path); the mounts as made, for ContainerStatus
        (which reports the image id).  ``_destroy`` undoes this."""
        for i, img in volume_images.items():
            m = cfg.mounts[i]
            assert m.image is not None  # _image_volume_images chose these indexes
            ref = m.image.image or m.image.user_specified_image
            target = self.image_volume_dir(rec.id, i)
            await self.ctx.images.mount_image_volume(_image_volume_key(rec.id, i), img, target)
            m.host_path = await asyncio.to_thread(_resolve_sub_path, target, m.image_sub_path, ref)
            m.image.image_ref = img.id
        return copy.deepcopy(cfg.mounts)

    async def _unmount_image_volumes(self, rec: Container) -> None:
        for i, m in enumerate(rec.metadata.config.mounts):
            if m.image is not None:
                await self.ctx.images.unmount_image_volume(_image_volume_key(rec.id, i),
                                                           self.image_volume_dir(rec.id, i))

    # -- StartContainer ------------------------------------------------------------------------

    def _still_there(self, rec: Container) -> None:
        """After waiting for a container's lock: NOT_FOUND if it was removed meanwhile."""
        if self.ctx.containers.get(rec.id) is not rec:
            raise NotFound(f"container {rec.id} not found (it was removed)")

    async def start(self, cid: str) -> None:
        rec = self.ctx.get_container(cid)
        async with self.ctx.lock(rec.id):
            self._still_there(rec)
            if rec.status.state != ContainerState.CREATED or rec.status.phase is not None:
                raise FailedPrecondition(
                    f"container {rec.id} is {rec.status.state.name.lower()}, not created; "
                    "only a created container can be started")
            sb = self.ctx.sandboxes.get(rec.metadata.sandbox_id)
            if sb is None or sb.status.state != SandboxState.READY:
                raise FailedPrecondition(
                    f"pod sandbox {rec.metadata.sandbox_id} of container {rec.id} is not ready")
            cfg = rec.metadata.config
            bundle = os.path.join(self.ctx.container_state(rec.id), "bundle")
            rt = self.ctx.oci(rec.metadata.runtime_handler)
            log_path = rec.metadata.log_path or os.path.join(self.ctx.container_state(rec.id), "ctr.log")
            await self.ctx.hooks.start_container(sb, rec)
            rec.update(lambda s: replace(s, phase=ContainerPhase.STARTING))
            pid = 0
            try:
                pid = await self.ctx.timed("oci_create", rt.create(
                    rec.id, bundle, log_path=log_path, name=rec.name, stdin=cfg.stdin, stdin_once=cfg.stdin_once,
                    tty=cfg.tty))
                probe = procsig.ExecProbe.read(pid)
                if probe is not None:
                    self._exec_probes[rec.id] = probe
                started = now_ns()
                await self.ctx.timed("oci_start", rt.start(rec.id))
                # Return only once the program runs: a stop must not meet the runtime's init instead.
                if not await procsig.wait_exec(pid, probe.exe if probe is not None else None):
                    log.warning("container %s had not exec'd its program 2 s after start", rec.id)
            except MoorageError as e:
                failure = e.message
                try:
                    await rt.delete(rec.id, force=True)
                except MoorageError:
                    pass
                rec.update(lambda s: replace(s, phase=None, state=ContainerState.EXITED, pid=pid or s.pid,
                                             exit_code=128, finished_at=now_ns(), reason="StartError",
                                             message=failure))
                self.ctx.events.publish(rec.id, events.EventType.STOPPED, rec.metadata.sandbox_id)
                await self.ctx.hooks.stop_container(sb, rec)
                raise
            rec.update(lambda s: replace(s, phase=None, state=ContainerState.RUNNING, pid=pid, started_at=started))
            self.ctx.watch_exit(rec.id, rec.metadata.runtime_handler, self._on_exit)
        self.ctx.events.publish(rec.id, events.EventType.STARTED, rec.metadata.sandbox_id)
        await self.ctx.hooks.post_start_container(sb, rec)

    async def _on_exit(self, cid: str) -> None:
        self._exec_probes.pop(cid, None)
        rec = self.ctx.containers.get(cid)
        if rec is None or rec.status.state != ContainerState.RUNNING:
            return
        outcome = await self.ctx.settle_exit(cid, rec.metadata.runtime_handler)
        if outcome is None:  # the watcher failed while conmon still supervises it: watch again
            asyncio.get_running_loop().call_soon(self.ctx.watch_exit, cid, rec.metadata.runtime_handler,
                                                 self._on_exit)
            return
        self._record_exit(rec, outcome)
        # Before a StopContainer waiting for this exit returns: plugins see stop before remove.
        sb = self.ctx.sandboxes.get(rec.metadata.sandbox_id)
        if sb is not None:
            await self.ctx.hooks.stop_container(sb, rec)
        if self.ctx.containers.get(cid) is rec:
            self._release_soon(rec)

    def _release_soon(self, rec: Container) -> None:
        """Release the runtime's state of an exited container in the background: runc delete
        (~20 ms of exec) and the cgroup then cost RemoveContainer nothing.  Not awaited by the
        exit path, so StopContainer returns as soon as the exit is recorded."""
        if rec.status.state != ContainerState.EXITED or rec.id in self._releases or rec.status.released:
            return
        task = asyncio.create_task(self._release_runtime(rec), name=f"release-{rec.id[:12]}")
        self._releases[rec.id] = task

        def done(_task: asyncio.Task[bool]) -> None:
            if self._releases.get(rec.id) is task:
                self._releases.pop(rec.id, None)
        task.add_done_callback(done)

    async def _release_runtime(self, rec: Container) -> bool:
        """runc delete and the cgroup of an exited container; True once both are done.  The mark
        is set only after it succeeded: a failure (or a crash) leaves the work to Remove."""
        try:
            await self.ctx.oci(rec.metadata.runtime_handler).delete(rec.id, force=True)
        except MoorageError as e:
            log.warning("deleting exited container %s: %s", rec.id, e.message)
            return False
        sb = self.ctx.sandboxes.get(rec.metadata.sandbox_id)
        await self.ctx.release_cgroup(rec.id, sb.metadata.cgroup_parent if sb else "")
        if self.ctx.containers.get(rec.id) is rec:  # no await between check and write
            try:
                rec.update(lambda s: replace(s, released=True))
            except NotFound:
                pass  # RemoveContainer deleted the row meanwhile (its journal covers this release)
        return True

    def _runtime_released(self, rec: Container) -> bool:
        """The exit is recorded and runc's state is gone (or going): nothing runs, nothing to ask runc."""
        return rec.status.state == ContainerState.EXITED and (rec.status.released or rec.id in self._releases)

    async def wait_released(self) -> None:
        """Wait for the releases in flight (daemon shutdown)."""
        if self._releases:
            await asyncio.gather(*list(self._releases.values()), return_exceptions=True)

    def _record_exit(self, rec: Container, outcome: ExitOutcome) -> None:
        if rec.status.state != ContainerState.RUNNING:
            return
        rec.update(lambda s: replace(s, state=ContainerState.EXITED, exit_code=outcome.code, phase=None,
                                     finished_at=outcome.finished_at, reason=outcome.reason,
                                     message=outcome.message))
        self.ctx.events.publish(rec.id, events.EventType.STOPPED, rec.metadata.sandbox_id)
        log.info("container exited", extra={"fields": {"id": rec.id, "exit_code": outcome.code,
                                                       "reason": outcome.reason}})

    # -- StopContainer -------------------------------------------------------------------------

    async def stop(self, cid: str, timeout: int) -> None:
        try:
            rec = self.ctx.get_container(cid)
        except NotFound:
            return  # stopping what is gone succeeds, as the CRI asks
        if rec.status.state == ContainerState.RUNNING:
            await self._stop_running(rec, timeout)
        # Never "stopped" while the process lives: with no conmon to record an exit (it was
        # killed, or the state was lost), runc is asked, and whatever it still runs is killed.
        rt = self.ctx.oci(rec.metadata.runtime_handler)
        if self.ctx.containers.get(rec.id) is not rec:
            return  # removed meanwhile (runc delete --force ended it)
        if rec.status.state != ContainerState.CREATED and not self._runtime_released(rec) \
                and rt.exit_status(rec.id) is None and rt.conmon_pid(rec.id) is None:
            if not await self.ctx.end_process(rec.id, rec.metadata.runtime_handler):
                raise FailedPrecondition(f"container {rec.id} still runs after SIGKILL (its conmon is gone)")
            if rec.status.state == ContainerState.RUNNING:
                outcome = await self.ctx.settle_exit(rec.id, rec.metadata.runtime_handler)
                if outcome is not None:
                    self.ctx.forget_watcher(rec.id)
                    self._record_exit(rec, outcome)

    async def _stop_running(self, rec: Container, timeout: int) -> None:
        rt = self.ctx.oci(rec.metadata.runtime_handler)
        if timeout > 0:
            sig = _signal_number(rec.metadata.stop_signal)
            pid = rec.status.pid
            probe = self._exec_probes.pop(rec.id, None)
            if probe is not None and pid:
                # Right after start the process may still be the runtime's init, or inside execve.
                await procsig.wait_settled(pid, probe, timeout)
            if procsig.would_be_dropped(sig, procsig.read_masks(pid) if pid else None):
                # no handler yet: the kernel would discard it; send it once the program has one
                if await self._signal_when_caught(rt, rec, sig, timeout):
                    return
            else:
                try:
                    await rt.kill(rec.id, sig)
                except NotFound:
                    if self._lost_on_kill(rt, rec):
                        return
                except MoorageError as e:
                    log.info("stop signal to %s: %s", rec.id, e.message)
                if await self.ctx.wait_exited(rec.id, timeout):
                    return
            log.info("container did not stop within its timeout; killing", extra={"fields": {"id": rec.id,
                                                                                             "timeout": timeout}})
        try:
            await rt.kill(rec.id, signal.SIGKILL)
        except NotFound:
            if self._lost_on_kill(rt, rec):
                return
        except MoorageError as e:
            log.info("SIGKILL to %s: %s", rec.id, e.message)
        if not await self.ctx.wait_exited(rec.id, 30):
            raise FailedPrecondition(f"container {rec.id} did not exit after SIGKILL within 30s")

    async def _signal_when_caught(self, rt: OCIRuntimeAPI, rec: Container, sig: int, timeout: float) -> bool:
        """The container's init has no handler for the stop signal yet, so the kernel would drop it
        (runtime/procsig.py). Wait for the exit as usual, and send the signal as soon as the
        program installs its handler. True once the container exited."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        step = 0.01
        while (left := deadline - loop.time()) > 0:
            if await self.ctx.wait_exited(rec.id, min(step, left)):
                return True
            masks = procsig.read_masks(rec.status.pid)
            if masks is None:
                break  # gone: its exit is on the way
            if not procsig.would_be_dropped(sig, masks):
                log.info("stop signal sent once the program had a handler for it",
                         extra={"fields": {"id": rec.id, "signal": sig}})
                try:
                    await rt.kill(rec.id, sig)
                except MoorageError as e:
                    log.info("stop signal to %s: %s", rec.id, e.message)
                break
            step = min(step * 1.5, 0.1)
        return await self.ctx.wait_exited(rec.id, max(0.0, deadline - loop.time()))

    def _lost_on_kill(self, rt: OCIRuntimeAPI, rec: Container) -> bool:
        """The runtime does not know a container we think runs: if no exit was recorded and no
        conmon supervises it, record the exit now (nothing else ever will) and say so."""
        if rt.exit_status(rec.id) is not None or rt.conmon_pid(rec.id) is not None:
            return False  # it exited or is exiting; the watcher records it
        self._record_lost_exit(rec)
        return True

    # -- RemoveContainer --------------------------------------------------------------------------

    async def remove(self, cid: str) -> None:
        """The runtime's state (and so the container's cgroup) and the record go before this
        returns (id and name are free); the rootfs and its writable layer, image volumes and the
        state dir go in the background, journalled so that a restart finishes them
        (``finish_removals``)."""
        try:
            rec = self.ctx.get_container(cid)
        except NotFound:
            return
        await self.stop(rec.id, 0)
        async with self.ctx.lock(rec.id):
            if rec.id in self.ctx.containers:
                released = self._runtime_released(rec)
                if not released and not rec.status.removing and rec.status.phase is None:
                    # runc's state goes before the record: recovery finishes it after a crash
                    rec.update(lambda s: replace(s, removing=True))
                self._exec_probes.pop(rec.id, None)
                self.ctx.cancel_watcher(rec.id)
                sb = self.ctx.sandboxes.get(rec.metadata.sandbox_id)
                parent = sb.metadata.cgroup_parent if sb else ""
                job: dict = {"id": rec.id, "snapshot_key": rec.metadata.snapshot_key or rec.id,
                             "image_volumes": [i for i, m in enumerate(rec.metadata.config.mounts)
                                               if m.image is not None]}
                if not released:
                    # It may still run (or its conmon is lost): killed and deleted before we return.
                    try:
                        await self.ctx.oci(rec.metadata.runtime_handler).delete(rec.id, force=True)
                    except MoorageError as e:
                        log.warning("deleting container %s: %s", rec.id, e.message)
                    await self.ctx.release_cgroup(rec.id, parent)
                elif not rec.status.released:
                    # Exited, its release still in flight: the background clean-up (or the next
                    # start, from the journal) makes sure runc's state and the cgroup go.
                    job["runtime"] = {"handler": rec.metadata.runtime_handler, "cgroup_parent": parent}
                # One hop off the loop: the journal on disk before the record's deletion is.
                await asyncio.to_thread(self._journal_and_delete, job)
                self.ctx.forget_container(rec.id, stored=False)
                self.ctx.events.publish(rec.id, events.EventType.DELETED, rec.metadata.sandbox_id)
                task = asyncio.create_task(self._clean_removed(job), name=f"remove-{rec.id[:12]}")
                self._cleanups[rec.id] = (rec.metadata.sandbox_id, task)
                task.add_done_callback(self._cleaned(rec.id))
                if sb is not None:
                    await self.ctx.hooks.stop_container(sb, rec)  # once per container: a no-op if seen
                    await self.ctx.hooks.remove_container(sb, rec)

    def _cleaned(self, cid: str) -> Callable[[asyncio.Task], None]:
        def done(_task: asyncio.Task) -> None:
            self._cleanups.pop(cid, None)
        return done

    def _journal(self, cid: str) -> str:
        return os.path.join(self.ctx.s.root_dir, REMOVING_DIR, f"{cid}.json")

    def _journal_and_delete(self, job: dict) -> None:
        """Blocking: the journal, then the record's deletion committed durably (so the call's
        closing barrier has nothing left to sync)."""
        self._write_journal(job)
        self.ctx.store.delete_container(job["id"])

    def _write_journal(self, job: dict) -> None:
        """On disk before the record is deleted: a crash in between leaves work, never a leak."""
        path = self._journal(job["id"])
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(job, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    async def _clean_removed(self, job: dict) -> None:
        """The file work of _destroy, after the record is gone; each step tolerates a repeat."""
        cid = job["id"]
        try:
            if "runtime" in job:
                await self._finish_release(cid, job["runtime"])
            rootfs = os.path.join(self.ctx.container_state(cid), "bundle", "rootfs")
            await self.ctx.images.release_rootfs(job["snapshot_key"], rootfs)
            for i in job["image_volumes"]:
                await self.ctx.images.unmount_image_volume(_image_volume_key(cid, i), self.image_volume_dir(cid, i))
            await asyncio.to_thread(remove_tree, self.ctx.container_state(cid))
        except Exception:
            log.exception("cleaning up after removed container %s failed; the next start retries", cid)
            return
        try:
            os.unlink(self._journal(cid))
        except FileNotFoundError:
            pass

    async def _finish_release(self, cid: str, runtime: dict) -> None:
        """The runtime part of a removal whose exit-time release was in flight: wait for it, and
        do it again if it failed or was cut (a restart)."""
        task = self._releases.get(cid)
        if task is not None and (await asyncio.gather(task, return_exceptions=True))[0] is True:
            return
        try:
            rt = self.ctx.oci(runtime["handler"])
        except InvalidArgument as e:  # a handler no longer configured: nothing we can ask
            log.warning("removed container %s: %s", cid, e.message)
            return
        try:
            await rt.delete(cid, force=True)
        except MoorageError as e:
            log.warning("deleting removed container %s: %s", cid, e.message)
        await self.ctx.release_cgroup(cid, runtime["cgroup_parent"])

    async def wait_removed(self, sandbox_id: str | None = None) -> None:
        """Wait for the background clean-ups of the removed containers of a sandbox (all: None)."""
        tasks = [t for sid, t in list(self._cleanups.values()) if sandbox_id is None or sid == sandbox_id]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def finish_removals(self) -> None:
        """At start: finish the clean-ups a previous daemon journalled and did not complete."""
        d = os.path.join(self.ctx.s.root_dir, REMOVING_DIR)
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(d, name)
            job = _read_journal(path)
            if job is None:
                log.warning("removing unreadable clean-up journal %s", path)
                os.unlink(path)
                continue
            if job["id"] in self.ctx.containers:
                os.unlink(path)  # not removed after all (the delete never committed): keep it
                continue
            log.info("finishing the clean-up of removed container %s", job["id"])
            await self._clean_removed(job)

    async def _destroy(self, rec: Container) -> None:
        cid = rec.id
        self._exec_probes.pop(cid, None)
        self.ctx.cancel_watcher(cid)
        try:
            await self.ctx.oci(rec.metadata.runtime_handler).delete(cid, force=True)
        except MoorageError as e:
            log.warning("deleting container %s: %s", cid, e.message)
        sb = self.ctx.sandboxes.get(rec.metadata.sandbox_id)
        await self.ctx.release_cgroup(cid, sb.metadata.cgroup_parent if sb else "")
        rootfs = os.path.join(self.ctx.container_state(cid), "bundle", "rootfs")
        await self.ctx.images.release_rootfs(rec.metadata.snapshot_key or cid, rootfs)
        await self._unmount_image_volumes(rec)
        remove_tree(self.ctx.container_state(cid))
        self.ctx.forget_container(cid)

    # -- status and list ---------------------------------------------------------------------------

    def status(self, cid: str, verbose: bool = False) -> tuple[Container, dict[str, str]]:
        rec = self.ctx.get_container(cid)
        if rec.status.phase in (ContainerPhase.CREATING, ContainerPhase.SPEC):
            # Not created yet (NRI plugins may still be adjusting it), as List hides it.
            raise NotFound(f"container {rec.id} not found (it is still being created)")
        info: dict[str, str] = {}
        if verbose:
            try:
                with open(os.path.join(self.ctx.container_state(rec.id), "bundle", "config.json")) as f:
                    runtime_spec = json.load(f)
            except (OSError, ValueError):
                runtime_spec = None
            meta = rec.metadata
            info["info"] = json.dumps({"pid": rec.status.pid, "sandboxID": meta.sandbox_id,
                                       "runtimeSpec": runtime_spec, "runtimeHandler": meta.runtime_handler,
                                       "snapshotKey": meta.snapshot_key, "config": to_plain(rec.effective_config())})
        return rec, info

    def query(self, id_prefix: str = "", state: ContainerState | None = None, sandbox_id: str = "",
             labels: dict[str, str] | None = None) -> list[Container]:
        out = []
        for rec in self.ctx.containers.values():
            if rec.status.phase in (ContainerPhase.CREATING, ContainerPhase.SPEC):
                continue
            if id_prefix and not rec.id.startswith(id_prefix):
                continue
            if state is not None and rec.status.state != state:
                continue
            if sandbox_id and not rec.metadata.sandbox_id.startswith(sandbox_id):
                continue
            if labels and any(rec.metadata.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(rec)
        return out

    # -- ExecSync, UpdateContainerResources, ReopenContainerLog ---------------------------------------

    def running(self, cid: str) -> Container:
        rec = self.ctx.get_container(cid)
        if rec.status.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"container {rec.id} is not running (state {rec.status.state.name})")
        return rec

    def attachable(self, cid: str, stdin: bool) -> Container:
        """A running container one may attach to; with *stdin*, it must have been created with stdin.

        conmon holds no stdin pipe for a container created without ``stdin: true``, so
        attached input would vanish.  containerd and CRI-O drop it silently; moorage
        refuses up front with FAILED_PRECONDITION so the caller knows.
        """
        rec = self.running(cid)
        if stdin and not rec.metadata.config.stdin:
            raise FailedPrecondition(
                f"cannot attach to the stdin of container {rec.id}: it was not created with stdin=true; "
                "attach without stdin, or re-create the container with stdin")
        return rec

    async def exec_sync(self, cid: str, cmd: list[str], timeout: int) -> tuple[int, bytes, bytes]:
        rec = self.running(cid)
        if not cmd:
            raise InvalidArgument("exec command is empty")
        result: tuple[int, bytes, bytes] = await self.ctx.timed(
            "oci_exec", self.ctx.oci(rec.metadata.runtime_handler).exec_sync(
                rec.id, list(cmd), float(timeout) if timeout > 0 else None,
                max_output=self.ctx.s.exec_sync_max_output))
        return result

    async def update_resources(self, cid: str, res: LinuxContainerResources, *, hooks: bool = True) -> None:
        """UpdateContainerResources; NRI plugins may adjust ``res`` first.  ``hooks=False`` is
        for the updates NRI plugins ask themselves (same path, no second round of hooks)."""
        rec = self.ctx.get_container(cid)
        sb = self.ctx.sandboxes.get(rec.metadata.sandbox_id)
        async with self.ctx.lock(rec.id):
            self._still_there(rec)
            if hooks and sb is not None:
                res = await self.ctx.hooks.update_container(sb, rec, res)
            state = rec.status.state
            if state == ContainerState.RUNNING:
                await self.ctx.timed("oci_update", self.ctx.oci(rec.metadata.runtime_handler).update(
                    rec.id, spec.linux_resources(res)))
            elif state != ContainerState.CREATED:
                raise FailedPrecondition(f"container {rec.id} has exited; its resources cannot be updated")
            bundle = os.path.join(self.ctx.container_state(rec.id), "bundle", "config.json")
            if state == ContainerState.CREATED and os.path.exists(bundle):
                with open(bundle) as f:
                    c_spec = json.load(f)
                c_spec.setdefault("linux", {})["resources"] = {**c_spec["linux"].get("resources", {}),
                                                              **spec.linux_resources(res)}
                with open(bundle, "w") as f:
                    json.dump(c_spec, f)
            # Kept for ContainerStatus and for a later start.
            rec.update(lambda s: replace(s, resources=copy.deepcopy(res)))
        if hooks and sb is not None:
            await self.ctx.hooks.post_update_container(sb, rec)

    async def reopen_log(self, cid: str) -> None:
        rec = self.running(cid)
        await self.ctx.oci(rec.metadata.runtime_handler).reopen_log(rec.id)
        # conmon re-creates the file asynchronously; the kubelet's log rotation (and
        # critest) look for it as soon as the call returns, so wait for it (bounded).
        log_path = rec.metadata.log_path
        if log_path:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not os.path.exists(log_path) and loop.time() < deadline:  # noqa: ASYNC110 - polls a file
                await asyncio.sleep(0.01)
            if not os.path.exists(log_path):
                raise FailedPrecondition(f"conmon did not reopen the log of container {rec.id} at {log_path}")

    # -- recovery -----------------------------------------------------------------------------------

    def recover_exec_sessions(self) -> None:
        """Kill exec sessions (streaming or ExecSync) that a crashed daemon left running.

        Their conmons were our children, waiting for us to read their output; nobody
        will now.  All handlers share one conmon dir, so one sweep covers them.
        """
        killed = self.ctx.oci(self.ctx.s.default_handler).reap_exec_sessions()
        if killed:
            log.info("killed exec sessions left by the previous daemon", extra={"fields": {"conmon_pids": killed}})

    async def recover(self, rec: Container) -> None:
        phase = rec.status.phase
        handler = rec.metadata.runtime_handler
        if phase in (ContainerPhase.CREATING, ContainerPhase.SPEC) or rec.status.removing:
            log.info("removing container %s left half-made or half-removed by a crash", rec.id)
            await self._destroy(rec)
            return
        if phase == ContainerPhase.STARTING:
            # The daemon died inside StartContainer: keep it if it really runs.
            running, running_pid = False, 0
            try:
                st = await self.ctx.oci(handler).state(rec.id)
                running, running_pid = st.status == "running", st.pid
            except NotFound:
                pass
            if running:
                rec.update(lambda s: replace(s, phase=None, state=ContainerState.RUNNING, pid=running_pid,
                                             started_at=s.started_at or now_ns()))
            else:
                try:
                    await self.ctx.oci(handler).delete(rec.id, force=True)
                except MoorageError:
                    pass
                rec.update(lambda s: replace(s, phase=None))
        if rec.status.state == ContainerState.RUNNING:
            if self.ctx.oci(handler).conmon_pid(rec.id) is None:
                # Nobody supervises it any more: the same rule as a live watcher's (settle_exit).
                outcome = await self.ctx.settle_exit(rec.id, handler)
                if outcome is not None:
                    self._record_exit(rec, outcome)
                    return
            # wait_exit reads conmon's exit file at once if it exited while we were down.
            self.ctx.watch_exit(rec.id, handler, self._on_exit)

    def _record_lost_exit(self, rec: Container) -> None:
        """Mark a RUNNING container EXITED whose exit can never be read (state lost)."""
        if rec.status.state != ContainerState.RUNNING:
            return
        rec.update(lambda s: replace(s, state=ContainerState.EXITED, exit_code=255, finished_at=now_ns(),
                                     reason="Error", message=LOST_STATE_MESSAGE, phase=None))
        self.ctx.forget_watcher(rec.id)
        self.ctx.events.publish(rec.id, events.EventType.STOPPED, rec.metadata.sandbox_id)
        log.warning("container state lost; marked exited", extra={"fields": {"id": rec.id}})


def _read_journal(path: str) -> dict | None:
    """A clean-up journal, checked: ids are ours to build paths from, nothing else is trusted."""
    name = os.path.basename(path)
    if not name.endswith(".json") or not _ID.fullmatch(name.removesuffix(".json")):
        return None
    try:
        with open(path) as f:
            job = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(job, dict) or job.get("id") != name.removesuffix(".json"):
        return None
    key, vols = job.get("snapshot_key"), job.get("image_volumes")
    if not (isinstance(key, str) and _ID.fullmatch(key)
            and isinstance(vols, list) and all(isinstance(i, int) and 0 <= i < 4096 for i in vols)):
        return None
    runtime = job.get("runtime")
    if runtime is not None and not (
            isinstance(runtime, dict) and set(runtime) == {"handler", "cgroup_parent"}
            and isinstance(runtime["handler"], str) and _HANDLER.fullmatch(runtime["handler"])
            and isinstance(runtime["cgroup_parent"], str) and len(runtime["cgroup_parent"]) <= 4096
            and "\0" not in runtime["cgroup_parent"] and ".." not in runtime["cgroup_parent"].split("/")):
        return None
    return job
