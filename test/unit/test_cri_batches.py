"""cri.batches: how Stream* RPCs split a list into messages."""

from __future__ import annotations

import pytest

from moorage.core.errors import InvalidArgument
from moorage.cri.api import api_pb2 as pb
from moorage.cri.batches import BATCH_SIZE_ENV, STREAM_BATCH_MAX_BYTES, STREAM_BATCH_SIZE, Batching


def images(n: int, tag_len: int = 1) -> list[pb.Image]:
    return [pb.Image(id=f"sha256:{i:064x}", repo_tags=["x" * tag_len]) for i in range(n)]


def test_defaults_are_containerds_count_under_the_kubelets_16_mib() -> None:
    b = Batching.from_env({})
    assert (b.size, b.max_bytes) == (STREAM_BATCH_SIZE, STREAM_BATCH_MAX_BYTES) == (5000, 15 * 1024 * 1024)


@pytest.mark.parametrize(("n", "sizes"), [(0, []), (1, [1]), (3, [3]), (4, [3, 1]), (7, [3, 3, 1])])
def test_split_by_count_covers_each_item_once_in_order(n: int, sizes: list[int]) -> None:
    items = images(n)
    batches = list(Batching(size=3).split(items))
    assert [len(b) for b in batches] == sizes
    assert [i for b in batches for i in b] == items


def test_split_by_bytes_and_an_oversized_item_goes_alone() -> None:
    small = images(4, tag_len=100)
    one = small[0].ByteSize()
    b = Batching(size=100, max_bytes=2 * one)
    assert [len(x) for x in b.split(small)] == [2, 2]
    big = images(1, tag_len=10 * one)[0]
    assert [len(x) for x in b.split([small[0], big, small[1]])] == [1, 1, 1]


def test_env_override_and_bad_values() -> None:
    assert Batching.from_env({BATCH_SIZE_ENV: " 7 "}).size == 7
    for bad in ("0", "-1", "many"):
        with pytest.raises(InvalidArgument):
            Batching.from_env({BATCH_SIZE_ENV: bad})
