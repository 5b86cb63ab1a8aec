"""Real CNI plugins (/usr/lib/cni) on a bridge and subnet owned by each test.

Safety: the bridge is ``mrgt<random>`` with a random 10.222.x.0/24 subnet,
``isGateway: false`` (so the bridge plugin never turns on host IP forwarding)
and the host address on the bridge is added by the test itself; ``ipMasq``
and portmap's ``snat`` are off; host-local keeps its reservations in a
test-owned dataDir.  All traffic stays between the test's namespaces and the
host end of its bridge.  The tests hold one file lock so they do not race
each other on the iptables chains portmap shares between networks.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import os
import random
import shutil
import socket
import threading
import uuid

import pytest

from moorage.cni.manager import Bandwidth, CNIManager, PortMapping
from moorage.core import netns
from moorage.core.errors import InvalidArgument
from moorage.testing.net import (
    PORTMAP_TOP,
    iptables_state,
    remove_portmap_scaffolding_if_ours,
    remove_rules_of_network,
    reservations,
    sh,
)
from moorage.testing.net import free_subnet as _free_subnet

pytestmark = pytest.mark.integration

PLUGIN_DIR = "/usr/lib/cni"
LOCK_PATH = "/run/lock/moorage-test-cni.lock"

if os.geteuid() != 0 or not os.path.exists(os.path.join(PLUGIN_DIR, "bridge")):
    pytest.skip("needs root and the CNI plugins in /usr/lib/cni", allow_module_level=True)



def free_subnet():
    return _free_subnet(222)





def link_index(name: str) -> int | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
    return idx[0] if idx else None


def addrs_in_netns(ns_path: str, ifname: str = "eth0") -> list[str]:
    def read():
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return []
            return sorted(a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx[0]) if a["family"] == socket.AF_INET)

    return netns.run_in_netns(ns_path, read)


class Lab:
    def __init__(self, root: str) -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"mrgt{tag}"
        self.network = f"mrgt-net-{tag}"
        self.subnet = free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.root = root
        self.conf_dir = os.path.join(root, "conf")
        self.cache_dir = os.path.join(root, "cache")
        self.data_dir = os.path.join(root, "ipam")
        self.pin_dir = os.path.join(root, "netns")
        os.makedirs(self.conf_dir)
        conf = {
            "cniVersion": "1.0.0",
            "name": self.network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": False,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.data_dir,
                        "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
                {"type": "bandwidth", "capabilities": {"bandwidth": True}},
            ],
        }
        with open(os.path.join(self.conf_dir, "10-test.conflist"), "w") as f:
            json.dump(conf, f)
        self.sandboxes: list[str] = []
        self.conf = conf

    def manager(self) -> CNIManager:
        return CNIManager(self.conf_dir, [PLUGIN_DIR], self.cache_dir, plugin_timeout=60)

    def new_netns(self) -> tuple[str, str]:
        sid = uuid.uuid4().hex + uuid.uuid4().hex
        self.sandboxes.append(sid)
        return sid, netns.create_netns(sid, self.pin_dir)

    def add_host_address(self) -> None:
        """Give the host an address on the bridge (what isGateway would do, minus ip_forward)."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.addr("add", index=link_index(self.bridge), address=self.gateway, prefixlen=self.subnet.prefixlen)


@pytest.fixture
def lab(tmp_path):
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    lock = open(LOCK_PATH, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    before = iptables_state()
    lab = Lab(str(tmp_path / "lab"))
    lab.iptables_before = before
    try:
        yield lab
    finally:
        m = lab.manager()
        for sid in lab.sandboxes:
            try:
                asyncio.run(m.teardown(sid, None))
            except Exception:
                pass
        netns.collect_stale(set(), lab.pin_dir)
        if link_index(lab.bridge) is not None:
            sh("ip", "link", "del", lab.bridge, check=False)
        remove_rules_of_network(lab.network)
        remove_portmap_scaffolding_if_ours(before)
        shutil.rmtree(lab.root, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


class OneShotServer:
    """A TCP listener created inside a netns, answering ``count`` connections with a greeting."""

    def __init__(self, ns_path: str, port: int, greeting: bytes, count: int) -> None:
        def listen():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(8)
            return s

        self.sock = netns.run_in_netns(ns_path, listen)
        self.sock.settimeout(60)  # never leave the thread behind if a test fails
        self.thread = threading.Thread(target=self._serve, args=(greeting, count), daemon=True)
        self.thread.start()

    def _serve(self, greeting: bytes, count: int) -> None:
        try:
            for _ in range(count):
                conn, _ = self.sock.accept()
                with conn:
                    conn.sendall(greeting)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join()


def recv_all(s: socket.socket) -> bytes:
    with s:
        s.settimeout(30)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def test_two_pods_traffic_portmap_and_clean_teardown(lab):
    m = lab.manager()
    sid_a, ns_a = lab.new_netns()
    sid_b, ns_b = lab.new_netns()
    host_port = random.randint(20000, 29999)

    res_a = asyncio.run(
        m.setup(sid_a, ns_a, "default", "pod-a", "uid-a",
                port_mappings=[PortMapping(host_port, 8080, "tcp")],
                bandwidth=Bandwidth(ingress_rate=100_000_000, egress_rate=100_000_000))
    )
    res_b = asyncio.run(m.setup(sid_b, ns_b, "default", "pod-b", "uid-b"))

    # the IPs the plugins report are the ones configured inside each namespace
    ip_a, ip_b = res_a.ips[0], res_b.ips[0]
    assert ipaddress.ip_address(ip_a) in lab.subnet and ipaddress.ip_address(ip_b) in lab.subnet
    assert ip_a != ip_b
    assert addrs_in_netns(ns_a) == [ip_a]
    assert addrs_in_netns(ns_b) == [ip_b]
    assert [i.sandbox for i in res_a.interfaces if i.name == "eth0"] == [ns_a]
    assert sorted(reservations(lab.data_dir, lab.network)) == sorted([ip_a, ip_b])

    lab.add_host_address()
    server = OneShotServer(ns_a, 8080, b"hello from pod-a", count=2)
    try:
        # pod B -> pod A over the bridge
        client = netns.run_in_netns(ns_b, socket.create_connection, (ip_a, 8080), 30)
        assert recv_all(client) == b"hello from pod-a"
        # host -> host port on the bridge address -> portmap DNAT -> pod A
        assert recv_all(socket.create_connection((lab.gateway, host_port), 30)) == b"hello from pod-a"
    finally:
        server.close()

    stats = netns.interface_stats(ns_a)
    assert stats["eth0"].rx_packets > 0 and stats["eth0"].tx_bytes > 0
    assert "lo" in stats

    host_side = [i.name for r in (res_a, res_b) for i in r.interfaces if not i.sandbox and i.name != lab.bridge]
    assert any(n.startswith("veth") for n in host_side) and any(n.startswith("bwp") for n in host_side)
    assert all(link_index(n) is not None for n in host_side)
    assert f'name: \\"{lab.network}\\"' in " ".join(iptables_state())

    asyncio.run(m.teardown(sid_a, ns_a))
    asyncio.run(m.teardown(sid_b, ns_b))
    asyncio.run(m.teardown(sid_a, ns_a))  # idempotent

    # no veth / ifb left, nothing attached to the bridge
    assert [n for n in host_side if link_index(n) is not None] == []
    bridge_idx = link_index(lab.bridge)
    assert f"master {lab.bridge}" not in sh("ip", "-o", "link", "show", "master", lab.bridge)
    assert bridge_idx is not None
    # no reservation, no cache entry
    assert reservations(lab.data_dir, lab.network) == []
    assert os.listdir(os.path.join(lab.cache_dir, "results")) == []
    # no per-pod iptables rules; after the shared top chain goes, iptables is as it was
    leftover = {line for line in iptables_state() - lab.iptables_before if PORTMAP_TOP not in line}
    assert leftover == set()
    remove_portmap_scaffolding_if_ours(lab.iptables_before)
    assert iptables_state() == lab.iptables_before

    # namespaces go away with their pins
    for ns in (ns_a, ns_b):
        netns.remove_netns(ns)
        netns.remove_netns(ns)  # idempotent
        assert not os.path.exists(ns)
    assert netns.list_netns(lab.pin_dir) == []


def test_teardown_after_restart_with_netns_gone(lab):
    sid, ns = lab.new_netns()
    host_port = random.randint(20000, 29999)
    res = asyncio.run(
        lab.manager().setup(sid, ns, "default", "pod-c", "uid-c", port_mappings=[PortMapping(host_port, 80)])
    )
    assert reservations(lab.data_dir, lab.network) == res.ips
    assert any(str(host_port) in line for line in iptables_state())

    # the daemon "restarts" and the namespace disappeared meanwhile
    netns.remove_netns(ns)
    os.rename(os.path.join(lab.conf_dir, "10-test.conflist"), os.path.join(lab.root, "moved-away"))
    fresh = lab.manager()
    assert fresh.status()[0] is False
    assert fresh.cached_result(sid).ips == res.ips
    asyncio.run(fresh.teardown(sid, ns))

    assert reservations(lab.data_dir, lab.network) == []
    assert not any(str(host_port) in line for line in iptables_state())
    assert os.listdir(os.path.join(lab.cache_dir, "results")) == []
    remove_portmap_scaffolding_if_ours(lab.iptables_before)
    assert iptables_state() == lab.iptables_before


def test_netns_lifecycle_and_gc(lab):
    keep_sid, keep = lab.new_netns()
    _, stale = lab.new_netns()
    with open(os.path.join(lab.pin_dir, "half-made"), "w"):
        pass  # a crash between creating the pin file and mounting it
    assert netns.list_netns(lab.pin_dir) == sorted([keep_sid, os.path.basename(stale)])
    assert addrs_in_netns(keep, "lo") == ["127.0.0.1"]
    # loopback is up inside
    lo_up = netns.run_in_netns(keep, lambda: socket.create_server(("127.0.0.1", 0)).close())
    assert lo_up is None
    removed = netns.collect_stale({keep_sid}, lab.pin_dir)
    assert sorted(removed) == sorted([os.path.basename(stale), "half-made"])
    assert netns.list_netns(lab.pin_dir) == [keep_sid]
    with pytest.raises(InvalidArgument, match="already exists"):
        netns.create_netns(keep_sid, lab.pin_dir)
    netns.remove_netns(keep)
    assert netns.list_netns(lab.pin_dir) == []


def test_check_on_bridge_only_network(lab):
    # CHECK through the full chain is not usable with the installed plugins (1.1.1):
    # portmap fails it for IPv4-only pods with port mappings
    # (containernetworking/plugins#819) and bandwidth crashes without a bandwidth
    # config, so CHECK is exercised on a bridge-only network.
    conf = dict(lab.conf, plugins=lab.conf["plugins"][:1])
    with open(os.path.join(lab.conf_dir, "10-test.conflist"), "w") as f:
        json.dump(conf, f)
    m = lab.manager()
    sid, ns = lab.new_netns()
    asyncio.run(m.setup(sid, ns, "default", "pod-d", "uid-d"))
    asyncio.run(m.check(sid, ns))
    asyncio.run(m.teardown(sid, ns))
    assert reservations(lab.data_dir, lab.network) == []
