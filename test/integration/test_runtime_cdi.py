"""CDI devices over gRPC with the real daemon, runc and crun.

The daemon's ``runtime.cdi_spec_dirs`` point at two directories of its own.  The spec
describes a harmless device: ``/dev/moorage-zero``, an alias of /dev/zero (its major and
minor numbers), plus an env and a bind-mount edit.  A container asks for it through
``CDI_devices``, another through a ``cdi.k8s.io/`` annotation; both read zeros from the
alias (so the node exists and the device cgroup lets them read it), see the env and the
mounted file.  A later directory overrides an earlier one, new spec files are picked up
without a restart, and unknown or conflicting devices fail CreateContainer naming the device
and the spec files.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import grpc
import pytest
import yaml

from moorage.cri.api import api_pb2 as pb
from moorage.testing import registry as registrymod
from moorage.testing.daemon import DaemonProcess, new_base, teardown
from moorage.testing.runtime_env import RuntimeEnv, own_cgroup_parent, remove_cgroup_tree

pytestmark = pytest.mark.integration

SLEEP = ["sleep", "1000"]
ZERO = os.stat("/dev/zero")


class CdiEnv:
    def __init__(self, env: RuntimeEnv, low: str, high: str, share: str, hooks: str) -> None:
        self.env, self.low, self.high, self.share, self.hooks = env, low, high, share, hooks


def write_spec(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        if path.endswith(".json"):
            json.dump(doc, f)
        else:
            yaml.safe_dump(doc, f)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def cdi_module(registry: registrymod.TestRegistry) -> Iterator[CdiEnv]:
    base = new_base()
    low, high = os.path.join(base, "cdi-etc"), os.path.join(base, "cdi-run")
    share, hooks = os.path.join(base, "cdi-share"), os.path.join(base, "cdi-hooks")
    for d in (low, high, share, hooks):
        os.makedirs(d)
    with open(os.path.join(share, "hello.txt"), "w") as f:
        f.write("from the CDI mount\n")
    # The static spec (lower precedence): JSON, the device by its numbers.
    write_spec(os.path.join(low, "moorage-test.json"), {
        "cdiVersion": "0.6.0", "kind": "moorage.test/zero",
        "containerEdits": {
            "env": ["MOORAGE_CDI_KIND=zero"],
            "mounts": [{"hostPath": share, "containerPath": "/mnt/cdi", "options": ["rbind", "ro"]}],
        },
        "devices": [
            {"name": "zero", "containerEdits": {
                "deviceNodes": [{"path": "/dev/moorage-zero", "type": "c", "major": os.major(ZERO.st_rdev),
                                 "minor": os.minor(ZERO.st_rdev), "permissions": "rw", "fileMode": 0o666}],
                "env": ["MOORAGE_CDI_DEVICE=zero"]}},
            {"name": "overridden", "containerEdits": {"env": ["MOORAGE_CDI_DEVICE=static"]}},
        ],
    })
    # The dynamic one (higher precedence): YAML, the device looked up from its host node, a hook.
    write_spec(os.path.join(high, "moorage-test.yaml"), {
        "cdiVersion": "0.6.0", "kind": "moorage.test/alias",
        "devices": [{"name": "zero2", "containerEdits": {
            "deviceNodes": [{"path": "/dev/moorage-zero2", "hostPath": "/dev/zero"}],
            "env": ["MOORAGE_CDI_DEVICE=zero2"],
            "hooks": [{"hookName": "poststart", "path": "/bin/sh",
                       "args": ["sh", "-c", f'cat > "$(mktemp -p {hooks} state.XXXXXX)"']}]}}],
    })
    write_spec(os.path.join(high, "override.json"), {
        "cdiVersion": "0.3.0", "kind": "moorage.test/zero",
        "devices": [{"name": "overridden", "containerEdits": {"env": ["MOORAGE_CDI_DEVICE=dynamic"]}}],
    })
    parent, runtime_table = own_cgroup_parent()
    d = DaemonProcess(base=base, extra_config=runtime_table + f'cdi_spec_dirs = ["{low}", "{high}"]\n')
    try:
        d.start()
        env = RuntimeEnv(d, registry, parent)
        env.pull("busybox")
        yield CdiEnv(env, low, high, share, hooks)
    finally:
        teardown(d)
        remove_cgroup_tree(parent)


@pytest.fixture
def cdi_env(cdi_module: CdiEnv) -> Iterator[CdiEnv]:
    cdi_module.env.begin()
    yield cdi_module
    cdi_module.env.cleanup()
    cdi_module.env.check_no_leaks()


def create_error(env: RuntimeEnv, sid: str, pcfg: pb.PodSandboxConfig, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        env.create(sid, pcfg, SLEEP, **kw)
    return e.value


@pytest.mark.parametrize("handler", ["runc", "crun"])
def test_cdi_device_env_and_mount_reach_the_container(cdi_env: CdiEnv, handler: str) -> None:
    env = cdi_env.env
    sid, pcfg = env.run_pod(handler=handler)
    cid = env.run(sid, pcfg, SLEEP, CDI_devices=[pb.CDIDevice(name="moorage.test/zero=zero")])
    # The node is there with /dev/zero's numbers, and the device cgroup lets the container read it.
    assert env.sh(cid, "dd if=/dev/moorage-zero bs=8 count=1 2>/dev/null | tr '\\0' z") == "zzzzzzzz"
    assert env.sh(cid, "stat -c '%t:%T' /dev/moorage-zero").strip() == (
        f"{os.major(ZERO.st_rdev):x}:{os.minor(ZERO.st_rdev):x}")
    assert env.sh(cid, "echo $MOORAGE_CDI_DEVICE $MOORAGE_CDI_KIND").strip() == "zero zero"
    assert env.sh(cid, "cat /mnt/cdi/hello.txt") == "from the CDI mount\n"
    r = env.exec(cid, ["touch", "/mnt/cdi/new"])
    assert r.exit_code != 0  # the spec asked for a read-only mount
    # Without the request: none of it.
    plain = env.run(sid, pcfg, SLEEP)
    assert env.exec(plain, ["test", "-e", "/dev/moorage-zero"]).exit_code != 0
    assert env.sh(plain, "echo x$MOORAGE_CDI_DEVICE").strip() == "x"


@pytest.mark.parametrize("handler", ["runc", "crun"])
def test_cdi_device_by_annotation_from_the_later_directory_with_a_hook(cdi_env: CdiEnv, handler: str) -> None:
    env = cdi_env.env
    sid, pcfg = env.run_pod(handler=handler)
    before = set(glob.glob(os.path.join(cdi_env.hooks, "state.*")))
    cid = env.run(sid, pcfg, SLEEP, annotations={"cdi.k8s.io/moorage-test": "moorage.test/alias=zero2"})
    # The node was looked up from /dev/zero on the host (the spec gives only its host path).
    assert env.sh(cid, "head -c 4 /dev/moorage-zero2 | tr '\\0' z") == "zzzz"
    assert env.sh(cid, "echo $MOORAGE_CDI_DEVICE").strip() == "zero2"
    # The poststart hook ran on the host with the container's state on stdin.
    states = set(glob.glob(os.path.join(cdi_env.hooks, "state.*"))) - before
    ids = []
    for p in states:
        with open(p) as f:
            ids.append(json.load(f).get("id"))
    assert cid in ids, ids


def test_a_later_directory_overrides_and_new_specs_are_picked_up(cdi_env: CdiEnv) -> None:
    env = cdi_env.env
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, CDI_devices=[pb.CDIDevice(name="moorage.test/zero=overridden")])
    assert env.sh(cid, "echo $MOORAGE_CDI_DEVICE").strip() == "dynamic"

    name = "moorage.test/fresh=f0"
    e = create_error(env, sid, pcfg, CDI_devices=[pb.CDIDevice(name=name)])
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and name in e.details()
    path = os.path.join(cdi_env.high, "fresh.json")
    write_spec(path, {"cdiVersion": "0.3.0", "kind": "moorage.test/fresh",
                      "devices": [{"name": "f0", "containerEdits": {"env": ["FRESH=1"]}}]})
    try:
        cid2 = env.run(sid, pcfg, SLEEP, CDI_devices=[pb.CDIDevice(name=name)])
        assert env.sh(cid2, "echo $FRESH").strip() == "1"
    finally:
        os.unlink(path)
    e = create_error(env, sid, pcfg, CDI_devices=[pb.CDIDevice(name=name)])
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_and_conflicting_devices_are_refused_naming_device_and_files(cdi_env: CdiEnv) -> None:
    env = cdi_env.env
    sid, pcfg = env.run_pod()
    e = create_error(env, sid, pcfg, CDI_devices=[pb.CDIDevice(name="moorage.test/zero=nosuch")])
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unknown CDI device 'moorage.test/zero=nosuch'" in e.details()
    assert os.path.join(cdi_env.low, "moorage-test.json") in e.details()  # the file that has this kind

    e = create_error(env, sid, pcfg, annotations={"cdi.k8s.io/x": "not-a-name"})
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "cdi.k8s.io/x" in e.details()

    # Two requested devices whose edits disagree (MOORAGE_CDI_DEVICE).
    e = create_error(env, sid, pcfg, CDI_devices=[pb.CDIDevice(name="moorage.test/zero=zero"),
                                                  pb.CDIDevice(name="moorage.test/alias=zero2")])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MOORAGE_CDI_DEVICE" in e.details() and "moorage.test/alias=zero2" in e.details()
    assert os.path.join(cdi_env.high, "moorage-test.yaml") in e.details()

    # Two files of one directory defining one device.
    dup = [os.path.join(cdi_env.high, n) for n in ("dup-a.json", "dup-b.yaml")]
    for p in dup:
        write_spec(p, {"cdiVersion": "0.3.0", "kind": "moorage.test/dup", "devices": [{"name": "d"}]})
    try:
        e = create_error(env, sid, pcfg, CDI_devices=[pb.CDIDevice(name="moorage.test/dup=d")])
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "moorage.test/dup=d" in e.details() and all(p in e.details() for p in dup)
    finally:
        for p in dup:
            os.unlink(p)
    # Nothing of the refused containers is left (the env's leak check runs after the test, too).
    listed = env.rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=sid)),
                                   timeout=30).containers
    assert listed == []
