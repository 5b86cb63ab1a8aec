"""moorage.core.safejson: untrusted JSON is refused by size, encoding and depth before parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moorage.core import safejson
from moorage.core.errors import InvalidArgument


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [0, 1, safejson.MAX_DEPTH])
def test_depth_up_to_the_limit_parses(depth: int) -> None:
    doc = safejson.loads(nested(depth) if depth else b"7", what="doc", max_size=1 << 20)
    got = 0
    while isinstance(doc, list):
        got += 1
        doc = doc[0] if doc else 0
    assert got == depth


@pytest.mark.parametrize("depth", [safejson.MAX_DEPTH + 1, 100_000])
def test_deeper_than_the_limit_is_invalid_argument(depth: int) -> None:
    with pytest.raises(InvalidArgument) as ei:
        safejson.loads(nested(depth), what="image config sha256:abc", max_size=1 << 20)
    assert ei.value.message == f"image config sha256:abc nests more than {safejson.MAX_DEPTH} levels deep"


def test_objects_count_as_levels_and_brackets_in_strings_do_not() -> None:
    assert safejson.nesting_depth(b'{"a": {"b": [1, {"c": "[[[{{{"}]}}') == 4
    assert safejson.nesting_depth(b'["\\"[[[", "\\\\", ["x"]]') == 2
    assert safejson.nesting_depth(b'"no brackets"') == 0


def test_size_limit_is_checked_first() -> None:
    with pytest.raises(InvalidArgument, match=r"^manifest is 11 bytes, over the 10 byte limit$"):
        safejson.loads(b'"123456789"', what="manifest", max_size=10)


def test_not_utf8_and_not_json_are_invalid_argument_without_quoting() -> None:
    with pytest.raises(InvalidArgument, match=r"not valid UTF-8 \(at byte 1\)"):
        safejson.loads(b'"\xff"', what="doc", max_size=100)
    secret = "hunter2-" * 1000
    with pytest.raises(InvalidArgument) as ei:
        safejson.loads(('{"Secret": "' + secret).encode(), what="helper answer", max_size=1 << 20)
    assert "hunter2" not in ei.value.message and len(ei.value.message) < 200


def test_loads_object_wants_an_object() -> None:
    assert safejson.loads_object(b'{"a": 1}', what="doc", max_size=100) == {"a": 1}
    with pytest.raises(InvalidArgument, match="doc must be a JSON object, got list"):
        safejson.loads_object(b"[]", what="doc", max_size=100)


def test_clip_bounds_and_escapes() -> None:
    assert safejson.clip("short") == "'short'"
    long = "a\nb" * 1000
    out = safejson.clip(long, 50)
    assert "\n" not in out and out.endswith("(3000 characters in all)") and len(out) < 100


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"a', max_size=4), inner,
                                                                 max_size=3),
    max_leaves=30)


def _depth(v: object) -> int:
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    return 0


@settings(max_examples=300)
@given(json_values)
def test_prescan_depth_equals_the_real_depth(value: object) -> None:
    data = json.dumps(value).encode()
    assert safejson.nesting_depth(data) == _depth(value)
    assert safejson.loads(data, what="doc", max_size=1 << 20) == value


@settings(max_examples=500)
@given(st.binary(max_size=300) | st.text(alphabet='[]{}"\\:,0a \n', max_size=300).map(str.encode))
def test_random_bytes_only_ever_give_invalid_argument(data: bytes) -> None:
    try:
        safejson.loads(data, what="doc", max_size=200, max_depth=8)
    except InvalidArgument as e:
        assert len(e.message) < 300


def test_the_depth_scan_spans_chunks_and_can_stop_early() -> None:
    wide = b"[" + b"[1]," * 100_000 + b"[[[7]]]]"  # the deepest part comes after many chunks
    assert safejson.nesting_depth(wide) == 4
    deep = nested(200_000)
    assert safejson.nesting_depth(deep) == 200_000
    assert 64 < safejson.nesting_depth(deep, stop_above=64) <= 1 << 16


def test_a_document_of_too_many_values_is_refused_before_parsing() -> None:
    many = b"[" + b"[1]," * safejson.MAX_VALUES + b"1]"
    with pytest.raises(InvalidArgument, match=rf"^manifest holds about {2 * safejson.MAX_VALUES + 1} values, "
                                              rf"over the limit of {safejson.MAX_VALUES}$"):
        safejson.loads(many, what="manifest", max_size=1 << 24)
    # commas inside strings are not values
    assert safejson.loads(b'["' + b"," * 200_000 + b'"]', what="doc", max_size=1 << 20) == ["," * 200_000]
    assert safejson.count_values(b'{"a": [1, 2, {"b": ","}]}') == 5
