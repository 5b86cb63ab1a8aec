"""images.registry: a host's TLS exceptions (skip_verify, client certificate) stay with that host.

Token servers and redirect targets on other hosts get their own configured TLS settings or
default verification; credentials and configured headers are not forwarded to them.  The
HTTP clients are replaced by in-memory transports that record which TLS settings served
each request.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import httpx
import pytest

from moorage.images import oci
from moorage.images.hosts import TLSSettings
from moorage.images.oci import Descriptor
from moorage.images.registry import RegistryClient

REG = "reg.example:5000"
BLOB = b"layer bytes" * 100
DESC = Descriptor(oci.OCI_LAYER, oci.sha256_digest(BLOB), len(BLOB))


def _hosts(tmp_path, netloc: str, extra: str) -> None:
    d = tmp_path / "certs.d" / netloc
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(f'server = "https://{netloc}"\n{extra}')


class _Body(httpx.AsyncByteStream):
    """A body that is really streamed (``httpx.Response(content=...)`` arrives pre-read)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self):
        yield self.data


def _resp(status: int, data: bytes = b"", headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, stream=_Body(data))


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """(client, log): log gets (tls, method, url, headers) for every request sent."""
    _hosts(tmp_path, REG, 'skip_verify = true\n[header]\n  X-Registry-Only = ["secret"]\n')
    log: list[tuple[TLSSettings, str, str, httpx.Headers]] = []

    def handler_for(tls: TLSSettings):
        def handler(req: httpx.Request) -> httpx.Response:
            log.append((tls, req.method, str(req.url), req.headers))
            if req.url.host == "auth.example":
                return _resp(200, json.dumps({"token": "tok"}).encode())
            if req.url.host == "cdn.example":
                return _resp(200, BLOB)
            if req.headers.get("authorization") != "Bearer tok":
                return _resp(401, headers={"WWW-Authenticate":
                                           'Bearer realm="https://auth.example/token",service="s"'})
            return _resp(307, headers={"Location": "https://cdn.example/b?sig=1"})
        return handler

    def fake_client(self, tls: TLSSettings) -> httpx.AsyncClient:
        c = self._clients.get(tls)
        if c is None:
            c = self._clients[tls] = httpx.AsyncClient(transport=httpx.MockTransport(handler_for(tls)))
        return c

    monkeypatch.setattr(RegistryClient, "_client", fake_client)
    return RegistryClient(hosts_dir=str(tmp_path / "certs.d"), trust_env=False, backoff=0.01), log


def _pull(client: RegistryClient) -> bytes:
    async def go():
        async with client:
            buf = b""
            async for chunk in client.fetch_blob(f"{REG}/test/x", DESC):
                buf += chunk
            return buf
    return asyncio.run(go())


def test_skip_verify_is_not_extended_to_token_server_and_redirect_target(recorded):
    client, log = recorded
    assert _pull(client) == BLOB
    by_host = {}
    for tls, _, url, _headers in log:
        by_host.setdefault(httpx.URL(url).host, set()).add(tls)
    assert by_host["reg.example"] == {TLSSettings(skip_verify=True)}
    assert by_host["auth.example"] == {TLSSettings()}
    assert by_host["cdn.example"] == {TLSSettings()}
    for _, _, url, headers in log:
        if httpx.URL(url).host == "reg.example":
            assert headers["x-registry-only"] == "secret"
        else:
            assert "x-registry-only" not in headers, url
        if httpx.URL(url).host == "cdn.example":
            assert "authorization" not in headers
            assert headers["accept-encoding"] == "identity"


def test_other_host_uses_its_own_configuration(recorded, tmp_path):
    client, log = recorded
    _hosts(tmp_path, "auth.example", 'skip_verify = true\n')
    assert _pull(client) == BLOB
    tls_of = {httpx.URL(url).host: tls for tls, _, url, _ in log}
    assert tls_of["auth.example"] == TLSSettings(skip_verify=True)
    assert tls_of["cdn.example"] == TLSSettings()


def test_client_for_real_contexts(tmp_path):
    """Without fakes: the SSL context used for another host verifies certificates."""
    _hosts(tmp_path, REG, "skip_verify = true\n")

    async def go():
        async with RegistryClient(hosts_dir=str(tmp_path / "certs.d"), trust_env=False) as c:
            [host] = c.hosts(REG, "pull")
            same = c._client_for(host, f"https://{REG}/v2/x/blobs/y")
            other = c._client_for(host, "https://auth.example/token")
            other_port = c._client_for(host, "https://reg.example:5001/token")
            ctx = lambda cl: cl._transport._pool._ssl_context  # noqa: E731
            return ctx(same), ctx(other), ctx(other_port)

    same, other, other_port = asyncio.run(go())
    assert same.verify_mode == ssl.CERT_NONE and not same.check_hostname
    for ctx in (other, other_port):
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
