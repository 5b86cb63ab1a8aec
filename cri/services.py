"""Composition root: builds the domain objects and the CRI servicers over them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from moorage.cni.manager import CNIManager
from moorage.cri.image_service import ImageServicer
from moorage.cri.metrics import METRICS
from moorage.cri.runtime_service import RuntimeServicer
from moorage.images.service import ImageService, ImageSettings
from moorage.runtime.service import Runtime, RuntimeSettings
from moorage.runtime.spec import RuntimeSpecConfig

if TYPE_CHECKING:
    from moorage.cri.server import Daemon


def runtime_settings(cfg) -> RuntimeSettings:
    return RuntimeSettings(
        root_dir=cfg.root_dir, state_dir=cfg.state_dir,
        handlers={n: h.path for n, h in cfg.runtime.handlers.items()},
        handler_roots={n: h.root for n, h in cfg.runtime.handlers.items() if h.root},
        default_handler=cfg.runtime.default_handler, conmon=cfg.runtime.conmon,
        infra_binary=cfg.runtime.infra_binary, cgroup_driver=cfg.runtime.cgroup_driver,
        default_cgroup_parent=cfg.runtime.default_cgroup_parent, netns_dir=cfg.netns_dir,
        log_level=cfg.log_level, exec_sync_max_output=cfg.runtime.exec_sync_max_output,
        spec=RuntimeSpecConfig(default_capabilities=tuple(cfg.runtime.default_capabilities),
                               seccomp_default=cfg.runtime.seccomp_default,
                               cgroupns=os.path.exists("/sys/fs/cgroup/cgroup.controllers")),
    )


def image_settings(cfg) -> ImageSettings:
    return ImageSettings(
        root_dir=cfg.root_dir, snapshotter=cfg.images.snapshotter, hosts_dir=cfg.images.registry_config_path,
        insecure_registries=list(cfg.images.insecure_registries), retries=cfg.images.pull_retries,
        stall_timeout=cfg.images.stall_timeout, max_concurrent_downloads=cfg.images.max_concurrent_downloads,
        gc_on_remove=cfg.images.gc_on_remove,
        pinned_refs=[cfg.runtime.sandbox_image] if cfg.runtime.sandbox_image else [],
    )


def build_services(daemon: Daemon) -> tuple[object, object, list]:
    """Returns (runtime servicer, image servicer, components to start/stop in order)."""
    cfg = daemon.cfg
    cni = CNIManager(cfg.cni.conf_dir, cfg.cni.bin_dirs, cfg.cni_cache_dir, cfg.cni.plugin_timeout,
                     cfg.cni.network_name or None)
    images = ImageService(image_settings(cfg), daemon.store, metrics=METRICS)
    runtime = Runtime(runtime_settings(cfg), daemon.store, images, cni,
                      observe=lambda op, secs: METRICS.oci_seconds.labels(op).observe(secs)
                      if op.startswith("oci") else METRICS.cni_seconds.labels(op).observe(secs))
    images.in_use = runtime.images_in_use
    METRICS.states.sandbox_states = lambda: runtime.states()[0]
    METRICS.states.container_states = lambda: runtime.states()[1]
    components: list = [images, runtime]
    streaming = None
    try:
        from moorage.cri.streaming_backend import build_streaming

        streaming = build_streaming(cfg, runtime)
        components.append(streaming)
    except ImportError:
        pass
    from moorage.runtime.stats import StatsCollector

    runtime_svc = RuntimeServicer(cfg, runtime=runtime, network=cni, streaming=streaming,
                                  stats=StatsCollector(runtime))
    image_svc = ImageServicer(cfg, images)
    return runtime_svc, image_svc, components
