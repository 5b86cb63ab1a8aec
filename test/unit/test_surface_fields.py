"""The fields issue #11 maps: Mount.mount_options and selinux_relabel in the OCI spec, the pod-level
resource annotations, and ContainerConfig.stop_signal through the protobuf translation."""

from __future__ import annotations

import dataclasses

import pytest

from moorage.core.errors import FailedPrecondition, InvalidArgument
from moorage.cri import convert
from moorage.cri.api import api_pb2 as pb
from moorage.runtime.model import (
    ContainerConfig,
    ContainerMetadata,
    ImageConfig,
    LinuxContainerResources,
    LinuxPodSandboxConfig,
    Mount,
    PodSandboxConfig,
    PodSandboxMetadata,
)
from moorage.runtime.spec import (
    BIND_MOUNT_OPTIONS,
    HostLookups,
    build_container_spec,
    build_sandbox_spec,
    pod_resource_annotations,
)

HOST = HostLookups(path_exists=lambda p: True, devices_at=lambda p: None, current_capabilities=lambda: None,
                   hugetlb_missing=lambda p: None, selinux_active=lambda: False)
POD = PodSandboxConfig(metadata=PodSandboxMetadata(name="p", namespace="ns", uid="u"))


def mount_spec(m: Mount, host: HostLookups = HOST) -> dict:
    c = ContainerConfig(metadata=ContainerMetadata(name="c"), image="img", command=["sh"], mounts=[m])
    spec = build_container_spec(c, ImageConfig(), container_id="c1", sandbox_id="s1", sandbox_cfg=POD,
                                rootfs="/r", sandbox_pid=42, netns_path="/run/netns/x", uid=0, gid=0,
                                cgroups_path="/moorage/c1", host=host)
    return next(x for x in spec["mounts"] if x["destination"] == "/vol")


def test_mount_options_reach_the_oci_mount():
    out = mount_spec(Mount(container_path="/vol", host_path="/data", mount_options=["noexec", "nosuid", "nodev"]))
    assert out["options"] == ["rbind", "rprivate", "rw", "noexec", "nosuid", "nodev"]


def test_ro_option_makes_the_mount_read_only_once():
    out = mount_spec(Mount(container_path="/vol", host_path="/data", mount_options=["ro", "noexec", "ro"]))
    assert out["options"] == ["rbind", "rprivate", "ro", "noexec"]
    out = mount_spec(Mount(container_path="/vol", host_path="/data", readonly=True, recursive_read_only=True,
                           mount_options=["nosuid"]))
    assert out["options"] == ["rbind", "rprivate", "rro", "nosuid"]


@pytest.mark.parametrize("opts, needle", [
    (["bogus"], "'bogus'"), (["rnoexec"], "'rnoexec'"), (["size=1m"], "'size=1m'"),
    (["exec", "noexec"], "contradict"), (["dev", "nodev"], "contradict"),
])
def test_unknown_and_contradicting_options_are_invalid(opts, needle):
    with pytest.raises(InvalidArgument) as e:
        mount_spec(Mount(container_path="/vol", host_path="/data", mount_options=opts))
    assert needle in e.value.message and "/vol" in e.value.message


def test_rw_option_contradicts_readonly():
    with pytest.raises(InvalidArgument, match="'rw'"):
        mount_spec(Mount(container_path="/vol", host_path="/data", readonly=True, mount_options=["rw"]))


def test_every_bind_option_has_its_opposite():
    assert all(BIND_MOUNT_OPTIONS[BIND_MOUNT_OPTIONS[o]] == o for o in BIND_MOUNT_OPTIONS)


def test_selinux_relabel_ignored_without_selinux_refused_with_it():
    m = Mount(container_path="/vol", host_path="/data", selinux_relabel=True)
    assert mount_spec(m)["source"] == "/data"
    with pytest.raises(FailedPrecondition, match="SELinux relabel"):
        mount_spec(m, dataclasses.replace(HOST, selinux_active=lambda: True))


def test_pod_resource_annotations_as_containerd():
    res = LinuxContainerResources(cpu_period=100000, cpu_quota=20000, cpu_shares=256, memory_limit_in_bytes=1 << 20)
    assert pod_resource_annotations(LinuxContainerResources(cpu_shares=5), res) == {
        "io.kubernetes.cri.sandbox-cpu-period": "100000", "io.kubernetes.cri.sandbox-cpu-quota": "20000",
        "io.kubernetes.cri.sandbox-cpu-shares": "256", "io.kubernetes.cri.sandbox-memory": str(1 << 20)}
    assert pod_resource_annotations(LinuxContainerResources(cpu_shares=5), None) == {}  # overhead is not passed
    with pytest.raises(InvalidArgument):
        pod_resource_annotations(LinuxContainerResources(cpu_quota=-7), None)


def test_sandbox_spec_carries_the_annotations_and_keeps_infra_shares():
    cfg = dataclasses.replace(POD, linux=LinuxPodSandboxConfig(
        resources=LinuxContainerResources(cpu_shares=700, memory_limit_in_bytes=1 << 30)))
    spec = build_sandbox_spec(cfg, sandbox_id="s1", rootfs="/r", infra_binary_path="/catatonit", netns_path=None,
                              cgroups_path="/moorage/s1", host=HOST)
    assert spec["annotations"]["io.kubernetes.cri.sandbox-cpu-shares"] == "700"
    assert spec["linux"]["resources"]["cpu"] == {"shares": 2}
    assert "memory" not in spec["linux"]["resources"]


def test_stop_signal_translation():
    assert convert.container_config(pb.ContainerConfig(stop_signal=pb.SIGNAL_SIGQUIT)).stop_signal == "SIGQUIT"
    assert convert.container_config(pb.ContainerConfig()).stop_signal == ""
    m = convert.container_config(pb.ContainerConfig(mounts=[pb.Mount(container_path="/v", mount_options=["nodev"])]))
    assert m.mounts[0].mount_options == ["nodev"]
    assert "ContainerConfig.stop_signal" not in convert.IGNORED and "Mount.mount_options" not in convert.IGNORED
