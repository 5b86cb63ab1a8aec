import json
import os

import pytest

from moorage.cni.config import (
    ConfigError,
    NetworkConfigWatcher,
    load_dir,
    parse_any,
    parse_conf,
    parse_conflist,
    plugin_config,
    render_template,
)
from moorage.core.errors import InvalidArgument

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "net1",
    "plugins": [
        {"type": "bridge", "bridge": "br0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "bandwidth", "capabilities": {"bandwidth": True, "dns": False}},
    ],
}


def write(d, name, obj):
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_parse_conflist_ok():
    net = parse_conflist(json.dumps(CONFLIST), "x.conflist")
    assert net.name == "net1"
    assert net.cni_version == "1.0.0"
    assert net.plugin_types == ["bridge", "portmap", "bandwidth"]
    assert not net.disable_check
    assert net.to_dict()["plugins"][0]["bridge"] == "br0"


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_supported_versions(version):
    assert parse_conflist({**CONFLIST, "cniVersion": version}, "f").cni_version == version


@pytest.mark.parametrize(
    "doc,needle",
    [
        ("{not json", "invalid JSON at line 1"),
        ("", "file is empty"),
        ("[1,2]", "JSON object"),
        ({**CONFLIST, "cniVersion": "0.2.0"}, "cniVersion '0.2.0' is not supported"),
        ({**CONFLIST, "cniVersion": "9.9.9"}, "not supported"),
        ({k: v for k, v in CONFLIST.items() if k != "cniVersion"}, 'missing "cniVersion"'),
        ({k: v for k, v in CONFLIST.items() if k != "name"}, 'missing network "name"'),
        ({**CONFLIST, "name": "bad name!"}, "network name 'bad name!' is invalid"),
        ({**CONFLIST, "plugins": []}, '"plugins" must be a non-empty list'),
        ({**CONFLIST, "plugins": [{"bridge": "x"}]}, 'plugins[0]: missing plugin "type"'),
        ({**CONFLIST, "plugins": [{"type": "../evil"}]}, "must be a binary name"),
        ({**CONFLIST, "plugins": ["bridge"]}, "plugins[0]: each plugin must be a JSON object"),
        ({**CONFLIST, "disableCheck": "yes"}, '"disableCheck" must be true or false'),
    ],
)
def test_parse_conflist_errors_name_file_and_problem(doc, needle):
    data = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(ConfigError) as ei:
        parse_conflist(data, "/etc/cni/net.d/10-x.conflist")
    assert isinstance(ei.value, InvalidArgument)
    assert ei.value.message.startswith("/etc/cni/net.d/10-x.conflist: ")
    assert needle in ei.value.message


def test_parse_conf_wraps_single_plugin():
    net = parse_conf(json.dumps({"cniVersion": "0.4.0", "name": "single", "type": "bridge", "bridge": "b"}), "a.conf")
    assert net.name == "single"
    assert net.plugins == ({"type": "bridge", "bridge": "b"},)


def test_parse_conf_rejects_list():
    with pytest.raises(ConfigError, match="rename it to .conflist"):
        parse_conf(json.dumps(CONFLIST), "a.conf")


def test_parse_any_json_either_form():
    assert parse_any(json.dumps(CONFLIST), "a.json").name == "net1"
    assert parse_any(json.dumps({"cniVersion": "1.0.0", "name": "s", "type": "ptp"}), "b.json").plugin_types == ["ptp"]


def test_load_dir_lexical_order_first_valid(tmp_path):
    d = str(tmp_path)
    write(d, "00-broken.conflist", "{")
    write(d, "10-b.conflist", {**CONFLIST, "name": "b"})
    write(d, "20-a.conf", {"cniVersion": "1.0.0", "name": "a", "type": "bridge"})
    write(d, "05-ignored.txt", "whatever")
    write(d, ".hidden.conflist", {**CONFLIST, "name": "hidden"})
    res = load_dir(d)
    assert res.network.name == "b"
    assert len(res.errors) == 1 and "00-broken.conflist" in res.errors[0].message
    assert load_dir(d, network_name="a").network.name == "a"
    missing = load_dir(d, network_name="zzz")
    assert missing.network is None
    assert "network 'zzz'" in missing.message(d, "zzz")


def test_load_dir_missing_dir(tmp_path):
    res = load_dir(str(tmp_path / "nope"))
    assert res.network is None and res.errors == ()


def test_plugin_config_injects_only_declared_capabilities():
    net = parse_conflist(CONFLIST, "f")
    caps = {"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 1}, "dns": {"servers": ["1.1.1.1"]}}
    prev = {"cniVersion": "1.0.0", "ips": []}
    c0 = plugin_config(net, 0, None, caps)
    assert c0["name"] == "net1" and c0["cniVersion"] == "1.0.0"
    assert "runtimeConfig" not in c0 and "prevResult" not in c0
    c1 = plugin_config(net, 1, prev, caps)
    assert c1["runtimeConfig"] == {"portMappings": caps["portMappings"]}
    assert c1["prevResult"] == prev
    c2 = plugin_config(net, 2, prev, caps)
    assert c2["runtimeConfig"] == {"bandwidth": {"ingressRate": 1}}  # dns declared false
    # the parsed network is not mutated
    assert "name" not in net.plugins[1]
    c2["prevResult"]["ips"].append("x")
    assert prev["ips"] == []


def test_render_template():
    t = '{"subnet": "{{.PodCIDR}}", "again": "{{ .PodCIDR }}"}'
    assert render_template(t, "10.244.1.0/24,fd00::/64") == '{"subnet": "10.244.1.0/24", "again": "10.244.1.0/24"}'
    with pytest.raises(InvalidArgument, match="not a valid CIDR"):
        render_template(t, "banana")
    with pytest.raises(InvalidArgument, match="placeholder"):
        render_template("{}", "10.0.0.0/8")


def test_watcher_status_follows_directory(tmp_path):
    d = str(tmp_path)
    w = NetworkConfigWatcher(d)
    ready, reason, msg = w.status()
    assert not ready and reason == "NetworkPluginNotReady"
    assert d in msg and "no valid network config" in msg

    p = write(d, "10-net.conflist", '{"cniVersion": "1.0.0", "name": "n", "plugins": [')
    ready, reason, msg = w.status()
    assert not ready and reason == "NetworkPluginNotReady"
    assert "10-net.conflist" in msg and "invalid JSON" in msg

    write(d, "10-net.conflist", CONFLIST)
    assert w.status() == (True, "", "")
    assert w.current().name == "net1"

    os.unlink(p)
    assert w.status()[0] is False
    assert w.current() is None
