"""Property-based fuzzing of the image reference parser (images/reference.py).

Random input only ever raises InvalidArgument with a bounded, single-line message; valid
references survive normalisation round trips.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from moorage.core.errors import InvalidArgument
from moorage.images.reference import NAME_TOTAL_LENGTH_MAX, Reference, parse_reference

MAX_MESSAGE = 700

# Characters references are made of, plus the ones that break them.
REF_ALPHABET = "abcz09AZ.-_:/@[]" + "sha256" + " \t\n\x00\u00e9\U0001f600"


def check_refused_or_parsed(value: str) -> Reference | None:
    try:
        return parse_reference(value)
    except InvalidArgument as e:
        assert len(e.message) <= MAX_MESSAGE, len(e.message)
        assert "\n" not in e.message and "\x00" not in e.message
        return None


@settings(max_examples=400)
@given(st.text(alphabet=REF_ALPHABET, max_size=80) | st.text(max_size=80))
@example("\n" * 5000)
@example("a" * 100_000)
@example("busybox:" + "t" * 100_000)
@example("busybox@sha256:" + "a" * 100_000)
@example("x/" * 50_000)
@example("[" * 10_000 + ":1/x")
def test_random_input_is_parsed_or_refused_with_a_bounded_message(value: str) -> None:
    check_refused_or_parsed(value)


component = st.from_regex(r"[a-z0-9]{1,6}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,4}){0,2}", fullmatch=True)
domain = st.one_of(
    st.just("docker.io"), st.just("index.docker.io"), st.just("localhost"), st.just("localhost:5000"),
    st.from_regex(r"[a-z0-9]{1,8}(?:\.[a-z0-9]{1,8}){1,2}(?::[0-9]{1,5})?", fullmatch=True),
    st.from_regex(r"127\.0\.0\.1:[0-9]{2,5}", fullmatch=True), st.just("[::1]:5000"))
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digest = st.sampled_from(["sha256", "sha512"]).flatmap(
    lambda alg: st.text(alphabet="0123456789abcdef", min_size=64 if alg == "sha256" else 128,
                        max_size=64 if alg == "sha256" else 128).map(lambda h: f"{alg}:{h}"))


@st.composite
def valid_references(draw: st.DrawFn) -> str:
    path = "/".join(draw(st.lists(component, min_size=1, max_size=3)))
    # without a domain, a first component with a "." would be read as one (as docker reads it)
    name = path if draw(st.booleans()) and "." not in path.split("/")[0] else f"{draw(domain)}/{path}"
    s = name
    if draw(st.booleans()):
        s += ":" + draw(tag)
    if draw(st.booleans()):
        s += "@" + draw(digest)
    return s


@settings(max_examples=300)
@given(valid_references())
def test_valid_references_round_trip(value: str) -> None:
    try:
        r = parse_reference(value)
    except InvalidArgument as e:
        # the only valid-looking input refused: a name over the length limit, or a bare image id
        assert "characters" in e.message or "image ID" in e.message
        return
    again = parse_reference(str(r))
    assert again == r and str(again) == str(r)
    if r.domain != "docker.io" or "." not in r.path.split("/")[0]:
        # docker's familiar form of docker.io/a.b/c is "a.b/c", which reads as domain a.b
        assert parse_reference(r.familiar()) == r
    assert parse_reference(r.docker_ref()).digest == r.digest
    assert len(r.name) <= NAME_TOTAL_LENGTH_MAX
    if r.digest is None:
        assert r.tag is not None  # latest is added
    assert r.domain != "index.docker.io"
    if r.domain == "docker.io":
        assert "/" in r.path


@settings(max_examples=100)
@given(valid_references(), st.text(alphabet=" \t\n\x00", min_size=1, max_size=3), st.integers(0, 200))
def test_whitespace_anywhere_is_refused(value: str, junk: str, at: int) -> None:
    i = at % (len(value) + 1)
    bad = value[:i] + junk + value[i:]
    assume(bad != value)
    with pytest.raises(InvalidArgument):
        parse_reference(bad)
