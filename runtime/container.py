"""Containers: create, start, stop, remove, status, list, exec-sync, update, reopen log.

As containerd's CRI plugin does, CreateContainer prepares the rootfs snapshot and
the OCI spec (so bad configs fail early), and StartContainer creates the runc
container under its conmon and starts it (so a missing executable fails at start,
leaving the container EXITED with the runtime's message).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import TYPE_CHECKING

from moorage.core.errors import FailedPrecondition, InvalidArgument, MoorageError, NotFound
from moorage.core.store import ContainerRecord, now_ns
from moorage.runtime import events, spec, users
from moorage.runtime.model import ContainerConfig, ImageConfig, LinuxContainerResources
from moorage.runtime.modelio import container_config_from, to_plain

if TYPE_CHECKING:
    from moorage.runtime.service import Runtime

log = logging.getLogger("moorage.container")

CREATED, RUNNING, EXITED, UNKNOWN = "CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN"
LOST_STATE_MESSAGE = "container state lost (conmon and runtime state are gone, e.g. after a reboot)"


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


class ContainerOps:
    # -- CreateContainer ---------------------------------------------------------------------

    async def create_container(self: Runtime, sandbox_id: str, cfg: ContainerConfig) -> str:
        if not cfg.metadata.name:
            raise InvalidArgument("container metadata.name is empty")
        if not cfg.image:
            raise InvalidArgument(f"container {cfg.metadata.name!r}: image is empty")
        sc = cfg.linux.security_context if cfg.linux else None
        if sc is not None and sc.run_as_group is not None and sc.run_as_user is None and not sc.run_as_username:
            raise InvalidArgument(f"container {cfg.metadata.name!r}: run_as_group is set without run_as_user "
                                  "or run_as_username; a group needs a user")
        sb = self.get_sandbox(sandbox_id)

        self._check_sandbox_accepts(sb)
        name = f"{cfg.metadata.name}_{sb.name}_{cfg.metadata.attempt}"
        return await self.dedup(name, lambda: self._create_container(sb, cfg, name))

    def _check_sandbox_accepts(self: Runtime, sb) -> None:
        """A container may be created in ``sb`` only while it exists, is ready and is not being removed."""
        from moorage.runtime.sandbox import READY

        if self.sandboxes.get(sb.id) is not sb:
            raise NotFound(f"pod sandbox {sb.id} ({sb.metadata.get('name')}) was removed; "
                           "cannot create containers in it")
        if sb.state != READY or sb.id in self._removing_sandboxes:
            raise FailedPrecondition(
                f"pod sandbox {sb.id} ({sb.metadata.get('name')}) is not ready; cannot create containers in it")

    async def _create_container(self: Runtime, sb, cfg: ContainerConfig, name: str) -> str:
        from moorage.core.ids import new_id

        image = self.images.get_local(cfg.image)  # NOT_FOUND with the reference
        volume_images = self._image_volume_images(cfg)  # bad input fails before anything is made
        cid = new_id()
        log_path = container_log_path(sb.config.get("log_directory") or "", cfg.log_path)
        rec = ContainerRecord(
            id=cid, name=name, sandbox_id=sb.id, state=CREATED, created_at=now_ns(),
            metadata=to_plain(cfg.metadata), config=to_plain(cfg), image_ref=image.id, image_name=cfg.image,
            labels=dict(cfg.labels), annotations=dict(cfg.annotations), log_path=log_path,
            runtime_handler=sb.runtime_handler, snapshot_key=cid, extra={"phase": "creating"},
        )
        self._check_sandbox_accepts(sb)  # removed or stopped while we waited to run
        self.store.add_container(rec)  # reserves the name
        self.containers[cid] = rec
        async with self.lock(cid):
            try:
                await self._prepare_container(rec, sb, cfg, image, volume_images)
                # RemovePodSandbox may have run meanwhile: it marks the sandbox under its lock and
                # then removes the containers it lists, so a container that passes this check is
                # one it will find; one that does not is cleaned up here (under our own lock, so a
                # concurrent RemoveContainer finds it gone).
                async with self.lock(sb.id):
                    self._check_sandbox_accepts(sb)
            except BaseException:
                try:
                    await asyncio.shield(self._destroy_container(rec))
                except Exception:
                    log.exception("cleanup of failed container %s", cid)
                raise
        self.events.publish(cid, events.CREATED, sb.id)
        return cid

    async def _prepare_container(self: Runtime, rec: ContainerRecord, sb, cfg: ContainerConfig, image,
                                 volume_images: dict[int, object]) -> None:
        cid = rec.id
        state = self.container_state(cid)
        bundle = os.path.join(state, "bundle")
        rootfs = os.path.join(bundle, "rootfs")
        os.makedirs(rootfs, mode=0o755, exist_ok=True)
        await self.images.prepare_rootfs(cid, image, rootfs)
        if volume_images:
            await self._mount_image_volumes(rec, cfg, volume_images)
        rec.extra["phase"] = "spec"
        self.store.update_container(rec)
        img_cfg = ImageConfig.from_oci(image.config)
        sc = cfg.linux.security_context if cfg.linux else None
        uid, gid, gids, home = await asyncio.to_thread(
            users.resolve_user, rootfs, sc.run_as_user if sc else None, sc.run_as_username if sc else None,
            sc.run_as_group if sc else None, list(sc.supplemental_groups) if sc else [], img_cfg.user,
            supplemental_groups_policy=sc.supplemental_groups_policy if sc else "Merge")
        sb_cfg = self.sandbox_config(sb)
        target_pid = None
        nso = sc.namespace_options if sc else None
        if nso is not None and nso.pid == "TARGET":
            target = self.containers.get(nso.target_id)
            if target is None or not target.pid:
                raise NotFound(f"target container {nso.target_id!r} for the pid namespace is not running")
            target_pid = target.pid
        root = self.sandbox_root(sb.id)
        shm = sb.extra.get("shm") or None
        c_spec = spec.build_container_spec(
            cfg, img_cfg, container_id=cid, sandbox_id=sb.id, sandbox_cfg=sb_cfg, rootfs=rootfs,
            sandbox_pid=sb.pid or None, netns_path=sb.netns_path or None, uid=uid, gid=gid,
            additional_gids=gids, home=home,
            cgroups_path=spec.cgroups_path(self.s.cgroup_driver, sb.cgroup_parent or self.s.default_cgroup_parent, cid),
            runtime_cfg=self.s.spec, hostname_path=os.path.join(root, "hostname"),
            hosts_path=os.path.join(root, "hosts"), resolv_conf_path=os.path.join(root, "resolv.conf"),
            shm_path=shm, target_pid=target_pid, hostname=sb.extra.get("hostname"), host=self.host,
        )
        from moorage.runtime.oom import restrict_oom_score_adj

        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(restrict_oom_score_adj(c_spec), f)
        rec.extra = {"stop_signal": img_cfg.stop_signal, "user": {"uid": uid, "gid": gid, "gids": gids},
                     "run_as_username": (sc.run_as_username if sc else "") or ""}
        self.store.update_container(rec)

    # -- image volumes (CRI Mount.image) ---------------------------------------------------------

    def _image_volume_images(self: Runtime, cfg: ContainerConfig) -> dict[int, object]:
        """Check the image volumes of ``cfg`` and look their images up: {mount index: image record}."""
        out: dict[int, object] = {}
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
            out[i] = self.images.get_local(ref)  # NOT_FOUND with the reference
        return out

    def image_volume_dir(self: Runtime, cid: str, index: int) -> str:
        return os.path.join(self.container_state(cid), "image-volumes", str(index))

    async def _mount_image_volumes(self: Runtime, rec: ContainerRecord, cfg: ContainerConfig,
                                   volume_images: dict[int, object]) -> None:
        """Mount a read-only view of each volume's image under the container's state dir and point
        the mount's host path at it (or at its sub path).  ``_destroy_container`` undoes this."""
        for i, img in volume_images.items():
            m = cfg.mounts[i]
            ref = m.image.image or m.image.user_specified_image
            target = self.image_volume_dir(rec.id, i)
            await self.images.mount_image_volume(_image_volume_key(rec.id, i), img, target)
            m.host_path = await asyncio.to_thread(_resolve_sub_path, target, m.image_sub_path, ref)
            m.image.image_ref = img.id
        rec.config["mounts"] = [to_plain(m) for m in cfg.mounts]  # ContainerStatus reports image_ref

    async def _unmount_image_volumes(self: Runtime, rec: ContainerRecord) -> None:
        for i, m in enumerate((rec.config or {}).get("mounts") or []):
            if isinstance(m, dict) and m.get("image"):
                await self.images.unmount_image_volume(_image_volume_key(rec.id, i), self.image_volume_dir(rec.id, i))

    # -- StartContainer ------------------------------------------------------------------------

    def get_container(self: Runtime, cid: str) -> ContainerRecord:
        rec = self.containers.get(cid)
        if rec is not None:
            return rec
        if cid:
            matches = [c for c in self.containers if c.startswith(cid)]
            if len(matches) == 1:
                return self.containers[matches[0]]
            if len(matches) > 1:
                raise InvalidArgument(f"container id prefix {cid!r} is ambiguous ({len(matches)} containers)")
        raise NotFound(f"container {cid!r} not found")

    def _still_there(self: Runtime, rec: ContainerRecord) -> None:
        """After waiting for a container's lock: NOT_FOUND if it was removed meanwhile."""
        if self.containers.get(rec.id) is not rec:
            raise NotFound(f"container {rec.id} not found (it was removed)")

    async def start_container(self: Runtime, cid: str) -> None:
        rec = self.get_container(cid)
        async with self.lock(rec.id):
            self._still_there(rec)
            if rec.state != CREATED or rec.extra.get("phase"):
                raise FailedPrecondition(
                    f"container {rec.id} is {rec.state.removeprefix('CONTAINER_').lower()}, not created; "
                    "only a created container can be started")
            sb = self.sandboxes.get(rec.sandbox_id)
            from moorage.runtime.sandbox import READY

            if sb is None or sb.state != READY:
                raise FailedPrecondition(f"pod sandbox {rec.sandbox_id} of container {rec.id} is not ready")
            cfg = container_config_from(rec.config)
            bundle = os.path.join(self.container_state(rec.id), "bundle")
            rt = self.oci(rec.runtime_handler)
            log_path = rec.log_path or os.path.join(self.container_state(rec.id), "ctr.log")
            rec.extra["phase"] = "starting"
            self.store.update_container(rec)
            try:
                rec.pid = await self.timed("oci_create", rt.create(
                    rec.id, bundle, log_path=log_path, name=rec.name, stdin=cfg.stdin, stdin_once=cfg.stdin_once,
                    tty=cfg.tty))
                started = now_ns()
                await self.timed("oci_start", rt.start(rec.id))
            except MoorageError as e:
                try:
                    await rt.delete(rec.id, force=True)
                except MoorageError:
                    pass
                rec.extra.pop("phase", None)
                rec.state, rec.exit_code, rec.finished_at = EXITED, 128, now_ns()
                rec.reason, rec.message = "StartError", e.message
                self.store.update_container(rec)
                self.events.publish(rec.id, events.STOPPED, rec.sandbox_id)
                raise
            rec.extra.pop("phase", None)
            rec.state, rec.started_at = RUNNING, started
            self.store.update_container(rec)
            self.watch_exit(rec.id, rec.runtime_handler, self._on_container_exit)
        self.events.publish(rec.id, events.STARTED, rec.sandbox_id)

    async def _on_container_exit(self: Runtime, cid: str) -> None:
        rec = self.containers.get(cid)
        if rec is None or rec.state != RUNNING:
            return
        status = self.oci(rec.runtime_handler).exit_status(cid)
        rec.state = EXITED
        if status is None:
            rec.exit_code, rec.finished_at = 255, now_ns()
            rec.reason, rec.message = "Error", "exit status unavailable: conmon left no exit file"
        else:
            rec.exit_code = status.code
            rec.finished_at = int(status.finished_at.timestamp() * 1e9)
            if status.oom_killed:
                rec.reason = "OOMKilled"
            else:
                rec.reason = "Completed" if status.code == 0 else "Error"
        self.store.update_container(rec)
        self.events.publish(cid, events.STOPPED, rec.sandbox_id)
        log.info("container exited", extra={"fields": {"id": cid, "exit_code": rec.exit_code, "reason": rec.reason}})

    # -- StopContainer -------------------------------------------------------------------------

    async def stop_container(self: Runtime, cid: str, timeout: int) -> None:
        try:
            rec = self.get_container(cid)
        except NotFound:
            return  # stopping what is gone succeeds, as the CRI asks
        if rec.state != RUNNING:
            return
        rt = self.oci(rec.runtime_handler)
        if timeout > 0:
            try:
                await rt.kill(rec.id, _signal_number(rec.extra.get("stop_signal", "")))
            except NotFound:
                if self._lost_on_kill(rt, rec):
                    return
            except MoorageError as e:
                log.info("stop signal to %s: %s", rec.id, e.message)
            if await self.wait_exited(rec.id, timeout):
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
        if not await self.wait_exited(rec.id, 30):
            raise FailedPrecondition(f"container {rec.id} did not exit after SIGKILL within 30s")

    def _lost_on_kill(self: Runtime, rt, rec: ContainerRecord) -> bool:
        """The runtime does not know a container we think runs: if no exit was recorded and no
        conmon supervises it, record the exit now (nothing else ever will) and say so."""
        if rt.exit_status(rec.id) is not None or rt.conmon_pid(rec.id) is not None:
            return False  # it exited or is exiting; the watcher records it
        self._record_lost_exit(rec)
        return True

    # -- RemoveContainer --------------------------------------------------------------------------

    async def remove_container(self: Runtime, cid: str) -> None:
        try:
            rec = self.get_container(cid)
        except NotFound:
            return
        await self.stop_container(rec.id, 0)
        async with self.lock(rec.id):
            if rec.id in self.containers:
                await self._destroy_container(rec)
                self.events.publish(rec.id, events.DELETED, rec.sandbox_id)

    async def _destroy_container(self: Runtime, rec: ContainerRecord) -> None:
        cid = rec.id
        watcher = self._watchers.pop(cid, None)
        if watcher is not None:
            watcher.cancel()
        try:
            await self.oci(rec.runtime_handler).delete(cid, force=True)
        except MoorageError as e:
            log.warning("deleting container %s: %s", cid, e.message)
        rootfs = os.path.join(self.container_state(cid), "bundle", "rootfs")
        await self.images.release_rootfs(rec.snapshot_key or cid, rootfs)
        await self._unmount_image_volumes(rec)
        from moorage.core.fs import remove_tree

        remove_tree(self.container_state(cid))
        self.store.delete_container(cid)
        self.containers.pop(cid, None)
        self._locks.pop(cid, None)
        ev = self._exit_events.pop(cid, None)
        if ev is not None:
            ev.set()  # a StopContainer waiting for this exit: the container is gone

    # -- status and list ---------------------------------------------------------------------------

    def container_status(self: Runtime, cid: str, verbose: bool = False) -> tuple[ContainerRecord, dict[str, str]]:
        rec = self.get_container(cid)
        info: dict[str, str] = {}
        if verbose:
            try:
                with open(os.path.join(self.container_state(rec.id), "bundle", "config.json")) as f:
                    runtime_spec = json.load(f)
            except (OSError, ValueError):
                runtime_spec = None
            info["info"] = json.dumps({"pid": rec.pid, "sandboxID": rec.sandbox_id, "runtimeSpec": runtime_spec,
                                       "runtimeHandler": rec.runtime_handler, "snapshotKey": rec.snapshot_key,
                                       "config": rec.config})
        return rec, info

    def list_containers(self: Runtime, id_prefix: str = "", state: str | None = None, sandbox_id: str = "",
                        labels: dict[str, str] | None = None) -> list[ContainerRecord]:
        out = []
        for rec in self.containers.values():
            if rec.extra.get("phase") == "creating" or rec.extra.get("phase") == "spec":
                continue
            if id_prefix and not rec.id.startswith(id_prefix):
                continue
            if state is not None and rec.state != state:
                continue
            if sandbox_id and not rec.sandbox_id.startswith(sandbox_id):
                continue
            if labels and any(rec.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(rec)
        return out

    # -- ExecSync, UpdateContainerResources, ReopenContainerLog ---------------------------------------

    def running_container(self: Runtime, cid: str) -> ContainerRecord:
        rec = self.get_container(cid)
        if rec.state != RUNNING:
            raise FailedPrecondition(f"container {rec.id} is not running (state {rec.state.removeprefix('CONTAINER_')})")
        return rec

    def attachable_container(self: Runtime, cid: str, stdin: bool) -> ContainerRecord:
        """A running container one may attach to; with *stdin*, it must have been created with stdin.

        conmon holds no stdin pipe for a container created without ``stdin: true``, so
        attached input would vanish.  containerd and CRI-O drop it silently; moorage
        refuses up front with FAILED_PRECONDITION so the caller knows.
        """
        rec = self.running_container(cid)
        if stdin and not (rec.config or {}).get("stdin"):
            raise FailedPrecondition(
                f"cannot attach to the stdin of container {rec.id}: it was not created with stdin=true; "
                "attach without stdin, or re-create the container with stdin")
        return rec

    async def exec_sync(self: Runtime, cid: str, cmd: list[str], timeout: int) -> tuple[int, bytes, bytes]:
        rec = self.running_container(cid)
        if not cmd:
            raise InvalidArgument("exec command is empty")
        return await self.timed("oci_exec", self.oci(rec.runtime_handler).exec_sync(
            rec.id, list(cmd), float(timeout) if timeout > 0 else None, max_output=self.s.exec_sync_max_output))

    async def update_resources(self: Runtime, cid: str, res: LinuxContainerResources) -> None:
        rec = self.get_container(cid)
        async with self.lock(rec.id):
            self._still_there(rec)
            if rec.state == RUNNING:
                await self.timed("oci_update", self.oci(rec.runtime_handler).update(rec.id, spec.linux_resources(res)))
            elif rec.state != CREATED:
                raise FailedPrecondition(f"container {rec.id} has exited; its resources cannot be updated")
            # Keep the new values for ContainerStatus and for a later start.
            linux = rec.config.setdefault("linux", {}) or {}
            rec.config["linux"] = linux
            linux["resources"] = to_plain(res)
            bundle = os.path.join(self.container_state(rec.id), "bundle", "config.json")
            if rec.state == CREATED and os.path.exists(bundle):
                with open(bundle) as f:
                    c_spec = json.load(f)
                c_spec.setdefault("linux", {})["resources"] = {**c_spec["linux"].get("resources", {}),
                                                              **spec.linux_resources(res)}
                with open(bundle, "w") as f:
                    json.dump(c_spec, f)
            self.store.update_container(rec)

    async def reopen_log(self: Runtime, cid: str) -> None:
        rec = self.running_container(cid)
        await self.oci(rec.runtime_handler).reopen_log(rec.id)
        # conmon re-creates the file asynchronously; the kubelet's log rotation (and
        # critest) look for it as soon as the call returns, so wait for it (bounded).
        if rec.log_path:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not os.path.exists(rec.log_path) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            if not os.path.exists(rec.log_path):
                raise FailedPrecondition(f"conmon did not reopen the log of container {rec.id} at {rec.log_path}")

    # -- recovery -----------------------------------------------------------------------------------

    def recover_exec_sessions(self: Runtime) -> None:
        """Kill exec sessions (streaming or ExecSync) that a crashed daemon left running.

        Their conmons were our children, waiting for us to read their output; nobody
        will now.  All handlers share one conmon dir, so one sweep covers them.
        """
        killed = self.oci(self.s.default_handler).reap_exec_sessions()
        if killed:
            log.info("killed exec sessions left by the previous daemon", extra={"fields": {"conmon_pids": killed}})

    async def recover_container(self: Runtime, rec: ContainerRecord) -> None:
        phase = rec.extra.get("phase")
        if phase in ("creating", "spec"):
            log.info("removing container %s left half-made by a crash", rec.id)
            await self._destroy_container(rec)
            return
        if phase == "starting":
            # The daemon died inside StartContainer: keep it if it really runs.
            try:
                st = await self.oci(rec.runtime_handler).state(rec.id)
                running = st.status == "running"
            except NotFound:
                running = False
            rec.extra.pop("phase", None)
            if running:
                rec.state, rec.pid, rec.started_at = RUNNING, st.pid, rec.started_at or now_ns()
            else:
                try:
                    await self.oci(rec.runtime_handler).delete(rec.id, force=True)
                except MoorageError:
                    pass
                rec.state = CREATED
            self.store.update_container(rec)
        if rec.state == RUNNING:
            rt = self.oci(rec.runtime_handler)
            if rt.exit_status(rec.id) is None and await self._process_lost(rt, rec.id):
                # conmon and the runtime's state are gone (a reboot wiped the state dir):
                # no exit will ever be recorded, so record one now.
                self._record_lost_exit(rec)
                return
            # wait_exit reads conmon's exit file at once if it exited while we were down.
            self.watch_exit(rec.id, rec.runtime_handler, self._on_container_exit)

    async def _process_lost(self: Runtime, rt, obj_id: str) -> bool:
        """True if neither a conmon nor the OCI runtime knows a live process for ``obj_id``."""
        if rt.conmon_pid(obj_id) is not None:
            return False
        try:
            st = await rt.state(obj_id)
        except NotFound:
            return True
        except MoorageError as e:
            log.warning("state of %s: %s", obj_id, e.message)
            return False
        return st.status == "stopped"

    def _record_lost_exit(self: Runtime, rec: ContainerRecord) -> None:
        """Mark a RUNNING container EXITED whose exit can never be read (state lost)."""
        if rec.state != RUNNING:
            return
        rec.state, rec.exit_code, rec.finished_at = EXITED, 255, now_ns()
        rec.reason = "Error"
        rec.message = LOST_STATE_MESSAGE
        rec.extra.pop("phase", None)
        self.store.update_container(rec)
        self.forget_watcher(rec.id)
        self.events.publish(rec.id, events.STOPPED, rec.sandbox_id)
        log.warning("container state lost; marked exited", extra={"fields": {"id": rec.id}})
