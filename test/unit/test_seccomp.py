"""RuntimeDefault seccomp profile and Localhost profile loading."""

from __future__ import annotations

import json

import pytest

from moorage.core.errors import InvalidArgument, NotFound
from moorage.runtime.seccomp import default_profile, load_localhost, parse_profile

DEFAULT_CAPS = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}


def allowed(profile, name):
    """Rules (as dicts) that mention ``name`` with an allow action."""
    return [s for s in profile["syscalls"] if name in s["names"] and s["action"] == "SCMP_ACT_ALLOW"]


def test_shape_and_default_action():
    p = default_profile(DEFAULT_CAPS, arch="x86_64")
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    assert p["defaultErrnoRet"] == 1
    assert p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    json.dumps(p)
    assert default_profile(DEFAULT_CAPS, arch="aarch64")["architectures"] == [
        "SCMP_ARCH_AARCH64",
        "SCMP_ARCH_ARM",
    ]


def test_common_syscalls_allowed_and_dangerous_denied():
    p = default_profile(DEFAULT_CAPS, arch="x86_64")
    for name in ("read", "write", "openat", "execve", "futex", "epoll_wait", "exit_group", "chown"):
        assert allowed(p, name), name
    for name in ("mount", "umount2", "unshare", "setns", "init_module", "reboot", "kexec_load",
                 "bpf", "ptrace_does_not_exist", "open_by_handle_at", "syslog", "perf_event_open"):
        assert not allowed(p, name), name


def test_chroot_follows_capability():
    assert allowed(default_profile(DEFAULT_CAPS, arch="x86_64"), "chroot")
    assert not allowed(default_profile(DEFAULT_CAPS - {"CAP_SYS_CHROOT"}, arch="x86_64"), "chroot")


def test_sys_admin_unlocks_mount_and_free_clone():
    p = default_profile(DEFAULT_CAPS | {"CAP_SYS_ADMIN"}, arch="x86_64")
    for name in ("mount", "umount2", "unshare", "setns", "clone3"):
        assert allowed(p, name), name
    clone = allowed(p, "clone")
    assert any("args" not in r for r in clone)  # unconditional clone
    assert not [s for s in p["syscalls"] if s["names"] == ["clone3"] and s["action"] != "SCMP_ACT_ALLOW"]


def test_clone_without_sys_admin_is_argument_filtered():
    p = default_profile(DEFAULT_CAPS, arch="x86_64")
    clone = allowed(p, "clone")
    assert len(clone) == 1
    (arg,) = clone[0]["args"]
    ns_flags = 0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x02000000
    assert arg == {"index": 0, "value": ns_flags, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    # clone3 answers ENOSYS so libc falls back to the filtered clone.
    (c3,) = [s for s in p["syscalls"] if "clone3" in s["names"]]
    assert c3["action"] == "SCMP_ACT_ERRNO" and c3["errnoRet"] == 38


def test_personality_rules():
    p = default_profile(DEFAULT_CAPS, arch="x86_64")
    values = sorted(r["args"][0]["value"] for r in allowed(p, "personality"))
    assert values == [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF]


@pytest.mark.parametrize(
    "cap, syscall",
    [
        ("CAP_SYS_PTRACE", "kcmp"),
        ("CAP_SYS_MODULE", "init_module"),
        ("CAP_SYS_BOOT", "reboot"),
        ("CAP_SYS_TIME", "settimeofday"),
        ("CAP_SYS_PACCT", "acct"),
        ("CAP_SYS_RAWIO", "iopl"),
        ("CAP_SYS_NICE", "mbind"),
        ("CAP_SYSLOG", "syslog"),
        ("CAP_BPF", "bpf"),
        ("CAP_PERFMON", "perf_event_open"),
        ("CAP_DAC_READ_SEARCH", "open_by_handle_at"),
        ("CAP_SYS_TTY_CONFIG", "vhangup"),
    ],
)
def test_capability_conditional_rules(cap, syscall):
    assert not allowed(default_profile(DEFAULT_CAPS, arch="x86_64"), syscall)
    assert allowed(default_profile(DEFAULT_CAPS | {cap}, arch="x86_64"), syscall)


def test_capability_names_without_prefix():
    assert allowed(default_profile({"sys_admin"}, arch="x86_64"), "mount")


def test_arch_specific_rules():
    x86 = default_profile(DEFAULT_CAPS, arch="x86_64")
    arm = default_profile(DEFAULT_CAPS, arch="aarch64")
    assert allowed(x86, "arch_prctl") and not allowed(arm, "arch_prctl")
    assert allowed(arm, "arm_fadvise64_64") and not allowed(x86, "arm_fadvise64_64")
    other = default_profile(DEFAULT_CAPS, arch="riscv64")
    assert "architectures" not in other and allowed(other, "read")


def test_profiles_are_independent_copies():
    a = default_profile(DEFAULT_CAPS, arch="x86_64")
    a["syscalls"][0]["names"].append("bogus")
    a["syscalls"][2]["args"][0]["value"] = 12345
    b = default_profile(DEFAULT_CAPS, arch="x86_64")
    assert "bogus" not in b["syscalls"][0]["names"]
    assert b["syscalls"][2]["args"][0]["value"] != 12345


# --- Localhost -------------------------------------------------------------------


def write(tmp_path, doc, name="p.json"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


def test_localhost_oci_profile(tmp_path):
    doc = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        ],
    }
    p = load_localhost(write(tmp_path, doc))
    assert p["defaultAction"] == "SCMP_ACT_ALLOW"
    assert p["architectures"] == ["SCMP_ARCH_X86_64"]
    assert p["syscalls"][0] == {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}
    assert p["syscalls"][1]["args"] == [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]


def test_localhost_prefix_stripped(tmp_path):
    path = write(tmp_path, {"defaultAction": "SCMP_ACT_LOG"})
    assert load_localhost("localhost/" + path) == {"defaultAction": "SCMP_ACT_LOG", "syscalls": []}


def test_localhost_docker_format_conditions(tmp_path):
    doc = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []},
        ],
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        ],
    }
    path = write(tmp_path, doc)
    plain = load_localhost(path, capabilities=set(), arch="x86_64")
    assert plain["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    assert [s["names"][0] for s in plain["syscalls"]] == ["read", "arch_prctl", "clone"]
    admin = load_localhost(path, capabilities={"SYS_ADMIN"}, arch="aarch64")
    assert admin["architectures"] == ["SCMP_ARCH_AARCH64"]
    assert [s["names"][0] for s in admin["syscalls"]] == ["read", "mount"]


def test_localhost_relative_path(tmp_path):
    with pytest.raises(InvalidArgument, match="must be absolute"):
        load_localhost("profiles/p.json")


def test_localhost_empty_ref():
    with pytest.raises(InvalidArgument, match="localhost_ref"):
        load_localhost("")


def test_localhost_missing(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        load_localhost(str(tmp_path / "nope.json"))


def test_localhost_directory(tmp_path):
    with pytest.raises(InvalidArgument, match="not a regular file"):
        load_localhost(str(tmp_path))


def test_localhost_bad_json(tmp_path):
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        load_localhost(write(tmp_path, "{nope"))


@pytest.mark.parametrize(
    "doc, msg",
    [
        ([], "JSON object"),
        ({}, "defaultAction"),
        ({"defaultAction": "SCMP_ACT_MAYBE"}, "defaultAction"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": -1}, "defaultErrnoRet"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["x86_64"]}, "SCMP_ARCH_"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}, "syscalls must be a list"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_ALLOW"}]},
         "names"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "allow"}]},
         "action"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 9, "op": "SCMP_CMP_EQ"}]}]},
         "index"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "op": "EQ"}]}]},
         "op"),
    ],
)
def test_profile_validation(doc, msg):
    with pytest.raises(InvalidArgument, match=msg):
        parse_profile(doc, source="/x.json")


def test_localhost_too_big(tmp_path, monkeypatch):
    import moorage.runtime.seccomp as sc

    monkeypatch.setattr(sc, "MAX_PROFILE_BYTES", 10)
    with pytest.raises(InvalidArgument, match="larger than"):
        load_localhost(write(tmp_path, {"defaultAction": "SCMP_ACT_ALLOW"}))
