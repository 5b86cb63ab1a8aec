"""Hostile CRI requests over the real socket: each gets its exact status, names its field,
leaves nothing behind and leaves the daemon answering.

One pod (with a log directory) and one running container serve every case; the
table's requests are built around them.  After each case: no new pod or
container record, no new mount, netns, process, cgroup, state or root directory,
no new log file, and a Version answers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import container_config, image_client, pod_config
from moorage.testing.runtime_env import RuntimeEnv

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MAX_DETAILS = 4096 + 64  # core.errors.MAX_MESSAGE and the cut note
MISSING_ID = "0" * 64


@dataclass
class Target:
    env: RuntimeEnv
    sid: str
    pcfg: pb.PodSandboxConfig
    cid: str
    log_dir: str


@pytest.fixture(scope="module")
def target(module_env: RuntimeEnv) -> Iterator[Target]:
    env = module_env
    log_dir = env.log_dir()
    sid, pcfg = env.run_pod(log_dir=log_dir)
    cid = env.run(sid, pcfg, ["sleep", "1000"], log_path="keep/0.log")
    try:
        yield Target(env, sid, pcfg, cid, log_dir)
    finally:
        env.cleanup()
        env.check_no_leaks()


Build = Callable[[Target], Any]


@dataclass(frozen=True)
class Case:
    id: str
    rpc: str  # RuntimeService or ImageService method
    build: Build
    code: grpc.StatusCode
    field: str  # the message names it


def pod(**kw: Any) -> Build:
    """RunPodSandbox of a pod config changed by ``kw`` (``linux=`` a LinuxPodSandboxConfig, ...)."""
    handler = kw.pop("runtime_handler", "")

    def build(t: Target) -> pb.RunPodSandboxRequest:
        cfg = pod_config(name=f"h-{uuid.uuid4().hex[:8]}", log_dir=t.log_dir)
        for k, v in kw.items():
            if k == "metadata":
                cfg.metadata.CopyFrom(v)
            elif isinstance(v, dict):
                getattr(cfg, k).update(v)
            elif isinstance(v, list):
                getattr(cfg, k).extend(v)
            elif hasattr(v, "DESCRIPTOR"):
                getattr(cfg, k).CopyFrom(v)
            else:
                setattr(cfg, k, v)
        return pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler)

    return build


def pod_linux(sc: dict[str, Any] | None = None, **kw: Any) -> Build:
    linux = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(**(sc or {})), **kw)
    return pod(linux=linux)


def ctr(sandbox_id: str = "", **kw: Any) -> Build:
    """CreateContainer in the target pod of a busybox config changed by ``kw``."""
    def build(t: Target) -> pb.CreateContainerRequest:
        cfg = container_config(t.env.busybox, ["sleep", "1"], log_path=f"h-{uuid.uuid4().hex[:6]}/0.log")
        for k, v in kw.items():
            if k == "image":
                cfg.image.image = v
            elif k == "metadata":
                cfg.metadata.CopyFrom(v)
            elif isinstance(v, dict):
                getattr(cfg, k).update(v)
            elif isinstance(v, list):
                del getattr(cfg, k)[:]
                getattr(cfg, k).extend(v)
            elif hasattr(v, "DESCRIPTOR"):
                getattr(cfg, k).CopyFrom(v)
            else:
                setattr(cfg, k, v)
        return pb.CreateContainerRequest(pod_sandbox_id=sandbox_id or t.sid, config=cfg, sandbox_config=t.pcfg)

    return build


def ctr_sc(**sc: Any) -> Build:
    return ctr(linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**sc)))


def ctr_res(**res: Any) -> Build:
    return ctr(linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(**res)))


def mount(**kw: Any) -> Build:
    m = {"container_path": "/data", "host_path": "/tmp", **kw}
    return ctr(mounts=[pb.Mount(**m)])


def env_var(key: str, value: str) -> Build:
    return ctr(envs=[pb.KeyValue(key=key, value=value.encode())])


def exec_sync(cmd: list[str], cid: str = "") -> Build:
    return lambda t: pb.ExecSyncRequest(container_id=cid or t.cid, cmd=cmd, timeout=10)


def update(**res: Any) -> Build:
    return lambda t: pb.UpdateContainerResourcesRequest(container_id=t.cid,
                                                        linux=pb.LinuxContainerResources(**res))


def ident(req: Any) -> Build:
    return lambda t: req


U32 = 2**32
HOST_NET = {"namespace_options": pb.NamespaceOption(network=pb.NODE)}
BIG_ARG = "a" * 200_000 + "\x00"

CASES: list[Case] = [
    # -- RunPodSandbox ---------------------------------------------------------------------------
    Case("hostname-newline", "RunPodSandbox", pod(hostname="web\n10.6.6.6 evil"), INVALID, "config.hostname"),
    Case("hostname-300", "RunPodSandbox", pod(hostname="a" * 300), INVALID, "config.hostname"),
    Case("hostname-65-bytes", "RunPodSandbox", pod(hostname="a" * 60 + ".bcde"), INVALID, "config.hostname"),
    Case("hostname-space", "RunPodSandbox", pod(hostname="web 1"), INVALID, "config.hostname"),
    Case("hostname-leading-dash", "RunPodSandbox", pod(hostname="-web"), INVALID, "config.hostname"),
    Case("hostname-empty-label", "RunPodSandbox", pod(hostname="web..x"), INVALID, "config.hostname"),
    Case("name-empty", "RunPodSandbox", pod(metadata=pb.PodSandboxMetadata(name="", namespace="d", uid="u")),
         INVALID, "config.metadata.name"),
    Case("name-slash", "RunPodSandbox", pod(metadata=pb.PodSandboxMetadata(name="a/b", namespace="d", uid="u")),
         INVALID, "config.metadata.name"),
    Case("name-300", "RunPodSandbox", pod(metadata=pb.PodSandboxMetadata(name="n" * 300, namespace="d", uid="u")),
         INVALID, "config.metadata.name"),
    Case("namespace-newline", "RunPodSandbox",
         pod(metadata=pb.PodSandboxMetadata(name="n", namespace="d\nx", uid="u")), INVALID,
         "config.metadata.namespace"),
    Case("uid-nul", "RunPodSandbox", pod(metadata=pb.PodSandboxMetadata(name="n", namespace="d", uid="u\x00")),
         INVALID, "config.metadata.uid"),
    Case("log-directory-relative", "RunPodSandbox", pod(log_directory="logs/x"), INVALID, "config.log_directory"),
    Case("log-directory-nul", "RunPodSandbox", pod(log_directory="/tmp/a\x00b"), INVALID, "config.log_directory"),
    Case("dns-server-not-ip", "RunPodSandbox", pod(dns_config=pb.DNSConfig(servers=["resolver.example"])),
         INVALID, "config.dns_config.servers[0]"),
    Case("dns-search-newline", "RunPodSandbox",
         pod(dns_config=pb.DNSConfig(searches=["ok.example", "a\nnameserver 6.6.6.6"])), INVALID,
         "config.dns_config.searches[1]"),
    Case("dns-option-space", "RunPodSandbox", pod(dns_config=pb.DNSConfig(options=["ndots:5 rotate"])),
         INVALID, "config.dns_config.options[0]"),
    Case("dns-too-many-searches", "RunPodSandbox",
         pod(dns_config=pb.DNSConfig(searches=[f"s{i}.example" for i in range(40)])), INVALID,
         "config.dns_config.searches"),
    Case("port-container-70000", "RunPodSandbox",
         pod(port_mappings=[pb.PortMapping(container_port=70000, host_port=8080)]), INVALID,
         "config.port_mappings[0].container_port"),
    Case("port-host-negative", "RunPodSandbox",
         pod(port_mappings=[pb.PortMapping(container_port=80), pb.PortMapping(container_port=81, host_port=-1)]),
         INVALID, "config.port_mappings[1].host_port"),
    Case("port-protocol-unknown", "RunPodSandbox",
         pod(port_mappings=[pb.PortMapping(protocol=7, container_port=80)]), INVALID,  # type: ignore[arg-type]
         "config.port_mappings[0].protocol"),
    Case("port-host-ip", "RunPodSandbox",
         pod(port_mappings=[pb.PortMapping(container_port=80, host_ip="999.1.1.1")]), INVALID,
         "config.port_mappings[0].host_ip"),
    Case("sysctl-not-namespaced", "RunPodSandbox", pod_linux(sysctls={"kernel.panic": "1"}), INVALID,
         "config.linux.sysctls"),
    Case("sysctl-slash-dotdot", "RunPodSandbox", pod_linux(sysctls={"net/ipv4/../../kernel/panic": "1"}),
         INVALID, "config.linux.sysctls"),
    Case("sysctl-dotdot", "RunPodSandbox", pod_linux(sysctls={"net.ipv4..ip_forward": "1"}), INVALID,
         "config.linux.sysctls"),
    Case("sysctl-equals", "RunPodSandbox", pod_linux(sysctls={"net.ipv4.ip_forward=1": "1"}), INVALID,
         "config.linux.sysctls"),
    Case("sysctl-value-newline", "RunPodSandbox", pod_linux(sysctls={"net.ipv4.ip_forward": "1\n0"}), INVALID,
         "config.linux.sysctls"),
    Case("sysctl-net-host-network", "RunPodSandbox",
         pod_linux(HOST_NET, sysctls={"net.ipv4.ip_forward": "1"}), INVALID, "config.linux.sysctls"),
    Case("pod-run-as-user-negative", "RunPodSandbox", pod_linux({"run_as_user": pb.Int64Value(value=-1)}),
         INVALID, "config.linux.security_context.run_as_user"),
    Case("pod-run-as-user-2^32-1", "RunPodSandbox", pod_linux({"run_as_user": pb.Int64Value(value=U32 - 1)}),
         INVALID, "config.linux.security_context.run_as_user"),
    Case("pod-run-as-group-huge", "RunPodSandbox", pod_linux({"run_as_group": pb.Int64Value(value=2**40)}),
         INVALID, "config.linux.security_context.run_as_group"),
    Case("pod-supplemental-negative", "RunPodSandbox", pod_linux({"supplemental_groups": [1, -5]}), INVALID,
         "config.linux.security_context.supplemental_groups[1]"),
    Case("pod-label-key-nul", "RunPodSandbox", pod(labels={"a\x00b": "v"}), INVALID, "config.labels"),
    Case("pod-annotation-key-nul", "RunPodSandbox", pod(annotations={"a\x00b": "v"}), INVALID,
         "config.annotations"),
    Case("runtime-handler-path", "RunPodSandbox", pod(runtime_handler="../../bin/sh"), INVALID,
         "runtime_handler"),
    Case("cgroup-parent-nul", "RunPodSandbox", pod_linux(cgroup_parent="/a\x00b"), INVALID,
         "config.linux.cgroup_parent"),
    Case("seccomp-ref-newline", "RunPodSandbox",
         pod_linux({"seccomp": pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                                                  localhost_ref="/x\n/y")}),
         INVALID, "config.linux.security_context.seccomp.localhost_ref"),
    Case("selinux-level-newline", "RunPodSandbox",
         pod_linux({"selinux_options": pb.SELinuxOption(level="s0\nx")}), INVALID,
         "config.linux.security_context.selinux_options.level"),
    Case("target-id-slash", "RunPodSandbox",
         pod_linux({"namespace_options": pb.NamespaceOption(target_id="../x")}), INVALID,
         "config.linux.security_context.namespace_options.target_id"),
    Case("overhead-cpuset", "RunPodSandbox", pod_linux(overhead=pb.LinuxContainerResources(cpuset_cpus="0-3;x")),
         INVALID, "config.linux.overhead.cpuset_cpus"),
    # -- CreateContainer --------------------------------------------------------------------------
    Case("ctr-name-empty", "CreateContainer", ctr(metadata=pb.ContainerMetadata(name="")), INVALID,
         "config.metadata.name"),
    Case("ctr-image-empty", "CreateContainer", ctr(image=""), INVALID, "config.image.image"),
    Case("ctr-image-newline", "CreateContainer", ctr(image="busybox\nx"), INVALID, "config.image.image"),
    Case("ctr-command-nul", "CreateContainer", ctr(command=["sh\x00", "-c"]), INVALID, "config.command[0]"),
    Case("ctr-args-200k-nul", "CreateContainer", ctr(args=["x", BIG_ARG]), INVALID, "config.args[1]"),
    Case("ctr-env-key-empty", "CreateContainer", env_var("", "v"), INVALID, "config.envs[0].key"),
    Case("ctr-env-key-equals", "CreateContainer", env_var("A=B", "v"), INVALID, "config.envs[0].key"),
    Case("ctr-env-key-nul", "CreateContainer", env_var("A\x00", "v"), INVALID, "config.envs[0].key"),
    Case("ctr-env-value-nul", "CreateContainer", env_var("A", "v\x00w"), INVALID, "config.envs[0].value"),
    Case("ctr-working-dir-relative", "CreateContainer", ctr(working_dir="tmp"), INVALID, "config.working_dir"),
    Case("ctr-mount-proc", "CreateContainer", mount(container_path="/proc"), INVALID,
         "config.mounts[0].container_path"),
    Case("ctr-mount-under-proc", "CreateContainer", mount(container_path="/proc/sys/kernel"), INVALID,
         "config.mounts[0].container_path"),
    Case("ctr-mount-dotdot-proc", "CreateContainer", mount(container_path="/a/../proc"), INVALID,
         "config.mounts[0].container_path"),
    Case("ctr-mount-root", "CreateContainer", mount(container_path="/"), INVALID,
         "config.mounts[0].container_path"),
    Case("ctr-mount-relative", "CreateContainer", mount(container_path="data"), INVALID,
         "config.mounts[0].container_path"),
    Case("ctr-mount-host-relative", "CreateContainer", mount(host_path="tmp"), INVALID,
         "config.mounts[0].host_path"),
    Case("ctr-mount-host-nul", "CreateContainer", mount(host_path="/tmp\x00/x"), INVALID,
         "config.mounts[0].host_path"),
    Case("ctr-device-relative", "CreateContainer",
         ctr(devices=[pb.Device(container_path="dev/x", host_path="/dev/null", permissions="rw")]), INVALID,
         "config.devices[0].container_path"),
    Case("ctr-device-permissions", "CreateContainer",
         ctr(devices=[pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwx")]), INVALID,
         "config.devices[0].permissions"),
    Case("ctr-log-path-64k", "CreateContainer", ctr(log_path="a/" * 32768), INVALID, "config.log_path"),
    Case("ctr-log-path-component", "CreateContainer", ctr(log_path="x" * 300 + "/0.log"), INVALID,
         "config.log_path"),
    Case("ctr-log-path-nul", "CreateContainer", ctr(log_path="a\x00/0.log"), INVALID, "config.log_path"),
    Case("ctr-log-path-escape", "CreateContainer", ctr(log_path="../../escape.log"), INVALID, "log path"),
    Case("ctr-run-as-user-2^32", "CreateContainer", ctr_sc(run_as_user=pb.Int64Value(value=U32)), INVALID,
         "config.linux.security_context.run_as_user"),
    Case("ctr-run-as-group-negative", "CreateContainer",
         ctr_sc(run_as_user=pb.Int64Value(value=1), run_as_group=pb.Int64Value(value=-2)), INVALID,
         "config.linux.security_context.run_as_group"),
    Case("ctr-supplemental-2^32-1", "CreateContainer", ctr_sc(supplemental_groups=[U32 - 1]), INVALID,
         "config.linux.security_context.supplemental_groups[0]"),
    Case("ctr-masked-relative", "CreateContainer", ctr_sc(masked_paths=["proc/kcore"]), INVALID,
         "config.linux.security_context.masked_paths[0]"),
    Case("ctr-cpuset", "CreateContainer", ctr_res(cpuset_cpus="abc"), INVALID,
         "config.linux.resources.cpuset_cpus"),
    Case("ctr-cpu-shares-negative", "CreateContainer", ctr_res(cpu_shares=-1), INVALID,
         "config.linux.resources: cpu_shares"),
    Case("ctr-oom-score", "CreateContainer", ctr_res(oom_score_adj=5000), INVALID,
         "config.linux.resources.oom_score_adj"),
    Case("ctr-label-key-nul", "CreateContainer", ctr(labels={"k\x00": "v"}), INVALID, "config.labels"),
    Case("ctr-sandbox-id-path", "CreateContainer", ctr(sandbox_id="../../etc"), INVALID, "pod_sandbox_id"),
    Case("ctr-sandbox-missing", "CreateContainer", ctr(sandbox_id=MISSING_ID), NOT_FOUND, MISSING_ID[:12]),
    # -- ExecSync, Exec, Attach, PortForward -------------------------------------------------------
    Case("execsync-empty", "ExecSync", exec_sync([]), INVALID, "cmd"),
    Case("execsync-nul", "ExecSync", exec_sync(["sh", "-c\x00x"]), INVALID, "cmd[1]"),
    Case("execsync-200k-nul", "ExecSync", exec_sync(["echo", BIG_ARG]), INVALID, "cmd[1]"),
    Case("execsync-id-path", "ExecSync", exec_sync(["true"], cid="x/../y"), INVALID, "container_id"),
    Case("execsync-missing-container", "ExecSync", exec_sync(["true"], cid=MISSING_ID), NOT_FOUND,
         MISSING_ID[:12]),
    Case("exec-nul", "Exec", lambda t: pb.ExecRequest(container_id=t.cid, cmd=["a\x00"], stdout=True), INVALID,
         "cmd[0]"),
    Case("exec-empty", "Exec", lambda t: pb.ExecRequest(container_id=t.cid, stdout=True), INVALID, "cmd"),
    Case("attach-id-long", "Attach", ident(pb.AttachRequest(container_id="a" * 200, stdout=True)), INVALID,
         "container_id"),
    Case("portforward-port-0", "PortForward", lambda t: pb.PortForwardRequest(pod_sandbox_id=t.sid, port=[0]),
         INVALID, "port[0]"),
    Case("portforward-port-70000", "PortForward",
         lambda t: pb.PortForwardRequest(pod_sandbox_id=t.sid, port=[80, 70000]), INVALID, "port[1]"),
    # -- other container RPCs ---------------------------------------------------------------------
    Case("update-cpuset", "UpdateContainerResources", update(cpuset_mems="0-"), INVALID, "linux.cpuset_mems"),
    Case("update-oom", "UpdateContainerResources", update(oom_score_adj=-5000), INVALID, "linux.oom_score_adj"),
    Case("update-no-linux", "UpdateContainerResources",
         lambda t: pb.UpdateContainerResourcesRequest(container_id=t.cid), INVALID, "linux"),
    Case("reopen-id-newline", "ReopenContainerLog", ident(pb.ReopenContainerLogRequest(container_id="a\nb")),
         INVALID, "container_id"),
    Case("stop-id-nul", "StopContainer", ident(pb.StopContainerRequest(container_id="a\x00")), INVALID,
         "container_id"),
    Case("status-id-long", "ContainerStatus", ident(pb.ContainerStatusRequest(container_id="f" * 300)), INVALID,
         "container_id"),
    Case("remove-pod-id-space", "RemovePodSandbox", ident(pb.RemovePodSandboxRequest(pod_sandbox_id="a b")),
         INVALID, "pod_sandbox_id"),
    Case("stats-id-slash", "ContainerStats", ident(pb.ContainerStatsRequest(container_id="a/b")), INVALID,
         "container_id"),
    Case("pod-stats-id-nul", "PodSandboxStats", ident(pb.PodSandboxStatsRequest(pod_sandbox_id="\x00")), INVALID,
         "pod_sandbox_id"),
    Case("pod-cidr-bad", "UpdateRuntimeConfig", ident(pb.UpdateRuntimeConfigRequest(runtime_config=pb.RuntimeConfig(
        network_config=pb.NetworkConfig(pod_cidr="10.0.0.0/99")))), INVALID, "runtime_config.network_config.pod_cidr"),
    # -- images --------------------------------------------------------------------------------------
    Case("pull-ref-newline", "PullImage", ident(pb.PullImageRequest(image=pb.ImageSpec(image="busybox\nx"))),
         INVALID, "image.image"),
    Case("pull-handler-path", "PullImage",
         ident(pb.PullImageRequest(image=pb.ImageSpec(image="busybox", runtime_handler="a/b"))), INVALID,
         "image.runtime_handler"),
    Case("image-status-space", "ImageStatus", ident(pb.ImageStatusRequest(image=pb.ImageSpec(image="a b"))),
         INVALID, "image.image"),
    Case("remove-image-nul", "RemoveImage", ident(pb.RemoveImageRequest(image=pb.ImageSpec(image="a\x00"))),
         INVALID, "image.image"),
]

IMAGE_RPCS = {"PullImage", "ImageStatus", "RemoveImage"}


def tree(root: str, depth: int = 3) -> set[str]:
    """Paths under ``root`` down to ``depth`` levels: where a record, bundle or log would appear."""
    out: set[str] = set()
    for dirpath, dirs, files in os.walk(root):
        level = dirpath[len(root):].count("/")
        if level >= depth:
            dirs[:] = []
        out.update(os.path.join(dirpath, n) for n in dirs + files)
    return out


def state_of(t: Target) -> dict[str, Any]:
    rt = t.env.rt
    return {
        "pods": sorted(p.id for p in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items),
        "containers": sorted(c.id for c in rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers),
        "state": tree(t.env.d.state),
        "logs": tree(t.log_dir, depth=5),
        "sandboxes": tree(os.path.join(t.env.d.root, "sandboxes"), depth=1),
        "containers_dir": tree(os.path.join(t.env.d.root, "containers"), depth=1),
    }


def call(t: Target, rpc: str, req: Any) -> Any:
    stub = image_client(t.env.d) if rpc in IMAGE_RPCS else t.env.rt
    return getattr(stub, rpc)(req, timeout=60)


def test_the_table_is_big_and_names_are_unique() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(target: Target, case: Case) -> None:
    t = target
    before = state_of(t)
    t.env.begin()
    with pytest.raises(grpc.RpcError) as e:
        call(t, case.rpc, case.build(t))
    details = e.value.details() or ""
    assert (e.value.code(), case.field in details) == (case.code, True), details[:1000]
    assert len(details.encode()) <= MAX_DETAILS
    assert "\n" not in details and "\x00" not in details  # the echo is escaped
    assert state_of(t) == before
    t.env.check_no_leaks()
    assert t.env.rt.Version(pb.VersionRequest(), timeout=10).runtime_name == "moorage"


def test_execsync_of_a_missing_binary_answers_127(target: Target) -> None:
    # As CRI-O: an answer with an exit code (the kubelet's exec probe sees a failed command).
    r = target.env.exec(target.cid, ["/no/such/binary", "arg"])
    assert r.exit_code == 127 and b"/no/such/binary" in r.stderr, r
    r = target.env.exec(target.cid, ["no-such-binary-on-path"])
    assert r.exit_code == 127 and b"no-such-binary-on-path" in r.stderr, r
    r = target.env.exec(target.cid, ["/etc/hostname"])  # not executable
    assert r.exit_code == 126, r
    assert target.env.exec(target.cid, ["true"]).exit_code == 0


def test_valid_hostname_is_the_whole_etc_hostname(target: Target) -> None:
    assert target.env.sh(target.cid, "cat /etc/hostname") == target.pcfg.hostname + "\n"


def _raw(t: Target, method: str, data: bytes) -> grpc.RpcError:
    fn = t.env.d.channel.unary_unary(method, request_serializer=lambda b: b,  # type: ignore[union-attr]
                                     response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        fn(data, timeout=30)
    return e.value


@pytest.mark.parametrize("method,build,field", [
    ("/runtime.v1.RuntimeService/RunPodSandbox",
     lambda t: pb.RunPodSandboxRequest(config=pod_config(name="utf8", hostname="HOSTXXXX")), "config.hostname"),
    ("/runtime.v1.RuntimeService/ExecSync",
     lambda t: pb.ExecSyncRequest(container_id=t.cid, cmd=["echo", "HOSTXXXX"]), "cmd"),
    ("/runtime.v1.RuntimeService/CreateContainer",
     lambda t: pb.CreateContainerRequest(pod_sandbox_id=t.sid, config=container_config(
         t.env.busybox, labels={"HOSTXXXX": "v"})), "config.labels.key"),
    ("/runtime.v1.ImageService/PullImage",
     lambda t: pb.PullImageRequest(image=pb.ImageSpec(image="HOSTXXXX")), "image.image"),
], ids=["pod-hostname", "exec-cmd", "ctr-label-key", "pull-image"])
def test_invalid_utf8_on_the_wire(target: Target, method: str, build: Callable[[Target], Any], field: str) -> None:
    before = state_of(target)
    data = build(target).SerializeToString().replace(b"HOSTXXXX", b"HO\xff\xfe\xc0TXX")
    err = _raw(target, method, data)
    assert (err.code(), field in (err.details() or "")) == (INVALID, True), err.details()
    assert "UTF-8" in (err.details() or "")
    assert state_of(target) == before
    assert target.env.rt.Version(pb.VersionRequest(), timeout=10).runtime_name == "moorage"


def test_truncated_request_is_invalid_argument(target: Target) -> None:
    data = pb.RunPodSandboxRequest(config=pod_config(name="cut")).SerializeToString()[:-3]
    err = _raw(target, "/runtime.v1.RuntimeService/RunPodSandbox", data)
    assert err.code() == INVALID, err.details()
    assert "runtime.v1.RunPodSandboxRequest" in (err.details() or "")
