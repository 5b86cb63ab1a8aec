"""CNIManager and plugin execution against fake plugins (Python scripts in a tmp bin dir).

No root needed: the "netns" handed to the fake plugins is /proc/self/ns/net,
which the fakes never touch.
"""

import asyncio
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from moorage.cni.manager import (
    Bandwidth,
    CNIManager,
    DNSConfig,
    PortMapping,
    capability_args,
)
from moorage.cni.plugin import PluginError, PluginExec, PluginNotFound, PluginTimeout
from moorage.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)

NETNS = "/proc/self/ns/net"
SID = "0123456789abcdef" * 4

FAKE = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys, time
    conf = json.load(sys.stdin)
    cmd = os.environ.get("CNI_COMMAND")
    log = conf.get("log")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({{
                "cmd": cmd, "tag": conf.get("tag"), "conf": conf,
                "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}},
            }}) + "\\n")
    if cmd == "VERSION":
        print(json.dumps({{"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}}))
        sys.exit(0)
    fail = (conf.get("failOn") or {{}}).get(cmd)
    if fail == "hang":
        with open(conf["pidFile"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(1000)
    if fail == "garbage":
        sys.stderr.write("panic: something exploded\\n")
        sys.exit(2)
    if fail:
        print(json.dumps({{"cniVersion": conf["cniVersion"], "code": fail["code"], "msg": fail["msg"],
                          "details": fail.get("details", "")}}))
        sys.exit(1)
    if cmd == "ADD":
        res = conf.get("result") or conf.get("prevResult") or {{"cniVersion": conf["cniVersion"]}}
        print(json.dumps(res))
    """
)

RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "br"}, {"name": "eth0", "sandbox": NETNS}],
    "ips": [{"address": "10.222.1.5/24", "gateway": "10.222.1.1", "interface": 1}],
}


@pytest.fixture
def env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "fake"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "conf").mkdir()

    class Env:
        conf = str(tmp_path / "conf")
        bins = (str(tmp_path / "nothing-here"), str(bindir))
        cache = str(tmp_path / "cache")
        log = str(tmp_path / "calls.log")
        pidfile = str(tmp_path / "plugin.pid")

        def write(self, plugins, version="1.0.0", name="fakenet", fname="10-fake.conflist"):
            for p in plugins:
                p.setdefault("log", self.log)
            with open(os.path.join(self.conf, fname), "w") as f:
                json.dump({"cniVersion": version, "name": name, "plugins": plugins}, f)

        def calls(self):
            if not os.path.exists(self.log):
                return []
            with open(self.log) as f:
                return [json.loads(line) for line in f]

        def clear(self):
            if os.path.exists(self.log):
                os.unlink(self.log)

        def manager(self, **kw):
            kw.setdefault("plugin_timeout", 30)
            return CNIManager(self.conf, self.bins, self.cache, **kw)

    return Env()


def run(coro):
    return asyncio.run(coro)


def test_setup_chain_env_prevresult_runtimeconfig(env):
    env.write(
        [
            {"type": "fake", "tag": "a", "result": RESULT},
            {"type": "fake", "tag": "b", "capabilities": {"portMappings": True}},
            {"type": "fake", "tag": "c", "capabilities": {"bandwidth": True, "dns": True}},
        ]
    )
    m = env.manager()
    res = run(
        m.setup(
            SID, NETNS, "ns1", "pod1", "uid-1",
            port_mappings=[PortMapping(8080, 80, "TCP"), PortMapping(0, 53, "udp")],
            bandwidth=Bandwidth(ingress_rate=1000),
            dns=DNSConfig(servers=("10.96.0.10",)),
        )
    )
    assert res.ips == ["10.222.1.5"]
    assert res.network == "fakenet"
    calls = env.calls()
    assert [(c["cmd"], c["tag"]) for c in calls] == [("ADD", "a"), ("ADD", "b"), ("ADD", "c")]
    e = calls[0]["env"]
    assert e["CNI_CONTAINERID"] == SID and e["CNI_NETNS"] == NETNS and e["CNI_IFNAME"] == "eth0"
    assert e["CNI_ARGS"] == f"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1;K8S_POD_INFRA_CONTAINER_ID={SID};K8S_POD_UID=uid-1"
    assert e["CNI_PATH"] == os.pathsep.join(env.bins)
    assert "prevResult" not in calls[0]["conf"] and "runtimeConfig" not in calls[0]["conf"]
    assert calls[1]["conf"]["prevResult"] == RESULT
    assert calls[1]["conf"]["runtimeConfig"] == {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    assert calls[2]["conf"]["runtimeConfig"] == {
        "bandwidth": {"ingressRate": 1000, "ingressBurst": 2**31 - 1},
        "dns": {"servers": ["10.96.0.10"], "searches": [], "options": []},
    }
    assert calls[2]["conf"]["name"] == "fakenet" and calls[2]["conf"]["cniVersion"] == "1.0.0"

    cache_file = os.path.join(env.cache, "results", f"fakenet-{SID}-eth0")
    with open(cache_file) as f:
        entry = json.load(f)
    assert entry["state"] == "ready" and entry["result"] == RESULT and entry["netns"] == NETNS
    assert m.cached_result(SID).ips == ["10.222.1.5"]


def test_teardown_from_cache_by_fresh_manager_after_conf_removed(env):
    env.write([{"type": "fake", "tag": "a", "result": RESULT}, {"type": "fake", "tag": "b"}])
    run(env.manager().setup(SID, NETNS, "ns", "p"))
    os.unlink(os.path.join(env.conf, "10-fake.conflist"))
    env.clear()
    fresh = env.manager()  # simulated daemon restart; conf dir is empty now
    assert fresh.status()[0] is False
    run(fresh.teardown(SID, NETNS))
    calls = env.calls()
    assert [(c["cmd"], c["tag"]) for c in calls] == [("DEL", "b"), ("DEL", "a")]
    assert all(c["conf"]["prevResult"] == RESULT for c in calls)
    assert calls[0]["env"]["CNI_NETNS"] == NETNS
    assert os.listdir(os.path.join(env.cache, "results")) == []
    env.clear()
    run(fresh.teardown(SID, NETNS))  # idempotent: nothing cached, nothing run
    assert env.calls() == []
    assert fresh.cached_result(SID) is None


def test_teardown_with_netns_gone_passes_empty_netns(env, tmp_path):
    env.write([{"type": "fake", "tag": "a", "result": RESULT}])
    m = env.manager()
    run(m.setup(SID, NETNS, "ns", "p"))
    # rewrite the cached netns to a path that no longer exists
    path = os.path.join(env.cache, "results", f"fakenet-{SID}-eth0")
    entry = json.loads(Path(path).read_text())
    entry["netns"] = str(tmp_path / "gone")
    Path(path).write_text(json.dumps(entry))
    env.clear()
    run(env.manager().teardown(SID, None))
    assert [c["env"]["CNI_NETNS"] for c in env.calls()] == [""]


def test_error_json_names_plugin_and_rolls_back(env):
    env.write(
        [
            {"type": "fake", "tag": "a", "result": RESULT},
            {"type": "fake", "tag": "b"},
            {"type": "fake", "tag": "c", "failOn": {"ADD": {"code": 7, "msg": "bad subnet", "details": "10.0.0.0/33"}}},
            {"type": "fake", "tag": "d"},
        ]
    )
    m = env.manager()
    with pytest.raises(PluginError) as ei:
        run(m.setup(SID, NETNS, "ns", "p"))
    err = ei.value
    assert isinstance(err, Internal)
    assert err.plugin == "fake" and err.cni_code == 7 and err.msg == "bad subnet" and err.details == "10.0.0.0/33"
    assert err.code == "INTERNAL"  # the gRPC status name, not the plugin's code
    assert "CNI plugin fake failed on ADD (code 7: invalid network config): bad subnet (10.0.0.0/33)" == err.message
    # a, b, c were ADDed (c failed): all three get a DEL, in reverse order; d never ran
    assert [(c["cmd"], c["tag"]) for c in env.calls()] == [
        ("ADD", "a"), ("ADD", "b"), ("ADD", "c"), ("DEL", "c"), ("DEL", "b"), ("DEL", "a"),
    ]
    assert os.listdir(os.path.join(env.cache, "results")) == []


def test_failed_rollback_keeps_cache_for_later_teardown(env):
    env.write(
        [
            {"type": "fake", "tag": "a", "result": RESULT, "failOn": {"DEL": {"code": 5, "msg": "disk on fire"}}},
            {"type": "fake", "tag": "b", "failOn": {"ADD": {"code": 11, "msg": "busy"}}},
        ]
    )
    m = env.manager()
    with pytest.raises(PluginError, match="busy"):
        run(m.setup(SID, NETNS, "ns", "p"))
    assert len(os.listdir(os.path.join(env.cache, "results"))) == 1
    with pytest.raises(Internal, match="disk on fire"):
        run(m.teardown(SID, NETNS))
    assert len(os.listdir(os.path.join(env.cache, "results"))) == 1
    # the admin fixes the plugin; the cached config is what teardown uses, so fix it there
    path = os.path.join(env.cache, "results", os.listdir(os.path.join(env.cache, "results"))[0])
    entry = json.loads(Path(path).read_text())
    del entry["config"]["plugins"][0]["failOn"]
    Path(path).write_text(json.dumps(entry))
    run(m.teardown(SID, NETNS))
    assert os.listdir(os.path.join(env.cache, "results")) == []


def test_non_json_failure_uses_stderr(env):
    env.write([{"type": "fake", "failOn": {"ADD": "garbage"}}])
    with pytest.raises(PluginError) as ei:
        run(env.manager().setup(SID, NETNS, "ns", "p"))
    assert "exit status 2" in ei.value.message and "panic: something exploded" in ei.value.message


def test_missing_plugin_binary(env):
    env.write([{"type": "fake", "tag": "a"}, {"type": "nosuchplugin"}])
    with pytest.raises(PluginNotFound) as ei:
        run(env.manager().setup(SID, NETNS, "ns", "p"))
    assert isinstance(ei.value, FailedPrecondition)
    msg = ei.value.message
    assert "'nosuchplugin'" in msg and env.bins[0] in msg and env.bins[1] in msg
    # the first plugin was rolled back
    assert [(c["cmd"], c["tag"]) for c in env.calls()] == [("ADD", "a"), ("DEL", "a")]


def test_hung_plugin_is_killed(env):
    env.write([{"type": "fake", "failOn": {"ADD": "hang", "DEL": None}, "pidFile": env.pidfile}])
    m = env.manager(plugin_timeout=1)
    with pytest.raises(PluginTimeout) as ei:
        run(m.setup(SID, NETNS, "ns", "p"))
    assert isinstance(ei.value, DeadlineExceeded)
    assert "did not finish ADD within 1s and was killed" in ei.value.message
    pid = int(Path(env.pidfile).read_text())
    assert f"pid {pid}" in ei.value.message
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_check_uses_cached_result(env):
    env.write([{"type": "fake", "tag": "a", "result": RESULT}, {"type": "fake", "tag": "b"}])
    m = env.manager()
    with pytest.raises(NotFound):
        run(m.check(SID, NETNS))
    run(m.setup(SID, NETNS, "ns", "p"))
    env.clear()
    run(m.check(SID, NETNS))
    calls = env.calls()
    assert [(c["cmd"], c["tag"]) for c in calls] == [("CHECK", "a"), ("CHECK", "b")]
    assert all(c["conf"]["prevResult"] == RESULT for c in calls)


def test_check_failure_raises(env):
    env.write([{"type": "fake", "result": RESULT, "failOn": {"CHECK": {"code": 3, "msg": "veth gone"}}}])
    m = env.manager()
    run(m.setup(SID, NETNS, "ns", "p"))
    with pytest.raises(PluginError, match="veth gone"):
        run(m.check(SID, NETNS))


def test_setup_retry_releases_leftover(env):
    env.write([{"type": "fake", "tag": "a", "result": RESULT}])
    m = env.manager()
    run(m.setup(SID, NETNS, "ns", "p"))
    env.clear()
    run(m.setup(SID, NETNS, "ns", "p"))
    assert [(c["cmd"], c["tag"]) for c in env.calls()] == [("DEL", "a"), ("ADD", "a")]


def test_setup_not_ready_and_bad_input(env):
    m = env.manager()
    with pytest.raises(Unavailable, match="no valid network config"):
        run(m.setup(SID, NETNS, "ns", "p"))
    env.write([{"type": "fake"}])
    with pytest.raises(FailedPrecondition, match="does not exist"):
        run(m.setup(SID, "/nonexistent/netns", "ns", "p"))
    with pytest.raises(InvalidArgument, match="CNI_ARGS"):
        run(m.setup(SID, NETNS, "ns;x", "p"))
    with pytest.raises(InvalidArgument, match="protocol"):
        run(m.setup(SID, NETNS, "ns", "p", port_mappings=[PortMapping(1, 2, "icmp")]))


def test_plugin_status_verb(env):
    env.write([{"type": "fake", "failOn": {"STATUS": {"code": 50, "msg": "no IPs left"}}}], version="1.1.0")
    m = env.manager()
    assert m.status() == (True, "", "")
    ready, reason, msg = run(m.plugin_status())
    assert not ready and reason == "NetworkPluginNotReady" and "no IPs left" in msg and "fake" in msg
    env.write([{"type": "fake"}], version="1.1.0")
    assert run(m.plugin_status()) == (True, "", "")
    env.clear()
    env.write([{"type": "fake"}], version="1.0.0")  # STATUS is only sent to 1.1 networks
    assert run(m.plugin_status()) == (True, "", "")
    assert [c["cmd"] for c in env.calls()] == []


def test_version_command(env):
    doc = run(PluginExec(env.bins).version("fake"))
    assert "1.1.0" in doc["supportedVersions"]


def test_write_conf_from_template(env, tmp_path):
    tpl = tmp_path / "tpl.conflist"
    tpl.write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "tpl", "plugins": [
            {"type": "bridge", "ipam": {"type": "host-local", "ranges": [[{"subnet": "{{.PodCIDR}}"}]]}}]})
    )
    m = env.manager()
    assert m.status()[0] is False
    path = m.write_conf_from_template(str(tpl), "10.244.3.0/24")
    assert path and path.endswith(".conflist")
    assert m.status() == (True, "", "")
    assert m.watcher.current().plugins[0]["ipam"]["ranges"] == [[{"subnet": "10.244.3.0/24"}]]
    # a valid config exists now: nothing is written again
    assert m.write_conf_from_template(str(tpl), "10.244.4.0/24") is None


def test_capability_args_pure():
    assert capability_args() == {}
    caps = capability_args(
        [PortMapping(80, 8080, "UDP", "127.0.0.1")],
        Bandwidth(egress_rate=5, egress_burst=7),
        DNSConfig(),
        [[{"subnet": "10.0.0.0/24"}]],
        {"cgroupPath": "/kubepods/x"},
    )
    assert caps == {
        "portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "udp", "hostIP": "127.0.0.1"}],
        "bandwidth": {"egressRate": 5, "egressBurst": 7},
        "ipRanges": [[{"subnet": "10.0.0.0/24"}]],
        "cgroupPath": "/kubepods/x",
    }
    with pytest.raises(InvalidArgument, match="between 1 and 65535"):
        capability_args([PortMapping(70000, 1)])
