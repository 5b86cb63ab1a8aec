"""Hypothesis fuzzing of the CRI → spec translation: protobuf configs through
``cri.convert``, ``cri.validate`` and the pure spec builders.

Whatever the (structurally valid) request holds, the only exceptions are domain
errors (``MoorageError``: a status for the caller), and what passes validation
reaches the spec without a NUL or a newline where the kernel, runc or a file
would read one as a separator.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moorage.core.errors import MoorageError
from moorage.cri import convert, validate
from moorage.cri.api import api_pb2 as pb
from moorage.runtime import podfiles
from moorage.runtime.model import ImageConfig
from moorage.runtime.spec import HostDevice, HostLookups, RuntimeSpecConfig, build_container_spec, build_sandbox_spec

HOST = HostLookups(
    path_exists=lambda p: True,
    devices_at=lambda p: [HostDevice(p, "c", 1, 3, 0o666)],
    load_seccomp=lambda p, caps: {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []},
    current_capabilities=lambda: None,
    ensure_dir=lambda p: None,
    hugetlb_missing=lambda p: None,
)
IMAGE = ImageConfig(env=["PATH=/bin", "A=1"], entrypoint=["/bin/sh"], cmd=["-c", "true"], working_dir="/")

EDGES = ["", "/", "..", "../x", "/proc", "/proc/sys", "/sys", "/a/../proc", "a\nb", "a\x00b", "x" * 300,
         "/tmp", "/data", "web-0", "a=b", "net.ipv4.ip_forward", "kernel.shm_rmid_forced", "kernel.panic",
         "net/ipv4/../../kernel/panic", "10.0.0.1", "::1", "0-3", "rwm", "CAP_NET_ADMIN", "ALL", " ", "\t"]
text = st.one_of(st.sampled_from(EDGES), st.text(max_size=24),
                 st.text(alphabet="abc./-_=:\n\x00 09", max_size=16))
ints = st.one_of(st.sampled_from([0, 1, -1, 65535, 65536, 2**32 - 2, 2**32 - 1, 2**32, -(2**31)]),
                 st.integers(-(2**40), 2**40))
int32s = st.one_of(st.sampled_from([0, 1, -1, 65535, 65536]), st.integers(-(2**31), 2**31 - 1))
small_lists = {"max_size": 3}


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
PATHS = st.sampled_from(["/data", "/tmp", "/srv/a", "/var/log/app", "/proc/cpuinfo", "/sys/fs/cgroup"])


class Fields:
    """Per example, a few fields (``chaos``) get hostile values and the rest valid ones, so
    the fuzzing reaches the spec builder as well as the validators."""

    def __init__(self, draw: st.DrawFn, names: list[str]) -> None:
        self.draw = draw
        self.chaos = draw(st.sets(st.sampled_from(names), max_size=2))

    def __call__(self, name: str, valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
        return self.draw(hostile if name in self.chaos else valid)


def int64(v: st.SearchStrategy[int] = ints) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), v.map(lambda x: pb.Int64Value(value=x)))


def _opt(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


IDS = st.integers(0, 2**32 - 2)
POD_FIELDS = ["name", "namespace", "uid", "hostname", "log_directory", "dns", "ports", "labels", "cgroup_parent",
              "sysctls", "ns", "run_as_user", "run_as_group", "groups", "overhead"]
CTR_FIELDS = ["name", "image", "command", "args", "working_dir", "envs", "mounts", "devices", "labels", "log_path",
              "run_as_user", "run_as_group", "groups", "masked", "caps", "resources"]


def resources(valid: bool) -> st.SearchStrategy[pb.LinuxContainerResources]:
    if valid:
        return st.builds(pb.LinuxContainerResources, cpu_shares=st.integers(0, 2**18), cpu_quota=st.integers(-1, 10**6),
                         cpu_period=st.integers(0, 10**6), memory_limit_in_bytes=st.integers(0, 2**40),
                         oom_score_adj=st.integers(-1000, 1000), cpuset_cpus=st.sampled_from(["", "0", "0-1,3"]))
    return st.builds(pb.LinuxContainerResources, cpu_shares=ints, cpu_quota=ints, cpu_period=ints,
                     memory_limit_in_bytes=ints, oom_score_adj=ints, cpuset_cpus=text, cpuset_mems=text,
                     unified=st.dictionaries(text, text, max_size=2))


@st.composite
def pod_configs(draw: st.DrawFn) -> pb.PodSandboxConfig:
    f = Fields(draw, POD_FIELDS)
    mode = st.sampled_from([0, 1, 2, 3])  # POD, CONTAINER, NODE, TARGET
    nso = f("ns", st.builds(pb.NamespaceOption, network=st.sampled_from([0, 2]), pid=st.sampled_from([0, 1, 2]),
                            ipc=st.sampled_from([0, 2])),
            st.builds(pb.NamespaceOption, network=mode, pid=mode, ipc=mode, target_id=text))
    sc = pb.LinuxSandboxSecurityContext(**_opt(
        namespace_options=nso, run_as_user=f("run_as_user", int64(IDS), int64()),
        run_as_group=f("run_as_group", int64(IDS), int64()),
        supplemental_groups=f("groups", st.lists(IDS, **small_lists), st.lists(ints, **small_lists))))
    sysctls = f("sysctls", st.dictionaries(st.sampled_from(["net.ipv4.ip_forward", "kernel.shm_rmid_forced",
                                                            "net/ipv4/conf/eth0.100/forwarding", "fs.mqueue.x"]),
                                           st.sampled_from(["0", "1", "1 2"]), max_size=2),
                st.dictionaries(text, text, max_size=3))
    linux = pb.LinuxPodSandboxConfig(
        cgroup_parent=f("cgroup_parent", st.sampled_from(["", "/kubepods"]), st.sampled_from(["/a\x00", "../x"])),
        sysctls=sysctls, security_context=sc, overhead=f("overhead", resources(True), resources(False)))
    dns = f("dns", st.builds(pb.DNSConfig, servers=st.lists(st.sampled_from(["10.0.0.10", "::1"]), max_size=2),
                             searches=st.lists(LABEL, max_size=3), options=st.lists(st.just("ndots:5"), max_size=1)),
            st.builds(pb.DNSConfig, servers=st.lists(text, **small_lists), searches=st.lists(text, **small_lists),
                      options=st.lists(text, **small_lists)))
    ports = f("ports", st.lists(st.builds(pb.PortMapping, protocol=st.sampled_from([0, 1, 2]),
                                          container_port=st.integers(1, 65535), host_port=st.integers(0, 65535)),
                                **small_lists),
              st.lists(st.builds(pb.PortMapping, protocol=st.sampled_from([0, 1, 2, 9]), container_port=int32s,
                                 host_port=int32s, host_ip=text), **small_lists))
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=f("name", LABEL, text), namespace=f("namespace", LABEL, text),
                                       uid=f("uid", LABEL, text)),
        hostname=f("hostname", LABEL, text), log_directory=f("log_directory", PATHS, text),
        dns_config=dns, port_mappings=ports,
        labels=f("labels", st.dictionaries(LABEL, LABEL, max_size=2), st.dictionaries(text, text, max_size=2)),
        linux=linux)


@st.composite
def container_configs(draw: st.DrawFn) -> pb.ContainerConfig:
    f = Fields(draw, CTR_FIELDS)
    words = st.lists(st.text(max_size=12).filter(lambda w: "\x00" not in w), **small_lists)
    hostile_words = st.lists(text, **small_lists)
    sc = pb.LinuxContainerSecurityContext(**_opt(
        run_as_user=f("run_as_user", int64(IDS), int64()), run_as_group=f("run_as_group", int64(IDS), int64()),
        supplemental_groups=f("groups", st.lists(IDS, **small_lists), st.lists(ints, **small_lists)),
        masked_paths=f("masked", st.lists(PATHS, **small_lists), hostile_words),
        capabilities=pb.Capability(add_capabilities=f("caps", st.lists(st.sampled_from(["NET_ADMIN", "CAP_CHOWN"]),
                                                                       **small_lists), hostile_words))))
    envs = f("envs", st.lists(st.builds(pb.KeyValue, key=st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True),
                                        value=st.text(max_size=12).filter(lambda w: "\x00" not in w)
                                        .map(str.encode)), **small_lists),
             st.lists(st.builds(pb.KeyValue, key=text, value=text.map(str.encode)), **small_lists))
    mounts = f("mounts", st.lists(st.builds(pb.Mount, container_path=PATHS, host_path=PATHS, readonly=st.booleans()),
                                  **small_lists),
               st.lists(st.builds(pb.Mount, container_path=text, host_path=text, readonly=st.booleans()),
                        **small_lists))
    devices = f("devices", st.lists(st.builds(pb.Device, container_path=st.just("/dev/x"),
                                              host_path=st.just("/dev/null"), permissions=st.sampled_from(["rw", ""])),
                                    max_size=1),
                st.lists(st.builds(pb.Device, container_path=text, host_path=text, permissions=text),
                         **small_lists))
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=f("name", LABEL, text)),
        image=pb.ImageSpec(image=f("image", st.just("docker.io/library/busybox:1"), text)),
        command=f("command", words, hostile_words), args=f("args", words, hostile_words),
        working_dir=f("working_dir", st.sampled_from(["", "/", "/srv"]), text),
        envs=envs, mounts=mounts, devices=devices,
        labels=f("labels", st.dictionaries(LABEL, LABEL, max_size=2), st.dictionaries(text, text, max_size=2)),
        log_path=f("log_path", st.sampled_from(["", "c/0.log"]), text),
        linux=pb.LinuxContainerConfig(resources=f("resources", resources(True), resources(False)),
                                      security_context=sc))


def no_separator(value: str, where: str) -> None:
    assert "\x00" not in value and "\n" not in value, (where, value)


def strings_in(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings_in(v)]
    return []


def sandbox_spec(cfg: Any) -> dict:
    return build_sandbox_spec(cfg, sandbox_id="s1", rootfs="/r/s1", infra_binary_path="/usr/bin/catatonit",
                              netns_path=None, cgroups_path="/kubepods/s1", runtime_cfg=RuntimeSpecConfig(),
                              shm_path="/run/s1/shm", host=HOST)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(pod_configs())
def test_pod_config_to_spec_raises_only_domain_errors(msg: pb.PodSandboxConfig) -> None:
    cfg = convert.sandbox_config(msg)
    try:
        validate.sandbox_config(cfg)
    except MoorageError:
        return
    # what passed the edge reaches the pod's files and spec without separators
    hostname = cfg.hostname or cfg.metadata.name
    assert podfiles.hostname_content(hostname) == hostname + "\n"
    assert podfiles.hosts_content(hostname, False, None, "10.0.0.2").count("\n") == 7
    for part in (cfg.dns_config.searches + cfg.dns_config.options + cfg.dns_config.servers
                 if cfg.dns_config else []):
        no_separator(part, "dns_config")
        assert " " not in part
    try:
        spec = sandbox_spec(cfg)
    except MoorageError:
        return
    json.dumps(spec)
    for k, v in spec["linux"].get("sysctl", {}).items():
        no_separator(k, "sysctl name")
        no_separator(v, "sysctl value")
        assert ".." not in k and "//" not in k
    no_separator(spec.get("hostname", ""), "hostname")


@FUZZ
@given(container_configs())
def test_container_config_to_spec_raises_only_domain_errors(msg: pb.ContainerConfig) -> None:
    cfg = convert.container_config(msg)
    try:
        validate.container_config(cfg)
    except MoorageError:
        return
    sandbox = convert.sandbox_config(pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web-0", namespace="d", uid="u"), hostname="web-0"))
    try:
        spec = build_container_spec(
            cfg, IMAGE, container_id="c1", sandbox_id="s1", sandbox_cfg=sandbox, rootfs="/r/c1",
            sandbox_pid=42, netns_path=None, uid=0, gid=0, cgroups_path="/kubepods/s1/c1",
            runtime_cfg=RuntimeSpecConfig(), hostname_path="/run/s1/hostname", hosts_path="/run/s1/hosts",
            resolv_conf_path="/run/s1/resolv.conf", shm_path="/run/s1/shm", host=HOST)
    except MoorageError:
        return
    json.dumps(spec)
    for s in spec["process"]["args"] + strings_in(spec["mounts"]):
        assert "\x00" not in s, s
    for e in spec["process"]["env"]:
        key = e.split("=", 1)[0]
        assert key and "=" in e and "\x00" not in e, e
    for m in spec["mounts"]:  # no bind over /proc but the files runc allows
        dest = "/" + m["destination"].lstrip("/")
        if m.get("type") == "bind" and (dest == "/proc" or dest.startswith("/proc/")):
            assert dest in validate.PROC_MOUNT_ALLOWED, dest
    assert spec["process"]["user"]["uid"] <= validate.MAX_ID_VALUE
