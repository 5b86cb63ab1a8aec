"""Pod network stats: a pod that downloads from another pod shows the bytes on its interface.

Safety: a test-owned bridge ``mrgo<hex>`` and a random 10.231.x.0/24 subnet; ``isGateway`` and
``ipMasq`` are off (no host forwarding, no NAT rules), host-local keeps its state under the
daemon's temporary dir; traffic only flows between the two pods on that bridge.  The bridge is
deleted at the end.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, pod_config, run_container, wait_for

MiB = 1024 * 1024

if os.geteuid() != 0 or not os.path.exists("/usr/lib/cni/bridge"):
    pytest.skip("needs root and the CNI plugins in /usr/lib/cni", allow_module_level=True)


@pytest.fixture
def cni_daemon(daemon_factory):
    d = daemon_factory(start=False)
    d.write_config()
    bridge = f"mrgo{secrets.token_hex(3)}"
    subnet = f"10.231.{random.randint(0, 255)}.0/24"
    conf = {"cniVersion": "1.0.0", "name": f"obs-{bridge}", "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False, "hairpinMode": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                 "dataDir": os.path.join(d.base, "ipam")}}]}
    with open(os.path.join(d.cni_conf_dir, "10-obs.conflist"), "w") as f:
        json.dump(conf, f)
    d.start()
    try:
        yield d
    finally:
        d.cleanup_pods()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


def eth0(stats: pb.PodSandboxStats) -> pb.NetworkInterfaceUsage:
    n = stats.linux.network
    assert n.default_interface.name == "eth0"
    assert [i.name for i in n.interfaces] == ["eth0"]  # loopback left out, as cAdvisor does
    return n.default_interface


def test_a_pod_downloading_from_another_shows_network_bytes(cni_daemon, registry):
    d = cni_daemon
    image = registry.images["busybox"].ref
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    rt = d.runtime

    cfg_srv = pod_config("obs-server")
    srv = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg_srv), timeout=60).pod_sandbox_id
    ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=srv)).status.network.ip
    assert ip.startswith("10.231.")
    run_container(rt, srv, cfg_srv, container_config(image, ["sh", "-c",
        "mkdir -p /www && dd if=/dev/zero of=/www/blob bs=1M count=4 && exec httpd -f -p 8080 -h /www"]))

    cfg_cli = pod_config("obs-client")
    cli = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg_cli), timeout=60).pod_sandbox_id
    base = eth0(rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=cli)).stats)
    run_container(rt, cli, cfg_cli, container_config(image, ["sh", "-c",
        f"until wget -q -O /dev/null http://{ip}:8080/blob; do sleep 0.2; done; exec sleep 3600"]))

    def downloaded():
        s = rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=cli)).stats
        return eth0(s).rx_bytes.value - base.rx_bytes.value >= 4 * MiB and s

    s = wait_for(downloaded, timeout=60, what="4 MiB received by the client pod")
    cli_if = eth0(s)
    assert cli_if.tx_bytes.value > base.tx_bytes.value  # requests and ACKs
    srv_if = eth0(rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=srv)).stats)
    assert srv_if.tx_bytes.value >= 4 * MiB

    # The same figures as cAdvisor-named metrics with the interface label.
    descs = {x.name: list(x.label_keys) for x in rt.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors}
    pms = {pm.pod_sandbox_id: pm for pm in rt.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics}
    rx = [m for m in pms[cli].metrics if m.name == "container_network_receive_bytes_total"]
    assert len(rx) == 1
    labels = dict(zip(descs[rx[0].name], rx[0].label_values))
    assert labels["interface"] == "eth0" and labels["id"] == cli and labels["pod"] == "obs-client"
    assert rx[0].value.value >= 4 * MiB and rx[0].metric_type == pb.COUNTER
    tx = [m for m in pms[srv].metrics if m.name == "container_network_transmit_bytes_total"]
    assert tx and tx[0].value.value >= 4 * MiB

    # CNI calls were timed: two ADDs so far.
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).read().decode()
    counts = {s.labels.get("operation"): s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "moorage_cni_operation_duration_seconds_count"}
    assert counts.get("cni_add") == 2
