"""Property-based fuzzing of the hosts.toml parser (images/hosts.py).

Random text, and random but well-formed TOML documents of the right shape with hostile
values, only ever give a host list or InvalidArgument with a bounded one-line message;
every host that is accepted is usable (an http(s) URL with a host, headers that stay one
line).
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from moorage.core.errors import InvalidArgument
from moorage.images.hosts import ALL_CAPABILITIES, RegistryHost, parse_hosts_toml

MAX_MESSAGE = 700


def parse(text: str) -> list[RegistryHost] | None:
    try:
        hosts = parse_hosts_toml(text, "registry.example.com:5000", "/etc/moorage/certs.d/x")
    except InvalidArgument as e:
        assert len(e.message) <= MAX_MESSAGE, len(e.message)
        assert "\n" not in e.message and "\r" not in e.message
        return None
    for h in hosts:
        assert h.scheme in ("http", "https") and h.netloc
        assert h.api_root.startswith(h.url.split("/", 3)[0])
        assert set(h.capabilities) <= set(ALL_CAPABILITIES)
        for k, v in h.headers:
            assert k and not any(c in k + v for c in "\r\n\x00")
    assert sum(not h.is_mirror for h in hosts) == 1
    return hosts


@settings(max_examples=400)
@given(st.text(alphabet='[]{}="\'\\.:/ \n\tabchost_ptsrv0129,#', max_size=120) | st.text(max_size=120))
@example("x = " + "[" * 5000 + "]" * 5000)
@example('server = "http://[::1"')
@example('[host."' + "a" * 100_000 + '"]\n')
@example('server = "https://ok.example"\n[header]\n"X-A" = "a\\r\\nInjected: yes"')
def test_random_text_gives_hosts_or_a_bounded_invalid_argument(text: str) -> None:
    parse(text)


def toml_str(s: str) -> str:
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in s) + '"'


urls = st.one_of(
    st.from_regex(r"(https?://)?[a-z0-9.-]{1,20}(:[0-9]{1,6})?(/[a-z0-9/]{0,10})?", fullmatch=True),
    st.text(max_size=30))
values: st.SearchStrategy[Any] = st.one_of(
    st.text(max_size=20), st.booleans(), st.integers(-5, 5), st.lists(st.text(max_size=10), max_size=3),
    st.lists(st.lists(st.text(max_size=10), max_size=3), max_size=2))


def render(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return toml_str(v)
    return "[" + ", ".join(render(x) for x in v) + "]"


@st.composite
def documents(draw: st.DrawFn) -> str:
    keys = st.sampled_from(["capabilities", "skip_verify", "override_path", "ca", "client"])
    lines = []
    if draw(st.booleans()):
        lines.append(f"server = {toml_str(draw(urls))}")
    for k, v in draw(st.dictionaries(keys, values, max_size=3)).items():
        lines.append(f"{k} = {render(v)}")
    for url in draw(st.lists(urls, max_size=3, unique=True)):
        lines.append(f"[host.{toml_str(url)}]")
        for k, v in draw(st.dictionaries(keys, values, max_size=3)).items():
            lines.append(f"{k} = {render(v)}")
        headers = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.lists(st.text(max_size=5),
                                                                                             max_size=2), max_size=2))
        if headers:
            lines.append(f"[host.{toml_str(url)}.header]")
            lines += [f"{toml_str(k)} = {render(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


@settings(max_examples=300)
@given(documents())
def test_hostile_values_in_well_formed_documents(text: str) -> None:
    parse(text)


@settings(max_examples=100)
@given(st.lists(st.from_regex(r"https?://[a-z]{1,8}\.example(:[0-9]{2,4})?", fullmatch=True),
                min_size=0, max_size=4, unique=True))
def test_mirrors_keep_file_order_before_the_server(mirrors: list[str]) -> None:
    text = 'server = "https://upstream.example"\n' + "".join(f"[host.{toml_str(m)}]\n" for m in mirrors)
    hosts = parse(text)
    assert hosts is not None
    assert [h.url for h in hosts] == [*mirrors, "https://upstream.example"]
    assert [h.is_mirror for h in hosts] == [True] * len(mirrors) + [False]
