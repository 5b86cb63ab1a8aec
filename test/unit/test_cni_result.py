import json

import pytest

from moorage.cni.result import ResultError, parse_result, pod_ips

BRIDGE_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "veth1234", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/moorage/netns/abc"},
    ],
    "ips": [
        {"address": "fd00:10::5/64", "gateway": "fd00:10::1", "interface": 2},
        {"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 2},
        {"address": "10.88.0.1/16", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "options": ["ndots:5"]},
}


def test_parse_1_0_result():
    r = parse_result(json.dumps(BRIDGE_RESULT))
    assert r.cni_version == "1.0.0"
    assert [i.name for i in r.interfaces] == ["cni0", "veth1234", "eth0"]
    assert r.interfaces[2].sandbox == "/run/moorage/netns/abc"
    assert r.ips[1].ip == "10.88.0.5" and r.ips[1].version == 4 and r.ips[1].interface == 2
    assert r.routes[0].gw == "10.88.0.1"
    assert r.dns.nameservers == ("10.96.0.10",) and r.dns.options == ("ndots:5",)
    assert r.raw == BRIDGE_RESULT


def test_pod_ips_dual_stack_v4_primary_and_skips_host_side():
    r = parse_result(BRIDGE_RESULT)
    assert pod_ips(r) == ["10.88.0.5", "fd00:10::5"]
    assert pod_ips(r, prefer=6) == ["fd00:10::5", "10.88.0.5"]


def test_pod_ips_without_interface_info():
    r = parse_result({"cniVersion": "0.4.0",
                      "ips": [{"version": "6", "address": "fd00::2/64"}, {"version": "4", "address": "10.1.0.2/24"}]})
    assert pod_ips(r) == ["10.1.0.2", "fd00::2"]


def test_pod_ips_empty():
    assert pod_ips(parse_result({"cniVersion": "1.0.0"})) == []


def test_legacy_0_2_result():
    r = parse_result({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24", "gateway": "10.0.0.1", "routes": [{"dst": "0.0.0.0/0"}]}})
    assert pod_ips(r) == ["10.0.0.2"]
    assert r.routes[0].dst == "0.0.0.0/0"


@pytest.mark.parametrize(
    "doc,needle",
    [
        ("nope", "not JSON"),
        ([], "expected a JSON object"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2"}]}, "lacks a prefix length"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "x/24"}]}, "not an address in CIDR form"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": 3}]}, "does not index interfaces"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": "gw"}]}, "not an IP address"),
        ({"cniVersion": "1.0.0", "dns": []}, "dns must be an object"),
    ],
)
def test_bad_results(doc, needle):
    with pytest.raises(ResultError) as ei:
        parse_result(doc, where="CNI plugin bridge")
    assert "CNI plugin bridge" in ei.value.message and needle in ei.value.message
