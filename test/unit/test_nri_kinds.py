"""The NRI adjustment kinds beyond the basic ones land in the OCI spec where containerd puts them."""

from __future__ import annotations

import pytest

from moorage.core.errors import FailedPrecondition, InvalidArgument
from moorage.nri import convert, merge
from moorage.nri.api import api_pb2 as nri
from moorage.runtime import spec


def _spec() -> dict:
    return {"process": {"args": ["sh"]},
            "linux": {"namespaces": [{"type": "mount"}, {"type": "network", "path": "/run/netns/x"},
                                     {"type": "ipc"}],
                      "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
                      "intelRdt": {"closID": "old", "enableMonitoring": False}}}


def _apply(*plugins: nri.ContainerAdjustment) -> dict:
    s = _spec()
    merged = merge.merge([(f"{10 * (i + 1)}-p", a) for i, a in enumerate(plugins)], "c1")
    assert convert.unsupported(merged) == []
    spec.apply_adjustment(s, convert.adjustment(merged))
    return s


def test_namespaces_replace_their_type_add_and_remove() -> None:
    a = nri.ContainerAdjustment()
    a.linux.namespaces.add(type="network", path="/run/netns/other")
    a.linux.namespaces.add(type="-ipc")
    a.linux.namespaces.add(type="cgroup")
    s = _apply(a)
    assert s["linux"]["namespaces"] == [{"type": "mount"}, {"type": "network", "path": "/run/netns/other"},
                                        {"type": "cgroup"}]


def test_seccomp_policy_replaces_the_profile() -> None:
    a = nri.ContainerAdjustment()
    sp = a.linux.seccomp_policy
    sp.default_action = "SCMP_ACT_ALLOW"
    sp.architectures.append("SCMP_ARCH_X86_64")
    call = sp.syscalls.add(names=["mkdir", "mkdirat"], action="SCMP_ACT_ERRNO")
    call.errno_ret.value = 1
    call.args.add(index=1, value=2, value_two=0, op="SCMP_CMP_EQ")
    assert _apply(a)["linux"]["seccomp"] == {
        "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                      "args": [{"index": 1, "value": 2, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]}]}


def test_scheduler_io_priority_memory_policy_net_devices_rdt() -> None:
    a = nri.ContainerAdjustment()
    a.linux.scheduler.policy = nri.SCHED_BATCH
    a.linux.scheduler.nice = 5
    a.linux.scheduler.flags.extend([nri.SCHED_FLAG_RESET_ON_FORK])
    a.linux.io_priority.CopyFrom(nri.LinuxIOPriority(priority=4, **{"class": nri.IOPRIO_CLASS_BE}))
    a.linux.memory_policy.mode = nri.MPOL_BIND
    a.linux.memory_policy.nodes = "0"
    a.linux.memory_policy.flags.append(nri.MPOL_F_STATIC_NODES)
    a.linux.net_devices["eth9"].name = "net1"
    a.linux.net_devices["dummy3"].name = ""  # keeps its name
    a.linux.rdt.clos_id.value = "gold"
    a.linux.rdt.schemata.value.append("L3:0=ff")
    s = _apply(a)
    assert s["process"]["scheduler"] == {"policy": "SCHED_BATCH", "nice": 5, "flags": ["SCHED_FLAG_RESET_ON_FORK"]}
    assert s["process"]["ioPriority"] == {"class": "IOPRIO_CLASS_BE", "priority": 4}
    assert s["linux"]["memoryPolicy"] == {"mode": "MPOL_BIND", "nodes": "0", "flags": ["MPOL_F_STATIC_NODES"]}
    assert s["linux"]["netDevices"] == {"eth9": {"name": "net1"}, "dummy3": {"name": "dummy3"}}
    assert s["linux"]["intelRdt"] == {"closID": "gold", "enableMonitoring": False, "schemata": ["L3:0=ff"]}


def test_rdt_class_is_the_clos_id_and_rdt_remove_drops_it() -> None:
    a = nri.ContainerAdjustment()
    a.linux.resources.rdt_class.value = "silver"
    assert _apply(a)["linux"]["intelRdt"]["closID"] == "silver"
    b = nri.ContainerAdjustment()
    b.linux.rdt.remove = True
    assert "intelRdt" not in _apply(b)["linux"]


def test_cdi_devices_reach_the_runtime_once_each_in_order() -> None:
    a = nri.ContainerAdjustment(CDI_devices=[nri.CDIDevice(name="vendor.com/gpu=1")])
    b = nri.ContainerAdjustment(CDI_devices=[nri.CDIDevice(name="vendor.com/gpu=0")])
    adj = convert.adjustment(merge.merge([("10-a", a), ("20-b", b)], "c1"))
    assert adj.cdi_devices == ("vendor.com/gpu=1", "vendor.com/gpu=0")
    assert convert.adjustment(nri.ContainerAdjustment()).cdi_devices == ()


def test_blockio_class_is_refused() -> None:
    a = nri.ContainerAdjustment()
    a.linux.resources.blockio_class.value = "slow"
    assert convert.unsupported(a) == ["linux.resources.blockio_class"]


def _with(**set_: str) -> nri.ContainerAdjustment:
    a = nri.ContainerAdjustment()
    for what, val in set_.items():
        if what == "ns":
            a.linux.namespaces.add(type=val, path="/run/netns/x")
        elif what == "seccomp":
            a.linux.seccomp_policy.default_action = val
        elif what == "netdev":
            a.linux.net_devices[val].name = "n"
        elif what == "cdi":
            a.CDI_devices.add(name=val)
        elif what == "rdt_class":
            a.linux.resources.rdt_class.value = val
        elif what == "rdt":
            a.linux.rdt.clos_id.value = val
        elif what == "sched":
            a.linux.scheduler.policy = nri.SCHED_FIFO
    return a


@pytest.mark.parametrize(("first", "second", "field"), [
    (_with(ns="network"), _with(ns="network"), "namespace network"),
    (_with(ns="network"), _with(ns="-network"), "namespace network"),
    (_with(seccomp="SCMP_ACT_ALLOW"), _with(seccomp="SCMP_ACT_LOG"), "seccomp_policy"),
    (_with(netdev="eth1"), _with(netdev="eth1"), "net device eth1"),
    (_with(cdi="v.com/c=0"), _with(cdi="v.com/c=0"), "CDI device v.com/c=0"),
    (_with(rdt="a"), _with(rdt_class="b"), "rdt"),
    (_with(sched="x"), _with(sched="y"), "scheduler"),
])
def test_two_plugins_on_one_field_conflict(first: nri.ContainerAdjustment, second: nri.ContainerAdjustment,
                                          field: str) -> None:
    with pytest.raises(FailedPrecondition) as e:
        merge.merge([("10-first", first), ("20-second", second)], "c1")
    assert e.value.message == f"NRI plugins 10-first and 20-second conflict: both adjust {field} of container c1"


def test_different_namespaces_and_net_devices_do_not_conflict() -> None:
    merge.merge([("10-a", _with(ns="network", netdev="eth1")), ("20-b", _with(ns="ipc", netdev="eth2"))], "c1")


def _bad(kind: str) -> nri.ContainerAdjustment:
    a = nri.ContainerAdjustment()
    if kind == "ns type":
        a.linux.namespaces.add(type="bogus")
    elif kind == "ns path":
        a.linux.namespaces.add(type="network", path="rel/x")
    elif kind == "seccomp action":
        a.linux.seccomp_policy.default_action = "ALLOW"
    elif kind == "seccomp no names":
        a.linux.seccomp_policy.default_action = "SCMP_ACT_ALLOW"
        a.linux.seccomp_policy.syscalls.add(action="SCMP_ACT_ERRNO")
    elif kind == "sched none":
        a.linux.scheduler.nice = 1
    elif kind == "ioprio none":
        a.linux.io_priority.priority = 1
    elif kind == "netdev":
        a.linux.net_devices["../etc"].name = "x"
    elif kind == "netdev long":
        a.linux.net_devices["eth0"].name = "n" * 16
    elif kind == "rdt":
        a.linux.rdt.clos_id.value = "../x"
    elif kind == "rdt dots":
        a.linux.resources.rdt_class.value = ".."
    elif kind == "cdi":
        a.CDI_devices.add(name="")
    return a


@pytest.mark.parametrize(("kind", "field"), [
    ("ns type", "namespace type"), ("ns path", "namespace path"), ("seccomp action", "seccomp default action"),
    ("seccomp no names", "names no syscall"), ("sched none", "scheduler policy is SCHED_NONE"),
    ("ioprio none", "I/O priority class is IOPRIO_CLASS_NONE"), ("netdev", "net device host name"),
    ("netdev long", "net device name"), ("rdt", "RDT value"), ("rdt dots", "not a class name"), ("cdi", "CDI device name"),
])
def test_bad_values_are_invalid_argument_naming_the_field(kind: str, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        convert.adjustment(_bad(kind))
