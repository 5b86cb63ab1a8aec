"""Server pieces without sockets: token cache, URL validation, HTTP head parsing, port-forward helpers, ByteQueue."""

from __future__ import annotations

import asyncio
import re

import pytest

from moorage.core.errors import InvalidArgument, ResourceExhausted
from moorage.cri.streaming import portforward as pf
from moorage.cri.streaming.backend import ByteQueue
from moorage.cri.streaming.server import (
    AttachRequest,
    BadRequest,
    ExecRequest,
    PortForwardRequest,
    StreamingServer,
    TokenCache,
    parse_request_head,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_tokens_are_single_use_and_expire():
    clock = Clock()
    cache = TokenCache(ttl=60, clock=clock)
    req = ExecRequest("c1", ["ls"])
    t1, t2 = cache.put(req), cache.put(req)
    assert t1 != t2 and len(t1) >= 32
    assert cache.consume(t1) is req
    assert cache.consume(t1) is None
    clock.now += 60
    assert cache.consume(t2) is None
    assert cache.consume("never-issued") is None


def test_token_cache_is_bounded_but_reclaims_expired():
    clock = Clock()
    cache = TokenCache(ttl=10, max_size=2, clock=clock)
    cache.put(AttachRequest("c"))
    cache.put(AttachRequest("c"))
    with pytest.raises(ResourceExhausted):
        cache.put(AttachRequest("c"))
    clock.now += 11
    cache.put(AttachRequest("c"))


def test_urls_and_validation():
    server = StreamingServer(backend=None, port=12345)
    url = server.get_exec_url(ExecRequest("c1", ["sh"], tty=True, stdin=True, stderr=False))
    assert re.fullmatch(r"http://127\.0\.0\.1:12345/exec/[A-Za-z0-9_-]+", url)
    assert "/attach/" in server.get_attach_url(AttachRequest("c1"))
    assert "/portforward/" in server.get_portforward_url(PortForwardRequest("s1", [80]))
    with pytest.raises(InvalidArgument):
        server.get_exec_url(ExecRequest("c1", ["sh"], stdin=False, stdout=False, stderr=False))
    with pytest.raises(InvalidArgument):
        server.get_attach_url(AttachRequest("c1", tty=True, stderr=True))
    with pytest.raises(InvalidArgument):
        server.get_exec_url(ExecRequest("c1", []))
    with pytest.raises(InvalidArgument):
        server.get_portforward_url(PortForwardRequest("s1", [70000]))
    assert StreamingServer(None, "::1", 5).base_url == "http://[::1]:5"
    assert StreamingServer(None, base_url="https://node:10010/").base_url == "https://node:10010"


def test_parse_request_head():
    req = parse_request_head(
        b"POST /exec/abc%2Dd?port=80&port=81 HTTP/1.1\r\nHost: x\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
        b"x-stream-protocol-version: v3.channel.k8s.io\r\n\r\n"
    )
    assert (req.method, req.path, req.query) == ("POST", "/exec/abc-d", {"port": ["80", "81"]})
    assert req.headers["x-stream-protocol-version"] == ["v4.channel.k8s.io", "v3.channel.k8s.io"]
    for bad in (b"GET /\r\n\r\n", b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"GET / HTTP/1.1\r\n bad: x\r\n\r\n"):
        with pytest.raises(BadRequest):
            parse_request_head(bad)
    with pytest.raises(BadRequest) as e:
        parse_request_head(b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * 101 + b"\r\n")
    assert e.value.status == 431


def test_port_parsing():
    assert pf.parse_port("8080") == 8080
    for bad in ("", None, "0", "65536", "http", "-1"):
        with pytest.raises(pf.PortForwardError):
            pf.parse_port(bad)
    assert pf.parse_ports_query(["80,443", "8080"]) == [80, 443, 8080]
    with pytest.raises(pf.PortForwardError):
        pf.parse_ports_query([])


def test_request_id_falls_back_to_stream_ids_for_old_clients():
    assert pf.request_id({"requestid": "7", "streamtype": "data"}, 3) == "7"
    assert pf.request_id({"streamtype": "error"}, 5) == "5"
    assert pf.request_id({"streamtype": "data"}, 7) == "5"


def test_stream_pairs():
    pairs = pf.StreamPairs()
    pair, complete = pairs.add("1", "error", 80, "E")
    assert not complete and "1" in pairs.pending
    with pytest.raises(pf.PortForwardError):
        pairs.add("1", "error", 80, "E2")
    pair, complete = pairs.add("1", "data", 80, "D")
    assert complete and (pair.error, pair.data, pair.port) == ("E", "D", 80)
    assert pairs.pending == {}


def test_byte_queue():
    async def main():
        consumed = []
        q = ByteQueue(limit=5, on_consumed=consumed.append)
        q.feed(b"abc")
        assert not q.over_limit
        q.feed(b"defg")
        assert q.over_limit
        assert await q.read(2) == b"ab"
        assert await q.read() == b"c"
        assert not q.over_limit
        await q.drained()
        reader = asyncio.create_task(q.read_all())
        q.feed(b"h")
        q.feed_eof()
        q.feed(b"ignored")
        assert await reader == b"defgh"
        assert await q.read() == b"" and q.at_eof
        assert sum(consumed) == 8

    asyncio.run(main())


def test_byte_queue_discard():
    async def main():
        q = ByteQueue(limit=4)
        q.feed(b"abcdef")
        assert q.over_limit
        assert q.discard() == 6
        assert not q.over_limit and q.at_eof
        await q.drained()
        q.feed(b"late")
        assert await q.read() == b""

    asyncio.run(main())
