"""Protobuf ↔ domain model translation.

The dataclasses in ``runtime.model`` mirror the CRI messages field by field, so
the translation is driven by the dataclass fields: same name, same shape.  The
few places where the model deliberately differs are listed in ``_SPECIAL``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from moorage.runtime import model, modelio

# model field name → proto field name, where they differ
_RENAMED = {"uid_mappings": "uidMappings", "gid_mappings": "gidMappings"}


_hints = modelio.hints
_unwrap_optional = modelio.unwrap_optional


def _enum_name(fd: FieldDescriptor, value: int) -> str:
    v = fd.enum_type.values_by_number.get(value)
    return v.name if v is not None else str(value)


def _scalar(fd: FieldDescriptor, value: Any) -> Any:
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
            kwargs[f.name] = special(msg)
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
            elif dataclasses.is_dataclass(tp):
                kwargs[f.name] = from_pb(tp, value)
        else:
            kwargs[f.name] = _scalar(fd, value)
    return cls(**kwargs)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _paths_or_default(attr: str):
    # An empty repeated field cannot be told from an absent one: both mean
    # "the runtime's default list".
    def get(msg: Message) -> list[str] | None:
        v = list(getattr(msg, attr))
        return v or None

    return get


_SPECIAL: dict[tuple[type, str], Any] = {
    (model.ContainerConfig, "image"): lambda m: m.image.image,
    (model.ContainerConfig, "user_specified_image"): lambda m: m.image.user_specified_image,
    (model.ContainerConfig, "envs"): lambda m: [(kv.key, kv.value.decode("utf-8", errors="replace")) for kv in m.envs],
    (model.LinuxContainerSecurityContext, "masked_paths"): _paths_or_default("masked_paths"),
    (model.LinuxContainerSecurityContext, "readonly_paths"): _paths_or_default("readonly_paths"),
}


def sandbox_config(msg: Message) -> model.PodSandboxConfig:
    return from_pb(model.PodSandboxConfig, msg)


def container_config(msg: Message) -> model.ContainerConfig:
    return from_pb(model.ContainerConfig, msg)


def resources(msg: Message) -> model.LinuxContainerResources:
    return from_pb(model.LinuxContainerResources, msg)


# -- model → plain dict (what the store keeps) and back: runtime.modelio --------------------

to_dict = modelio.to_plain
from_dict = modelio.from_plain


# -- model → protobuf ---------------------------------------------------------------------------

_PROPAGATION_TO_CRI = {v: k for k, v in model.PROPAGATION_FROM_CRI.items()}


def to_pb(msg_cls: type, obj: Any) -> Message:
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
            target.update({k: v for k, v in value.items()})
        elif fd.is_repeated:
            if fd.message_type is not None:
                sub = getattr(_api(), fd.message_type.name)
                target.extend(to_pb(sub, v) for v in value)
            else:
                target.extend(_pb_scalar(fd, v) for v in value)
        elif fd.message_type is not None:
            if fd.message_type.name in ("Int64Value", "UInt64Value"):
                target.value = value
            elif dataclasses.is_dataclass(value):
                target.CopyFrom(to_pb(getattr(_api(), fd.message_type.name), value))
        else:
            setattr(msg, fd.name, _pb_scalar(fd, value))
    return msg


def _pb_scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_ENUM:
        if fd.enum_type.name == "MountPropagation":
            value = _PROPAGATION_TO_CRI.get(value, "PROPAGATION_PRIVATE")
        v = fd.enum_type.values_by_name.get(value)
        return v.number if v is not None else 0
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.encode() if isinstance(value, str) else value
    return value


@functools.cache
def _api():
    from moorage.cri.api import api_pb2

    return api_pb2
