"""Dataclasses <-> plain JSON-able dicts: the one codec for what the store keeps.

Used for the domain model (``runtime.model``) and the records built on it
(``runtime.records``).  Decoding follows the type hints: nested dataclasses,
lists, tuples, optionals and enums; missing keys take the field's default, and
unknown keys are ignored (a newer or older writer).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved field types of ``cls`` (names resolved in its own module)."""
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def to_plain(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def from_plain(cls: type[T], data: Any) -> T:
    """Rebuild a dataclass from ``to_plain`` output (tolerates missing and unknown keys)."""
    if data is None:
        return None  # type: ignore[return-value]  # an unset optional sub-message
    h = hints(typing.cast(type, cls))
    kwargs = {f.name: _value(h[f.name], data[f.name]) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.name in data}
    return cls(**kwargs)


def _value(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    tp = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, v)  # type: ignore[arg-type]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(v)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_value(item, x) for x in v]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], x) for x in v)
        if args and len(args) == len(v):
            return tuple(_value(a, x) for a, x in zip(args, v, strict=True))
        return tuple(v)
    if origin is dict:
        _, item = typing.get_args(tp)
        return {k: _value(item, x) for k, x in v.items()}
    return v
