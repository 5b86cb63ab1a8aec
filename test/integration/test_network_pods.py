"""Pod networking end to end over gRPC: real daemon, real CNI plugins, test-owned bridge and subnet."""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import subprocess
from pathlib import Path

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config, wait_for
from moorage.testing.net import iptables_state, remove_portmap_scaffolding_if_ours
from moorage.testing.netlab import (
    NEEDS,
    exec_sync,
    link_exists,
    links_on_bridge,
    pod_status,
    pull,
    rules_of_network,
    run_pod,
    start_busybox,
    stop_and_remove,
)

pytestmark = [pytest.mark.integration, NEEDS]

HTTPD = "mkdir -p /tmp/www && echo hello-from-{name} > /tmp/www/index.html && exec httpd -f -p {port} -h /tmp/www"


def inet_addrs(ip_addr_output: str) -> list[str]:
    """IPv4 addresses of eth0 in ``ip -4 -o addr`` output."""
    out = []
    for line in ip_addr_output.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] == "eth0" and parts[2] == "inet":
            out.append(parts[3].split("/")[0])
    return out


def http_get(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_two_pods_reach_each_other_and_host_port(netlab, daemon_factory, registry):
    d = netlab.daemon(daemon_factory)
    image = registry.images["busybox"].ref
    pull(d, image)
    host_port = random.randint(20000, 29999)

    cfg_a = pod_config("net-a")
    cfg_b = pod_config("net-b", port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=8080,
                                                               host_port=host_port)])
    sid_a, sid_b = run_pod(d, cfg_a), run_pod(d, cfg_b)
    st_a, st_b = pod_status(d, sid_a), pod_status(d, sid_b)
    ip_a, ip_b = st_a.network.ip, st_b.network.ip
    assert ipaddress.ip_address(ip_a) in netlab.subnet and ipaddress.ip_address(ip_b) in netlab.subnet
    assert ip_a != ip_b and not st_a.network.additional_ips
    assert netlab.reservations() == sorted([ip_a, ip_b])

    server = start_busybox(d, sid_b, cfg_b, image, HTTPD.format(name="b", port=8080))
    client = start_busybox(d, sid_a, cfg_a, image, "exec sleep 3600")

    # the IP in PodSandboxStatus is the one configured inside each pod
    for cid, ip in ((client, ip_a), (server, ip_b)):
        code, out, err = exec_sync(d, cid, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        assert code == 0, err
        assert inet_addrs(out) == [ip]
        code, out, _ = exec_sync(d, cid, ["cat", "/proc/net/fib_trie"])
        assert code == 0 and ip in out

    # pod A -> pod B over the bridge (busybox wget against busybox httpd); no -T: it
    # crashes busybox 1.35 wget, the ExecSync timeout bounds the call instead
    def fetch():
        code, out, _ = exec_sync(d, client, ["wget", "-q", "-O", "-", f"http://{ip_b}:8080/"])
        return code == 0 and out
    assert wait_for(fetch, 60, 0.2, "httpd in pod B").strip() == "hello-from-b"

    # host -> host port on the bridge address -> portmap DNAT -> pod B
    assert rules_of_network(netlab.network)
    body = http_get(netlab.gateway, host_port)
    assert body.endswith(b"hello-from-b\n"), body

    veth_a, veth_b = netlab.host_veth(d, sid_a), netlab.host_veth(d, sid_b)
    assert links_on_bridge(netlab.bridge) == sorted([veth_a, veth_b])

    stop_and_remove(d, sid_b)
    assert not link_exists(veth_b)
    assert netlab.reservations() == [ip_a]
    assert not rules_of_network(netlab.network)
    assert sid_b not in netlab.netns_pins(d)
    assert [e["containerId"] for e in netlab.cache_entries(d)] == [sid_a]
    stop_and_remove(d, sid_a)
    assert links_on_bridge(netlab.bridge) == []
    assert netlab.reservations() == []
    assert netlab.netns_pins(d) == [] and netlab.cache_entries(d) == []
    remove_portmap_scaffolding_if_ours(netlab.iptables_before)
    assert iptables_state() == netlab.iptables_before


def test_host_network_pod_sees_host_interfaces_without_cni(netlab, daemon_factory, registry):
    d = netlab.daemon(daemon_factory)
    image = registry.images["busybox"].ref
    pull(d, image)
    cfg = pod_config("net-host", linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pb.NamespaceOption(network=pb.NODE))))
    sid = run_pod(d, cfg)
    assert pod_status(d, sid).network.ip == ""
    cid = start_busybox(d, sid, cfg, image, "exec sleep 3600")
    code, out, err = exec_sync(d, cid, ["ip", "-o", "link"])
    assert code == 0, err
    assert f"{netlab.bridge}:" in out  # the host's own (test-owned) bridge is visible
    assert netlab.cache_entries(d) == [] and netlab.netns_pins(d) == []
    assert links_on_bridge(netlab.bridge) == [] and netlab.reservations() == []
    stop_and_remove(d, sid)


def test_dns_options_land_in_resolv_conf(netlab, daemon_factory, registry):
    d = netlab.daemon(daemon_factory)
    image = registry.images["busybox"].ref
    pull(d, image)
    dns = pb.DNSConfig(servers=["10.223.0.10", "10.223.0.11"], searches=["ns1.svc.example", "svc.example"],
                       options=["ndots:5", "timeout:2"])
    cfg = pod_config("net-dns", dns_config=dns)
    sid = run_pod(d, cfg)
    cid = start_busybox(d, sid, cfg, image, "exec sleep 3600")
    code, out, err = exec_sync(d, cid, ["cat", "/etc/resolv.conf"])
    assert code == 0, err
    lines = out.splitlines()
    assert "nameserver 10.223.0.10" in lines and "nameserver 10.223.0.11" in lines
    assert "search ns1.svc.example svc.example" in lines
    assert "options ndots:5 timeout:2" in lines
    # the CNI dns capability got the same values
    (entry,) = netlab.cache_entries(d)
    assert entry["capabilityArgs"].get("dns") == {
        "servers": ["10.223.0.10", "10.223.0.11"], "searches": ["ns1.svc.example", "svc.example"],
        "options": ["ndots:5", "timeout:2"]}
    stop_and_remove(d, sid)


def test_restart_then_stop_tears_network_down_from_cache(netlab, daemon_factory):
    d = netlab.daemon(daemon_factory)
    host_port = random.randint(20000, 29999)
    cfg = pod_config("net-restart", port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80,
                                                                   host_port=host_port)])
    sid = run_pod(d, cfg)
    ip = pod_status(d, sid).network.ip
    veth = netlab.host_veth(d, sid)
    assert netlab.reservations() == [ip] and rules_of_network(netlab.network)

    d.kill9()
    # the conf dir changes meanwhile: teardown must use the cache, not the current config
    os.unlink(os.path.join(d.cni_conf_dir, "10-test.conflist"))
    d.start()
    st = pod_status(d, sid)
    assert st.network.ip == ip
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert not link_exists(veth)
    assert sid not in netlab.netns_pins(d)
    assert netlab.reservations() == []
    assert not rules_of_network(netlab.network)
    assert netlab.cache_entries(d) == []
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)  # idempotent
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    remove_portmap_scaffolding_if_ours(netlab.iptables_before)
    assert iptables_state() == netlab.iptables_before


def test_bandwidth_annotations_shape_the_pod(netlab, daemon_factory):
    d = netlab.daemon(daemon_factory)
    cfg = pod_config("net-bw", annotations={"kubernetes.io/ingress-bandwidth": "10M",
                                            "kubernetes.io/egress-bandwidth": "20M"})
    sid = run_pod(d, cfg)
    (entry,) = netlab.cache_entries(d)
    assert entry["capabilityArgs"]["bandwidth"]["ingressRate"] == 10_000_000
    assert entry["capabilityArgs"]["bandwidth"]["egressRate"] == 20_000_000
    veth = netlab.host_veth(d, sid)
    ifbs = [i["name"] for i in entry["result"]["interfaces"] if i["name"].startswith("bwp")]
    assert len(ifbs) == 1
    # ingress shaping: tbf on the host veth; egress: tbf on the ifb the veth's ingress is mirrored to
    qdisc_veth = subprocess.run(["tc", "qdisc", "show", "dev", veth], capture_output=True, text=True).stdout
    qdisc_ifb = subprocess.run(["tc", "qdisc", "show", "dev", ifbs[0]], capture_output=True, text=True).stdout
    assert "tbf" in qdisc_veth and "ingress" in qdisc_veth, qdisc_veth
    assert "tbf" in qdisc_ifb, qdisc_ifb
    stop_and_remove(d, sid)
    assert not link_exists(veth) and not link_exists(ifbs[0])
    assert netlab.reservations() == []


def test_dual_stack_pod_reports_additional_ip(netlab, daemon_factory):
    if Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").read_text().strip() != "0":
        pytest.skip("IPv6 is disabled on this host")
    v6 = ipaddress.ip_network(f"fd00:6d72:{netlab.subnet.network_address.packed[2]:x}:{random.randint(1, 0xffff):x}::/64")
    conf = netlab.conflist(portmap=False, bandwidth=False)
    conf["plugins"][0]["ipam"]["ranges"].append([{"subnet": str(v6)}])
    d = netlab.daemon(daemon_factory, conf=conf)
    sid = run_pod(d, pod_config("net-dual"))
    st = pod_status(d, sid)
    assert ipaddress.ip_address(st.network.ip) in netlab.subnet
    assert [ipaddress.ip_address(i.ip) in v6 for i in st.network.additional_ips] == [True]
    assert netlab.reservations() == sorted([st.network.ip, st.network.additional_ips[0].ip])
    stop_and_remove(d, sid)
    assert netlab.reservations() == [] and links_on_bridge(netlab.bridge) == []
