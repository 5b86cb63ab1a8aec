"""How the Stream* RPCs split a list into messages.

Each Stream* RPC sends exactly what its List* counterpart would return, in
order, split into batches (one repeated field per message), then ends.  A
batch holds at most ``size`` items and, once it has one item, at most
``max_bytes`` serialized bytes, so a message stays below the kubelet's 16 MiB
receive limit however large the items are (an item bigger than that goes
alone; gRPC then reports the size error, as the List* call would).

The default batch size, 5000, is containerd's (``DefaultStreamBatchSize``);
neither the CRI proto nor KEP-5825 documents one.  ``MOORAGE_STREAM_BATCH_SIZE``
in the daemon's environment overrides it: tests use it to cross a batch
boundary with a handful of pods; it is not meant for production tuning.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from moorage.core.errors import InvalidArgument

STREAM_BATCH_SIZE = 5000
STREAM_BATCH_MAX_BYTES = 15 * 1024 * 1024  # 1 MiB under the kubelet's default 16 MiB receive limit
BATCH_SIZE_ENV = "MOORAGE_STREAM_BATCH_SIZE"



class _Serialized(Protocol):
    """A protobuf message, as far as batching needs one."""

    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=_Serialized)


@dataclass(frozen=True)
class Batching:
    size: int = STREAM_BATCH_SIZE
    max_bytes: int = STREAM_BATCH_MAX_BYTES

    def __post_init__(self) -> None:
        if self.size < 1 or self.max_bytes < 1:
            raise InvalidArgument(f"stream batches need a positive size and byte limit, not {self.size}/{self.max_bytes}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Batching:
        raw = env.get(BATCH_SIZE_ENV, "").strip()
        if not raw:
            return cls()
        try:
            return cls(size=int(raw))
        except ValueError:
            raise InvalidArgument(f"{BATCH_SIZE_ENV}={raw!r} is not a whole number") from None

    def split(self, items: Sequence[M]) -> Iterator[list[M]]:
        """Consecutive batches covering ``items`` once each; none at all for an empty list."""
        batch: list[M] = []
        used = 0
        for item in items:
            n = item.ByteSize()
            if batch and (len(batch) >= self.size or used + n > self.max_bytes):
                yield batch
                batch, used = [], 0
            batch.append(item)
            used += n
        if batch:
            yield batch
