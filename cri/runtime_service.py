"""CRI RuntimeService: translates protobuf to calls on ``runtime/`` objects and back.

No business logic here: each request's syntax is checked by ``cri.validate``
first; validation of meaning, state and lifecycle live in ``runtime/``; this
module only moves fields between messages and dataclasses.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeAlias

import grpc

from moorage.core.errors import InvalidArgument, NotFound
from moorage.cri import config as configmod
from moorage.cri import convert, validate
from moorage.cri.api import api_pb2 as pb
from moorage.cri.batches import Batching
from moorage.cri.encoded import Encoded, field
from moorage.cri.limits import check_metadata
from moorage.cri.readcache import ObjectCache, Slot
from moorage.cri.version import CRI_API_VERSION, KUBELET_API_VERSION, RUNTIME_NAME, VERSION
from moorage.runtime import model
from moorage.runtime.records import Container, Sandbox
from moorage.runtime.service import Runtime

Ctx: TypeAlias = grpc.aio.ServicerContext  # Any to mypy: grpc ships no stubs
ImageView = tuple[str, str, str]  # (image_ref, image_id, first repo tag)
ImageMemo = dict[str, ImageView]  # image ref -> its view


class Network(Protocol):
    """What the runtime service needs of pod networking (``cni.manager.CNIManager``)."""

    def status(self) -> tuple[bool, str, str]: ...

    def write_conf_from_template(self, template_path: str, pod_cidr: str) -> str | None: ...


class RuntimeServicer:
    """Sandbox, container, status and event RPCs; exec/attach/port-forward are in
    ``rpc_streaming``, stats and metrics in ``rpc_stats`` (the edge serves all three)."""

    def __init__(self, cfg: configmod.Config, runtime: Runtime, network: Network | None = None,
                 batching: Batching | None = None) -> None:
        self.cfg = cfg
        self.rt = runtime
        self.network = network
        self.batching = batching or Batching()
        # Ready-to-send messages per object (cri/readcache.py): the kubelet polls these.
        self.sandbox_items: ObjectCache[Sandbox, pb.PodSandbox] = ObjectCache(
            lambda rec, _: self._build_sandbox_item(rec))
        self.sandbox_statuses: ObjectCache[Sandbox, pb.PodSandboxStatus] = ObjectCache(
            lambda rec, _: self._build_sandbox_status(rec))
        self.container_items: ObjectCache[Container, pb.Container] = ObjectCache(self._build_container_item)
        self.container_statuses: ObjectCache[Container, pb.ContainerStatus] = ObjectCache(
            self._build_container_status)
        self._image_views: ImageMemo = {}
        self._image_views_version: object = None

    def network_status(self) -> tuple[bool, str, str]:
        if self.network is None:
            return False, "NetworkPluginNotReady", "moorage: pod networking (CNI) is not set up"
        return self.network.status()

    # -- runtime -------------------------------------------------------------------------------

    async def Version(self, request: pb.VersionRequest, context: Ctx) -> pb.VersionResponse:
        return pb.VersionResponse(version=KUBELET_API_VERSION, runtime_name=RUNTIME_NAME, runtime_version=VERSION,
                                  runtime_api_version=CRI_API_VERSION)

    async def Status(self, request: pb.StatusRequest, context: Ctx) -> pb.StatusResponse:
        net_ok, net_reason, net_msg = self.network_status()
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(type="NetworkReady", status=net_ok, reason="" if net_ok else net_reason,
                                message="" if net_ok else net_msg),
        ]
        info = {}
        if request.verbose:
            info["config"] = json.dumps(configmod.as_dict(self.cfg), sort_keys=True)
        report = await self.rt.features.areport()  # probed once, then cached
        # "" is the default handler: the kubelet looks it up for pods without a RuntimeClass.
        handlers = [pb.RuntimeHandler(name=h.name, features=pb.RuntimeHandlerFeatures(
                        recursive_read_only_mounts=h.recursive_read_only_mounts.advertised,
                        user_namespaces=h.user_namespaces.advertised))
                    for _, h in sorted(report.handlers.items())]
        features = pb.RuntimeFeatures(
            supplemental_groups_policy=report.supplemental_groups_policy.advertised,
            user_namespaces_host_network=report.user_namespaces_host_network.advertised,
            mount_options=report.mount_options.advertised)
        if request.verbose:
            info["features"] = json.dumps({
                "handlers": {n: {f.name: f.describe() for f in h.features()} for n, h in report.handlers.items()},
                "runtime": {f.name: f.describe() for f in report.runtime_features()}}, sort_keys=True)
        return pb.StatusResponse(status=pb.RuntimeStatus(conditions=conditions), info=info,
                                 runtime_handlers=handlers, features=features)

    async def RuntimeConfig(self, request: pb.RuntimeConfigRequest, context: Ctx) -> pb.RuntimeConfigResponse:
        driver = pb.SYSTEMD if self.cfg.runtime.cgroup_driver == "systemd" else pb.CGROUPFS
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))

    async def UpdateRuntimeConfig(self, request: pb.UpdateRuntimeConfigRequest,
                                  context: Ctx) -> pb.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        validate.pod_cidr(cidr, "runtime_config.network_config.pod_cidr")
        if cidr and self.network is not None and self.cfg.cni.conf_template:
            await asyncio.to_thread(self.network.write_conf_from_template, self.cfg.cni.conf_template, cidr)
        return pb.UpdateRuntimeConfigResponse()

    # -- sandboxes -------------------------------------------------------------------------------

    async def RunPodSandbox(self, request: pb.RunPodSandboxRequest, context: Ctx) -> pb.RunPodSandboxResponse:
        c = request.config
        # Before any other work: one oversized request must cost no more than a refused one.
        check_metadata(f"pod sandbox {c.metadata.name[:64]!r}", c.labels, c.annotations,
                       self.cfg.limits.max_labels_annotations_bytes)
        validate.runtime_handler(request.runtime_handler)
        cfg = convert.sandbox_config(c)
        validate.sandbox_config(cfg)
        sid = await self.rt.run_sandbox(cfg, request.runtime_handler)
        return pb.RunPodSandboxResponse(pod_sandbox_id=sid)

    async def StopPodSandbox(self, request: pb.StopPodSandboxRequest, context: Ctx) -> pb.StopPodSandboxResponse:
        validate.object_id(request.pod_sandbox_id, "pod_sandbox_id")
        try:
            await self.rt.stop_sandbox(request.pod_sandbox_id)
        except NotFound:
            pass  # stopping what is gone is success, as the CRI asks
        return pb.StopPodSandboxResponse()

    async def RemovePodSandbox(self, request: pb.RemovePodSandboxRequest, context: Ctx) -> pb.RemovePodSandboxResponse:
        validate.object_id(request.pod_sandbox_id, "pod_sandbox_id")
        await self.rt.remove_sandbox(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    async def UpdatePodSandboxResources(self, request: pb.UpdatePodSandboxResourcesRequest,
                                        context: Ctx) -> pb.UpdatePodSandboxResourcesResponse:
        validate.object_id(request.pod_sandbox_id, "pod_sandbox_id")
        overhead = convert.resources(request.overhead) if request.HasField("overhead") else None
        resources = convert.resources(request.resources) if request.HasField("resources") else None
        validate.resources(overhead, "overhead")
        validate.resources(resources, "resources")
        await self.rt.update_sandbox_resources(request.pod_sandbox_id, overhead, resources)
        return pb.UpdatePodSandboxResourcesResponse()

    def _sandbox_status(self, rec: Sandbox) -> pb.PodSandboxStatus:
        return self.sandbox_statuses.get(rec).msg

    def _build_sandbox_status(self, rec: Sandbox) -> pb.PodSandboxStatus:
        meta, st = rec.metadata, rec.status
        cfg = meta.config
        sc = cfg.linux.security_context if cfg.linux else None
        nso = (sc.namespace_options if sc else None) or model.NamespaceOption()
        return pb.PodSandboxStatus(
            id=rec.id, metadata=convert.to_pb(pb.PodSandboxMetadata, cfg.metadata),
            state=convert.sandbox_state_pb(st.state), created_at=meta.created_at,
            network=pb.PodSandboxNetworkStatus(ip=st.ip, additional_ips=[pb.PodIP(ip=i) for i in st.additional_ips]),
            linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=convert.to_pb(pb.NamespaceOption, nso))),
            labels=meta.labels, annotations=meta.annotations, runtime_handler=meta.runtime_handler,
        )

    async def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest, context: Ctx) -> Encoded:
        validate.object_id(request.pod_sandbox_id, "pod_sandbox_id")
        rec, info = self.rt.sandbox_status(request.pod_sandbox_id, request.verbose)
        memo = self._image_memo()  # one image look-up per image, not per container (the kubelet asks often)
        # PodSandboxStatusResponse: status = 1, info = 2, containers_statuses = 3, timestamp = 4.
        parts = [self.sandbox_statuses.get(rec).entry]
        if info:
            parts.append(pb.PodSandboxStatusResponse(info=info).SerializeToString())
        parts += [field(3, self._container_status_slot(c, memo).raw)
                  for c in self.rt.list_containers(sandbox_id=rec.id) if c.metadata.sandbox_id == rec.id]
        parts.append(pb.PodSandboxStatusResponse(timestamp=time.time_ns()).SerializeToString())
        return Encoded(b"".join(parts))

    def _build_sandbox_item(self, rec: Sandbox) -> pb.PodSandbox:
        meta = rec.metadata
        return pb.PodSandbox(id=rec.id, metadata=convert.to_pb(pb.PodSandboxMetadata, meta.config.metadata),
                             state=convert.sandbox_state_pb(rec.status.state), created_at=meta.created_at,
                             labels=meta.labels, annotations=meta.annotations, runtime_handler=meta.runtime_handler)

    def _sandbox_slots(self, f: pb.PodSandboxFilter | None) -> list[Slot[pb.PodSandbox]]:
        kw: dict[str, Any] = {}
        if f is not None:
            kw = dict(id_prefix=f.id, labels=dict(f.label_selector))
            if f.HasField("state"):
                kw["state"] = convert.sandbox_state_from_pb(f.state.state)
        recs = self.rt.list_sandboxes(**kw)
        slots = [self.sandbox_items.get(r) for r in recs]
        if not kw:  # everything there is: forget the removed
            live = {r.id for r in recs}
            self.sandbox_items.prune(live)
            self.sandbox_statuses.prune(live)
        return slots

    async def ListPodSandbox(self, request: pb.ListPodSandboxRequest, context: Ctx) -> Encoded:
        # ListPodSandboxResponse: items = 1.
        slots = self._sandbox_slots(request.filter if request.HasField("filter") else None)
        return Encoded(b"".join(s.entry for s in slots))

    async def StreamPodSandboxes(self, request: pb.StreamPodSandboxesRequest,
                                 context: Ctx) -> AsyncIterator[pb.StreamPodSandboxesResponse]:
        items = [s.msg for s in self._sandbox_slots(request.filter if request.HasField("filter") else None)]
        for batch in self.batching.split(items):
            yield pb.StreamPodSandboxesResponse(pod_sandboxes=batch)

    # -- containers --------------------------------------------------------------------------------

    async def CreateContainer(self, request: pb.CreateContainerRequest, context: Ctx) -> pb.CreateContainerResponse:
        c = request.config
        check_metadata(f"container {c.metadata.name[:64]!r}", c.labels, c.annotations,
                       self.cfg.limits.max_labels_annotations_bytes)
        validate.object_id(request.pod_sandbox_id, "pod_sandbox_id")
        cfg = convert.container_config(c)
        validate.container_config(cfg)
        cid = await self.rt.create_container(request.pod_sandbox_id, cfg)
        return pb.CreateContainerResponse(container_id=cid)

    async def StartContainer(self, request: pb.StartContainerRequest, context: Ctx) -> pb.StartContainerResponse:
        validate.object_id(request.container_id, "container_id")
        await self.rt.start_container(request.container_id)
        return pb.StartContainerResponse()

    async def StopContainer(self, request: pb.StopContainerRequest, context: Ctx) -> pb.StopContainerResponse:
        validate.object_id(request.container_id, "container_id")
        await self.rt.stop_container(request.container_id, request.timeout)
        return pb.StopContainerResponse()

    async def RemoveContainer(self, request: pb.RemoveContainerRequest, context: Ctx) -> pb.RemoveContainerResponse:
        validate.object_id(request.container_id, "container_id")
        await self.rt.remove_container(request.container_id)
        return pb.RemoveContainerResponse()

    def _image_memo(self) -> ImageMemo:
        """Image views valid now: kept until the image store changes (one look-up per image)."""
        version = self.rt.images.store.images_version()
        if version != self._image_views_version:
            self._image_views, self._image_views_version = {}, version
        return self._image_views

    def _image_ref(self, rec: Container, memo: ImageMemo | None = None) -> ImageView:
        """(image_ref, image_id, first repo tag) for a container: the repo digest where there is one."""
        image_ref = rec.metadata.image_ref
        if memo is not None and image_ref in memo:
            return memo[image_ref]
        try:
            img = self.rt.images.store.get_image(image_ref)
            out = ((img.repo_digests[0] if img.repo_digests else img.id), img.id,
                   img.repo_tags[0] if img.repo_tags else "")
        except Exception:  # noqa: BLE001 - the image may have been removed since
            out = (image_ref, image_ref, "")
        if memo is not None:
            memo[image_ref] = out
        return out

    @staticmethod
    def _image_spec(rec: Container, tag: str) -> pb.ImageSpec:
        """As containerd: the image's first repo tag, else what the user wrote, else what was asked for
        (the kubelet creates containers with the image id)."""
        user = rec.metadata.config.user_specified_image
        return pb.ImageSpec(image=tag or user or rec.metadata.image_name, user_specified_image=user)

    def _build_container_item(self, rec: Container, view: ImageView) -> pb.Container:
        ref, iid, tag = view
        meta = rec.metadata
        return pb.Container(id=rec.id, pod_sandbox_id=meta.sandbox_id,
                            metadata=convert.to_pb(pb.ContainerMetadata, meta.config.metadata),
                            image=self._image_spec(rec, tag), image_ref=ref, image_id=iid,
                            state=convert.container_state_pb(rec.status.state), created_at=meta.created_at,
                            labels=meta.labels, annotations=meta.annotations)

    def _container_status_slot(self, rec: Container, memo: ImageMemo) -> Slot[pb.ContainerStatus]:
        return self.container_statuses.get(rec, self._image_ref(rec, memo))

    def _container_status(self, rec: Container, memo: ImageMemo) -> pb.ContainerStatus:
        return self._container_status_slot(rec, memo).msg

    def _build_container_status(self, rec: Container, view: ImageView) -> pb.ContainerStatus:
        meta, st = rec.metadata, rec.status
        cfg = rec.effective_config()
        ref, iid, tag = view
        res = cfg.linux.resources if cfg.linux and cfg.linux.resources else None
        user = st.user
        sig = meta.stop_signal.upper()
        if sig and not sig.startswith("SIG"):
            sig = "SIG" + sig
        return pb.ContainerStatus(
            id=rec.id, metadata=convert.to_pb(pb.ContainerMetadata, cfg.metadata),
            state=convert.container_state_pb(st.state),
            created_at=meta.created_at, started_at=st.started_at, finished_at=st.finished_at,
            exit_code=st.exit_code, image=self._image_spec(rec, tag), image_ref=ref, image_id=iid,
            reason=st.reason, message=st.message, labels=meta.labels, annotations=meta.annotations,
            mounts=[convert.to_pb(pb.Mount, m) for m in cfg.mounts], log_path=meta.log_path,
            resources=pb.ContainerResources(linux=convert.to_pb(pb.LinuxContainerResources, res)) if res else None,
            user=pb.ContainerUser(linux=pb.LinuxContainerUser(
                uid=user.uid if user else 0, gid=user.gid if user else 0,
                supplemental_groups=user.additional_gids if user else [])),
            stop_signal=f"SIGNAL_{sig}" if f"SIGNAL_{sig}" in pb.Signal.keys() else "SIGNAL_RUNTIME_DEFAULT",
        )

    async def ContainerStatus(self, request: pb.ContainerStatusRequest, context: Ctx) -> Encoded:
        validate.object_id(request.container_id, "container_id")
        rec, info = self.rt.container_status(request.container_id, request.verbose)
        slot = self._container_status_slot(rec, self._image_memo())
        # ContainerStatusResponse: status = 1, info = 2.
        if info:
            return Encoded(slot.entry + pb.ContainerStatusResponse(info=info).SerializeToString())
        return Encoded(slot.entry)

    def _container_slots(self, f: pb.ContainerFilter | None) -> list[Slot[pb.Container]]:
        kw: dict[str, Any] = {}
        if f is not None:
            kw = dict(id_prefix=f.id, sandbox_id=f.pod_sandbox_id, labels=dict(f.label_selector))
            if f.HasField("state"):
                kw["state"] = convert.container_state_from_pb(f.state.state)
        memo = self._image_memo()  # one image look-up per image, not per container (the kubelet lists every second)
        recs = self.rt.list_containers(**kw)
        slots = [self.container_items.get(r, self._image_ref(r, memo)) for r in recs]
        if not kw:  # everything there is: forget the removed
            live = {r.id for r in recs}
            self.container_items.prune(live)
            self.container_statuses.prune(live)
        return slots

    async def ListContainers(self, request: pb.ListContainersRequest, context: Ctx) -> Encoded:
        # ListContainersResponse: containers = 1.
        slots = self._container_slots(request.filter if request.HasField("filter") else None)
        return Encoded(b"".join(s.entry for s in slots))

    async def StreamContainers(self, request: pb.StreamContainersRequest,
                               context: Ctx) -> AsyncIterator[pb.StreamContainersResponse]:
        items = [s.msg for s in self._container_slots(request.filter if request.HasField("filter") else None)]
        for batch in self.batching.split(items):
            yield pb.StreamContainersResponse(containers=batch)

    async def UpdateContainerResources(self, request: pb.UpdateContainerResourcesRequest,
                                       context: Ctx) -> pb.UpdateContainerResourcesResponse:
        validate.object_id(request.container_id, "container_id")
        if not request.HasField("linux"):
            raise InvalidArgument("linux: UpdateContainerResources needs linux resources")
        res = convert.resources(request.linux)
        validate.resources(res, "linux")
        await self.rt.update_resources(request.container_id, res)
        return pb.UpdateContainerResourcesResponse()

    async def ReopenContainerLog(self, request: pb.ReopenContainerLogRequest,
                                 context: Ctx) -> pb.ReopenContainerLogResponse:
        validate.object_id(request.container_id, "container_id")
        await self.rt.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    async def ExecSync(self, request: pb.ExecSyncRequest, context: Ctx) -> pb.ExecSyncResponse:
        validate.object_id(request.container_id, "container_id")
        validate.command(request.cmd)
        code, out, err = await self.rt.exec_sync(request.container_id, list(request.cmd), request.timeout)
        return pb.ExecSyncResponse(stdout=out, stderr=err, exit_code=code)

    # -- events ------------------------------------------------------------------------------------

    async def GetContainerEvents(self, request: pb.GetEventsRequest,
                                 context: Ctx) -> AsyncIterator[pb.ContainerEventResponse]:
        sub = self.rt.events.subscribe()
        try:
            # Initial metadata tells the client it is subscribed: events from now on reach it.
            await context.send_initial_metadata(())
            while True:
                ev = await sub.next()
                sandbox_status = None
                statuses = []
                if ev.captured:  # the state when the event happened, however late we send it
                    sb, ctrs = ev.sandbox, list(ev.containers)
                else:
                    sb = self.rt.sandboxes.get(ev.sandbox_id)
                    ctrs = self.rt.list_containers(sandbox_id=sb.id) if sb is not None else []
                if sb is not None:
                    sandbox_status = self._sandbox_status(sb)
                    memo = self._image_memo()
                    statuses = [self._container_status(c, memo) for c in ctrs]
                yield pb.ContainerEventResponse(
                    container_id=ev.container_id, container_event_type=convert.event_type_pb(ev.type),
                    created_at=ev.created_at, pod_sandbox_status=sandbox_status, containers_statuses=statuses)
        finally:
            sub.close()
