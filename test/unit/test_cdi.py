"""CDI: parsing and validating spec files, the registry's precedence, resolving and merging a
request (runtime/cdi.py), and the spec builder applying the merged edits (runtime/spec.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from moorage.core.errors import FailedPrecondition, InvalidArgument
from moorage.cri import convert
from moorage.cri.api import api_pb2 as pb
from moorage.runtime import cdi
from moorage.runtime.model import ContainerConfig, ContainerMetadata, Device, Mount, PodSandboxConfig, PodSandboxMetadata
from moorage.runtime.spec import HostDevice, HostLookups, ImageConfig, build_container_spec

GPU_SPEC = {
    "cdiVersion": "0.7.0",
    "kind": "vendor.com/gpu",
    "annotations": {"owner": "driver"},
    "containerEdits": {"env": ["GPU_DRIVER=1"], "mounts": [{"hostPath": "/usr/lib/gpu", "containerPath": "/usr/lib/gpu",
                                                            "options": ["ro", "bind"]}]},
    "devices": [
        {"name": "gpu0", "containerEdits": {
            "deviceNodes": [{"path": "/dev/gpu0", "permissions": "rw"}],
            "env": ["GPU=0"]}},
        {"name": "gpu1", "containerEdits": {
            "deviceNodes": [{"path": "/dev/gpu1", "hostPath": "/dev/card1", "type": "c", "major": 226, "minor": 1}],
            "hooks": [{"hookName": "createContainer", "path": "/usr/bin/gpu-hook", "args": ["gpu-hook", "1"],
                       "timeout": 5}],
            "additionalGids": [0, 44]}},
        {"name": "all", "containerEdits": {"env": ["GPU=all"]}},
    ],
}


def spec_text(doc: dict, fmt: str = "json") -> str:
    return json.dumps(doc) if fmt == "json" else yaml.safe_dump(doc)


def with_(doc: dict, **changes: object) -> dict:
    out = json.loads(json.dumps(doc))
    out.update(changes)
    return out


def one_device(edits: dict, version: str = "1.1.0", kind: str = "example.com/dev", name: str = "d") -> dict:
    return {"cdiVersion": version, "kind": kind, "devices": [{"name": name, "containerEdits": edits}]}


# --- parsing --------------------------------------------------------------------------------------


def test_json_and_yaml_give_the_same_spec():
    a = cdi.parse_spec(spec_text(GPU_SPEC, "json"), "/etc/cdi/gpu.json")
    b = cdi.parse_spec(spec_text(GPU_SPEC, "yaml"), "/etc/cdi/gpu.yaml")
    assert a.kind == b.kind == "vendor.com/gpu" and a.vendor == "vendor.com" and a.device_class == "gpu"
    assert [d.name for d in a.devices] == [d.name for d in b.devices] == ["gpu0", "gpu1", "all"]

    def plain(s: cdi.Spec) -> list[object]:  # the edits without their origins (which name the file)
        return [(d.name, d.edits.env, d.edits.additional_gids,
                 [dataclasses.replace(x, origin="") for x in (*d.edits.device_nodes, *d.edits.mounts, *d.edits.hooks)])
                for d in s.devices]

    assert plain(a) == plain(b) and a.edits.env == b.edits.env and a.annotations == b.annotations
    gpu1 = a.devices[1]
    node = gpu1.edits.device_nodes[0]
    assert (node.path, node.source, node.type, node.major, node.minor) == ("/dev/gpu1", "/dev/card1", "c", 226, 1)
    assert gpu1.edits.additional_gids == (44,)  # 0 is ignored, as the spec says
    assert gpu1.edits.hooks[0].timeout == 5 and gpu1.edits.hooks[0].args == ("gpu-hook", "1")
    assert a.devices[0].edits.device_nodes[0].major is None  # from the host when applied
    assert "vendor.com/gpu=gpu1" in node.origin and "/etc/cdi/gpu.json" in node.origin
    assert a.edits.mounts[0].options == ("ro", "bind")


def test_yaml_spec_as_vendors_write_it():
    text = """
cdiVersion: 0.5.0
kind: example.com/zero
devices:
  - name: "0"
    containerEdits:
      deviceNodes:
        - path: /dev/moorage-zero
          hostPath: /dev/zero
"""
    s = cdi.parse_spec(text, "/etc/cdi/zero.yaml")
    assert s.devices[0].name == "0" and s.devices[0].edits.device_nodes[0].source == "/dev/zero"


@pytest.mark.parametrize("doc, fragment", [
    ({"kind": "a.com/b", "devices": [{"name": "x"}]}, "'cdiVersion' is required"),
    (with_(GPU_SPEC, cdiVersion="2.0.0"), "unknown version '2.0.0'"),
    (with_(GPU_SPEC, kind="gpu"), "kind: 'gpu' must be vendor.com/class"),
    (with_(GPU_SPEC, kind="vendor.com/gpu/x"), "invalid class"),
    (with_(GPU_SPEC, kind="-vendor.com/gpu"), "invalid vendor"),
    (with_(GPU_SPEC, devices=[]), "devices: must list at least one device"),
    (with_(GPU_SPEC, devices=[{"name": "a"}, {"name": "a"}]), "devices[1].name: device 'a' is defined twice"),
    (with_(GPU_SPEC, devices=[{"name": "-a"}]), "devices[0].name: invalid device name '-a'"),
    (with_(GPU_SPEC, colour="blue"), "unknown field 'colour'"),
    (one_device({"deviceNodes": [{"path": "/dev/x", "major": 1, "minr": 2}]}),
     "devices[0].containerEdits.deviceNodes[0]: unknown field 'minr'"),
    (one_device({"deviceNodes": [{"path": "dev/x"}]}), "deviceNodes[0].path: 'dev/x' must be an absolute path"),
    (one_device({"deviceNodes": [{"path": "/dev/x", "type": "x"}]}), "deviceNodes[0].type: 'x' is not one of"),
    (one_device({"deviceNodes": [{"path": "/dev/x", "permissions": "rx"}]}), "must be a combination of r, w and m"),
    (one_device({"deviceNodes": [{"path": "/dev/x", "major": "1"}]}), "major: must be an integer, got a string"),
    (one_device({"env": ["NOVALUE"]}), "env[0]: 'NOVALUE' is not NAME=value"),
    (one_device({"mounts": [{"hostPath": "/a"}]}), "mounts[0]: 'containerPath' is required"),
    (one_device({"hooks": [{"hookName": "preStart", "path": "/bin/true"}]}), "hookName: 'preStart' is not one of"),
    (one_device({"hooks": [{"hookName": "poststop", "path": "/bin/true", "timeout": 0}]}), "timeout: 0 is out of range"),
    (one_device({"deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/y"}]}, version="0.3.0"),
     "cdiVersion: 0.3.0 is too old for the fields used: deviceNodes hostPath needs at least 0.5.0"),
    (one_device({"netDevices": [{"hostInterfaceName": "eth1", "name": "net1"}]}, version="0.7.0"),
     "netDevices needs at least 1.1.0"),
    ({**one_device({}, version="0.5.0"), "annotations": {"a": "b"}}, "annotations needs at least 0.6.0"),
    ([1, 2], "must be an object, got a list"),
])
def test_invalid_specs_are_refused_naming_file_and_field(doc, fragment):
    with pytest.raises(cdi.SpecError) as e:
        cdi.spec_from_document(doc, "/etc/cdi/bad.json")
    assert str(e.value).startswith("/etc/cdi/bad.json: ")
    assert fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("path, text", [("/etc/cdi/x.json", "{nope"), ("/etc/cdi/x.yaml", "kind: [unclosed")])
def test_syntax_errors_name_the_format(path, text):
    with pytest.raises(cdi.SpecError, match="not valid (JSON|YAML)") as e:
        cdi.parse_spec(text, path)
    assert e.value.path == path


@pytest.mark.parametrize("name, ok", [
    ("vendor.com/gpu=gpu0", True), ("nvidia.com/gpu=all", True), ("a.b.c/x_y.z=0:1", True),
    ("vendor.com/gpu", False), ("gpu=0", False), ("vendor.com/gpu=", False), ("vendor.com/=x", False),
    ("vendor.com/gpu=-x", False), ("ven dor.com/gpu=x", False),
])
def test_qualified_names(name, ok):
    if ok:
        assert cdi.parse_qualified_name(name)[2] == name.split("=", 1)[1]
    else:
        with pytest.raises(ValueError):
            cdi.parse_qualified_name(name)


def test_requested_devices_from_the_field_and_annotations():
    ann = {"cdi.k8s.io/z-plugin": "vendor.com/gpu=gpu1,vendor.com/gpu=gpu0", "cdi.k8s.io/a": "x.org/nic=n1",
           "other/annotation": "not a device"}
    assert cdi.requested_devices(["vendor.com/gpu=gpu0"], ann) == ["vendor.com/gpu=gpu0", "x.org/nic=n1",
                                                                   "vendor.com/gpu=gpu1"]
    assert cdi.requested_devices([], {}) == []
    with pytest.raises(InvalidArgument, match="annotation cdi.k8s.io/bad: 'gpu0' is not a fully-qualified"):
        cdi.requested_devices([], {"cdi.k8s.io/bad": "gpu0"})
    with pytest.raises(InvalidArgument, match="CDI_devices: "):
        cdi.requested_devices(["vendor.com/gpu"], {})


def test_cri_cdi_devices_reach_the_model():
    msg = pb.ContainerConfig(CDI_devices=[pb.CDIDevice(name="vendor.com/gpu=gpu0"), pb.CDIDevice(name="a.b/c=d")])
    assert convert.container_config(msg).cdi_devices == ["vendor.com/gpu=gpu0", "a.b/c=d"]
    assert convert.container_config(pb.ContainerConfig()).cdi_devices == []


# --- the registry ---------------------------------------------------------------------------------


def spec_at(path: str, doc: dict, priority: int) -> cdi.Spec:
    return cdi.spec_from_document(doc, path, priority)


def test_a_later_directory_overrides_an_earlier_one():
    low = spec_at("/etc/cdi/gpu.json", GPU_SPEC, 0)
    high = spec_at("/var/run/cdi/gpu.json", with_(GPU_SPEC, devices=[{"name": "gpu0", "containerEdits": {
        "env": ["GPU=dynamic"]}}]), 1)
    for order in ([low, high], [high, low]):
        reg = cdi.build_registry(["/etc/cdi", "/var/run/cdi"], order)
        assert reg.devices["vendor.com/gpu=gpu0"][0].path == "/var/run/cdi/gpu.json"
        assert reg.devices["vendor.com/gpu=gpu1"][0].path == "/etc/cdi/gpu.json"
        assert not reg.conflicts


def test_two_files_of_one_directory_conflict_and_the_device_is_unusable():
    a = spec_at("/etc/cdi/a.json", GPU_SPEC, 0)
    b = spec_at("/etc/cdi/b.json", with_(GPU_SPEC, devices=[{"name": "gpu0"}]), 0)
    reg = cdi.build_registry(["/etc/cdi"], [a, b])
    assert "vendor.com/gpu=gpu0" not in reg.devices and "vendor.com/gpu=gpu1" in reg.devices
    with pytest.raises(InvalidArgument) as e:
        cdi.resolve(reg, ["vendor.com/gpu=gpu0"])
    assert "'vendor.com/gpu=gpu0'" in e.value.message
    assert "/etc/cdi/a.json" in e.value.message and "/etc/cdi/b.json" in e.value.message
    # A higher directory settles it.
    c = spec_at("/run/cdi/c.json", with_(GPU_SPEC, devices=[{"name": "gpu0"}]), 1)
    reg = cdi.build_registry(["/etc/cdi", "/run/cdi"], [a, b, c])
    assert reg.devices["vendor.com/gpu=gpu0"][0].path == "/run/cdi/c.json" and not reg.conflicts


def test_unknown_device_names_it_the_dirs_the_kind_and_broken_files():
    reg = cdi.build_registry(["/etc/cdi", "/var/run/cdi"], [
        spec_at("/etc/cdi/gpu.json", GPU_SPEC, 0), cdi.SpecError("/etc/cdi/broken.yaml", "not valid YAML: x")])
    with pytest.raises(FailedPrecondition) as e:
        cdi.resolve(reg, ["vendor.com/gpu=gpu0", "vendor.com/gpu=gpu7"])
    m = e.value.message
    assert m.startswith("unknown CDI device 'vendor.com/gpu=gpu7': no spec file in /etc/cdi, /var/run/cdi defines it")
    assert "vendor.com/gpu is defined by /etc/cdi/gpu.json with devices vendor.com/gpu=all" in m
    assert "/etc/cdi/broken.yaml: not valid YAML: x" in m
    with pytest.raises(FailedPrecondition, match="unknown CDI device 'other.org/x=y'"):
        cdi.resolve(reg, ["other.org/x=y"])
    with pytest.raises(InvalidArgument, match="not a fully-qualified CDI device name"):
        cdi.resolve(reg, ["gpu7"])


# --- resolving and merging ---------------------------------------------------------------------------


def gpu_registry(*extra: cdi.Spec) -> cdi.Registry:
    return cdi.build_registry(["/etc/cdi"], [spec_at("/etc/cdi/gpu.json", GPU_SPEC, 0), *extra])


def test_spec_edits_apply_once_and_device_edits_each():
    inj = cdi.resolve(gpu_registry(), ["vendor.com/gpu=gpu0", "vendor.com/gpu=gpu1"])
    e = inj.edits
    assert inj.devices == ("vendor.com/gpu=gpu0", "vendor.com/gpu=gpu1")
    assert inj.spec_files == {"vendor.com/gpu=gpu0": "/etc/cdi/gpu.json", "vendor.com/gpu=gpu1": "/etc/cdi/gpu.json"}
    assert e.env == ("GPU_DRIVER=1", "GPU=0")
    assert [m.container_path for m in e.mounts] == ["/usr/lib/gpu"]
    assert [n.path for n in e.device_nodes] == ["/dev/gpu0", "/dev/gpu1"]
    assert [h.path for h in e.hooks] == ["/usr/bin/gpu-hook"] and e.additional_gids == (44,)
    assert cdi.resolve(gpu_registry(), []) == cdi.Injection()


def test_conflicting_edits_name_both_devices_and_files():
    other = spec_at("/etc/cdi/other.yaml", one_device({"mounts": [
        {"hostPath": "/opt/gpu-libs", "containerPath": "/usr/lib/gpu"}]}, kind="other.org/acc", name="a0"), 0)
    with pytest.raises(InvalidArgument) as e:
        cdi.resolve(gpu_registry(other), ["vendor.com/gpu=gpu0", "other.org/acc=a0"])
    m = e.value.message
    assert "conflicting CDI edits for mount at /usr/lib/gpu" in m
    assert "vendor.com/gpu (/etc/cdi/gpu.json)" in m and "other.org/acc=a0 (/etc/cdi/other.yaml)" in m
    # Env values that disagree conflict too; the same value twice does not.
    with pytest.raises(InvalidArgument, match="environment variable GPU: .*'GPU=0' and 'GPU=all'"):
        cdi.resolve(gpu_registry(), ["vendor.com/gpu=gpu0", "vendor.com/gpu=all"])
    # Two devices putting different host nodes at one path conflict; the same node twice is one.
    twin = spec_at("/etc/cdi/twin.json", one_device({"deviceNodes": [{"path": "/dev/gpu1", "hostPath": "/dev/card1",
                                                                      "type": "c", "major": 226, "minor": 1}]},
                                                    kind="twin.org/gpu"), 0)
    assert len(cdi.resolve(gpu_registry(twin), ["vendor.com/gpu=gpu1", "twin.org/gpu=d"]).edits.device_nodes) == 1
    clash = spec_at("/etc/cdi/clash.json", one_device({"deviceNodes": [{"path": "/dev/gpu1", "hostPath": "/dev/card2"}]},
                                                      kind="clash.org/gpu"), 0)
    with pytest.raises(InvalidArgument, match="device node /dev/gpu1: .*/dev/card1 226:1 and /dev/card2"):
        cdi.resolve(gpu_registry(clash), ["vendor.com/gpu=gpu1", "clash.org/gpu=d"])


# --- the spec directories on disk -----------------------------------------------------------------


def test_spec_dirs_are_read_and_refreshed_when_they_change(tmp_path):
    etc, run = tmp_path / "etc", tmp_path / "run"
    etc.mkdir()
    (etc / "gpu.json").write_text(spec_text(GPU_SPEC))
    (etc / "notes.txt").write_text("not a spec")
    (etc / "broken.yaml").write_text("cdiVersion: [")
    dirs = cdi.SpecDirs([str(etc), str(run)])  # run does not exist yet: no specs there
    reg = dirs.registry()
    assert sorted(reg.devices) == ["vendor.com/gpu=all", "vendor.com/gpu=gpu0", "vendor.com/gpu=gpu1"]
    assert list(reg.errors) == [str(etc / "broken.yaml")]
    assert dirs.registry() is reg  # nothing changed: not re-read

    run.mkdir()
    (run / "zero.yaml").write_text(spec_text(one_device({"env": ["A=1"]}, kind="example.com/zero", name="z"), "yaml"))
    reg2 = dirs.registry()
    assert "example.com/zero=z" in reg2.devices

    # Rewritten in place (same name, new content and mtime).
    (run / "zero.yaml").write_text(spec_text(one_device({"env": ["A=22"]}, kind="example.com/zero", name="z"), "yaml"))
    os.utime(run / "zero.yaml", ns=(1, 1))
    assert dirs.registry().devices["example.com/zero=z"][1].edits.env == ("A=22",)
    (run / "zero.yaml").unlink()
    assert "example.com/zero=z" not in dirs.registry().devices


# --- the spec builder applies the edits ----------------------------------------------------------------

HOST_NODES = {
    "/dev/gpu0": [HostDevice("/dev/gpu0", "c", 195, 0, 0o660, 0, 44)],
    "/dev/card1": [HostDevice("/dev/card1", "c", 226, 1, 0o660, 0, 44)],
    "/dev/fuse": [HostDevice("/dev/fuse", "c", 10, 229, 0o666)],
    "/dev/sda": [HostDevice("/dev/sda", "b", 8, 0, 0o660)],
    "/etc/hostname": [],
}
HOST = HostLookups(
    path_exists=lambda p: p in ("/usr/lib/gpu", "/data"),
    devices_at=lambda p: HOST_NODES.get(p),
    current_capabilities=lambda: None,
    ensure_dir=lambda p: pytest.fail(f"the spec builder would create {p}"),
    hugetlb_missing=lambda p: None,
)


def build(inj: cdi.Injection | None, **cfg_kw: object) -> dict:
    c = ContainerConfig(metadata=ContainerMetadata(name="app"), image="img", command=["/bin/sh"],
                        envs=[("GPU_DRIVER", "user"), ("KEEP", "1")], **cfg_kw)  # type: ignore[arg-type]
    sb = PodSandboxConfig(metadata=PodSandboxMetadata(name="p", uid="u", namespace="n"))
    return build_container_spec(c, ImageConfig(), container_id="c1", sandbox_id="s1", sandbox_cfg=sb,
                                rootfs="/rootfs", sandbox_pid=42, netns_path=None, uid=1000, gid=1000,
                                additional_gids=[1000], cgroups_path="/moorage/c1", host=HOST, cdi=inj)


def inject(*names: str, reg: cdi.Registry | None = None) -> cdi.Injection:
    return cdi.resolve(reg or gpu_registry(), list(names))


def test_builder_applies_device_nodes_env_mounts_hooks_and_gids():
    s = build(inject("vendor.com/gpu=gpu0", "vendor.com/gpu=gpu1"))
    devs = {d["path"]: d for d in s["linux"]["devices"]}
    # gpu0: everything from the host node; gpu1: the numbers the spec gives, mode from its host node.
    assert devs["/dev/gpu0"] == {"path": "/dev/gpu0", "type": "c", "major": 195, "minor": 0, "fileMode": 0o660,
                                 "uid": 0, "gid": 44}
    assert (devs["/dev/gpu1"]["major"], devs["/dev/gpu1"]["minor"], devs["/dev/gpu1"]["fileMode"]) == (226, 1, 0o660)
    rules = s["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    assert {"allow": True, "type": "c", "major": 195, "minor": 0, "access": "rw"} in rules
    assert {"allow": True, "type": "c", "major": 226, "minor": 1, "access": "rwm"} in rules
    env = s["process"]["env"]
    assert "GPU_DRIVER=1" in env and "GPU_DRIVER=user" not in env and "GPU=0" in env and "KEEP=1" in env
    m = next(m for m in s["mounts"] if m["destination"] == "/usr/lib/gpu")
    assert m == {"destination": "/usr/lib/gpu", "type": "bind", "source": "/usr/lib/gpu", "options": ["ro", "bind"]}
    assert s["hooks"] == {"createContainer": [{"path": "/usr/bin/gpu-hook", "args": ["gpu-hook", "1"], "timeout": 5}]}
    assert s["process"]["user"]["additionalGids"] == [1000, 44]


def test_no_request_changes_nothing():
    assert build(None) == build(cdi.Injection())
    assert "hooks" not in build(None)


def registry_of(edits: dict, version: str = "1.1.0") -> cdi.Registry:
    return cdi.build_registry(["/etc/cdi"], [spec_at("/etc/cdi/t.json", one_device(edits, version), 0)])


def test_builder_device_node_details():
    # permissions "none": the node, but no cgroup rule; a "u" node is allowed as a char device.
    s = build(inject("example.com/dev=d", reg=registry_of({"deviceNodes": [
        {"path": "/dev/none", "hostPath": "/dev/fuse", "permissions": "none"},
        {"path": "/dev/unbuf", "type": "u", "major": 10, "minor": 7, "fileMode": 0o600, "uid": 5, "gid": 6}]})))
    devs = {d["path"]: d for d in s["linux"]["devices"]}
    assert devs["/dev/none"]["major"] == 10 and devs["/dev/none"]["minor"] == 229
    assert devs["/dev/unbuf"] == {"path": "/dev/unbuf", "type": "u", "major": 10, "minor": 7, "fileMode": 0o600,
                                  "uid": 5, "gid": 6}
    rules = s["linux"]["resources"]["devices"]
    assert not any(r.get("minor") == 229 for r in rules)
    assert {"allow": True, "type": "c", "major": 10, "minor": 7, "access": "rwm"} in rules


@pytest.mark.parametrize("edits, exc, fragment", [
    ({"deviceNodes": [{"path": "/dev/missing"}]}, FailedPrecondition,
     "device node /dev/missing of CDI example.com/dev=d (/etc/cdi/t.json) does not exist on this node"),
    ({"deviceNodes": [{"path": "/dev/x", "hostPath": "/etc/hostname"}]}, InvalidArgument, "is not a device node"),
    ({"deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/sda", "type": "c"}]}, InvalidArgument,
     "the spec says type 'c', the node is 'b'"),
    ({"mounts": [{"hostPath": "/nope", "containerPath": "/x"}]}, FailedPrecondition,
     "mount source /nope of CDI example.com/dev=d (/etc/cdi/t.json) (for /x) does not exist on this node"),
    ({"mounts": [{"hostPath": "/data", "containerPath": "/data"}]}, InvalidArgument,
     "mounts /data at /data, where the container already has a mount"),
    ({"deviceNodes": [{"path": "/dev/fuse", "hostPath": "/dev/gpu0"}]}, InvalidArgument,
     "puts device 195:0 at /dev/fuse, where the container's devices put /dev/fuse (10:229)"),
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "net1"}]}, FailedPrecondition,
     "moves host network interface eth1 into the container"),
])
def test_builder_refuses_what_cannot_be_applied(edits, exc, fragment):
    with pytest.raises(exc) as e:
        build(inject("example.com/dev=d", reg=registry_of(edits)),
              mounts=[Mount(container_path="/data", host_path="/data")],
              devices=[Device(container_path="/dev/fuse", host_path="/dev/fuse", permissions="rw")])
    assert fragment in e.value.message, e.value.message


def test_builder_mount_details_and_ignored_intel_rdt():
    s = build(inject("example.com/dev=d", reg=registry_of({
        "mounts": [{"hostPath": "/usr/lib/gpu", "containerPath": "/dev/shm"},
                   {"hostPath": "tmpfs", "containerPath": "/scratch", "type": "tmpfs", "options": ["size=1m"]}],
        "intelRdt": {"closID": "gold"}})))
    shm = [m for m in s["mounts"] if m["destination"] == "/dev/shm"]
    assert shm == [{"destination": "/dev/shm", "type": "bind", "source": "/usr/lib/gpu", "options": ["rbind"]}]
    assert {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]} in s["mounts"]
    assert "intelRdt" not in s["linux"]


# --- moorage check ------------------------------------------------------------------------------------


def test_check_lists_cdi_state_dirs_and_devices(tmp_path):
    from moorage.cri import cli
    from moorage.cri import config as configmod

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "gpu.yaml").write_text(spec_text(GPU_SPEC, "yaml"))
    cfg = configmod.loads(f'[runtime]\ncdi_spec_dirs = ["{etc}", "{tmp_path}/run"]')
    label, ok, hint = cli._cdi_item(cfg)
    assert (label, ok) == ("CDI", True)
    assert hint == f"enabled; spec dirs {etc}, {tmp_path}/run (missing): 3 devices from 1 spec file"
    (etc / "bad.json").write_text("{")
    _, ok, hint = cli._cdi_item(cfg)
    assert ok and hint.startswith("warning: ") and f"not usable: {etc}/bad.json: not valid JSON" in hint
    _, ok, hint = cli._cdi_item(configmod.loads("[runtime]\nenable_cdi = false"))
    assert ok and hint.startswith("disabled (runtime.enable_cdi = false)")
