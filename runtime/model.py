"""Domain model: plain dataclasses mirroring the CRI v1 messages the runtime needs.

The CRI layer (``cri/``) translates protobuf requests into these objects; nothing
below ``cri/`` sees a protobuf type.  Field names follow the proto's snake_case
(``kubernetes/cri-api`` ``pkg/apis/runtime/v1/api.proto``) so the translation is
mechanical.  A few conventions:

* ``None`` means "unset" wherever the proto distinguishes unset from a zero
  value (wrapper messages such as ``Int64Value``, optional sub-messages).
* Enums are plain strings spelled as in the proto (``"POD"``, ``"RuntimeDefault"``),
  except mount propagation, which uses the OCI/mount(8) words
  (``"private"``, ``"rslave"``, ``"rshared"``) - see ``PROPAGATION_FROM_CRI``.
* Repeated fields are lists, maps are dicts; both default to empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# --- enum spellings ----------------------------------------------------------

NamespaceMode = Literal["POD", "CONTAINER", "NODE", "TARGET"]
NAMESPACE_MODES: tuple[str, ...] = ("POD", "CONTAINER", "NODE", "TARGET")

Propagation = Literal["private", "rslave", "rshared"]
PROPAGATIONS: tuple[str, ...] = ("private", "rslave", "rshared")
#: CRI ``MountPropagation`` enum names → the words used here.
PROPAGATION_FROM_CRI: dict[str, str] = {
    "PROPAGATION_PRIVATE": "private",
    "PROPAGATION_HOST_TO_CONTAINER": "rslave",
    "PROPAGATION_BIDIRECTIONAL": "rshared",
}

ProfileType = Literal["RuntimeDefault", "Unconfined", "Localhost"]
PROFILE_TYPES: tuple[str, ...] = ("RuntimeDefault", "Unconfined", "Localhost")

Protocol = Literal["TCP", "UDP", "SCTP"]

SupplementalGroupsPolicy = Literal["Merge", "Strict"]


# --- small building blocks ---------------------------------------------------


@dataclass
class PodSandboxMetadata:
    name: str = ""
    uid: str = ""
    namespace: str = ""
    attempt: int = 0


@dataclass
class ContainerMetadata:
    name: str = ""
    attempt: int = 0


@dataclass
class DNSConfig:
    servers: list[str] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


@dataclass
class PortMapping:
    protocol: Protocol = "TCP"
    container_port: int = 0
    host_port: int = 0
    host_ip: str = ""


@dataclass
class IDMapping:
    """One range of a user-namespace id mapping."""

    host_id: int = 0
    container_id: int = 0
    length: int = 0


@dataclass
class ImageSpec:
    image: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    user_specified_image: str = ""
    runtime_handler: str = ""
    #: The resolved image id (``ImageSpec.image_ref``); set for image volumes in ContainerStatus.
    image_ref: str = ""


@dataclass
class Mount:
    container_path: str = ""
    host_path: str = ""
    readonly: bool = False
    selinux_relabel: bool = False
    propagation: Propagation = "private"
    uid_mappings: list[IDMapping] = field(default_factory=list)
    gid_mappings: list[IDMapping] = field(default_factory=list)
    recursive_read_only: bool = False
    #: An image volume.  The container-create code mounts the image and fills
    #: ``host_path`` before the spec is built; the builder only sees host paths.
    image: ImageSpec | None = None
    #: A path inside the image volume to mount instead of its root (relative, no ``..``).
    image_sub_path: str = ""
    #: Extra bind-mount flags (``noexec``, ``nosuid``, ...); see ``spec.BIND_MOUNT_OPTIONS``.
    mount_options: list[str] = field(default_factory=list)


@dataclass
class Device:
    container_path: str = ""
    host_path: str = ""
    #: Any of "r", "w", "m" (cgroup device permissions); "" means "rwm".
    permissions: str = "rwm"


@dataclass
class HugepageLimit:
    page_size: str = ""  # e.g. "2MB", "1GB"
    limit: int = 0


@dataclass
class LinuxContainerResources:
    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_in_bytes: int = 0
    oom_score_adj: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    hugepage_limits: list[HugepageLimit] = field(default_factory=list)
    unified: dict[str, str] = field(default_factory=dict)
    memory_swap_limit_in_bytes: int = 0


@dataclass
class Capability:
    add_capabilities: list[str] = field(default_factory=list)
    drop_capabilities: list[str] = field(default_factory=list)
    add_ambient_capabilities: list[str] = field(default_factory=list)

    # Short aliases used throughout the runtime.
    @property
    def add(self) -> list[str]:
        return self.add_capabilities

    @property
    def drop(self) -> list[str]:
        return self.drop_capabilities

    @property
    def add_ambient(self) -> list[str]:
        return self.add_ambient_capabilities


@dataclass
class SecurityProfile:
    profile_type: ProfileType = "RuntimeDefault"
    #: For ``Localhost``: absolute path of a seccomp JSON file, or an AppArmor
    #: profile name.
    localhost_ref: str = ""

    @property
    def type(self) -> str:
        return self.profile_type


@dataclass
class UserNamespace:
    mode: NamespaceMode = "NODE"
    uids: list[IDMapping] = field(default_factory=list)
    gids: list[IDMapping] = field(default_factory=list)


@dataclass
class NamespaceOption:
    network: NamespaceMode = "POD"
    pid: NamespaceMode = "CONTAINER"
    ipc: NamespaceMode = "POD"
    #: Container id whose pid namespace is joined when ``pid == "TARGET"``.
    target_id: str = ""
    userns_options: UserNamespace | None = None


@dataclass
class SELinuxOption:
    user: str = ""
    role: str = ""
    type: str = ""
    level: str = ""


@dataclass
class LinuxContainerSecurityContext:
    capabilities: Capability | None = None
    privileged: bool = False
    namespace_options: NamespaceOption | None = None
    selinux_options: SELinuxOption | None = None
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_username: str = ""
    readonly_rootfs: bool = False
    supplemental_groups: list[int] = field(default_factory=list)
    no_new_privs: bool = False
    #: ``None`` = the runtime's default list; a list (even empty) is used as given.
    #: (Protobuf cannot tell an empty repeated field from an absent one; the CRI
    #: layer maps an empty field to ``None`` so that paths stay masked by default.)
    masked_paths: list[str] | None = None
    readonly_paths: list[str] | None = None
    #: ``None`` = unset: the runtime config decides (``seccomp_default``).
    seccomp: SecurityProfile | None = None
    apparmor: SecurityProfile | None = None
    supplemental_groups_policy: SupplementalGroupsPolicy = "Merge"


@dataclass
class LinuxSandboxSecurityContext:
    namespace_options: NamespaceOption | None = None
    selinux_options: SELinuxOption | None = None
    run_as_user: int | None = None
    run_as_group: int | None = None
    readonly_rootfs: bool = False
    supplemental_groups: list[int] = field(default_factory=list)
    privileged: bool = False
    seccomp: SecurityProfile | None = None
    apparmor: SecurityProfile | None = None
    supplemental_groups_policy: SupplementalGroupsPolicy = "Merge"


@dataclass
class LinuxPodSandboxConfig:
    cgroup_parent: str = ""
    security_context: LinuxSandboxSecurityContext | None = None
    sysctls: dict[str, str] = field(default_factory=dict)
    #: Pod-level overhead / resources (informational for the runtime).
    overhead: LinuxContainerResources | None = None
    resources: LinuxContainerResources | None = None


@dataclass
class PodSandboxConfig:
    metadata: PodSandboxMetadata = field(default_factory=PodSandboxMetadata)
    hostname: str = ""
    log_directory: str = ""
    dns_config: DNSConfig | None = None
    port_mappings: list[PortMapping] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    linux: LinuxPodSandboxConfig | None = None


@dataclass
class LinuxContainerConfig:
    resources: LinuxContainerResources | None = None
    security_context: LinuxContainerSecurityContext | None = None


@dataclass
class ContainerConfig:
    metadata: ContainerMetadata = field(default_factory=ContainerMetadata)
    #: The image reference the kubelet asked for (``ImageSpec.image``).
    image: str = ""
    #: What the user wrote in the pod spec (``ImageSpec.user_specified_image``); the kubelet
    #: passes the image id as ``image``.
    user_specified_image: str = ""
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    working_dir: str = ""
    envs: list[tuple[str, str]] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    linux: LinuxContainerConfig | None = None
    #: Signal that stops the container, e.g. "SIGUSR1" ("" = the image's StopSignal, else SIGTERM).
    stop_signal: str = ""
    #: Fully-qualified CDI device names (``vendor.com/class=name``) the container asks for.
    cdi_devices: list[str] = field(default_factory=list)


@dataclass
class ImageConfig:
    """The part of an OCI image config (``config`` object) the runtime uses."""

    user: str = ""
    env: list[str] = field(default_factory=list)  # "KEY=value" strings
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    working_dir: str = ""
    exposed_ports: list[str] = field(default_factory=list)  # "80/tcp"
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    volumes: list[str] = field(default_factory=list)

    @classmethod
    def from_oci(cls, config: dict) -> ImageConfig:
        """Build from a parsed OCI image config document (whole doc or its ``config``)."""
        c = config.get("config", config) if isinstance(config, dict) else {}
        c = c or {}

        def strs(v: object) -> list[str]:
            return [str(x) for x in v] if isinstance(v, list) else []

        def keys(v: object) -> list[str]:
            return sorted(str(k) for k in v) if isinstance(v, dict) else []

        labels = c.get("Labels") or {}
        return cls(
            user=str(c.get("User") or ""),
            env=strs(c.get("Env")),
            entrypoint=strs(c.get("Entrypoint")),
            cmd=strs(c.get("Cmd")),
            working_dir=str(c.get("WorkingDir") or ""),
            exposed_ports=keys(c.get("ExposedPorts")),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
            stop_signal=str(c.get("StopSignal") or ""),
            volumes=keys(c.get("Volumes")),
        )
