"""Per-object CRI messages built once and kept until the object changes.

The kubelet lists every container and sandbox every second and asks each one's status more often
still; building each message anew (the generic converter, a deep copy of the config) cost more than
everything else in those calls.  A record's metadata and status are immutable objects that are
replaced, never changed, when the record changes (``runtime/records.py``), so "has it changed" is
two identity checks; the image a container shows (repo digest, id, tag) is compared by value.  A
slot holds the message and its serialized bytes, from which ``cri.wire`` joins responses.

Slots of removed objects go at the next ``prune`` (each unfiltered List prunes to what it saw),
and holding the old metadata and status alive is what makes the identity check sound.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message

from moorage.cri.encoded import field


class _Record(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def metadata(self) -> object: ...
    @property
    def status(self) -> object: ...


R = TypeVar("R", bound=_Record)
P = TypeVar("P", bound=Message)


@dataclass(slots=True)
class Slot(Generic[P]):
    metadata: object
    status: object
    extra: Hashable
    msg: P
    raw: bytes  # msg.SerializeToString()
    entry: bytes  # raw as field 1 of a response (ListX's items, XStatus's status)


class ObjectCache(Generic[R, P]):
    """id -> the message ``build(record, extra)`` made, rebuilt when the record or ``extra`` changes."""

    def __init__(self, build: Callable[[R, Any], P]) -> None:
        self._build = build
        self._slots: dict[str, Slot[P]] = {}
        self.builds = 0  # messages built (not served from the cache): for tests and profiling

    def get(self, rec: R, extra: Hashable = None) -> Slot[P]:
        """The slot for ``rec``; ``extra`` is what else the message depends on (compared by value)."""
        s = self._slots.get(rec.id)
        if s is not None and s.metadata is rec.metadata and s.status is rec.status and s.extra == extra:
            return s
        msg = self._build(rec, extra)
        self.builds += 1
        raw = msg.SerializeToString()
        s = Slot(rec.metadata, rec.status, extra, msg, raw, field(1, raw))
        self._slots[rec.id] = s
        return s

    def prune(self, live: Collection[str]) -> None:
        """Drop the slots of objects not in ``live`` (all the objects there are)."""
        if len(self._slots) > len(live):
            for k in [k for k in self._slots if k not in live]:
                del self._slots[k]

    def __len__(self) -> int:
        return len(self._slots)
