"""build_sandbox_spec, sysctl validation, cgroups_path, model helpers."""

from __future__ import annotations

import json

import pytest

from moorage.core.errors import InvalidArgument, NotFound
from moorage.core.nspin import proc_sys_path
from moorage.runtime.model import (
    IDMapping,
    ImageConfig,
    LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext,
    NamespaceOption,
    PodSandboxConfig,
    PodSandboxMetadata,
    SecurityProfile,
    UserNamespace,
)
from moorage.runtime.spec import (
    ALL_CAPABILITIES,
    DEFAULT_MASKED_PATHS,
    INFRA_PATH_IN_CONTAINER,
    HostDevice,
    HostLookups,
    RuntimeSpecConfig,
    _real_devices_at,
    build_sandbox_spec,
    cgroups_path,
    normalize_sysctl_name,
    sandbox_needs_infra,
    sandbox_sysctls,
    split_sysctls,
    validate_sysctls,
)

HOST = HostLookups(
    path_exists=lambda p: True,
    devices_at=lambda p: None,
    load_seccomp=lambda p, caps: {"defaultAction": "SCMP_ACT_LOG", "syscalls": [], "_from": p},
    current_capabilities=lambda: None,
)


def pod(network="POD", pid="CONTAINER", ipc="POD", sysctls=None, privileged=False, seccomp=None,
        run_as_user=None, run_as_group=None, supplemental_groups=(), annotations=None, userns=None):
    return PodSandboxConfig(
        metadata=PodSandboxMetadata(name="web-0", uid="uid-1", namespace="prod", attempt=2),
        hostname="web-0",
        log_directory="/var/log/pods/prod_web-0_uid-1",
        annotations=annotations or {},
        linux=LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/pod-uid-1",
            sysctls=dict(sysctls or {}),
            security_context=LinuxSandboxSecurityContext(
                namespace_options=NamespaceOption(network=network, pid=pid, ipc=ipc, userns_options=userns),
                privileged=privileged,
                seccomp=seccomp,
                run_as_user=run_as_user,
                run_as_group=run_as_group,
                supplemental_groups=list(supplemental_groups),
            ),
        ),
    )


def build(cfg=None, **kw):
    args = dict(
        sandbox_id="s1",
        rootfs="/var/lib/moorage/sandboxes/s1/rootfs",
        infra_binary_path="/usr/bin/catatonit",
        netns_path="/run/netns/cni-123",
        cgroups_path="/kubepods/pod-uid-1/s1",
        runtime_cfg=RuntimeSpecConfig(),
        shm_path="/run/moorage/sandboxes/s1/shm",
        host=HOST,
    )
    args.update(kw)
    spec = build_sandbox_spec(cfg or pod(), **args)
    json.dumps(spec)
    return spec


def ns(spec):
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


def mount_at(spec, dest):
    found = [m for m in spec["mounts"] if m["destination"] == dest]
    return found[0] if found else None


def test_shape():
    spec = build()
    assert spec["ociVersion"] == "1.0.2"
    assert set(spec) == {"ociVersion", "process", "root", "hostname", "mounts", "annotations", "linux"}
    assert spec["root"] == {"path": "/var/lib/moorage/sandboxes/s1/rootfs", "readonly": True}
    assert spec["hostname"] == "web-0"
    p = spec["process"]
    assert p["args"] == [INFRA_PATH_IN_CONTAINER, "-P"]
    assert p["cwd"] == "/" and p["terminal"] is False
    assert p["oomScoreAdj"] == -998
    assert p["noNewPrivileges"] is True
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert p["capabilities"]["bounding"] == []
    assert spec["linux"]["cgroupsPath"] == "/kubepods/pod-uid-1/s1"
    assert spec["linux"]["resources"]["cpu"] == {"shares": 2}
    assert spec["linux"]["maskedPaths"] == list(DEFAULT_MASKED_PATHS)


def test_infra_binary_bind_mounted_read_only():
    m = mount_at(build(), INFRA_PATH_IN_CONTAINER)
    assert m["source"] == "/usr/bin/catatonit" and m["type"] == "bind" and "ro" in m["options"]


def test_minimal_mounts():
    spec = build()
    dests = {m["destination"] for m in spec["mounts"]}
    assert {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", INFRA_PATH_IN_CONTAINER} == dests
    assert mount_at(spec, "/dev/shm")["source"] == "/run/moorage/sandboxes/s1/shm"
    spec = build(shm_path=None, resolv_conf_path="/r", hosts_path="/h", hostname_path="/n")
    assert mount_at(spec, "/dev/shm")["type"] == "tmpfs"
    assert mount_at(spec, "/etc/resolv.conf")["source"] == "/r"
    assert mount_at(spec, "/etc/hosts")["source"] == "/h"
    assert mount_at(spec, "/etc/hostname")["source"] == "/n"


def test_pod_network_namespaces():
    assert ns(build()) == {"mount": None, "network": "/run/netns/cni-123", "uts": None, "ipc": None, "pid": None}


def test_pod_network_without_path_gets_fresh_netns():
    assert ns(build(netns_path=None))["network"] is None


def test_host_network():
    spec = build(pod(network="NODE"), netns_path=None)
    n = ns(spec)
    assert "network" not in n and "uts" not in n
    assert "hostname" not in spec
    with pytest.raises(InvalidArgument, match="host network"):
        build(pod(network="NODE"), netns_path="/run/netns/x")


def test_host_ipc_and_pid():
    spec = build(pod(ipc="NODE", pid="NODE"), shm_path=None)
    n = ns(spec)
    assert "ipc" not in n and "pid" not in n
    shm = mount_at(spec, "/dev/shm")
    assert shm["type"] == "bind" and shm["source"] == "/dev/shm"


def test_pid_pod_mode_still_gets_own_pid_namespace():
    assert "pid" in ns(build(pod(pid="POD")))


def test_target_mode_rejected_for_sandbox():
    with pytest.raises(InvalidArgument, match="TARGET"):
        build(pod(pid="TARGET"))


def test_cgroupns_and_userns():
    userns = UserNamespace(mode="POD", uids=[IDMapping(200000, 0, 65536)], gids=[IDMapping(200000, 0, 65536)])
    spec = build(pod(userns=userns), runtime_cfg=RuntimeSpecConfig(cgroupns=True))
    n = ns(spec)
    assert "cgroup" in n and "user" in n
    assert spec["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 200000, "size": 65536}]
    with pytest.raises(InvalidArgument, match="mappings"):
        build(pod(userns=UserNamespace(mode="POD")))


def _m(host, length=65536, ctr=0):
    return IDMapping(host_id=host, container_id=ctr, length=length)


@pytest.mark.parametrize(("uids", "gids", "cfg", "match"), [
    ([_m(65536), _m(131072, ctr=100)], None, None, r"uids\[1\]\.container_id: range 100\+65536 overlaps uids\[0\]"),
    ([_m(65536), _m(100000, ctr=70000)], None, None, r"uids\[1\]\.host_id: range 100000\+65536 overlaps"),
    ([_m(65536), _m(196608, ctr=65536)], None, None, r"uids: 2 ranges given; moorage needs exactly one"),
    ([_m(65536, length=100000)], None, None, r"uids\[0\]\.length: 100000 is not a multiple of 65536"),
    (None, [_m(65536, length=0)], None, r"gids\[0\]\.length: must be positive"),
    ([_m(65536, ctr=1)], None, None, r"uids\[0\]\.container_id: must be 0"),
    ([_m(0)], None, None, r"uids\[0\]\.host_id: 0 would map"),
    ([_m(4294901760 + 65536)], None, None, r"uids\[0\]\.host_id: range .* leaves the 32-bit id space"),
    ([], None, None, r"uids: a pod user namespace needs uid and gid mappings"),
    # critest's mapping (0 1000 100000) is fine where the multiple is switched off.
    ([_m(1000, length=100000)], [_m(1000, length=100000)], RuntimeSpecConfig(userns_length_multiple=1), None),
])
def test_bad_userns_mappings_name_the_field(uids, gids, cfg, match):
    good = [_m(65536)]
    userns = UserNamespace(mode="POD", uids=good if uids is None else uids, gids=good if gids is None else gids)
    if match is None:
        assert "user" in ns(build(pod(userns=userns), runtime_cfg=cfg))
        return
    with pytest.raises(InvalidArgument, match="linux.security_context.namespace_options.userns_options." + match):
        build(pod(userns=userns), runtime_cfg=cfg or RuntimeSpecConfig())


@pytest.mark.parametrize(("userns", "match"), [
    (UserNamespace(mode="NODE", uids=[_m(65536)], gids=[_m(65536)]), "mode NODE .* takes no uid/gid mappings"),
    (UserNamespace(mode="CONTAINER"), "mode CONTAINER is not supported"),
    (UserNamespace(mode="TARGET"), "mode TARGET is not supported"),
])
def test_bad_userns_modes(userns, match):
    with pytest.raises(InvalidArgument, match=match):
        build(pod(userns=userns))


def test_userns_mode_node_is_the_host_namespace():
    spec = build(pod(userns=UserNamespace(mode="NODE")))
    assert "user" not in ns(spec) and "uidMappings" not in spec["linux"]


def test_run_as_user_and_groups():
    spec = build(pod(run_as_user=65534, run_as_group=65534, supplemental_groups=[5]))
    assert spec["process"]["user"] == {"uid": 65534, "gid": 65534, "additionalGids": [65534, 5]}


def test_privileged_sandbox():
    spec = build(pod(privileged=True, seccomp=SecurityProfile("RuntimeDefault")))
    assert spec["process"]["capabilities"]["bounding"] == list(ALL_CAPABILITIES)
    assert "seccomp" not in spec["linux"] and "maskedPaths" not in spec["linux"]
    assert "ro" not in mount_at(spec, "/sys")["options"]


def test_seccomp_variants():
    assert "seccomp" not in build()["linux"]
    rc = RuntimeSpecConfig(seccomp_default=True, seccomp_arch="x86_64")
    assert build(runtime_cfg=rc)["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert build(pod(seccomp=SecurityProfile("RuntimeDefault")))["linux"]["seccomp"]["defaultErrnoRet"] == 1
    assert "seccomp" not in build(pod(seccomp=SecurityProfile("Unconfined")), runtime_cfg=rc)["linux"]
    local = build(pod(seccomp=SecurityProfile("Localhost", "/p.json")))["linux"]["seccomp"]
    assert local["_from"] == "/p.json"


def test_seccomp_localhost_bad_path_with_real_loader(tmp_path):
    real = HostLookups(path_exists=lambda p: True)
    with pytest.raises(NotFound, match="does not exist"):
        build(pod(seccomp=SecurityProfile("Localhost", str(tmp_path / "missing.json"))), host=real)


def test_annotations():
    a = build(pod(annotations={"foo": "bar", "keep-me": "1"}),
              runtime_cfg=RuntimeSpecConfig(pod_annotations=("keep-*",)))["annotations"]
    assert a == {
        "keep-me": "1",
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": "s1",
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "prod",
        "io.kubernetes.cri.sandbox-uid": "uid-1",
        "io.kubernetes.cri.sandbox-log-directory": "/var/log/pods/prod_web-0_uid-1",
    }


def test_minimal_config_without_linux_section():
    spec = build(PodSandboxConfig(metadata=PodSandboxMetadata(name="x", uid="u", namespace="n")))
    assert spec["process"]["args"][1] == "-P"
    assert "hostname" not in spec  # no hostname requested


def test_empty_sandbox_id():
    with pytest.raises(InvalidArgument):
        build(sandbox_id="")


# --- sysctls ------------------------------------------------------------------------------------


def test_sysctls_in_sandbox_spec():
    spec = build(pod(sysctls={"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1",
                              "net/ipv4/conf/eth0.100/forwarding": "1"}))
    assert spec["linux"]["sysctl"] == {
        "net.ipv4.ip_forward": "1",
        "kernel.shm_rmid_forced": "1",
        "net.ipv4.conf.eth0/100.forwarding": "1",
    }


def test_sandbox_sysctls_and_their_namespaces():
    rc = RuntimeSpecConfig(default_sysctls={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.msgmax": "9"})
    got = sandbox_sysctls(pod(sysctls={"kernel.msgmax": "10", "fs.mqueue.msg_max": "20", "kernel.sem": "1 2 3 4"}),
                          rc)
    assert got == build(pod(sysctls={"kernel.msgmax": "10", "fs.mqueue.msg_max": "20", "kernel.sem": "1 2 3 4"}),
                        runtime_cfg=rc)["linux"]["sysctl"]
    net, ipc = split_sysctls(got)
    assert net == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert ipc == {"kernel.msgmax": "10", "fs.mqueue.msg_max": "20", "kernel.sem": "1 2 3 4"}
    assert split_sysctls({}) == ({}, {})
    with pytest.raises(InvalidArgument, match="not namespaced"):
        sandbox_sysctls(pod(sysctls={"vm.swappiness": "1"}))


def test_which_pods_need_an_infra_process():
    assert not sandbox_needs_infra(pod())
    assert not sandbox_needs_infra(pod(network="NODE", ipc="NODE"))
    assert not sandbox_needs_infra(PodSandboxConfig(metadata=PodSandboxMetadata(name="p", uid="u", namespace="n")))
    assert sandbox_needs_infra(pod(pid="POD"))  # a shared PID namespace needs its PID 1
    userns = UserNamespace(mode="POD", uids=[IDMapping(100000, 0, 65536)], gids=[IDMapping(100000, 0, 65536)])
    p = pod()
    p.linux.security_context.namespace_options.userns_options = userns
    assert sandbox_needs_infra(p)


def test_proc_sys_paths_stay_under_proc_sys():
    assert proc_sys_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert proc_sys_path("net.ipv4.conf.eth0/100.forwarding") == "/proc/sys/net/ipv4/conf/eth0.100/forwarding"
    for bad in ("net.//.x", "net./.x", "net..x", "", "net.a\x00"):
        with pytest.raises(InvalidArgument):
            proc_sys_path(bad)


def test_default_sysctls_merged_and_skipped_when_host_shared():
    rc = RuntimeSpecConfig(default_sysctls={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.msgmax": "9"})
    spec = build(pod(sysctls={"kernel.msgmax": "10"}), runtime_cfg=rc)
    assert spec["linux"]["sysctl"] == {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.msgmax": "10"}
    spec = build(pod(network="NODE", ipc="NODE"), netns_path=None, runtime_cfg=rc)
    assert "sysctl" not in spec["linux"]


@pytest.mark.parametrize(
    "sysctls, kw, msg",
    [
        ({"vm.swappiness": "10"}, {}, "not namespaced"),
        ({"kernel.pid_max": "10"}, {}, "not namespaced"),
        ({"kernel.hostname": "x"}, {}, "not namespaced"),
        ({"net.ipv4.ip_forward": "1"}, {"network": "NODE"}, "host network"),
        ({"kernel.sem": "1 2 3 4"}, {"ipc": "NODE"}, "host IPC"),
        ({"fs.mqueue.msg_max": "10"}, {"ipc": "NODE"}, "host IPC"),
        ({"net..x": "1"}, {}, "invalid sysctl"),
        ({"net.ipv4.ip_forward": "1\nvm.x=1"}, {}, "invalid value"),
    ],
)
def test_sysctl_validation(sysctls, kw, msg):
    with pytest.raises(InvalidArgument, match=msg):
        build(pod(sysctls=sysctls, **kw), netns_path=None)


def test_validate_sysctls_direct():
    assert validate_sysctls({"kernel.msgmnb": "1"}, host_network=True, host_ipc=False) == {"kernel.msgmnb": "1"}
    assert validate_sysctls({"net.core.somaxconn": "1"}, host_network=False, host_ipc=True) == {
        "net.core.somaxconn": "1"
    }


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("net.ipv4.ip_forward", "net.ipv4.ip_forward"),
        ("net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        ("net/ipv4/conf/eth0.100/rp_filter", "net.ipv4.conf.eth0/100.rp_filter"),
        ("net.ipv4.conf.eth0/100.rp_filter", "net.ipv4.conf.eth0/100.rp_filter"),
    ],
)
def test_sysctl_name_forms(raw, expected):
    assert normalize_sysctl_name(raw) == expected


# --- cgroups_path -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "driver, parent, expected",
    [
        ("cgroupfs", "/kubepods/burstable/pod1", "/kubepods/burstable/pod1/abc"),
        ("cgroupfs", "kubepods/pod1/", "/kubepods/pod1/abc"),
        ("cgroupfs", "", "/moorage/abc"),
        ("systemd", "kubepods-besteffort-pod1.slice", "kubepods-besteffort-pod1.slice:moorage:abc"),
        ("systemd", "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice",
         "kubepods-besteffort-pod1.slice:moorage:abc"),
        ("systemd", "", "system.slice:moorage:abc"),
    ],
)
def test_cgroups_path(driver, parent, expected):
    assert cgroups_path(driver, parent, "abc") == expected


@pytest.mark.parametrize(
    "driver, parent, id, msg",
    [
        ("systemd", "/kubepods/pod1", "abc", "systemd slice"),
        ("cgroupfs", "system.slice:moorage:x", "abc", "systemd"),
        ("cgroupfs", "/a/../b", "abc", r"\.\."),
        ("cgroupfs", "/a", "a/b", "invalid id"),
        ("cgroupfs", "/a", "", "invalid id"),
        ("openrc", "/a", "abc", "unknown cgroup driver"),
    ],
)
def test_cgroups_path_errors(driver, parent, id, msg):
    with pytest.raises(InvalidArgument, match=msg):
        cgroups_path(driver, parent, id)


def test_cgroups_path_scope_prefix():
    assert cgroups_path("systemd", "kubepods.slice", "x", scope_prefix="cri") == "kubepods.slice:cri:x"


# --- default host look-ups and model helpers -----------------------------------------------------


def test_real_devices_at(tmp_path):
    assert _real_devices_at(str(tmp_path / "missing")) is None
    f = tmp_path / "file"
    f.write_text("x")
    assert _real_devices_at(str(f)) == []
    (null,) = _real_devices_at("/dev/null")
    assert (null.type, null.major, null.minor) == ("c", 1, 3)
    assert isinstance(null, HostDevice)


def test_image_config_from_oci():
    doc = {
        "architecture": "amd64",
        "config": {
            "User": "nginx:nginx",
            "Env": ["PATH=/usr/bin", "A=1"],
            "Entrypoint": ["/ep"],
            "Cmd": None,
            "WorkingDir": "/w",
            "ExposedPorts": {"80/tcp": {}, "443/tcp": {}},
            "Labels": {"k": "v"},
            "StopSignal": "SIGQUIT",
            "Volumes": {"/data": {}},
        },
    }
    ic = ImageConfig.from_oci(doc)
    assert ic == ImageConfig(
        user="nginx:nginx", env=["PATH=/usr/bin", "A=1"], entrypoint=["/ep"], cmd=[], working_dir="/w",
        exposed_ports=["443/tcp", "80/tcp"], labels={"k": "v"}, stop_signal="SIGQUIT", volumes=["/data"],
    )
    assert ImageConfig.from_oci({"config": None}) == ImageConfig()
