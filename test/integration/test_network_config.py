"""NetworkReady follows the conf dir; UpdateRuntimeConfig writes the template; no-config pods."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config, wait_for
from moorage.testing.netlab import NEEDS, links_on_bridge, network_condition, pod_status, rpc_error, run_pod, stop_and_remove

pytestmark = [pytest.mark.integration, NEEDS]


def test_network_ready_follows_the_conf_dir(netlab, daemon_factory):
    d = netlab.daemon(daemon_factory, conf="")
    cond = network_condition(d)
    assert cond.status is False and cond.reason == "NetworkPluginNotReady"
    assert d.cni_conf_dir in cond.message

    # no config at all: a pod still starts, loopback only, and CNI is never called
    sid = run_pod(d, pod_config("net-lo"))
    assert pod_status(d, sid).network.ip == "" and netlab.cache_entries(d) == []
    stop_and_remove(d, sid)

    # a config appears: ready
    good = netlab.write_conf(d)
    assert wait_for(lambda: network_condition(d).status, 10, what="NetworkReady")

    # only a malformed one: not ready, the message names the file and the problem
    os.unlink(good)
    bad = netlab.write_conf(d, '{"cniVersion": "1.0.0", "name": "x", "plugins": [', name="05-broken.conflist")
    cond = network_condition(d)
    assert cond.status is False and cond.reason == "NetworkPluginNotReady"
    assert bad in cond.message and "invalid JSON" in cond.message
    # ... and a pod is refused rather than silently given no network
    err = rpc_error(run_pod, d, pod_config("net-broken"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and bad in err.details()
    assert netlab.netns_pins(d) == []

    # an unsupported version is named too
    netlab.write_conf(d, dict(netlab.conflist(), cniVersion="9.9.9"), name="05-broken.conflist")
    cond = network_condition(d)
    assert cond.status is False and bad in cond.message and "'9.9.9' is not supported" in cond.message

    # a valid file next to the broken one wins
    netlab.write_conf(d)
    assert network_condition(d).status is True
    sid = run_pod(d, pod_config("net-ok"))
    assert ipaddress.ip_address(pod_status(d, sid).network.ip) in netlab.subnet
    stop_and_remove(d, sid)


def test_update_runtime_config_writes_template_for_pod_cidr(netlab, daemon_factory):
    template = os.path.join(netlab.root, "template.conflist")
    conf = netlab.conflist(portmap=False, bandwidth=False)
    conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "{{.PodCIDR}}"}]]
    with open(template, "w") as f:
        f.write(json.dumps(conf, indent=1).replace('"{{.PodCIDR}}"', '"{{ .PodCIDR }}"'))
    d = netlab.daemon(daemon_factory, cni=f'conf_template = "{template}"', conf="")
    assert network_condition(d).status is False

    d.runtime.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(runtime_config=pb.RuntimeConfig(
        network_config=pb.NetworkConfig(pod_cidr=str(netlab.subnet)))))
    written = os.path.join(d.cni_conf_dir, "10-moorage-from-template.conflist")
    with open(written) as f:
        got = json.load(f)
    assert got["plugins"][0]["ipam"]["ranges"] == [[{"subnet": str(netlab.subnet)}]]
    assert network_condition(d).status is True

    sid = run_pod(d, pod_config("net-tmpl"))
    ip = pod_status(d, sid).network.ip
    assert ipaddress.ip_address(ip) in netlab.subnet and netlab.reservations() == [ip]

    # once a network exists, another CIDR changes nothing (an admin's or earlier config wins)
    before = Path(written).read_text()
    d.runtime.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(runtime_config=pb.RuntimeConfig(
        network_config=pb.NetworkConfig(pod_cidr="10.223.0.0/24"))))
    assert Path(written).read_text() == before
    stop_and_remove(d, sid)
    assert links_on_bridge(netlab.bridge) == [] and netlab.reservations() == []


def test_update_runtime_config_without_template_writes_nothing(netlab, daemon_factory):
    d = netlab.daemon(daemon_factory, conf="")
    d.runtime.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(runtime_config=pb.RuntimeConfig(
        network_config=pb.NetworkConfig(pod_cidr=str(netlab.subnet)))))
    assert os.listdir(d.cni_conf_dir) == []
    assert network_condition(d).status is False


def test_shipped_default_network_parses_and_uses_installed_plugins():
    from moorage.cni.config import load_file

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    net = load_file(os.path.join(repo, "manifests", "cni", "10-moorage-bridge.conflist"))
    assert net.plugin_types == ["bridge", "portmap", "bandwidth", "loopback"]
    bridge = net.plugins[0]
    assert bridge["ipMasq"] is False  # no masquerade to the outside
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.88.0.0/16"}]]
    for t in net.plugin_types + ["host-local"]:
        assert os.access(os.path.join("/usr/lib/cni", t), os.X_OK), t


def test_shipped_default_network_chain_works_on_a_test_bridge(netlab, daemon_factory, registry):
    """The shipped plugin chain, moved onto the test's bridge and subnet (10.88.0.0/16 is never used)."""
    from moorage.cni.config import load_file

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    conf = load_file(os.path.join(repo, "manifests", "cni", "10-moorage-bridge.conflist")).to_dict()
    conf["name"] = netlab.network
    bridge = conf["plugins"][0]
    bridge.update(bridge=netlab.bridge, isGateway=False)  # isGateway would turn on the host's ip_forward
    bridge["ipam"].update(dataDir=netlab.data_dir, ranges=[[{"subnet": str(netlab.subnet), "gateway": netlab.gateway}]])
    conf["plugins"][1]["snat"] = False
    d = netlab.daemon(daemon_factory, conf=conf)
    image = registry.images["busybox"].ref
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    cfg = pod_config("net-default")
    sid = run_pod(d, cfg)
    ip = pod_status(d, sid).network.ip
    assert ipaddress.ip_address(ip) in netlab.subnet
    from moorage.testing.netlab import exec_sync, start_busybox

    cid = start_busybox(d, sid, cfg, image, "exec sleep 3600")
    code, out, err = exec_sync(d, cid, ["ip", "-o", "addr"])
    assert code == 0, err
    assert "127.0.0.1/8" in out  # loopback up (the netns code and the loopback plugin both see to it)
    assert f"inet {ip}/" in out
    stop_and_remove(d, sid)
    assert links_on_bridge(netlab.bridge) == [] and netlab.reservations() == []
