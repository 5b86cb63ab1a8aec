"""The hugetlb controller: the kubelet sends hugepage limits for every container (limit 0 for each
page size the node has); they are kept, dropped or refused by what the host and the config say."""

from __future__ import annotations

import logging
import uuid

import pytest

from moorage.core.errors import FailedPrecondition
from moorage.runtime import cgroups
from moorage.runtime.model import (
    ContainerConfig,
    ContainerMetadata,
    HugepageLimit,
    ImageConfig,
    LinuxContainerConfig,
    LinuxContainerResources,
    PodSandboxConfig,
    PodSandboxMetadata,
)
from moorage.runtime.spec import HostLookups, RuntimeSpecConfig, build_container_spec, linux_resources

KUBELET_LIMITS = [HugepageLimit("2MB", 0), HugepageLimit("1GB", 0)]


def build(missing: str | None, runtime_cfg: RuntimeSpecConfig, limits=KUBELET_LIMITS) -> dict:
    asked: list[str] = []

    def hugetlb_missing(path: str) -> str | None:
        asked.append(path)
        return missing

    host = HostLookups(path_exists=lambda p: True, devices_at=lambda p: None, current_capabilities=lambda: None,
                       hugetlb_missing=hugetlb_missing)
    c = ContainerConfig(metadata=ContainerMetadata(name="app"), image="busybox", command=["sleep", "1"],
                        linux=LinuxContainerConfig(resources=LinuxContainerResources(
                            cpu_shares=2, hugepage_limits=list(limits))))
    spec = build_container_spec(
        c, ImageConfig(), container_id="c1", sandbox_id="s1",
        sandbox_cfg=PodSandboxConfig(metadata=PodSandboxMetadata(name="p", uid="u", namespace="n")),
        rootfs="/r", sandbox_pid=42, netns_path=None, uid=0, gid=0, cgroups_path="/kubepods/pod1/c1",
        runtime_cfg=runtime_cfg, host=host)
    if not runtime_cfg.disable_hugetlb_controller:
        assert asked == ["/kubepods/pod1/c1"]
    return spec["linux"]["resources"]


def test_present_keeps_the_limits():
    res = build(None, RuntimeSpecConfig())
    assert res["hugepageLimits"] == [{"pageSize": "2MB", "limit": 0}, {"pageSize": "1GB", "limit": 0}]
    assert res["cpu"] == {"shares": 2}


def test_absent_and_tolerated_drops_them_and_logs_once(caplog):
    why = f"no hugetlb here ({uuid.uuid4().hex})"
    with caplog.at_level(logging.WARNING, logger="moorage.runtime.spec"):
        first = build(why, RuntimeSpecConfig())
        second = build(why, RuntimeSpecConfig())
    assert "hugepageLimits" not in first and "hugepageLimits" not in second
    assert first["cpu"] == {"shares": 2}  # the rest of the resources stay
    lines = [r.getMessage() for r in caplog.records if why in r.getMessage()]
    assert len(lines) == 1 and "dropped" in lines[0]


def test_absent_and_not_tolerated_is_refused():
    with pytest.raises(FailedPrecondition) as e:
        build("cgroup v1: no hierarchy has the hugetlb controller mounted",
              RuntimeSpecConfig(tolerate_missing_hugetlb_controller=False))
    assert "hugetlb" in e.value.message and "tolerate_missing_hugetlb_controller" in e.value.message


def test_disabled_never_sets_them_nor_asks_the_host():
    res = build(None, RuntimeSpecConfig(disable_hugetlb_controller=True))
    assert "hugepageLimits" not in res


def test_no_limits_asked_needs_no_controller():
    # Even when a missing controller is not tolerated: without hugepage limits it is not needed.
    host = HostLookups(hugetlb_missing=lambda p: pytest.fail("asked the host without hugepage limits"))
    c = ContainerConfig(metadata=ContainerMetadata(name="app"), image="busybox", command=["sleep", "1"])
    build_container_spec(
        c, ImageConfig(), container_id="c1", sandbox_id="s1",
        sandbox_cfg=PodSandboxConfig(metadata=PodSandboxMetadata(name="p", uid="u", namespace="n")),
        rootfs="/r", sandbox_pid=42, netns_path=None, uid=0, gid=0, cgroups_path="/kubepods/pod1/c1",
        runtime_cfg=RuntimeSpecConfig(tolerate_missing_hugetlb_controller=False), host=host)


def test_update_leaves_hugepage_limits_out():
    res = LinuxContainerResources(memory_limit_in_bytes=1 << 20, hugepage_limits=list(KUBELET_LIMITS))
    assert linux_resources(res) == {"memory": {"limit": 1 << 20}}
    assert linux_resources(res, hugepages=True)["hugepageLimits"][0] == {"pageSize": "2MB", "limit": 0}


# --- host detection ------------------------------------------------------------------------------

MOUNTINFO_HYBRID_NO_HUGETLB = """\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
MOUNTINFO_V1_HUGETLB = MOUNTINFO_HYBRID_NO_HUGETLB + \
    "42 31 0:39 / /sys/fs/cgroup/hugetlb rw,relatime - cgroup cgroup rw,hugetlb\n"


def test_v1_detection_from_mountinfo(tmp_path):
    root = str(tmp_path)  # no cgroup.controllers at the root: v1 (or hybrid)
    missing = cgroups.hugetlb_missing("/kubepods/c1", root=root,
                                      mounts=cgroups.parse_mountinfo_cgroups(MOUNTINFO_HYBRID_NO_HUGETLB))
    assert missing is not None and "v1" in missing
    assert cgroups.hugetlb_missing("/kubepods/c1", root=root,
                                   mounts=cgroups.parse_mountinfo_cgroups(MOUNTINFO_V1_HUGETLB)) is None


def test_v2_detection_reads_the_nearest_existing_parent(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (tmp_path / "kubepods.slice").mkdir()
    (tmp_path / "kubepods.slice" / "cgroup.controllers").write_text("cpu memory pids\n")
    root = str(tmp_path)
    # A pod cgroup that does not exist yet: its nearest parent decides.
    assert cgroups.hugetlb_missing("/kubepods.slice/pod1/c1", root=root) is not None
    assert cgroups.hugetlb_missing("kubepods-pod1.slice:moorage:c1", root=root) is not None
    assert cgroups.hugetlb_missing("/other/c1", root=root) is None
    assert cgroups.hugetlb_missing("system.slice:moorage:c1", root=root) is None


def test_systemd_slice_paths():
    assert cgroups.systemd_slice_path("kubepods-besteffort-pod1.slice") == \
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice"
    assert cgroups.systemd_slice_path("-.slice") == "/"
    assert cgroups.parent_of_cgroups_path("/a/b/c1") == "/a/b"
    assert cgroups.parent_of_cgroups_path("kubepods.slice:moorage:c1") == "/kubepods.slice"


# --- moorage check ------------------------------------------------------------------------------


@pytest.mark.parametrize("missing, toml, ok, words", [
    (None, "", True, "available"),
    ("cgroup v1: no hugetlb", "", True, "dropped"),
    ("cgroup v1: no hugetlb", "tolerate_missing_hugetlb_controller = false", False, "refused"),
    ("cgroup v1: no hugetlb", "disable_hugetlb_controller = true", True, "never set"),
])
def test_check_reports_the_hugetlb_state(monkeypatch, missing, toml, ok, words):
    from moorage.cri import cli
    from moorage.cri import config as c

    asked: list[str] = []
    monkeypatch.setattr(cgroups, "hugetlb_missing", lambda p: asked.append(p) or missing)
    cfg = c.loads(f'[runtime]\ndefault_cgroup_parent = "/kubepods"\n{toml}')
    items = {label: (good, hint) for label, good, hint in cli._check_items(cfg)}
    good, hint = items["hugetlb cgroup controller"]
    assert good is ok and words in hint
    if missing is not None and "disable" not in toml:
        assert missing in hint and asked == ["/kubepods/check"]
