"""The daemon's Prometheus endpoint: counters move with the calls made."""

from __future__ import annotations

import os
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config, run_container, wait_exited

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Scrape:
    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
        self.samples: dict[tuple, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in self.samples.items()
                   if n == name and all(dict(ls).get(k) == v2 for k, v2 in labels.items()))


def test_counters_move_with_the_calls(daemon, registry):
    rt = daemon.runtime
    before = Scrape(daemon.metrics_port)
    for _ in range(3):
        rt.Version(pb.VersionRequest())
    with pytest.raises(grpc.RpcError):
        rt.ContainerStatus(pb.ContainerStatusRequest(container_id="does-not-exist"))
    ref = registry.images["busybox"].ref
    daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120)
    with pytest.raises(grpc.RpcError):
        daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=f"{registry.host}/test/nope:1")),
                                timeout=120)
    pcfg = pod_config()
    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pcfg)).pod_sandbox_id
    running = run_container(rt, sid, pcfg, container_config(ref, ["sleep", "3600"]))
    exited = run_container(rt, sid, pcfg, container_config(ref, ["true"]))
    wait_exited(rt, exited)
    run_container(rt, sid, pcfg, container_config(ref, ["true"]), start=False)
    after = Scrape(daemon.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    rs = "RuntimeService"
    assert delta("moorage_grpc_requests_total", service=rs, method="Version", code="OK") == 3
    assert delta("moorage_grpc_requests_total", service=rs, method="ContainerStatus", code="NOT_FOUND") == 1
    assert delta("moorage_grpc_requests_total", service=rs, method="RunPodSandbox", code="OK") == 1
    assert delta("moorage_grpc_requests_total", service=rs, method="CreateContainer", code="OK") == 3
    assert delta("moorage_grpc_requests_total", service="ImageService", method="PullImage", code="OK") == 1
    assert delta("moorage_grpc_requests_total", service="ImageService", method="PullImage", code="NOT_FOUND") == 1
    assert delta("moorage_grpc_request_duration_seconds_count", service=rs, method="Version") == 3
    assert after.get("moorage_grpc_request_duration_seconds_bucket", service=rs, method="Version", le="+Inf") >= 3

    assert after.get("moorage_sandboxes", state="SANDBOX_READY") == 1
    assert after.get("moorage_containers", state="CONTAINER_RUNNING") == 1
    assert after.get("moorage_containers", state="CONTAINER_EXITED") == 1
    assert after.get("moorage_containers", state="CONTAINER_CREATED") == 1

    assert delta("moorage_image_pulls_total", result="success") == 1
    assert delta("moorage_image_pulls_total", result="failure") == 1
    assert delta("moorage_image_pull_bytes_total") > 500_000  # the gzip busybox layer is ~1.3 MB
    assert delta("moorage_image_pull_duration_seconds_count") == 1
    assert delta("moorage_image_pull_duration_seconds_sum") > 0

    # runc/conmon: the two started containers were each created and started (the pod has no
    # infra process: its namespaces are pinned).
    assert delta("moorage_oci_operation_duration_seconds_count", operation="oci_create") == 2
    assert delta("moorage_oci_operation_duration_seconds_count", operation="oci_start") == 2
    assert delta("moorage_oci_operation_duration_seconds_sum", operation="oci_create") > 0

    assert after.get("process_resident_memory_bytes") > 10_000_000
    assert after.get("process_open_fds") > 0
    assert after.get("process_cpu_seconds_total") >= before.get("process_cpu_seconds_total")
    assert after.get("moorage_grpc_requests_in_flight") == 0
    assert running


def test_scrape_config_points_at_the_default_address():
    with open(os.path.join(REPO, "manifests", "prometheus", "scrape-config.yaml")) as f:
        text = f.read()
    assert "job_name: moorage" in text and '"127.0.0.1:9464"' in text and "metrics_path: /metrics" in text
    from moorage.cri.config import Config

    assert Config().metrics.address == "127.0.0.1:9464"
