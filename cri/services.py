"""Composition root: builds the domain objects and the CRI servicers over them.

The one module that knows every part: the other cri modules receive what they
use through typed constructors and import none of their peers' wiring.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from moorage.cni.manager import CNIManager
from moorage.core.store import Store
from moorage.cri import config as configmod
from moorage.cri.batches import Batching
from moorage.cri.config import RuntimeConfig, rlimit_type
from moorage.cri.image_service import ImageServicer
from moorage.cri.limits import EXEC_SYNC_RESERVE, KUBELET_MAX_MESSAGE, max_response_bytes
from moorage.cri.metrics import METRICS
from moorage.cri.reload import ReloadTargets
from moorage.cri.rpc_stats import StatsRPCs
from moorage.cri.rpc_streaming import StreamingRPCs
from moorage.cri.runtime_service import RuntimeServicer
from moorage.cri.streaming_backend import build_streaming
from moorage.images.service import ImageService, ImageSettings
from moorage.nri.adaptation import Adaptation, NRISettings
from moorage.runtime.service import Runtime, RuntimeSettings
from moorage.runtime.spec import RuntimeSpecConfig
from moorage.runtime.stats import StatsCollector


class Component(Protocol):
    """A part the daemon starts before serving and stops after (in reverse order)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Services:
    runtime: RuntimeServicer
    streaming: StreamingRPCs
    stats: StatsRPCs
    images: ImageServicer
    components: list[Component] = field(default_factory=list)  # in start order
    reload_targets: ReloadTargets | None = None  # what a SIGHUP reconfigures

    def rpc_groups(self) -> dict[str, tuple[object, ...]]:
        """The servicers behind each CRI service, as ``Edge.service_handler`` takes them."""
        return {"RuntimeService": (self.runtime, self.streaming, self.stats), "ImageService": (self.images,)}


def _cgroupns(mode: str) -> bool:
    # "auto": a private cgroup namespace where the host is cgroup v2 (as containerd on v2).
    if mode == "auto":
        return os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    return mode == "private"


def runtime_spec_config(rt: RuntimeConfig) -> RuntimeSpecConfig:
    """The spec builder's knobs from [runtime]; every field of RuntimeSpecConfig has a key."""
    return RuntimeSpecConfig(
        default_capabilities=tuple(rt.default_capabilities),
        default_sysctls=dict(rt.default_sysctls),
        seccomp_default=rt.seccomp_default,
        seccomp_arch=rt.seccomp_arch or None,
        apparmor_default_profile=rt.apparmor_default_profile,
        selinux_enabled=rt.selinux_enabled,
        cgroupns=_cgroupns(rt.cgroup_namespace),
        masked_paths=tuple(rt.masked_paths),
        readonly_paths=tuple(rt.readonly_paths),
        tmpfs_size=rt.tmpfs_size,
        sandbox_cpu_shares=rt.sandbox_cpu_shares,
        privileged_without_host_devices=rt.privileged_without_host_devices,
        rlimits=tuple((rlimit_type(n), soft, hard) for n, (soft, hard) in sorted(rt.rlimits.items())),
        allowed_annotations=tuple(rt.allowed_annotations),
        pod_annotations=tuple(rt.pod_annotations),
        disable_hugetlb_controller=rt.disable_hugetlb_controller,
        tolerate_missing_hugetlb_controller=rt.tolerate_missing_hugetlb_controller,
        userns_length_multiple=rt.userns_length_multiple,
    )


def runtime_settings(cfg: configmod.Config, max_response: int = KUBELET_MAX_MESSAGE) -> RuntimeSettings:
    # ExecSync output is capped so that the whole response fits the CRI clients' message limit.
    exec_cap = min(cfg.runtime.exec_sync_max_output, max_response - EXEC_SYNC_RESERVE)
    return RuntimeSettings(
        root_dir=cfg.root_dir, state_dir=cfg.state_dir,
        handlers={n: h.path for n, h in cfg.runtime.handlers.items()},
        handler_roots={n: h.root for n, h in cfg.runtime.handlers.items() if h.root},
        default_handler=cfg.runtime.default_handler, conmon=cfg.runtime.conmon,
        infra_binary=cfg.runtime.infra_binary, cgroup_driver=cfg.runtime.cgroup_driver,
        default_cgroup_parent=cfg.runtime.default_cgroup_parent, netns_dir=cfg.netns_dir,
        log_level=cfg.log_level, exec_sync_max_output=exec_cap,
        spec=runtime_spec_config(cfg.runtime), disabled_features=tuple(cfg.runtime.disabled_features),
        enable_cdi=cfg.runtime.enable_cdi, cdi_spec_dirs=tuple(cfg.runtime.cdi_spec_dirs),
        drop_infra=cfg.runtime.drop_infra,
    )


def image_settings(cfg: configmod.Config) -> ImageSettings:
    return ImageSettings(
        root_dir=cfg.root_dir, snapshotter=cfg.images.snapshotter, hosts_dir=cfg.images.registry_config_path,
        insecure_registries=list(cfg.images.insecure_registries), retries=cfg.images.pull_retries,
        stall_timeout=cfg.images.stall_timeout, max_concurrent_downloads=cfg.images.max_concurrent_downloads,
        gc_on_remove=cfg.images.gc_on_remove,
        pinned_refs=configmod.pinned_refs(cfg), auth_file=cfg.images.auth_file,
        credential_helper_timeout=cfg.images.credential_helper_timeout,
        container_root=cfg.images.container_root, sync_snapshots=cfg.images.sync_snapshots,
        fs_usage_period=cfg.images.fs_usage_period,
    )


def nri_settings(cfg: configmod.Config) -> NRISettings:
    n = cfg.nri
    return NRISettings(
        enable=n.enable, socket_path=n.socket_path, plugin_path=n.plugin_path,
        plugin_config_path=n.plugin_config_path, registration_timeout=n.plugin_registration_timeout,
        request_timeout=n.plugin_request_timeout, disable_connections=n.disable_connections,
        fail_on_plugin_loss=n.fail_on_plugin_loss,
    )


def _observe(op: str, secs: float) -> None:
    if op.startswith("oci"):
        METRICS.oci_seconds.labels(op).observe(secs)
    else:
        METRICS.cni_seconds.labels(op).observe(secs)


def build_services(cfg: configmod.Config, store: Store, env: Mapping[str, str] = os.environ) -> Services:
    """Every domain object and servicer of a daemon over ``store``; ``env`` may set the stream batch size."""
    cni = CNIManager(cfg.cni.conf_dir, cfg.cni.bin_dirs, cfg.cni_cache_dir, cfg.cni.plugin_timeout,
                     cfg.cni.network_name or None)
    images = ImageService(image_settings(cfg), store, metrics=METRICS)
    METRICS.json_routes["/debug/pulls"] = lambda: {"pulls": images.pulls.snapshot()}  # `moorage images pull` reads it
    # NRI sits between the CRI front and the runtime: the runtime calls it through its hooks port,
    # and it sends the plugins' own updates and evictions back to the runtime.
    nri = Adaptation(nri_settings(cfg)) if cfg.nri.enable else None
    max_response = max_response_bytes(env)
    runtime = Runtime(runtime_settings(cfg, max_response), store, images, cni, observe=_observe, hooks=nri)
    if nri is not None:
        nri.attach(runtime)
    images.in_use = runtime.images_in_use
    images.layer_tokens = runtime.layer_tokens
    METRICS.states.sandbox_states = lambda: runtime.states()[0]
    METRICS.states.container_states = lambda: runtime.states()[1]
    streaming = build_streaming(cfg.streaming, runtime)
    # A stream message, too, must fit the response cap (lowered in tests): 1/16 of it to spare.
    batching = Batching.from_env(env)
    batching = dataclasses.replace(batching, max_bytes=min(batching.max_bytes, max_response - max_response // 16))
    return Services(
        runtime=RuntimeServicer(cfg, runtime=runtime, network=cni, batching=batching),
        streaming=StreamingRPCs(runtime, streaming),
        stats=StatsRPCs(runtime, StatsCollector(runtime), batching),
        images=ImageServicer(images, batching, handlers=tuple(cfg.runtime.handlers)),
        components=[images, runtime, *([nri] if nri is not None else []), streaming],
        reload_targets=ReloadTargets(images=images, network=cni, runtime=runtime),
    )
