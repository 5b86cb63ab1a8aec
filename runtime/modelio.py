"""Domain model dataclasses ↔ plain JSON-able dicts (what the store keeps)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from moorage.runtime import model


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(model))


def unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def to_plain(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def from_plain(cls: type, data: Any) -> Any:
    """Rebuild a model dataclass from ``to_plain`` output (tolerates missing keys)."""
    if data is None:
        return None
    h = hints(cls)
    kwargs = {f.name: _value(h[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
    return cls(**kwargs)


def _value(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    tp = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, v)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_value(item, x) for x in v]
    if origin is tuple:
        return tuple(v)
    return v


def sandbox_config_from(d: dict) -> model.PodSandboxConfig:
    return from_plain(model.PodSandboxConfig, d)


def container_config_from(d: dict) -> model.ContainerConfig:
    return from_plain(model.ContainerConfig, d)
