"""Merging plugins' adjustments in index order with conflict detection, and what reaches the spec."""

from __future__ import annotations

import pytest

from moorage.core.errors import FailedPrecondition, InvalidArgument
from moorage.nri import convert, merge
from moorage.nri.adaptation import parse_plugin_file
from moorage.nri.api import api_pb2 as nri
from moorage.runtime import spec
from moorage.runtime.adjust import ContainerAdjustment


def _adj(**kw: object) -> nri.ContainerAdjustment:
    return nri.ContainerAdjustment(**kw)  # type: ignore[arg-type]


def test_no_plugin_merges_to_nothing() -> None:
    merged = merge.merge([], "c1")
    assert merged == nri.ContainerAdjustment()
    assert convert.adjustment(merged).empty()


def test_one_plugin_is_taken_as_is() -> None:
    a = _adj(annotations={"a": "1"}, env=[nri.KeyValue(key="E", value="v")])
    a.linux.resources.memory.limit.value = 1 << 20
    assert merge.merge([("10-one", a)], "c1") == a


def test_many_plugins_union_and_hooks_accumulate() -> None:
    a = _adj(annotations={"a": "1"})
    a.hooks.prestart.add(path="/bin/a")
    b = _adj(annotations={"b": "2"}, mounts=[nri.Mount(destination="/data", source="/srv", type="bind")])
    b.hooks.prestart.add(path="/bin/b")
    c = _adj()
    c.linux.resources.cpu.shares.value = 512
    c.linux.resources.memory.limit.value = 2 << 20
    merged = merge.merge([("10-a", a), ("20-b", b), ("30-c", c)], "c1")
    assert dict(merged.annotations) == {"a": "1", "b": "2"}
    assert [h.path for h in merged.hooks.prestart] == ["/bin/a", "/bin/b"]  # in plugin order
    assert merged.linux.resources.cpu.shares.value == 512 and merged.linux.resources.memory.limit.value == 2 << 20
    assert [m.destination for m in merged.mounts] == ["/data"]


@pytest.mark.parametrize(("first", "second", "field"), [
    (_adj(annotations={"k": "1"}), _adj(annotations={"k": "2"}), "annotation k"),
    (_adj(annotations={"k": "1"}), _adj(annotations={"-k": ""}), "annotation k"),  # removing is touching
    (_adj(env=[nri.KeyValue(key="E", value="1")]), _adj(env=[nri.KeyValue(key="E", value="2")]), "env E"),
    (_adj(mounts=[nri.Mount(destination="/m", source="/a")]), _adj(mounts=[nri.Mount(destination="/m", source="/b")]),
     "mount /m"),
    (_adj(args=["a"]), _adj(args=["b"]), "args"),
    (_adj(rlimits=[nri.POSIXRlimit(type="RLIMIT_NOFILE", hard=1, soft=1)]),
     _adj(rlimits=[nri.POSIXRlimit(type="RLIMIT_NOFILE", hard=2, soft=2)]), "rlimit RLIMIT_NOFILE"),
])
def test_two_plugins_touching_one_field_conflict(first: nri.ContainerAdjustment, second: nri.ContainerAdjustment,
                                                 field: str) -> None:
    with pytest.raises(FailedPrecondition) as e:
        merge.merge([("10-first", first), ("20-second", second)], "c1")
    assert f"NRI plugins 10-first and 20-second conflict: both adjust {field} of container c1" == e.value.message


def test_resource_values_conflict_per_value() -> None:
    a, b = _adj(), _adj()
    a.linux.resources.memory.limit.value = 1
    b.linux.resources.memory.swap.value = 2  # another value: fine
    merge.merge([("10-a", a), ("20-b", b)], "c")
    b.linux.resources.memory.limit.value = 3
    with pytest.raises(FailedPrecondition, match="memory.limit"):
        merge.merge([("10-a", a), ("20-b", b)], "c")
    a2, b2 = _adj(), _adj()
    a2.linux.oom_score_adj.value = 5
    b2.linux.oom_score_adj.value = 6
    with pytest.raises(FailedPrecondition, match="oom_score_adj"):
        merge.merge([("10-a", a2), ("20-b", b2)], "c")


def test_updates_merge_per_container_and_conflict_per_value() -> None:
    r = merge.Result()
    u1 = nri.ContainerUpdate(container_id="x")
    u1.linux.resources.cpu.shares.value = 100
    u2 = nri.ContainerUpdate(container_id="x")
    u2.linux.resources.memory.limit.value = 200
    u3 = nri.ContainerUpdate(container_id="y")
    u3.linux.resources.cpu.shares.value = 300
    r.update_with("10-a", [u1])
    r.update_with("20-b", [u2, u3])
    assert r.updates["x"].linux.resources.cpu.shares.value == 100
    assert r.updates["x"].linux.resources.memory.limit.value == 200
    assert r.updates["y"].linux.resources.cpu.shares.value == 300
    with pytest.raises(FailedPrecondition, match="10-a and 30-c conflict: both adjust cpu.shares of container x"):
        r.update_with("30-c", [u1])


def _base_spec() -> dict:
    return {"process": {"args": ["sh"], "env": ["PATH=/bin", "KEEP=1", "DROP=1"],
                        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 10}]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/old", "type": "bind", "source": "/x"}],
            "annotations": {"keep": "1", "drop": "1"},
            "linux": {"resources": {"memory": {"limit": 5}}, "cgroupsPath": "/a/b"}}


def test_every_adjustment_kind_reaches_the_spec() -> None:
    a = _adj(annotations={"new": "v", "-drop": ""}, env=[nri.KeyValue(key="NEW", value="x"), nri.KeyValue(key="-DROP")],
             mounts=[nri.Mount(destination="/data", source="/srv/data", type="bind", options=["rbind", "ro"]),
                     nri.Mount(destination="-/old")],
             rlimits=[nri.POSIXRlimit(type="RLIMIT_NOFILE", hard=100, soft=50)], args=["sleep", "1"])
    a.hooks.create_runtime.add(path="/usr/bin/hook", args=["hook", "x"])
    a.linux.devices.add(path="/dev/nri0", type="c", major=1, minor=3)
    a.linux.resources.memory.limit.value = 1 << 24
    a.linux.resources.cpu.shares.value = 256
    a.linux.resources.pids.limit = 42
    a.linux.cgroups_path = "/nri/c1"
    a.linux.oom_score_adj.value = 321
    a.linux.sysctl["net.ipv4.ip_forward"] = "1"
    s = _base_spec()
    spec.apply_adjustment(s, convert.adjustment(merge.merge([("10-a", a)], "c1")))
    assert s["annotations"] == {"keep": "1", "new": "v"}
    assert s["process"]["env"] == ["PATH=/bin", "KEEP=1", "NEW=x"]
    assert s["process"]["args"] == ["sleep", "1"]
    assert s["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 100, "soft": 50}]
    assert s["process"]["oomScoreAdj"] == 321
    assert [m["destination"] for m in s["mounts"]] == ["/proc", "/data"]
    assert s["mounts"][1] == {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]}
    assert s["hooks"]["createRuntime"] == [{"path": "/usr/bin/hook", "args": ["hook", "x"]}]
    assert s["linux"]["devices"] == [{"path": "/dev/nri0", "type": "c", "major": 1, "minor": 3}]
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"} in s["linux"]["resources"]["devices"]
    assert s["linux"]["resources"]["memory"] == {"limit": 1 << 24}
    assert s["linux"]["resources"]["cpu"] == {"shares": 256}
    assert s["linux"]["resources"]["pids"] == {"limit": 42}
    assert s["linux"]["cgroupsPath"] == "/nri/c1"
    assert s["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}


def test_an_empty_adjustment_changes_nothing() -> None:
    s = _base_spec()
    spec.apply_adjustment(s, ContainerAdjustment())
    assert s == _base_spec()


@pytest.mark.parametrize(("adj", "field"), [
    (_adj(mounts=[nri.Mount(destination="rel/path", source="/x")]), "mount destination"),
    (_adj(mounts=[nri.Mount(destination="/a/../b", source="/x")]), "mount destination"),
    (_adj(mounts=[nri.Mount(destination="/m", source="")]), "mount source"),
    (_adj(annotations={"": "x"}), "annotation key"),
    (_adj(env=[nri.KeyValue(key="A\0B", value="x")]), "env name"),
    (_adj(rlimits=[nri.POSIXRlimit(type="NOFILE")]), "rlimit type"),
])
def test_bad_plugin_data_is_invalid_argument_naming_the_field(adj: nri.ContainerAdjustment, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        convert.adjustment(adj)


def test_bad_device_type_and_unsupported_fields() -> None:
    a = _adj()
    a.linux.devices.add(path="/dev/x", type="z")
    with pytest.raises(InvalidArgument, match="want c, b, u or p"):
        convert.adjustment(a)
    b = _adj(CDI_devices=[nri.CDIDevice(name="vendor.com/gpu=0")])
    b.linux.scheduler.nice = 1
    b.linux.resources.blockio_class.value = "slow"
    assert convert.unsupported(b) == ["linux.resources.blockio_class"]
    assert convert.unsupported(_adj()) == []


def test_plugin_file_names() -> None:
    assert parse_plugin_file("10-logger") == ("10", "logger")
    assert parse_plugin_file("5-short") is None
    assert parse_plugin_file("logger") is None
    assert parse_plugin_file("10-") is None
