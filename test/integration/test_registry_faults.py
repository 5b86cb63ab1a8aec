"""Faults and mirrors: tampered content, dropped and stalled transfers, 5xx, hosts.toml mirrors.

Tampering and network faults come from a tiny scriptable HTTP server on 127.0.0.1
(moorage.testing.registry.FakeHTTPServer); mirror tests also use the real registry.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from moorage.core.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from moorage.images import oci
from moorage.images.oci import Descriptor
from moorage.images.registry import RegistryClient
from moorage.testing.registry import FakeHTTPServer, FakeRequest, FakeResponse

BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_DESC = Descriptor(oci.OCI_LAYER, oci.sha256_digest(BLOB), len(BLOB))
FAST = dict(trust_env=False, backoff=0.01, backoff_max=0.02)


def run(coro):
    return asyncio.run(coro)


async def _download(client: RegistryClient, repo: str, desc: Descriptor = BLOB_DESC) -> bytes:
    buf = bytearray()
    async for chunk in client.fetch_blob(repo, desc):
        buf += chunk
    return bytes(buf)


def _blob_route(req: FakeRequest) -> bool:
    return req.route.endswith(f"/blobs/{BLOB_DESC.digest}")


def _range_start(req: FakeRequest) -> int | None:
    m = re.match(r"bytes=(\d+)-", req.headers.get("range", ""))
    return int(m.group(1)) if m else None


def test_tampered_blob_is_detected():
    tampered = bytearray(BLOB)
    tampered[1000] ^= 0xFF

    def handler(req):
        return FakeResponse(200, {}, bytes(tampered)) if _blob_route(req) else FakeResponse(404)

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            await _download(c, f"{srv.host}/test/x")

    with pytest.raises(DataLoss) as ei:
        run(go())
    assert BLOB_DESC.digest in ei.value.message and "verification" in ei.value.message


def test_oversized_blob_is_cut_off():
    def handler(req):
        return FakeResponse(200, {}, BLOB + b"extra") if _blob_route(req) else FakeResponse(404)

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            await _download(c, f"{srv.host}/test/x")

    with pytest.raises(DataLoss, match="larger than its declared size"):
        run(go())


def test_tampered_manifest_by_digest_is_detected():
    manifest = b'{"schemaVersion":2,"mediaType":"%s","config":{},"layers":[]}' % oci.OCI_MANIFEST.encode()
    wanted = oci.sha256_digest(b"something else")

    def handler(req):
        return FakeResponse(200, {"Content-Type": oci.OCI_MANIFEST}, manifest)

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            await c.fetch_manifest(f"{srv.host}/test/x", wanted)

    with pytest.raises(DataLoss) as ei:
        run(go())
    assert wanted in ei.value.message


def test_manifest_not_matching_docker_content_digest_is_detected():
    manifest = b'{"schemaVersion":2,"mediaType":"%s","config":{},"layers":[]}' % oci.OCI_MANIFEST.encode()

    def handler(req):
        return FakeResponse(200, {"Content-Type": oci.OCI_MANIFEST,
                                  "Docker-Content-Digest": "sha256:" + "a" * 64}, manifest)

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            await c.fetch_manifest(f"{srv.host}/test/x", "latest")

    with pytest.raises(DataLoss, match="Docker-Content-Digest"):
        run(go())


def test_schema1_manifest_is_refused_clearly():
    body = json.dumps({"schemaVersion": 1, "name": "x", "tag": "latest", "fsLayers": []}).encode()

    def handler(req):
        return FakeResponse(200, {"Content-Type": oci.DOCKER_SCHEMA1_SIGNED}, body)

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            await c.resolve_image(f"{srv.host}/test/old:latest")

    with pytest.raises(InvalidArgument, match="schema 1"):
        run(go())


def test_oversized_manifest_is_refused():
    body = b"{" + b" " * (oci.MAX_MANIFEST_SIZE + 10) + b"}"

    def handler(req):
        return FakeResponse(200, {"Content-Type": oci.OCI_MANIFEST}, body)

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            await c.fetch_manifest(f"{srv.host}/test/x", "latest")

    with pytest.raises(InvalidArgument, match="limit"):
        run(go())


def test_dropped_connection_resumes_with_range():
    half = len(BLOB) // 2

    def handler(req):
        if not _blob_route(req):
            return FakeResponse(404)
        start = _range_start(req)
        if start is None:
            return FakeResponse(200, {"Accept-Ranges": "bytes"}, BLOB, send_only=half, then="drop")
        return FakeResponse(206, {"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"}, BLOB[start:])

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            data = await _download(c, f"{srv.host}/test/x")
            return data, srv.requests

    data, reqs = run(go())
    assert data == BLOB
    assert len(reqs) == 2
    assert "range" not in reqs[0].headers
    assert 0 < _range_start(reqs[1]) <= half


def test_dropped_connection_restarts_when_range_is_ignored():
    calls = []

    def handler(req):
        if not _blob_route(req):
            return FakeResponse(404)
        calls.append(req)
        if len(calls) == 1:
            return FakeResponse(200, {}, BLOB, send_only=len(BLOB) // 3, then="drop")
        return FakeResponse(200, {}, BLOB)  # ignores Range: full body again

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            return await _download(c, f"{srv.host}/test/x")

    assert run(go()) == BLOB
    assert len(calls) == 2 and "range" in calls[1].headers


def test_repeated_drops_give_up_as_unavailable():
    def handler(req):
        if not _blob_route(req):
            return FakeResponse(404)
        return FakeResponse(200, {}, BLOB, send_only=10, then="drop")

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(retries=2, **FAST) as c:
            await _download(c, f"{srv.host}/test/x")

    with pytest.raises(Unavailable) as ei:
        run(go())
    assert BLOB_DESC.digest in ei.value.message and "3 attempts" in ei.value.message


def test_stalled_download_raises_deadline_exceeded():
    def handler(req):
        if not _blob_route(req):
            return FakeResponse(404)
        return FakeResponse(200, {}, BLOB, send_only=4096, then="stall")

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(stall_timeout=0.3, **FAST) as c:
            await _download(c, f"{srv.host}/test/x")

    with pytest.raises(DeadlineExceeded) as ei:
        run(go())
    assert BLOB_DESC.digest in ei.value.message and "stalled" in ei.value.message


def test_server_that_never_answers_raises_deadline_exceeded():
    async def go():
        never = asyncio.Event()

        async def handler(req):
            await never.wait()
            return FakeResponse(500)

        async with FakeHTTPServer(handler) as srv, RegistryClient(stall_timeout=0.3, **FAST) as c:
            try:
                await _download(c, f"{srv.host}/test/x")
            finally:
                never.set()

    with pytest.raises(DeadlineExceeded, match="stalled"):
        run(go())


def test_5xx_is_retried():
    calls = []

    def handler(req):
        calls.append(req)
        if len(calls) <= 2:
            return FakeResponse(503, {}, b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}')
        return FakeResponse(200, {}, BLOB) if _blob_route(req) else FakeResponse(404)

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(retries=3, **FAST) as c:
            return await _download(c, f"{srv.host}/test/x")

    assert run(go()) == BLOB
    assert len(calls) == 3


def test_persistent_5xx_gives_up_with_the_registry_message():
    def handler(req):
        return FakeResponse(503, {}, b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}')

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(retries=1, **FAST) as c:
            await c.fetch_manifest(f"{srv.host}/test/x", "latest")

    with pytest.raises(Unavailable) as ei:
        run(go())
    assert "busy" in ei.value.message and "2 attempts" in ei.value.message


def test_blob_redirect_is_followed():
    def handler(req):
        if _blob_route(req):
            return FakeResponse(307, {"Location": "/storage/the-blob"})
        if req.route == "/storage/the-blob":
            assert "authorization" not in req.headers
            return FakeResponse(200, {}, BLOB)
        return FakeResponse(404)

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            return await _download(c, f"{srv.host}/test/x")

    assert run(go()) == BLOB


def test_bearer_flow_against_fake_registry():
    """Anonymous token flow, token cached per scope, scope taken from the challenge."""
    tokens = []

    def handler(req):
        if req.route == "/token":
            tokens.append(req.path)
            return FakeResponse(200, {"Content-Type": "application/json"},
                                json.dumps({"token": "tok-1", "expires_in": 300}).encode())
        if req.headers.get("authorization") != "Bearer tok-1":
            return FakeResponse(401, {"WWW-Authenticate":
                                      f'Bearer realm="http://{srv_host[0]}/token",service="fake",'
                                      f'scope="repository:test/x:pull"'})
        return FakeResponse(200, {}, BLOB) if _blob_route(req) else FakeResponse(404)

    srv_host = [""]

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            srv_host[0] = srv.host
            a = await _download(c, f"{srv.host}/test/x")
            b = await _download(c, f"{srv.host}/test/x")
            return a, b

    a, b = run(go())
    assert a == b == BLOB
    assert len(tokens) == 1
    assert "service=fake" in tokens[0] and "scope=repository%3Atest%2Fx%3Apull" in tokens[0]


# --- mirrors -------------------------------------------------------------------------------------

def _hosts_dir(tmp_path, namespace: str, text: str) -> str:
    d = tmp_path / "certs.d" / namespace
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(text)
    return str(tmp_path / "certs.d")


def test_mirror_is_tried_first_then_server(registry, tmp_path):
    img = registry.images["busybox"]

    async def go():
        async with FakeHTTPServer(lambda req: FakeResponse(404)) as mirror:
            hosts_dir = _hosts_dir(tmp_path, registry.host,
                                   f'server = "http://{registry.host}"\n'
                                   f'[host."http://{mirror.host}"]\n'
                                   '  capabilities = ["pull", "resolve"]\n')
            async with RegistryClient(hosts_dir=hosts_dir, **FAST) as c:
                r = await c.resolve_image(img.ref)
            return r, mirror.requests

    r, reqs = run(go())
    assert r.digest == img.digest
    assert reqs, "the mirror was not asked"
    first = reqs[0]
    assert first.route == "/v2/test/busybox/manifests/latest"
    assert parse_qs(urlsplit(first.path).query)["ns"] == [registry.host]
    # the config blob was asked of the mirror too before falling through
    assert any("/blobs/" in q.route for q in reqs)


def test_mirror_serves_when_server_is_down(registry, tmp_path):
    img = registry.images["busybox"]
    hosts_dir = _hosts_dir(tmp_path, "mirror.invalid",
                           'server = "http://127.0.0.1:9"\n'
                           f'[host."http://{registry.host}"]\n'
                           '  capabilities = ["pull", "resolve"]\n')

    async def go():
        async with RegistryClient(hosts_dir=hosts_dir, **FAST) as c:
            return await c.resolve_image("mirror.invalid/test/busybox:latest")

    r = run(go())
    assert r.digest == img.digest


def test_unreachable_mirror_falls_through(registry, tmp_path):
    img = registry.images["busybox"]
    hosts_dir = _hosts_dir(tmp_path, registry.host,
                           f'server = "http://{registry.host}"\n[host."http://127.0.0.1:9"]\n')

    async def go():
        async with RegistryClient(hosts_dir=hosts_dir, retries=0, **FAST) as c:
            r = await c.resolve_image(img.ref)
            data = await c.read_blob(r.repo, r.manifest.layers[0], max_size=1 << 30)
            return r, data

    r, data = run(go())
    assert r.digest == img.digest and oci.sha256_digest(data) == r.manifest.layers[0].digest


def test_mirror_with_override_path(registry, tmp_path):
    async def go():
        async with FakeHTTPServer(lambda req: FakeResponse(404)) as mirror:
            hosts_dir = _hosts_dir(tmp_path, registry.host,
                                   f'server = "http://{registry.host}"\n'
                                   f'[host."http://{mirror.host}/custom/api"]\n'
                                   '  capabilities = ["resolve"]\n  override_path = true\n'
                                   '  [host."http://%s/custom/api".header]\n    x-moorage = "yes"\n' % mirror.host)
            async with RegistryClient(hosts_dir=hosts_dir, **FAST) as c:
                await c.resolve(registry.images["busybox"].ref)
            return mirror.requests

    reqs = run(go())
    assert reqs[0].route == "/custom/api/test/busybox/manifests/latest"
    assert reqs[0].headers.get("x-moorage") == "yes"


def test_not_found_everywhere_is_not_found(registry, tmp_path):
    async def go():
        async with FakeHTTPServer(lambda req: FakeResponse(404)) as mirror:
            hosts_dir = _hosts_dir(tmp_path, registry.host,
                                   f'server = "http://{registry.host}"\n[host."http://{mirror.host}"]\n')
            async with RegistryClient(hosts_dir=hosts_dir, **FAST) as c:
                await c.resolve(f"{registry.host}/test/busybox:nope")

    with pytest.raises(NotFound, match="busybox:nope"):
        run(go())


# --- hostile token servers and compressing proxies ------------------------------------------------

class EndlessHTTP:
    """A raw HTTP server on 127.0.0.1 answering every request with *status* and a body that never
    ends (no Content-Length): it writes until the client hangs up or ``cap`` bytes, and counts."""

    def __init__(self, status: int, cap: int = 64 << 20) -> None:
        self.status, self.cap, self.sent, self.port = status, cap, 0, 0
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> EndlessHTTP:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        await self._server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\n"
                         "Connection: close\r\n\r\n".encode() + b'{"token": "')
            chunk = b"a" * 65536
            while self.sent < self.cap:
                writer.write(chunk)
                await writer.drain()
                self.sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())
            writer.transport.abort()


@pytest.mark.parametrize("status, error, words", [
    (200, "Unauthenticated", "over the 1048576 byte limit"),
    (401, "Unauthenticated", "token server"),
    (500, "Unavailable", "HTTP 500"),
])
def test_endless_token_server_response_is_read_bounded(status, error, words):
    async def go():
        async with EndlessHTTP(status) as tok:
            def handler(req):
                return FakeResponse(401, {"WWW-Authenticate":
                                          f'Bearer realm="http://127.0.0.1:{tok.port}/token",service="s"'})
            async with FakeHTTPServer(handler) as srv, RegistryClient(retries=1, **FAST) as c:
                try:
                    await c.fetch_manifest(f"{srv.host}/test/x", "latest")
                except Exception as e:
                    return e, tok.sent
        return None, tok.sent

    err, sent = run(go())
    assert type(err).__name__ == error, err
    assert words in err.message
    # what the client asked for, plus what the sockets buffered: far from the 64 MiB on offer
    assert sent < 24 << 20, f"the client read {sent} bytes of an endless token response"


def _gzip_if_accepted(req: FakeRequest, body: bytes, ctype: str) -> FakeResponse:
    if "gzip" in req.headers.get("accept-encoding", ""):
        return FakeResponse(200, {"Content-Type": ctype, "Content-Encoding": "gzip"}, gzip.compress(body))
    return FakeResponse(200, {"Content-Type": ctype}, body)


def test_compressing_registry_gets_identity_for_manifests_tokens_and_errors():
    manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                           "config": {"mediaType": oci.OCI_CONFIG, "digest": BLOB_DESC.digest, "size": 1},
                           "layers": []}).encode()
    digest = oci.sha256_digest(manifest)
    seen: list[str] = []

    def handler(req):
        seen.append(req.headers.get("accept-encoding", "<none>"))
        if req.route == "/token":
            return _gzip_if_accepted(req, json.dumps({"token": "tok-1"}).encode(), "application/json")
        if req.headers.get("authorization") != "Bearer tok-1":
            return FakeResponse(401, {"WWW-Authenticate": f'Bearer realm="http://{srv_host[0]}/token"'})
        if req.route.endswith(f"/manifests/{digest}") or req.route.endswith("/manifests/latest"):
            r = _gzip_if_accepted(req, manifest, oci.OCI_MANIFEST)
            r.headers["Docker-Content-Digest"] = digest
            return r
        if "gzip" in req.headers.get("accept-encoding", ""):
            return FakeResponse(404, {"Content-Encoding": "gzip"},
                                gzip.compress(b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such repo"}]}'))
        return FakeResponse(404, {}, b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such repo"}]}')

    srv_host = [""]

    async def go():
        async with FakeHTTPServer(handler) as srv, RegistryClient(**FAST) as c:
            srv_host[0] = srv.host
            by_digest = await c.fetch_manifest(f"{srv.host}/test/x", digest)
            by_tag = await c.fetch_manifest(f"{srv.host}/test/x", "latest")
            with pytest.raises(NotFound) as ei:
                await c.fetch_manifest(f"{srv.host}/test/x", "nope")
            return by_digest, by_tag, ei.value.message

    by_digest, by_tag, missing = run(go())
    assert by_digest.data == by_tag.data == manifest
    assert by_tag.descriptor.digest == digest
    assert "no such repo" in missing
    assert seen and set(seen) == {"identity"}
