"""build_container_spec and its helpers: a pure function, tested without a host."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moorage.core.errors import FailedPrecondition, InvalidArgument, NotFound
from moorage.runtime.model import (
    Capability,
    ContainerConfig,
    ContainerMetadata,
    Device,
    HugepageLimit,
    IDMapping,
    ImageConfig,
    ImageSpec,
    LinuxContainerConfig,
    LinuxContainerResources,
    LinuxContainerSecurityContext,
    LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext,
    Mount,
    NamespaceOption,
    PodSandboxConfig,
    PodSandboxMetadata,
    SecurityProfile,
    SELinuxOption,
    UserNamespace,
)
from moorage.runtime.spec import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    DEFAULT_MASKED_PATHS,
    DEFAULT_PATH,
    DEFAULT_READONLY_PATHS,
    HostDevice,
    HostLookups,
    RuntimeSpecConfig,
    build_container_spec,
    compute_capabilities,
    container_args,
    container_env,
    linux_resources,
)

SANDBOX_PID = 4242
EXISTING = {"/data", "/var/log/app", "/run/secret", "/host/shared", "/srv/a", "/srv/a/b", "/srv/a/b/c", "/etc/foo"}
HOST_DEVICES = {
    "/dev/null": [HostDevice("/dev/null", "c", 1, 3, 0o666)],
    "/dev/fuse": [HostDevice("/dev/fuse", "c", 10, 229, 0o666)],
    "/dev/sda": [HostDevice("/dev/sda", "b", 8, 0, 0o660, 0, 6)],
    "/dev/snd": [
        HostDevice("/dev/snd/controlC0", "c", 116, 2, 0o660, 0, 29),
        HostDevice("/dev/snd/pcmC0D0p", "c", 116, 3, 0o660, 0, 29),
    ],
    "/dev/regular-file": [],
    "/dev": [
        HostDevice("/dev/null", "c", 1, 3, 0o666),
        HostDevice("/dev/console", "c", 5, 1, 0o600),
        HostDevice("/dev/pts/0", "c", 136, 0, 0o620),
        HostDevice("/dev/sda", "b", 8, 0, 0o660, 0, 6),
        HostDevice("/dev/initctl", "p", 0, 0, 0o600),
    ],
}
SECCOMP_FILES = {"/var/lib/kubelet/seccomp/audit.json": {"defaultAction": "SCMP_ACT_LOG", "syscalls": []}}


def fake_load_seccomp(path, caps):
    if path not in SECCOMP_FILES:
        raise NotFound(f"seccomp profile {path} does not exist on this node")
    return dict(SECCOMP_FILES[path])


HOST = HostLookups(
    path_exists=lambda p: p in EXISTING,
    devices_at=lambda p: HOST_DEVICES.get(p),
    load_seccomp=fake_load_seccomp,
    current_capabilities=lambda: None,
    ensure_dir=lambda p: pytest.fail(f"the spec builder would create {p} on the host"),
    hugetlb_missing=lambda p: None,
)


def sandbox_cfg(privileged=False, hostname="web-0", annotations=None):
    return PodSandboxConfig(
        metadata=PodSandboxMetadata(name="web-0", uid="uid-1", namespace="prod", attempt=0),
        hostname=hostname,
        annotations=annotations or {},
        linux=LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/pod-uid-1",
            security_context=LinuxSandboxSecurityContext(privileged=privileged),
        ),
    )


def image_cfg(**kw):
    base = dict(
        user="",
        env=["PATH=/custom/bin:/bin", "LANG=C.UTF-8", "FROM_IMAGE=1"],
        entrypoint=["/docker-entrypoint.sh"],
        cmd=["nginx", "-g", "daemon off;"],
        working_dir="/srv",
    )
    base.update(kw)
    return ImageConfig(**base)


def cfg(sc=None, res=None, **kw):
    base = dict(metadata=ContainerMetadata(name="app", attempt=1), image="docker.io/library/nginx:1.25")
    base.update(kw)
    c = ContainerConfig(**base)
    if sc is not None or res is not None:
        c.linux = LinuxContainerConfig(resources=res, security_context=sc)
    return c


def build(c=None, image=None, sandbox=None, runtime_cfg=None, **kw):
    args = dict(
        container_id="c1",
        sandbox_id="s1",
        sandbox_cfg=sandbox or sandbox_cfg(),
        rootfs="/var/lib/moorage/rootfs/c1",
        sandbox_pid=SANDBOX_PID,
        netns_path="/run/netns/cni-123",
        uid=0,
        gid=0,
        additional_gids=[0],
        cgroups_path="/kubepods/pod-uid-1/c1",
        runtime_cfg=runtime_cfg or RuntimeSpecConfig(),
        hostname_path="/run/moorage/s1/hostname",
        hosts_path="/run/moorage/s1/hosts",
        resolv_conf_path="/run/moorage/s1/resolv.conf",
        shm_path="/run/moorage/s1/shm",
        host=HOST,
    )
    args.update(kw)
    spec = build_container_spec(c or cfg(), image or image_cfg(), **args)
    json.dumps(spec)  # always serialisable
    return spec


def mount_at(spec, dest):
    found = [m for m in spec["mounts"] if m["destination"] == dest]
    assert len(found) <= 1, found
    return found[0] if found else None


def ns(spec):
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


# --- shape ----------------------------------------------------------------------------


def test_top_level_shape():
    spec = build()
    assert spec["ociVersion"] == "1.0.2"
    assert set(spec) == {"ociVersion", "process", "root", "mounts", "annotations", "linux"}
    assert spec["root"] == {"path": "/var/lib/moorage/rootfs/c1", "readonly": False}
    assert spec["linux"]["cgroupsPath"] == "/kubepods/pod-uid-1/c1"
    p = spec["process"]
    assert p["terminal"] is False
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert p["noNewPrivileges"] is False
    assert "hostname" not in spec  # the container shares the sandbox's UTS namespace


def test_build_is_deterministic_and_does_not_mutate_inputs():
    c, img, sb = cfg(), image_cfg(), sandbox_cfg()
    before = (repr(c), repr(img), repr(sb))
    a = build(c, img, sb)
    b = build(c, img, sb)
    assert a == b
    assert (repr(c), repr(img), repr(sb)) == before


# --- command / args -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, args, entrypoint, cmd, expected",
    [
        (["/bin/sh"], ["-c", "x"], ["/ep"], ["c1"], ["/bin/sh", "-c", "x"]),
        (["/bin/sh"], [], ["/ep"], ["c1"], ["/bin/sh"]),  # image Cmd ignored when command set
        ([], ["a", "b"], ["/ep"], ["c1"], ["/ep", "a", "b"]),
        ([], ["a"], [], ["c1"], ["a"]),  # only args, no entrypoint: args are the command
        ([], [], ["/ep"], ["c1", "c2"], ["/ep", "c1", "c2"]),
        ([], [], [], ["/bin/run"], ["/bin/run"]),
        ([], [], ["/ep"], [], ["/ep"]),
        (["/x"], ["y"], [], [], ["/x", "y"]),
    ],
)
def test_command_table(command, args, entrypoint, cmd, expected):
    c = cfg(command=command, args=args)
    img = image_cfg(entrypoint=entrypoint, cmd=cmd)
    assert container_args(c, img) == expected
    assert build(c, img)["process"]["args"] == expected


def test_no_command_is_invalid():
    with pytest.raises(InvalidArgument, match="no command specified"):
        build(cfg(), image_cfg(entrypoint=[], cmd=[]))
    with pytest.raises(InvalidArgument, match="no command specified"):
        build(cfg(command=[""]), image_cfg())


# --- env / cwd / user ---------------------------------------------------------------------


def test_env_merge_order_and_override():
    c = cfg(envs=[("LANG", "de_DE"), ("NEW", "x=y"), ("FROM_IMAGE", "2")])
    env = build(c)["process"]["env"]
    assert env == [
        "PATH=/custom/bin:/bin",
        "HOSTNAME=web-0",
        "LANG=de_DE",
        "FROM_IMAGE=2",
        "NEW=x=y",
    ]


def test_env_default_path_and_home():
    env = container_env(cfg(), image_cfg(env=[]), hostname="", home="/root")
    assert env == [f"PATH={DEFAULT_PATH}", "HOME=/root"]
    env = container_env(cfg(envs=[("HOME", "/h")]), image_cfg(env=[]), home="/root")
    assert "HOME=/h" in env and "HOME=/root" not in env


def test_env_hostname_override_and_cri_wins_over_hostname():
    assert "HOSTNAME=node-a" in build(hostname="node-a")["process"]["env"]
    env = build(cfg(envs=[("HOSTNAME", "mine")]))["process"]["env"]
    assert env.count("HOSTNAME=mine") == 1 and not any(e == "HOSTNAME=web-0" for e in env)


def test_env_invalid_key():
    with pytest.raises(InvalidArgument, match="environment variable"):
        build(cfg(envs=[("A=B", "c")]))
    with pytest.raises(InvalidArgument):
        build(cfg(envs=[("", "c")]))


@pytest.mark.parametrize(
    "cfg_wd, image_wd, expected",
    [("/work", "/srv", "/work"), ("", "/srv", "/srv"), ("", "", "/")],
)
def test_working_dir(cfg_wd, image_wd, expected):
    assert build(cfg(working_dir=cfg_wd), image_cfg(working_dir=image_wd))["process"]["cwd"] == expected


def test_relative_working_dir_rejected():
    with pytest.raises(InvalidArgument, match="absolute"):
        build(cfg(working_dir="rel"))


def test_user_and_groups():
    spec = build(uid=1000, gid=3000, additional_gids=[3000, 100, 3000, 4000])
    assert spec["process"]["user"] == {"uid": 1000, "gid": 3000, "additionalGids": [3000, 100, 4000]}
    with pytest.raises(InvalidArgument):
        build(uid=-1)


def test_tty():
    assert build(cfg(tty=True))["process"]["terminal"] is True


# --- capabilities ---------------------------------------------------------------------------


def caps_of(spec):
    return spec["process"]["capabilities"]


def test_default_capabilities():
    c = caps_of(build())
    assert set(c["bounding"]) == set(DEFAULT_CAPABILITIES) and len(DEFAULT_CAPABILITIES) == 14
    assert c["effective"] == c["permitted"] == c["bounding"]
    assert c["inheritable"] == [] and c["ambient"] == []


@pytest.mark.parametrize(
    "add, drop, expect_in, expect_out",
    [
        (["NET_ADMIN"], [], {"CAP_NET_ADMIN", "CAP_CHOWN"}, set()),
        (["CAP_SYS_TIME"], ["chown"], {"CAP_SYS_TIME"}, {"CAP_CHOWN"}),
        (["ALL"], [], set(ALL_CAPABILITIES), set()),
        (["all"], ["NET_RAW"], set(ALL_CAPABILITIES) - {"CAP_NET_RAW"}, {"CAP_NET_RAW"}),
        ([], ["ALL"], set(), set(DEFAULT_CAPABILITIES)),
        (["NET_BIND_SERVICE"], ["ALL"], {"CAP_NET_BIND_SERVICE"}, set(DEFAULT_CAPABILITIES) - {"CAP_NET_BIND_SERVICE"}),
        (["ALL"], ["ALL"], set(), set(ALL_CAPABILITIES)),
    ],
)
def test_capability_add_drop(add, drop, expect_in, expect_out):
    sc = LinuxContainerSecurityContext(capabilities=Capability(add_capabilities=add, drop_capabilities=drop))
    got = set(caps_of(build(cfg(sc=sc)))["bounding"])
    assert expect_in <= got
    assert not (expect_out & got)


def test_drop_all_add_one_is_exact():
    caps, ambient = compute_capabilities(
        Capability(add_capabilities=["net_bind_service"], drop_capabilities=["ALL"]), DEFAULT_CAPABILITIES, False
    )
    assert caps == ["CAP_NET_BIND_SERVICE"] and ambient == []


def test_ambient_capabilities():
    sc = LinuxContainerSecurityContext(
        capabilities=Capability(drop_capabilities=["ALL"], add_ambient_capabilities=["NET_BIND_SERVICE"])
    )
    c = caps_of(build(cfg(sc=sc)))
    assert c["ambient"] == ["CAP_NET_BIND_SERVICE"] == c["inheritable"]
    assert c["permitted"] == ["CAP_NET_BIND_SERVICE"]
    with pytest.raises(InvalidArgument):
        compute_capabilities(Capability(add_ambient_capabilities=["ALL"]), DEFAULT_CAPABILITIES, False)


def test_unknown_capability():
    sc = LinuxContainerSecurityContext(capabilities=Capability(add_capabilities=["FLY"]))
    with pytest.raises(InvalidArgument, match="CAP_FLY"):
        build(cfg(sc=sc))


def test_runtime_default_capabilities_configurable():
    spec = build(runtime_cfg=RuntimeSpecConfig(default_capabilities=("CHOWN",)))
    assert caps_of(spec)["bounding"] == ["CAP_CHOWN"]


# --- privileged ------------------------------------------------------------------------------


def test_privileged_container():
    sc = LinuxContainerSecurityContext(
        privileged=True,
        capabilities=Capability(drop_capabilities=["ALL"]),
        seccomp=SecurityProfile("RuntimeDefault"),
        apparmor=SecurityProfile("Localhost", "my-profile"),
    )
    spec = build(cfg(sc=sc), sandbox=sandbox_cfg(privileged=True),
                 runtime_cfg=RuntimeSpecConfig(seccomp_default=True))
    assert caps_of(spec)["bounding"] == list(ALL_CAPABILITIES)
    lin = spec["linux"]
    assert "seccomp" not in lin
    assert "maskedPaths" not in lin and "readonlyPaths" not in lin
    assert lin["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    paths = [d["path"] for d in lin["devices"]]
    assert paths == ["/dev/null", "/dev/sda"]  # console, pts and fifos skipped
    assert "ro" not in mount_at(spec, "/sys")["options"]
    assert "ro" not in mount_at(spec, "/sys/fs/cgroup")["options"]
    # An explicitly requested AppArmor profile is still honoured.
    assert spec["process"]["apparmorProfile"] == "my-profile"


def test_privileged_without_host_devices():
    sc = LinuxContainerSecurityContext(privileged=True)
    spec = build(cfg(sc=sc), sandbox=sandbox_cfg(privileged=True),
                 runtime_cfg=RuntimeSpecConfig(privileged_without_host_devices=True))
    assert "devices" not in spec["linux"]
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]


def test_privileged_container_gets_only_the_daemons_capabilities():
    import dataclasses

    host = dataclasses.replace(HOST, current_capabilities=lambda: frozenset({"CAP_CHOWN", "CAP_SYS_ADMIN"}))
    spec = build(cfg(sc=LinuxContainerSecurityContext(privileged=True)), sandbox=sandbox_cfg(privileged=True),
                 host=host)
    assert spec["process"]["capabilities"]["bounding"] == ["CAP_CHOWN", "CAP_SYS_ADMIN"]


def test_adding_all_grants_only_the_daemons_capabilities():
    import dataclasses

    host = dataclasses.replace(HOST, current_capabilities=lambda: frozenset({"CAP_CHOWN", "CAP_SYS_ADMIN"}))
    spec = build(cfg(sc=LinuxContainerSecurityContext(capabilities=Capability(add_capabilities=["ALL"]))),
                 host=host)
    assert spec["process"]["capabilities"]["effective"] == ["CAP_CHOWN", "CAP_SYS_ADMIN"]
    # Named capabilities are passed as asked (the runtime reports what it cannot grant).
    spec = build(cfg(sc=LinuxContainerSecurityContext(capabilities=Capability(add_capabilities=["SYS_TIME"]))),
                 host=host)
    assert "CAP_SYS_TIME" in spec["process"]["capabilities"]["effective"]


def test_privileged_container_needs_privileged_sandbox():
    with pytest.raises(InvalidArgument, match="privileged pod sandbox"):
        build(cfg(sc=LinuxContainerSecurityContext(privileged=True)))


# --- rootfs, no_new_privs, masked paths ---------------------------------------------------------


def test_readonly_rootfs_and_etc_files():
    spec = build(cfg(sc=LinuxContainerSecurityContext(readonly_rootfs=True)))
    assert spec["root"]["readonly"] is True
    for dest in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
        assert "ro" in mount_at(spec, dest)["options"]
    spec = build()
    assert "rw" in mount_at(spec, "/etc/hosts")["options"]


def test_no_new_privs():
    assert build(cfg(sc=LinuxContainerSecurityContext(no_new_privs=True)))["process"]["noNewPrivileges"] is True


def test_default_masked_and_readonly_paths():
    lin = build()["linux"]
    assert lin["maskedPaths"] == list(DEFAULT_MASKED_PATHS)
    assert lin["readonlyPaths"] == list(DEFAULT_READONLY_PATHS)
    assert "/proc/kcore" in lin["maskedPaths"] and "/proc/sys" in lin["readonlyPaths"]


def test_unmasked_and_custom_paths():
    lin = build(cfg(sc=LinuxContainerSecurityContext(masked_paths=[], readonly_paths=[])))["linux"]
    assert lin["maskedPaths"] == [] and lin["readonlyPaths"] == []
    lin = build(cfg(sc=LinuxContainerSecurityContext(masked_paths=["/proc/foo"], readonly_paths=["/proc/bar"])))[
        "linux"
    ]
    assert lin["maskedPaths"] == ["/proc/foo"] and lin["readonlyPaths"] == ["/proc/bar"]
    with pytest.raises(InvalidArgument):
        build(cfg(sc=LinuxContainerSecurityContext(masked_paths=["relative"])))


# --- seccomp / apparmor / selinux ---------------------------------------------------------------


def test_seccomp_unset_follows_runtime_default_setting():
    assert "seccomp" not in build()["linux"]
    prof = build(runtime_cfg=RuntimeSpecConfig(seccomp_default=True, seccomp_arch="x86_64"))["linux"]["seccomp"]
    assert prof["defaultAction"] == "SCMP_ACT_ERRNO"


def test_seccomp_runtime_default_uses_container_caps():
    sc = LinuxContainerSecurityContext(
        seccomp=SecurityProfile("RuntimeDefault"), capabilities=Capability(add_capabilities=["SYS_ADMIN"])
    )
    prof = build(cfg(sc=sc), runtime_cfg=RuntimeSpecConfig(seccomp_arch="x86_64"))["linux"]["seccomp"]
    assert prof["architectures"][0] == "SCMP_ARCH_X86_64"
    assert any("mount" in s["names"] and s["action"] == "SCMP_ACT_ALLOW" for s in prof["syscalls"])
    sc.capabilities = None
    prof = build(cfg(sc=sc), runtime_cfg=RuntimeSpecConfig(seccomp_arch="x86_64"))["linux"]["seccomp"]
    assert not any("mount" in s["names"] and s["action"] == "SCMP_ACT_ALLOW" for s in prof["syscalls"])


def test_seccomp_unconfined():
    sc = LinuxContainerSecurityContext(seccomp=SecurityProfile("Unconfined"))
    assert "seccomp" not in build(cfg(sc=sc), runtime_cfg=RuntimeSpecConfig(seccomp_default=True))["linux"]


def test_seccomp_localhost():
    sc = LinuxContainerSecurityContext(seccomp=SecurityProfile("Localhost", "/var/lib/kubelet/seccomp/audit.json"))
    assert build(cfg(sc=sc))["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_LOG", "syscalls": []}


def test_seccomp_localhost_missing():
    sc = LinuxContainerSecurityContext(seccomp=SecurityProfile("Localhost", "/nope.json"))
    with pytest.raises(NotFound, match="/nope.json"):
        build(cfg(sc=sc))


def test_seccomp_localhost_real_loader_relative_path():
    sc = LinuxContainerSecurityContext(seccomp=SecurityProfile("Localhost", "profiles/x.json"))
    with pytest.raises(InvalidArgument, match="absolute"):
        build(cfg(sc=sc), host=HostLookups(path_exists=lambda p: True))


def test_seccomp_bad_type():
    with pytest.raises(InvalidArgument, match="profile type"):
        build(cfg(sc=LinuxContainerSecurityContext(seccomp=SecurityProfile("Strict"))))


def test_apparmor_variants():
    rc = RuntimeSpecConfig(apparmor_default_profile="moorage-default")
    assert build(runtime_cfg=rc)["process"]["apparmorProfile"] == "moorage-default"
    assert "apparmorProfile" not in build()["process"]
    sc = LinuxContainerSecurityContext(apparmor=SecurityProfile("Unconfined"))
    assert "apparmorProfile" not in build(cfg(sc=sc), runtime_cfg=rc)["process"]
    sc = LinuxContainerSecurityContext(apparmor=SecurityProfile("Localhost", "localhost/k8s-deny-write"))
    assert build(cfg(sc=sc), runtime_cfg=rc)["process"]["apparmorProfile"] == "k8s-deny-write"
    with pytest.raises(InvalidArgument):
        build(cfg(sc=LinuxContainerSecurityContext(apparmor=SecurityProfile("Localhost", ""))))


def test_selinux_labels_only_when_enabled():
    sc = LinuxContainerSecurityContext(selinux_options=SELinuxOption(level="s0:c1,c2"))
    assert "selinuxLabel" not in build(cfg(sc=sc))["process"]
    spec = build(cfg(sc=sc), runtime_cfg=RuntimeSpecConfig(selinux_enabled=True))
    assert spec["process"]["selinuxLabel"] == "system_u:system_r:container_t:s0:c1,c2"
    assert spec["linux"]["mountLabel"] == "system_u:object_r:container_file_t:s0:c1,c2"


# --- mounts --------------------------------------------------------------------------------


def test_default_mounts():
    spec = build()
    dests = [m["destination"] for m in spec["mounts"]]
    for d in ("/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/dev/shm",
              "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
        assert d in dests, d
    assert "ro" in mount_at(spec, "/sys")["options"]
    assert "ro" in mount_at(spec, "/sys/fs/cgroup")["options"]
    shm = mount_at(spec, "/dev/shm")
    assert shm["type"] == "bind" and shm["source"] == "/run/moorage/s1/shm"
    assert mount_at(spec, "/etc/resolv.conf")["source"] == "/run/moorage/s1/resolv.conf"


def test_no_sandbox_files_gives_private_shm_and_no_etc_binds():
    spec = build(shm_path=None, hostname_path=None, hosts_path=None, resolv_conf_path=None)
    assert mount_at(spec, "/dev/shm")["type"] == "tmpfs"
    assert mount_at(spec, "/etc/hosts") is None


def test_cri_mounts_options_and_propagation():
    c = cfg(
        mounts=[
            Mount(container_path="/data", host_path="/data"),
            Mount(container_path="/logs", host_path="/var/log/app", readonly=True, propagation="rslave"),
        ]
    )
    spec = build(c)
    assert mount_at(spec, "/data") == {
        "destination": "/data", "type": "bind", "source": "/data", "options": ["rbind", "rprivate", "rw"],
    }
    assert mount_at(spec, "/logs")["options"] == ["rbind", "rslave", "ro"]
    assert spec["linux"]["rootfsPropagation"] == "rslave"


def test_rshared_wins_for_rootfs_propagation():
    c = cfg(
        mounts=[
            Mount(container_path="/a", host_path="/var/log/app", propagation="rslave"),
            Mount(container_path="/b", host_path="/host/shared", propagation="rshared"),
        ]
    )
    spec = build(c)
    assert mount_at(spec, "/b")["options"] == ["rbind", "rshared", "rw"]
    assert spec["linux"]["rootfsPropagation"] == "rshared"


def test_private_mounts_leave_rootfs_propagation_unset():
    assert "rootfsPropagation" not in build(cfg(mounts=[Mount("/d", "/data")]))["linux"]


def test_recursive_read_only():
    spec = build(cfg(mounts=[Mount("/d", "/data", readonly=True, recursive_read_only=True)]))
    assert mount_at(spec, "/d")["options"] == ["rbind", "rprivate", "rro"]
    with pytest.raises(InvalidArgument, match="read-only"):
        build(cfg(mounts=[Mount("/d", "/data", readonly=False, recursive_read_only=True)]))
    with pytest.raises(InvalidArgument, match="private"):
        build(cfg(mounts=[Mount("/d", "/data", readonly=True, recursive_read_only=True, propagation="rslave")]))


def test_cri_mount_overrides_default_mount():
    c = cfg(mounts=[Mount("/etc/hosts", "/etc/foo", readonly=True), Mount("/dev/shm", "/data")])
    spec = build(c)
    assert mount_at(spec, "/etc/hosts")["source"] == "/etc/foo"
    assert mount_at(spec, "/dev/shm")["source"] == "/data"


def test_cri_mount_path_normalised_for_override():
    spec = build(cfg(mounts=[Mount("/etc//hosts/", "/etc/foo")]))
    assert mount_at(spec, "/etc/hosts")["source"] == "/etc/foo"


def test_cri_mounts_sorted_parents_first():
    c = cfg(mounts=[Mount("/m/a/b/c", "/srv/a/b/c"), Mount("/m/a", "/srv/a"), Mount("/m/a/b", "/srv/a/b")])
    dests = [m["destination"] for m in build(c)["mounts"] if m["destination"].startswith("/m/")]
    assert dests == ["/m/a", "/m/a/b", "/m/a/b/c"]


def test_missing_host_path_is_created_as_a_directory():
    made = []
    host = dataclasses.replace(HOST, ensure_dir=made.append)
    spec = build(cfg(mounts=[Mount("/x", "/does/not//exist/")]), host=host)
    assert made == ["/does/not/exist"]
    assert mount_at(spec, "/x")["source"] == "/does/not/exist"
    # An existing source is left alone.
    made.clear()
    build(cfg(mounts=[Mount("/x", "/data")]), host=host)
    assert made == []


def test_missing_host_path_that_cannot_be_created_names_it():
    def refuse(p):
        raise PermissionError(13, "Permission denied", p)

    with pytest.raises(FailedPrecondition, match="/does/not/exist"):
        build(cfg(mounts=[Mount("/x", "/does/not/exist")]), host=dataclasses.replace(HOST, ensure_dir=refuse))


@pytest.mark.parametrize("host_path", ["", "data", "./data"])
def test_empty_or_relative_host_path_is_invalid_and_nothing_is_made(host_path):
    made = []
    with pytest.raises(InvalidArgument):
        build(cfg(mounts=[Mount("/x", host_path)]), host=dataclasses.replace(HOST, ensure_dir=made.append))
    assert made == []


@pytest.mark.parametrize(
    "mount, msg",
    [
        (Mount("relative", "/data"), "absolute"),
        (Mount("/x/../etc", "/data"), r"\.\."),
        (Mount("/x", "data"), "absolute"),
        (Mount("/x", ""), "no host path"),
        (Mount("/x", "", image=ImageSpec(image="busybox")), "image volume"),
        (Mount("/x", "/data", propagation="shared"), "propagation"),
    ],
)
def test_bad_mounts(mount, msg):
    with pytest.raises(InvalidArgument, match=msg):
        build(cfg(mounts=[mount]))


def test_duplicate_mount_points():
    with pytest.raises(InvalidArgument, match="duplicate"):
        build(cfg(mounts=[Mount("/x", "/data"), Mount("/x/", "/etc/foo")]))


def test_idmapped_mount():
    m = Mount("/d", "/data", uid_mappings=[IDMapping(100000, 0, 65536)], gid_mappings=[IDMapping(100000, 0, 65536)])
    out = mount_at(build(cfg(mounts=[m])), "/d")
    assert out["uidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]


# --- devices ---------------------------------------------------------------------------------


def test_devices():
    c = cfg(devices=[Device("/dev/myfuse", "/dev/fuse", "rw"), Device("/dev/sda", "/dev/sda", "")])
    lin = build(c)["linux"]
    assert lin["devices"] == [
        {"path": "/dev/myfuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666, "uid": 0, "gid": 0},
        {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0, "fileMode": 0o660, "uid": 0, "gid": 6},
    ]
    assert lin["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"},
        {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "rwm"},
    ]


def test_device_directory_expands():
    lin = build(cfg(devices=[Device("/dev/sound", "/dev/snd", "r")]))["linux"]
    assert [d["path"] for d in lin["devices"]] == ["/dev/sound/controlC0", "/dev/sound/pcmC0D0p"]


def test_device_errors():
    with pytest.raises(NotFound, match="/dev/nothing"):
        build(cfg(devices=[Device("/dev/x", "/dev/nothing", "rwm")]))
    with pytest.raises(InvalidArgument, match="not a device"):
        build(cfg(devices=[Device("/dev/x", "/dev/regular-file", "rwm")]))
    with pytest.raises(InvalidArgument, match="permissions"):
        build(cfg(devices=[Device("/dev/x", "/dev/fuse", "rwx")]))


def test_no_devices_means_deny_all_rule_only():
    lin = build()["linux"]
    assert "devices" not in lin
    assert lin["resources"]["devices"] == [{"allow": False, "access": "rwm"}]


# --- resources ---------------------------------------------------------------------------------


def test_resources():
    res = LinuxContainerResources(
        cpu_period=100000, cpu_quota=50000, cpu_shares=512, memory_limit_in_bytes=256 << 20,
        memory_swap_limit_in_bytes=256 << 20, oom_score_adj=500, cpuset_cpus="0-1", cpuset_mems="0",
        hugepage_limits=[HugepageLimit("2MB", 4 << 20)], unified={"memory.high": "200000000"},
    )
    spec = build(cfg(res=res))
    r = spec["linux"]["resources"]
    assert r["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"}
    assert r["memory"] == {"limit": 256 << 20, "swap": 256 << 20}
    assert r["hugepageLimits"] == [{"pageSize": "2MB", "limit": 4 << 20}]
    assert r["unified"] == {"memory.high": "200000000"}
    assert spec["process"]["oomScoreAdj"] == 500


def test_linux_resources_zero_means_unset():
    assert linux_resources(LinuxContainerResources()) == {}
    assert linux_resources(None) == {}
    assert linux_resources(LinuxContainerResources(memory_limit_in_bytes=1 << 20)) == {"memory": {"limit": 1 << 20}}
    assert linux_resources(LinuxContainerResources(memory_swap_limit_in_bytes=-1)) == {"memory": {"swap": -1}}


@pytest.mark.parametrize(
    "res, msg",
    [
        (LinuxContainerResources(cpu_shares=-2), "cpu_shares"),
        (LinuxContainerResources(cpu_quota=-5), "cpu_quota"),
        (LinuxContainerResources(memory_limit_in_bytes=-1), "memory_limit"),
        (LinuxContainerResources(memory_limit_in_bytes=100, memory_swap_limit_in_bytes=50), "swap"),
        (LinuxContainerResources(hugepage_limits=[HugepageLimit("", 1)]), "page size"),
        (LinuxContainerResources(unified={"../x": "1"}), "unified"),
    ],
)
def test_bad_resources(res, msg):
    with pytest.raises(InvalidArgument, match=msg):
        linux_resources(res)


def test_oom_score_adj_range():
    with pytest.raises(InvalidArgument, match="oom_score_adj"):
        build(cfg(res=LinuxContainerResources(oom_score_adj=1001)))


# --- namespaces --------------------------------------------------------------------------------


def with_ns(**kw):
    return cfg(sc=LinuxContainerSecurityContext(namespace_options=NamespaceOption(**kw)))


def test_default_namespaces_join_sandbox():
    n = ns(build())
    assert n == {
        "mount": None,
        "network": "/run/netns/cni-123",
        "uts": f"/proc/{SANDBOX_PID}/ns/uts",
        "ipc": f"/proc/{SANDBOX_PID}/ns/ipc",
        "pid": None,  # default pid mode CONTAINER: a private pid namespace
    }


def test_network_falls_back_to_sandbox_proc_path():
    assert ns(build(netns_path=None))["network"] == f"/proc/{SANDBOX_PID}/ns/net"


def test_pid_pod_joins_sandbox():
    assert ns(build(with_ns(pid="POD")))["pid"] == f"/proc/{SANDBOX_PID}/ns/pid"


def test_pid_node_and_ipc_node_and_host_network():
    n = ns(build(with_ns(pid="NODE", ipc="NODE", network="NODE"), netns_path=None))
    assert n == {"mount": None}


def test_host_ipc_shares_node_dev_shm():
    spec = build(with_ns(ipc="NODE"), shm_path=None)
    assert mount_at(spec, "/dev/shm") == {
        "destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind", "rprivate", "rw"],
    }


def test_ipc_container_is_private():
    assert ns(build(with_ns(ipc="CONTAINER")))["ipc"] is None


def test_pid_target():
    n = ns(build(with_ns(pid="TARGET", target_id="other"), target_pid=777))
    assert n["pid"] == "/proc/777/ns/pid"
    with pytest.raises(FailedPrecondition, match="other"):
        build(with_ns(pid="TARGET", target_id="other"))
    with pytest.raises(InvalidArgument, match="target container id"):
        build(with_ns(pid="TARGET"), target_pid=777)


@pytest.mark.parametrize("kw", [dict(network="TARGET"), dict(network="CONTAINER"), dict(ipc="TARGET"),
                                dict(pid="BOGUS")])
def test_unsupported_namespace_modes(kw):
    with pytest.raises(InvalidArgument):
        build(with_ns(**kw))


def test_sandbox_not_running():
    with pytest.raises(FailedPrecondition, match="infra process"):
        build(sandbox_pid=None)


PINS = {"ipc": "/run/moorage/sandboxes/s1/ns/ipc", "uts": "/run/moorage/sandboxes/s1/ns/uts"}


def test_pinned_namespaces_of_a_pod_without_infra_are_joined_by_path():
    n = ns(build(sandbox_pid=None, sandbox_ns_paths=PINS))
    assert n == {"mount": None, "network": "/run/netns/cni-123", "uts": PINS["uts"], "ipc": PINS["ipc"], "pid": None}
    # only the kinds pinned: a host-IPC pod pins no IPC namespace, a private IPC needs none
    n = ns(build(with_ns(ipc="CONTAINER"), sandbox_pid=None, sandbox_ns_paths={"uts": PINS["uts"]}))
    assert n["uts"] == PINS["uts"] and n["ipc"] is None
    # a namespace that is neither pinned nor held by an infra process cannot be joined
    with pytest.raises(FailedPrecondition, match="infra process to share its pid namespace"):
        build(with_ns(pid="POD"), sandbox_pid=None, sandbox_ns_paths=PINS)
    with pytest.raises(FailedPrecondition, match="ipc namespace"):
        build(sandbox_pid=None, sandbox_ns_paths={"uts": PINS["uts"]})


def test_a_pod_without_infra_on_host_namespaces_gives_its_containers_the_hosts():
    sb = sandbox_cfg()
    sb.linux.security_context.namespace_options = NamespaceOption(network="NODE", ipc="NODE")
    # the container says POD (the default): the pod's are the host's, so no entry at all
    assert ns(build(sandbox=sb, sandbox_pid=None, netns_path=None, sandbox_ns_paths={})) == {"mount": None, "pid": None}
    sb.linux.security_context.namespace_options = NamespaceOption(network="NODE")
    n = ns(build(sandbox=sb, sandbox_pid=None, netns_path=None, sandbox_ns_paths={"ipc": PINS["ipc"]}))
    assert n == {"mount": None, "ipc": PINS["ipc"], "pid": None}


def test_cgroup_namespace_optional():
    assert "cgroup" not in ns(build())
    assert "cgroup" in ns(build(runtime_cfg=RuntimeSpecConfig(cgroupns=True)))


def _userns_sandbox(userns):
    sb = sandbox_cfg()
    sb.linux.security_context.namespace_options = NamespaceOption(userns_options=userns)
    return sb


def test_user_namespace_joins_sandbox():
    userns = UserNamespace(mode="POD", uids=[IDMapping(100000, 0, 65536)], gids=[IDMapping(100000, 0, 65536)])
    spec = build(with_ns(userns_options=userns), sandbox=_userns_sandbox(userns))
    assert ns(spec)["user"] == f"/proc/{SANDBOX_PID}/ns/user"
    assert spec["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]
    # A container that says nothing about it still joins its pod's user namespace.
    spec = build(sandbox=_userns_sandbox(userns))
    assert ns(spec)["user"] == f"/proc/{SANDBOX_PID}/ns/user"
    assert spec["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]


def test_container_user_namespace_must_be_its_pods():
    userns = UserNamespace(mode="POD", uids=[IDMapping(100000, 0, 65536)], gids=[IDMapping(100000, 0, 65536)])
    other = UserNamespace(mode="POD", uids=[IDMapping(200000, 0, 65536)], gids=[IDMapping(200000, 0, 65536)])
    with pytest.raises(InvalidArgument, match="userns_options: the container's user namespace must be its pod's"):
        build(with_ns(userns_options=userns))  # the pod has none
    with pytest.raises(InvalidArgument, match="must be its pod's"):
        build(with_ns(userns_options=other), sandbox=_userns_sandbox(userns))
    with pytest.raises(InvalidArgument, match="must be its pod's"):
        build(with_ns(userns_options=UserNamespace(mode="NODE")), sandbox=_userns_sandbox(userns))
    assert "user" not in ns(build(with_ns(userns_options=UserNamespace(mode="NODE"))))


def test_container_spec_sets_no_sysctls():
    sb = sandbox_cfg()
    sb.linux.sysctls = {"net.ipv4.ip_forward": "1"}
    assert "sysctl" not in build(sandbox=sb)["linux"]


# --- annotations --------------------------------------------------------------------------------


def test_annotations():
    c = cfg(annotations={"team": "a", "io.kubernetes.cri.container-type": "sandbox", "run.oci.keep_original_groups": "1"})
    sb = sandbox_cfg(annotations={"pod-level": "x"})
    a = build(c, sandbox=sb)["annotations"]
    assert a == {
        "team": "a",
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "s1",
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "prod",
        "io.kubernetes.cri.sandbox-uid": "uid-1",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.image-name": "docker.io/library/nginx:1.25",
    }


def test_annotation_allow_lists():
    c = cfg(annotations={"run.oci.keep_original_groups": "1"})
    sb = sandbox_cfg(annotations={"pod-level": "x", "other": "y"})
    rc = RuntimeSpecConfig(allowed_annotations=("run.oci.*",), pod_annotations=("pod-*",))
    a = build(c, sandbox=sb, runtime_cfg=rc)["annotations"]
    assert a["run.oci.keep_original_groups"] == "1" and a["pod-level"] == "x" and "other" not in a


def test_rlimits():
    spec = build(runtime_cfg=RuntimeSpecConfig(rlimits=(("RLIMIT_NOFILE", 1024, 4096),)))
    assert spec["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]
