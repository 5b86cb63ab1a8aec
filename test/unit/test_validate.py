"""The CRI edge's syntax checks (cri/validate.py), the wire-format explainer, the message
clipping helpers and the last guards in the runtime: valid and invalid edge cases."""

from __future__ import annotations

import grpc
import pytest

from moorage.core.errors import MAX_ECHO, MAX_MESSAGE, InvalidArgument, MoorageError, bound, clip
from moorage.cri import convert, validate, wire
from moorage.cri.api import api_pb2 as pb
from moorage.cri.edge import _decode
from moorage.cri.errors import status_for
from moorage.runtime import model, podfiles
from moorage.runtime.oci import exec_start_failure_code
from moorage.runtime.spec import normalize_sysctl_name


def refused(fn, *args, field: str, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as e:
        fn(*args, **kw)
    assert field in e.value.message, e.value.message
    assert len(e.value.message) < MAX_ECHO * 2 + 300
    return e.value.message


# -- clip and bound ------------------------------------------------------------------------------


def test_clip_escapes_and_cuts() -> None:
    assert clip("a\nb\x00") == repr("a\nb\x00")
    assert clip("") == "''"
    assert clip("x" * MAX_ECHO) == repr("x" * MAX_ECHO)
    out = clip("é" * (MAX_ECHO + 10))
    assert out.endswith("…(20 more bytes)") and "\n" not in out
    assert clip(["a", "b"]) == repr("['a', 'b']")


def test_bound_cuts_long_messages_only() -> None:
    assert bound("short") == "short"
    assert bound("x" * MAX_MESSAGE) == "x" * MAX_MESSAGE
    out = bound("x" * (MAX_MESSAGE + 5))
    assert out.startswith("x" * MAX_MESSAGE) and out.endswith("(5 more characters cut)")


def test_every_domain_error_and_status_is_bounded() -> None:
    assert len(InvalidArgument("y" * 200_000).message) < MAX_MESSAGE + 64
    code, msg = status_for(ValueError("z" * 200_000))
    assert code is grpc.StatusCode.INTERNAL and len(msg) < MAX_MESSAGE + 64
    code, msg = status_for(InvalidArgument("bad"))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "bad")


# -- primitives ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ok", ["web-0", "a", "A1", "a.b-c.d", "x" * 63, "a" * 62 + "." + "b"])
def test_hostname_valid(ok: str) -> None:
    validate.hostname(ok, "config.hostname")


@pytest.mark.parametrize("bad", ["web\n1.2.3.4 evil", "a" * 64 + ".b", "a" * 300, "-a", "a-", "a..b", ".a",
                                 "a b", "a_b", "a\x00", "é"])
def test_hostname_invalid(bad: str) -> None:
    refused(validate.hostname, bad, "config.hostname", field="config.hostname")


def test_hostname_at_64_bytes() -> None:
    validate.hostname("a" * 31 + "." + "b" * 32, "h")  # 64 bytes
    refused(validate.hostname, "a" * 32 + "." + "b" * 32, "h", field="65 bytes")


@pytest.mark.parametrize("ok", ["", "0" * 64, "abc", "my_id.1-2"])
def test_object_id_valid(ok: str) -> None:
    validate.object_id(ok, "container_id")


@pytest.mark.parametrize("bad", ["a/b", "../x", "a b", "a\nb", "a\x00", "f" * 129])
def test_object_id_invalid(bad: str) -> None:
    refused(validate.object_id, bad, "container_id", field="container_id")


@pytest.mark.parametrize("value,ok", [(None, True), (0, True), (2**32 - 2, True), (-1, False), (2**32 - 1, False),
                                      (2**63 - 1, False)])
def test_host_id_range(value: int | None, ok: bool) -> None:
    if ok:
        validate.host_id(value, "run_as_user")
    else:
        refused(validate.host_id, value, "run_as_user", field="run_as_user")


def test_host_ids_name_the_index() -> None:
    validate.host_ids([], "g")
    validate.host_ids([0, 5, 2**32 - 2], "g")
    refused(validate.host_ids, [1, 2, -3], "g", field="g[2]")


@pytest.mark.parametrize("bad,problem", [("", "empty"), ("rel/x", "absolute"), ("/a\x00", "NUL"),
                                         ("/" + "a" * 4096, "4096"), ("/" + "b" * 256, "component")])
def test_abs_path_invalid(bad: str, problem: str) -> None:
    assert problem in refused(validate.abs_path, bad, "p", field="p")


def test_abs_path_valid_and_optional() -> None:
    validate.abs_path("/a/b", "p")
    validate.abs_path("", "p", required=False)
    validate.abs_path("/" + "a" * 255, "p")


@pytest.mark.parametrize("ok", ["/data", "/proc/cpuinfo", "/proc/sys/kernel/ns_last_pid", "/sys", "/sys/fs/cgroup",
                                "/procfs", "/var/proc"])
def test_mount_destination_valid(ok: str) -> None:
    validate.mount_destination(ok, "config.mounts[0].container_path")


@pytest.mark.parametrize("bad", ["/proc", "/proc/", "/proc/sys", "/proc/1/root", "/", "//", "//proc", "/a/../proc", "data",
                                 "/x\x00"])
def test_mount_destination_invalid(bad: str) -> None:
    refused(validate.mount_destination, bad, "config.mounts[0].container_path",
            field="config.mounts[0].container_path")


def test_command() -> None:
    validate.command(["true"])
    validate.command(["sh", "-c", "echo 'a\nb'"])  # a newline is data in an argv
    refused(validate.command, [], field="cmd")
    refused(validate.command, [""], field="cmd")
    msg = refused(validate.command, ["echo", "x" * 200_000 + "\x00"], field="cmd[1]")
    assert "more bytes" in msg


def test_ports() -> None:
    validate.ports([])
    validate.ports([1, 80, 65535])
    refused(validate.ports, [80, 0], field="port[1]")
    refused(validate.ports, [65536], field="port[0]")


def test_dns_config() -> None:
    validate.dns_config(None, "d")
    validate.dns_config(model.DNSConfig(servers=["10.0.0.10", "fd00::a", "fe80::1%eth0"],
                                        searches=["svc.cluster.local"], options=["ndots:5"]), "d")
    refused(validate.dns_config, model.DNSConfig(servers=["dns.example"]), "d", field="d.servers[0]")
    refused(validate.dns_config, model.DNSConfig(searches=["a", "b\nnameserver 1.1.1.1"]), "d", field="d.searches[1]")
    refused(validate.dns_config, model.DNSConfig(options=["a b"]), "d", field="d.options[0]")
    refused(validate.dns_config, model.DNSConfig(options=[""]), "d", field="d.options[0]")
    refused(validate.dns_config, model.DNSConfig(searches=["s"] * 33), "d", field="d.searches")


def test_port_mappings() -> None:
    validate.port_mappings([], "p")
    validate.port_mappings([model.PortMapping("UDP", 53, 0, ""), model.PortMapping("SCTP", 1, 65535, "::")], "p")
    refused(validate.port_mappings, [model.PortMapping("TCP", 65536)], "p", field="p[0].container_port")
    refused(validate.port_mappings, [model.PortMapping("TCP", 1, -1)], "p", field="p[0].host_port")
    refused(validate.port_mappings, [model.PortMapping("9", 1)], "p", field="p[0].protocol")  # type: ignore[arg-type]
    refused(validate.port_mappings, [model.PortMapping("TCP", 1, 1, "1.2.3")], "p", field="p[0].host_ip")


def test_resources() -> None:
    validate.resources(None, "r")
    validate.resources(model.LinuxContainerResources(cpuset_cpus="0-3,7", cpuset_mems="0", oom_score_adj=-1000,
                                                     cpu_quota=-1, unified={"memory.high": "1G"}), "r")
    refused(validate.resources, model.LinuxContainerResources(cpuset_cpus="0-"), "r", field="r.cpuset_cpus")
    refused(validate.resources, model.LinuxContainerResources(cpuset_mems="a"), "r", field="r.cpuset_mems")
    refused(validate.resources, model.LinuxContainerResources(oom_score_adj=1001), "r", field="r.oom_score_adj")
    refused(validate.resources, model.LinuxContainerResources(cpu_shares=-1), "r", field="r: cpu_shares")
    refused(validate.resources, model.LinuxContainerResources(unified={"../x": "1"}), "r", field="r.unified")
    refused(validate.resources, model.LinuxContainerResources(unified={"memory.max": "1\x00"}), "r",
            field="r.unified")
    refused(validate.resources, model.LinuxContainerResources(
        hugepage_limits=[model.HugepageLimit(page_size="2 MB", limit=1)]), "r", field="r.hugepage_limits[0]")


def test_image_ref_and_handler() -> None:
    validate.image_ref("", "image.image")
    validate.image_ref("docker.io/library/busybox@sha256:" + "a" * 64, "image.image")
    refused(validate.image_ref, "a b", "image.image", field="image.image")
    refused(validate.image_ref, "a\nb", "image.image", field="image.image")
    refused(validate.image_ref, "a" * 5000, "image.image", field="image.image")
    validate.runtime_handler("")
    validate.runtime_handler("runc-v2.x")
    refused(validate.runtime_handler, "../runc", field="runtime_handler")


def test_log_path() -> None:
    validate.log_path("", "l")
    validate.log_path("c/0.log", "l")
    validate.log_path("/c/0.log", "l")  # a leading '/' is dropped, as containerd does
    refused(validate.log_path, "a/" * 32768, "l", field="4096")
    refused(validate.log_path, "x" * 256, "l", field="component")
    refused(validate.log_path, "a\x00", "l", field="NUL")
    refused(validate.log_path, "a\nb", "l", field="control")


# -- whole configs ---------------------------------------------------------------------------------


def pod(**kw: object) -> model.PodSandboxConfig:
    base = model.PodSandboxConfig(metadata=model.PodSandboxMetadata(name="web-0", namespace="d", uid="u"),
                                  hostname="web-0")
    for k, v in kw.items():
        setattr(base, k, v)
    return base


def linux(sysctls: dict[str, str] | None = None, network: str = "POD", **sc: object) -> model.LinuxPodSandboxConfig:
    return model.LinuxPodSandboxConfig(sysctls=sysctls or {}, security_context=model.LinuxSandboxSecurityContext(
        namespace_options=model.NamespaceOption(network=network), **sc))  # type: ignore[arg-type]


def test_sandbox_config_valid() -> None:
    validate.sandbox_config(pod())
    validate.sandbox_config(pod(linux=linux({"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1",
                                             "net/ipv4/conf/eth0.100/forwarding": "1"})))
    validate.sandbox_config(pod(hostname="", linux=linux(network="NODE")))  # the node's name is used


def test_sandbox_config_name_as_hostname() -> None:
    validate.sandbox_config(pod(hostname=""))
    validate.sandbox_config(pod(hostname="", metadata=model.PodSandboxMetadata(name="PodSandbox-" + "a" * 70)))
    refused(validate.sandbox_config, pod(hostname="", metadata=model.PodSandboxMetadata(name="a b")),
            field="config.metadata.name (the hostname")
    refused(validate.sandbox_config, pod(metadata=model.PodSandboxMetadata(name="")), field="config.metadata.name")


@pytest.mark.parametrize("sysctls,network", [
    ({"kernel.panic": "1"}, "POD"), ({"net.ipv4.ip_forward": "1"}, "NODE"), ({"net.ipv4..x": "1"}, "POD"),
    ({"net/ipv4/../../kernel/panic": "1"}, "POD"), ({"net/ipv4/./x": "1"}, "POD"), ({"net.ipv4.x y": "1"}, "POD"),
    ({"net.ipv4.x": "1\n2"}, "POD"), ({"net.ipv4.x": "1" * 5000}, "POD"), ({"": "1"}, "POD"),
])
def test_sandbox_config_sysctls_refused(sysctls: dict[str, str], network: str) -> None:
    refused(validate.sandbox_config, pod(linux=linux(sysctls, network)), field="config.linux.sysctls")


def test_sandbox_config_ids() -> None:
    refused(validate.sandbox_config, pod(linux=linux(run_as_user=-1)),
            field="config.linux.security_context.run_as_user")
    refused(validate.sandbox_config, pod(linux=linux(supplemental_groups=[0, 2**32])),
            field="config.linux.security_context.supplemental_groups[1]")


def ctr(**kw: object) -> model.ContainerConfig:
    base = model.ContainerConfig(metadata=model.ContainerMetadata(name="app"), image="busybox")
    for k, v in kw.items():
        setattr(base, k, v)
    return base


def test_container_config_valid() -> None:
    validate.container_config(ctr())
    validate.container_config(ctr(
        command=["sh", "-c", "x\ny"], envs=[("A", "="), ("B_2", "")], working_dir="/srv",
        mounts=[model.Mount(container_path="/data", host_path="/tmp"),
                model.Mount(container_path="/img", image=model.ImageSpec(image="busybox"), image_sub_path="a/b")],
        devices=[model.Device("/dev/x", "/dev/null", "rw"), model.Device("", "/dev/fuse", "")],
        log_path="app/0.log"))


@pytest.mark.parametrize("kw,field", [
    ({"metadata": model.ContainerMetadata(name="")}, "config.metadata.name"),
    ({"image": ""}, "config.image.image"),
    ({"command": ["a\x00"]}, "config.command[0]"),
    ({"args": ["ok", "b\x00"]}, "config.args[1]"),
    ({"envs": [("", "v")]}, "config.envs[0].key"),
    ({"envs": [("A", "v"), ("B=C", "v")]}, "config.envs[1].key"),
    ({"envs": [("A", "v\x00")]}, "config.envs[0].value"),
    ({"working_dir": "srv"}, "config.working_dir"),
    ({"mounts": [model.Mount(container_path="/proc/sys", host_path="/tmp")]}, "config.mounts[0].container_path"),
    ({"mounts": [model.Mount(container_path="/d", host_path="")]}, "config.mounts[0].host_path"),
    ({"mounts": [model.Mount(container_path="/d", host_path="/t", mount_options=["a\nb"])]},
     "config.mounts[0].mount_options[0]"),
    ({"devices": [model.Device("/dev/x", "/dev/null", "rwx")]}, "config.devices[0].permissions"),
    ({"devices": [model.Device("/dev/x", "null", "rw")]}, "config.devices[0].host_path"),
    ({"labels": {"a\x00": "b"}}, "config.labels"),
    ({"annotations": {"": "b"}}, "config.annotations"),
    ({"log_path": "x" * 70000}, "config.log_path"),
    ({"cdi_devices": ["vendor.com/x=a\nb"]}, "config.CDI_devices[0].name"),
])
def test_container_config_refused(kw: dict[str, object], field: str) -> None:
    refused(validate.container_config, ctr(**kw), field=field)


def test_container_security_context_refused() -> None:
    def sc(**kw: object) -> model.ContainerConfig:
        return ctr(linux=model.LinuxContainerConfig(security_context=model.LinuxContainerSecurityContext(**kw)))  # type: ignore[arg-type]

    f = "config.linux.security_context"
    refused(validate.container_config, sc(run_as_user=2**32), field=f"{f}.run_as_user")
    refused(validate.container_config, sc(run_as_group=-1), field=f"{f}.run_as_group")
    refused(validate.container_config, sc(supplemental_groups=[-1]), field=f"{f}.supplemental_groups[0]")
    refused(validate.container_config, sc(masked_paths=["rel"]), field=f"{f}.masked_paths[0]")
    refused(validate.container_config, sc(run_as_username="a\nb"), field=f"{f}.run_as_username")
    refused(validate.container_config, sc(capabilities=model.Capability(add_capabilities=["A\x00"])),
            field=f"{f}.capabilities.add_capabilities[0]")


# -- invalid bytes on the wire ------------------------------------------------------------------


def test_wire_explain_names_the_field() -> None:
    data = pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(hostname="HOSTXXXX")).SerializeToString()
    bad = data.replace(b"HOSTXXXX", b"HO\xff\xfeTXXX")
    assert wire.explain(bad, pb.RunPodSandboxRequest.DESCRIPTOR) == "config.hostname: is not valid UTF-8"
    data = pb.ExecSyncRequest(container_id="c", cmd=["ok", "ARGXXXXX"]).SerializeToString()
    bad = data.replace(b"ARGXXXXX", b"\xc0\xc0\xc0\xc0\xc0\xc0\xc0\xc0")
    assert wire.explain(bad, pb.ExecSyncRequest.DESCRIPTOR) == "cmd: is not valid UTF-8"
    assert wire.explain(data, pb.ExecSyncRequest.DESCRIPTOR) is None
    assert "cut short" in (wire.explain(data[:-2], pb.ExecSyncRequest.DESCRIPTOR) or "")
    assert "cut short" in (wire.explain(b"\xff" * 11, pb.ExecSyncRequest.DESCRIPTOR) or "")


def test_edge_decode_refuses_undecodable_bytes_naming_the_field() -> None:
    good = pb.ExecSyncRequest(container_id="c", cmd=["ARGXXXXX"])
    assert _decode(pb.ExecSyncRequest, good.SerializeToString()) == good
    with pytest.raises(InvalidArgument) as e:
        _decode(pb.ExecSyncRequest, good.SerializeToString().replace(b"ARGXXXXX", b"\xff" * 8))
    assert "runtime.v1.ExecSyncRequest" in e.value.message and "cmd" in e.value.message


def test_convert_then_validate_sees_bytes_env_values() -> None:
    msg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="a"), image=pb.ImageSpec(image="busybox"),
                             envs=[pb.KeyValue(key="A", value=b"x\x00y")])
    refused(validate.container_config, convert.container_config(msg), field="config.envs[0].value")


# -- last guards in the runtime -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["web\n6.6.6.6 evil", "a b", "a\tb", "a#b", "a" * 254, "a\x00"])
def test_pod_files_refuse_a_hostname_that_is_not_one_word(bad: str) -> None:
    with pytest.raises(MoorageError):
        podfiles.hostname_content(bad)
    with pytest.raises(MoorageError):
        podfiles.hosts_content(bad, False, None, "10.0.0.2")


def test_pod_files_write_one_hosts_line() -> None:
    assert podfiles.hostname_content("web-0") == "web-0\n"
    text = podfiles.hosts_content("web-0", False, None, "10.0.0.2")
    assert text.endswith("10.0.0.2\tweb-0\n") and text.count("web-0") == 1
    assert podfiles.hosts_content("any thing", True, "node hosts\n") == "node hosts\n"  # the node's own file


def test_sysctl_names_refuse_path_games() -> None:
    assert normalize_sysctl_name("net/ipv4/conf/eth0.100/forwarding") == "net.ipv4.conf.eth0/100.forwarding"
    for bad in ("net/ipv4/../../kernel/panic", "net/ipv4/./x", "net.ipv4.x/", "net..x", "net.x=1", "net.x y",
                "n" * 1025):
        with pytest.raises(InvalidArgument):
            normalize_sysctl_name(bad)


@pytest.mark.parametrize("text,code", [
    ('exec failed: unable to start container process: exec: "nope": executable file not found in $PATH', 127),
    ("exec failed: unable to start container process: exec /no/such: no such file or directory", 127),
    ("exec failed: unable to start container process: exec /etc/hostname: permission denied", 126),
    ("executable file `nope` not found in $PATH: No such file or directory", 127),
    ("cannot exec in a stopped container", None),
    ("", None),
])
def test_exec_start_failure_code(text: str, code: int | None) -> None:
    assert exec_start_failure_code(text) == code


def test_pod_cidr() -> None:
    validate.pod_cidr("", "p")
    validate.pod_cidr("10.244.0.0/24", "p")
    validate.pod_cidr("10.244.0.0/24,fd00::/64", "p")
    refused(validate.pod_cidr, "10.244.0.0/33", "p", field="p")
    refused(validate.pod_cidr, "10.0.0.0/8\n", "p", field="p")
    refused(validate.pod_cidr, "10.0.0.0/8,x", "p", field="p")
