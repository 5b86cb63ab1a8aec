"""Pure parsers and path helpers of runtime/cgroups.py, the cgroup path builder and the stats reader."""

from __future__ import annotations

import pytest

from moorage.core.errors import InvalidArgument
from moorage.runtime import cgroups, spec, stats

PROC_CGROUP_V1 = """\
12:name=systemd:/kubepods/pod1/c1
4:memory:/kubepods/pod1/c1
2:cpu,cpuacct:/kubepods/pod1/c1
0::/
"""

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /proc rw - proc proc rw
"""

MOUNTINFO_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
MOUNTINFO_NS = "30 23 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


def test_parse_proc_cgroup():
    p = cgroups.parse_proc_cgroup(PROC_CGROUP_V1)
    assert p["memory"] == "/kubepods/pod1/c1"
    assert p["cpu"] == p["cpuacct"] == "/kubepods/pod1/c1"
    assert p["name=systemd"] == "/kubepods/pod1/c1"
    assert p[""] == "/"


def test_mountinfo_and_dirs_v1_hybrid():
    mounts = cgroups.parse_mountinfo_cgroups(MOUNTINFO)
    assert [m.version for m in mounts] == [1, 1, 1, 2]
    assert mounts[0].controllers == ("cpu", "cpuacct")
    assert mounts[2].controllers == ("name=systemd",)
    dirs = cgroups.cgroup_dirs(cgroups.parse_proc_cgroup(PROC_CGROUP_V1), mounts)
    assert dirs["memory"] == "/sys/fs/cgroup/memory/kubepods/pod1/c1"
    assert dirs["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1"
    assert dirs[""] == "/sys/fs/cgroup/unified"


def test_dirs_v2_and_cgroup_namespace_root():
    dirs = cgroups.cgroup_dirs({"": "/kubepods/pod1/c1"}, cgroups.parse_mountinfo_cgroups(MOUNTINFO_V2))
    assert dirs == {"": "/sys/fs/cgroup/kubepods/pod1/c1"}
    dirs = cgroups.cgroup_dirs({"": "/kubepods/pod1/c1"}, cgroups.parse_mountinfo_cgroups(MOUNTINFO_NS))
    assert dirs == {"": "/sys/fs/cgroup/c1"}
    by_path = cgroups.cgroup_dirs_for_path("/a/b", cgroups.parse_mountinfo_cgroups(MOUNTINFO))
    assert by_path["memory"] == "/sys/fs/cgroup/memory/a/b" and by_path[""] == "/sys/fs/cgroup/unified/a/b"


def test_mountinfo_octal_escapes():
    mi = "30 23 0:26 / /sys/fs/cgroup/my\\040dir rw - cgroup2 cgroup2 rw\n"
    assert cgroups.parse_mountinfo_cgroups(mi)[0].mountpoint == "/sys/fs/cgroup/my dir"


def test_memory_v1():
    stat = "cache 100\nrss 300\ntotal_rss 4096\ntotal_inactive_file 1000\ntotal_pgfault 7\ntotal_pgmajfault 1\n"
    m = cgroups.memory_stats_v1("5000\n", "9223372036854771712\n", stat,
                                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert m == {"usage": 5000, "working_set": 4000, "rss": 4096, "limit": None,
                 "pgfault": 7, "pgmajfault": 1, "oom_kills": 2}
    assert cgroups.memory_stats_v1("10\n", "67108864\n", "total_inactive_file 50\n")["working_set"] == 0
    assert cgroups.memory_stats_v1("10\n", "67108864\n", "")["limit"] == 67108864


def test_memory_v2_and_cpu_pids():
    m = cgroups.memory_stats_v2("8192\n", "max\n", "anon 4096\ninactive_file 192\npgfault 3\npgmajfault 0\n",
                                "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert m == {"usage": 8192, "working_set": 8000, "rss": 4096, "limit": None,
                 "pgfault": 3, "pgmajfault": 0, "oom_kills": 1}
    assert cgroups.cpu_usage_ns_v2("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n") == 1_500_000
    assert cgroups.parse_single_value("max\n") is None
    assert cgroups.parse_single_value("42\n") == 42
    assert cgroups.parse_oom_kill_count("oom_kill_disable 0\nunder_oom 0\n") == 0


def test_read_cgroup_from_fake_v1_tree(tmp_path):
    # The daemon's one cgroup stats reader (stats.read_cgroup) over real files.
    mem = tmp_path / "memory"
    mem.mkdir()
    (mem / "memory.usage_in_bytes").write_text("2048\n")
    (mem / "memory.limit_in_bytes").write_text("4096\n")
    (mem / "memory.stat").write_text("total_rss 1024\ntotal_inactive_file 48\ntotal_cache 64\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    acct = tmp_path / "cpuacct"
    acct.mkdir()
    (acct / "cpuacct.usage").write_text("123456\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    (pids / "pids.current").write_text("3\n")
    (pids / "pids.max").write_text("max\n")
    dirs = {"memory": str(mem), "cpuacct": str(acct), "pids": str(pids)}
    st = stats.read_cgroup(dirs, with_oom=True)
    assert st is not None and st.memory is not None
    assert (st.memory["usage"], st.memory["working_set"], st.memory["limit"]) == (2048, 2000, 4096)
    assert (st.cpu_usage_ns, st.pids, st.oom_kills, st.cache_bytes) == (123456, 3, 1, 64)
    assert cgroups.oom_kill_count(dirs) == 1
    assert cgroups.oom_kill_count({"memory": str(tmp_path / "gone")}) == 0
    assert stats.read_cgroup({"memory": str(tmp_path / "gone")}) is None


@pytest.mark.parametrize("driver, parent, expected", [
    ("cgroupfs", "/kubepods/besteffort/pod1", "/kubepods/besteffort/pod1/c1"),
    ("cgroupfs", "kubepods/", "/kubepods/c1"),
    ("cgroupfs", "", "/moorage/c1"),
    ("systemd", "kubepods-besteffort-pod1.slice", "kubepods-besteffort-pod1.slice:moorage:c1"),
    # What a kubelet with cgroupDriver: systemd really sends: the path of slices; runc wants the last one.
    ("systemd", "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice",
     "kubepods-besteffort-pod1.slice:moorage:c1"),
    ("systemd", "", "system.slice:moorage:c1"),
])
def test_container_cgroups_path(driver, parent, expected):
    # The one cgroup path builder the daemon uses (spec.cgroups_path).
    assert spec.cgroups_path(driver, parent, "c1") == expected


@pytest.mark.parametrize("bad", [("systemd", "/kubepods/pod1", "c1"), ("cgroupfs", "/a/../b", "c1"),
                                 ("cgroupfs", "/a", "x/y"), ("cgroupv3", "/a", "c1")])
def test_container_cgroups_path_rejects(bad):
    with pytest.raises(InvalidArgument):
        spec.cgroups_path(*bad)


def test_remove_cgroup_refuses_root_and_relative():
    for bad in ("/", "", "relative", "/a/../.."):
        with pytest.raises(InvalidArgument):
            cgroups.remove_cgroup(bad, mounts=[])


def test_remove_cgroup_removes_children_first(tmp_path):
    mounts = [cgroups.CgroupMount(str(tmp_path / "memory"), "/", 1, ("memory",))]
    (tmp_path / "memory" / "p" / "c1" / "x").mkdir(parents=True)
    (tmp_path / "memory" / "p" / "c2").mkdir(parents=True)
    cgroups.remove_cgroup("/p", mounts=mounts)
    assert not (tmp_path / "memory" / "p").exists()
    cgroups.remove_cgroup("/p", mounts=mounts)  # already gone: fine
