"""Protobuf ↔ domain model translation.

The dataclasses in ``runtime.model`` mirror the CRI messages field by field, so
the translation is driven by the dataclass fields: same name, same shape.  The
few places where the model deliberately differs are listed in ``_SPECIAL``
(with the proto fields each reads), and every proto field the model does not
take is listed, with the reason, in ``IGNORED``: a unit test walks the proto
messages translated here and fails on any field in neither, so a field added
to api.proto is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from moorage.cri.api import api_pb2 as pb
from moorage.runtime import model, modelio
from moorage.runtime.events import EventType
from moorage.runtime.records import ContainerState, SandboxState

# model field name → proto field name, where they differ
_RENAMED = {"uid_mappings": "uidMappings", "gid_mappings": "gidMappings"}

_NOT_YET = "not supported yet"
_WINDOWS = "Windows only; moorage runs Linux containers"

#: Proto fields the model does not take: "Message.field" (or "Message.field.sub" for a
#: sub-field of a message read by a ``_SPECIAL`` function) → why.
IGNORED: dict[str, str] = {
    "PodSandboxConfig.windows": _WINDOWS,
    "LinuxSandboxSecurityContext.seccomp_profile_path": "deprecated by the CRI for seccomp (mapped); not supported",
    "ContainerConfig.windows": _WINDOWS,
    "ContainerConfig.image.annotations": "annotations of the container's image spec: " + _NOT_YET,
    "ContainerConfig.image.runtime_handler": "per-image runtime handler: " + _NOT_YET
                                             + "; the pod's runtime handler runs the container",
    "ContainerConfig.image.image_ref": "an output field (ContainerStatus of image volumes), not read from requests",
    "LinuxContainerSecurityContext.apparmor_profile": "deprecated by the CRI for apparmor (mapped); not supported",
    "LinuxContainerSecurityContext.seccomp_profile_path": "deprecated by the CRI for seccomp (mapped); not supported",
}

_hints = modelio.hints
_unwrap_optional = modelio.unwrap_optional
#: a field descriptor: protobuf's pure-Python and upb builds have different classes for it
FieldDesc = Any
M = TypeVar("M", bound=Message)


def _enum_name(fd: FieldDesc, value: int) -> str:
    v = fd.enum_type.values_by_number.get(value)
    return v.name if v is not None else str(value)


def _scalar(fd: FieldDesc, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_ENUM:
        name = _enum_name(fd, value)
        if fd.enum_type.name == "MountPropagation":
            return model.PROPAGATION_FROM_CRI.get(name, "private")
        return name
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", errors="replace")
    return value


def from_pb(cls: type, msg: Message | None) -> Any:
    """Build the dataclass ``cls`` from ``msg`` (None → ``cls()``)."""
    if msg is None:
        return cls()
    desc = msg.DESCRIPTOR
    kwargs: dict[str, Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        special = _SPECIAL.get((cls, f.name))
        if special is not None:
            kwargs[f.name] = special[0](msg)
            continue
        fd = desc.fields_by_name.get(_RENAMED.get(f.name, f.name))
        if fd is None:
            continue
        value = getattr(msg, fd.name)
        tp = _unwrap_optional(hints[f.name])
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            kwargs[f.name] = {k: _scalar(fd.message_type.fields_by_name["value"], v) for k, v in value.items()}
        elif fd.is_repeated:
            if fd.message_type is not None:
                (item,) = typing.get_args(tp)
                kwargs[f.name] = [from_pb(item, m) for m in value]
            else:
                kwargs[f.name] = [_scalar(fd, v) for v in value]
        elif fd.message_type is not None:
            if not msg.HasField(fd.name):
                kwargs[f.name] = None if f.default is None else _default(f)
            elif fd.message_type.name in ("Int64Value", "UInt64Value"):
                kwargs[f.name] = value.value
            elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
                kwargs[f.name] = from_pb(tp, value)
        else:
            kwargs[f.name] = _scalar(fd, value)
    return cls(**kwargs)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _paths_or_default(attr: str) -> Callable[[Message], list[str] | None]:
    # An empty repeated field cannot be told from an absent one: both mean
    # "the runtime's default list".
    def get(msg: Message) -> list[str] | None:
        v = list(getattr(msg, attr))
        return v or None

    return get


def _stop_signal(m: pb.ContainerConfig) -> str:
    # SIGNAL_RUNTIME_DEFAULT → "" (the image's StopSignal decides); SIGNAL_SIGUSR1 → "SIGUSR1".
    return "" if m.stop_signal == pb.SIGNAL_RUNTIME_DEFAULT else pb.Signal.Name(m.stop_signal).removeprefix("SIGNAL_")


def _envs(m: pb.ContainerConfig) -> list[tuple[str, str]]:
    return [(kv.key, kv.value.decode("utf-8", errors="replace")) for kv in m.envs]


#: Model fields filled by a function instead of by name: (model class, field) → (function of the
#: proto message, the proto fields it reads, as paths relative to that message).
_SPECIAL: dict[tuple[type, str], tuple[Callable[[Any], Any], tuple[str, ...]]] = {
    (model.ContainerConfig, "image"): (lambda m: m.image.image, ("image.image",)),
    (model.ContainerConfig, "user_specified_image"): (lambda m: m.image.user_specified_image,
                                                      ("image.user_specified_image",)),
    (model.ContainerConfig, "envs"): (_envs, ("envs.key", "envs.value")),
    (model.ContainerConfig, "stop_signal"): (_stop_signal, ("stop_signal",)),
    (model.ContainerConfig, "cdi_devices"): (lambda m: [d.name for d in m.CDI_devices], ("CDI_devices.name",)),
    (model.LinuxContainerSecurityContext, "masked_paths"): (_paths_or_default("masked_paths"), ("masked_paths",)),
    (model.LinuxContainerSecurityContext, "readonly_paths"): (_paths_or_default("readonly_paths"),
                                                              ("readonly_paths",)),
}

#: The proto messages translated into the model here (requests' configs), with their model classes.
ROOTS: tuple[tuple[str, type], ...] = (
    ("PodSandboxConfig", model.PodSandboxConfig),
    ("ContainerConfig", model.ContainerConfig),
    ("LinuxContainerResources", model.LinuxContainerResources),  # UpdateContainerResources
)


def _model_type(cls: type, name: str) -> Any:
    tp = _unwrap_optional(_hints(cls)[name])
    if typing.get_origin(tp) is list:
        (tp,) = typing.get_args(tp)
    return tp


def field_coverage(messages: dict[str, Descriptor] | None = None) -> tuple[list[str], list[str]]:
    """Walk the ``ROOTS`` (recursively through nested messages) and return
    (proto fields neither mapped nor in ``IGNORED``, ``IGNORED`` entries that name no unmapped field)."""
    by_name = messages if messages is not None else dict(pb.DESCRIPTOR.message_types_by_name)
    unmapped: set[str] = set()
    seen: set[tuple[str, type]] = set()

    def walk(desc: Descriptor, cls: type) -> None:
        if (desc.full_name, cls) in seen:
            return
        seen.add((desc.full_name, cls))
        by_proto = {_RENAMED.get(f.name, f.name): f.name for f in dataclasses.fields(cls)
                    if (cls, f.name) not in _SPECIAL}
        reads = {r for (c, _n), (_fn, rs) in _SPECIAL.items() if c is cls for r in rs}
        for fd in desc.fields:
            key = f"{desc.name}.{fd.name}"
            msg_type = fd.message_type
            is_msg = msg_type is not None and not msg_type.GetOptions().map_entry
            if fd.name in by_proto:
                tp = _model_type(cls, by_proto[fd.name])
                if msg_type is not None and is_msg and isinstance(tp, type) and dataclasses.is_dataclass(tp):
                    walk(msg_type, tp)
            elif fd.name in reads:
                pass
            elif msg_type is not None and is_msg and any(r.startswith(fd.name + ".") for r in reads):
                for sub in msg_type.fields:
                    sub_key = f"{key}.{sub.name}"
                    if f"{fd.name}.{sub.name}" not in reads:
                        unmapped.add(sub_key)
            else:
                unmapped.add(key)

    for name, cls in ROOTS:
        walk(by_name[name], cls)
    return sorted(unmapped - set(IGNORED)), sorted(set(IGNORED) - unmapped)


def sandbox_config(msg: Message) -> model.PodSandboxConfig:
    return from_pb(model.PodSandboxConfig, msg)


def container_config(msg: Message) -> model.ContainerConfig:
    return from_pb(model.ContainerConfig, msg)


def resources(msg: Message) -> model.LinuxContainerResources:
    return from_pb(model.LinuxContainerResources, msg)


# -- model → protobuf ---------------------------------------------------------------------------

_PROPAGATION_TO_CRI = {v: k for k, v in model.PROPAGATION_FROM_CRI.items()}


def to_pb(msg_cls: type[M], obj: Any) -> M:
    """Build protobuf ``msg_cls`` from a model dataclass (the inverse of ``from_pb``)."""
    msg = msg_cls()
    if obj is None:
        return msg
    desc = msg.DESCRIPTOR
    for f in dataclasses.fields(obj):
        fd = desc.fields_by_name.get(_RENAMED.get(f.name, f.name))
        value = getattr(obj, f.name)
        if fd is None or value is None or (obj.__class__, f.name) in _SPECIAL:
            continue
        target = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            target.update(dict(value))
        elif fd.is_repeated:
            if fd.message_type is not None:
                sub = getattr(pb, fd.message_type.name)
                target.extend(to_pb(sub, v) for v in value)
            else:
                target.extend(_pb_scalar(fd, v) for v in value)
        elif fd.message_type is not None:
            if fd.message_type.name in ("Int64Value", "UInt64Value"):
                target.value = value
            elif dataclasses.is_dataclass(value):
                target.CopyFrom(to_pb(getattr(pb, fd.message_type.name), value))
        else:
            setattr(msg, fd.name, _pb_scalar(fd, value))
    return msg


def _pb_scalar(fd: FieldDesc, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_ENUM:
        if fd.enum_type.name == "MountPropagation":
            value = _PROPAGATION_TO_CRI.get(value, "PROPAGATION_PRIVATE")
        v = fd.enum_type.values_by_name.get(value)
        return v.number if v is not None else 0
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.encode() if isinstance(value, str) else value
    return value


# -- runtime states and event types <-> CRI enums (only here) ------------------------------------


def sandbox_state_pb(state: SandboxState) -> pb.PodSandboxState:
    return typing.cast(pb.PodSandboxState, pb.PodSandboxState.Value(state.value))


def sandbox_state_from_pb(value: int) -> SandboxState:
    return SandboxState(pb.PodSandboxState.Name(value))


def container_state_pb(state: ContainerState) -> pb.ContainerState:
    return typing.cast(pb.ContainerState, pb.ContainerState.Value(state.value))


def container_state_from_pb(value: int) -> ContainerState:
    return ContainerState(pb.ContainerState.Name(value))


def event_type_pb(t: EventType) -> pb.ContainerEventType:
    return typing.cast(pb.ContainerEventType, pb.ContainerEventType.Value(t.value))
