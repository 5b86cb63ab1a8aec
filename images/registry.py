"""Async OCI distribution client (pull, plus the minimal push the tests need).

* Hosts come from :mod:`images.hosts`: mirrors first, in configured order, then
  the namespace's own server.  A mirror that answers 404, refuses the
  connection or keeps failing falls through to the next host.
* Auth follows the Docker token spec: a 401 carries ``WWW-Authenticate``; for
  ``Bearer`` we fetch a token from the realm (anonymously, with basic auth, with
  an OAuth2 refresh token, or use a given registry token as is) and cache it
  per (realm, service, scope, credentials); for ``Basic`` we send the
  credentials.  A 401 after authenticating is :class:`Unauthenticated` naming
  the registry.
* 5xx / 429 / dropped connections are retried with exponential backoff; blob
  downloads resume with ``Range`` when the server honours it, otherwise the
  already-delivered prefix of the restarted body is skipped.  A download that
  makes no progress for ``stall_timeout`` seconds is cancelled with
  :class:`DeadlineExceeded`.
* Everything fetched is verified: manifests against the digest asked for (or the
  ``Docker-Content-Digest`` header), blobs against descriptor digest and size.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from moorage.core import safejson
from moorage.core.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    MoorageError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from moorage.core.safejson import clip
from moorage.images import oci
from moorage.images.credentials import Credentials
from moorage.images.hosts import RegistryHost, TLSSettings, resolve_hosts
from moorage.images.oci import Descriptor, ImageConfig, Index, Manifest, Platform

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = "moorage/0.1"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MAX_ERROR_BODY = 64 * 1024
_MAX_TOKEN_BODY = 1024 * 1024
_MAX_REDIRECTS = 10
DEFAULT_TOKEN_TTL = 60.0


# --- names ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RepoName:
    """A repository on a registry namespace: ("127.0.0.1:5000", "test/busybox")."""

    registry: str
    repository: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


def _looks_like_domain(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first.lower() != first


def split_reference(ref: Any) -> tuple[RepoName, str]:
    """Split an image reference into (repository, tag-or-digest).

    Accepts a string ("127.0.0.1:5000/test/busybox:1.0", "busybox", "x/y@sha256:...")
    or any object with ``domain``, ``path``, ``tag`` and ``digest`` attributes (such as
    :class:`images.reference.Reference`).  A digest wins over a tag; no tag means ``latest``.
    """
    if not isinstance(ref, str):
        domain, path = getattr(ref, "domain", None), getattr(ref, "path", None)
        if not domain or not path:
            raise InvalidArgument(f"invalid image reference {ref!r}")
        digest = getattr(ref, "digest", None)
        tag = getattr(ref, "tag", None)
        return RepoName(domain, path), str(digest) if digest else (tag or "latest")
    s = ref.strip()
    if not s or any(c.isspace() for c in s):
        raise InvalidArgument(f"invalid image reference {ref!r}")
    name, _, digest = s.partition("@")
    if digest:
        oci.validate_digest(digest, f"image reference {ref!r}")
    tag = ""
    i = name.rfind(":")
    if i > name.rfind("/"):
        name, tag = name[:i], name[i + 1:]
    first, slash, rest = name.partition("/")
    if slash and _looks_like_domain(first):
        domain, path = first, rest
    else:
        domain, path = "docker.io", name
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    if not path or path != path.lower() or "//" in path or path.startswith("/") or path.endswith("/"):
        raise InvalidArgument(f"invalid image reference {ref!r}: repository must be lowercase path components")
    return RepoName(domain, path), digest or tag or "latest"


def as_repo(repo: Any) -> RepoName:
    if isinstance(repo, RepoName):
        return repo
    if isinstance(repo, str):
        first, slash, rest = repo.partition("/")
        if not slash:
            raise InvalidArgument(f"invalid repository {repo!r}: want <registry>/<path>")
        return RepoName(first, rest)
    domain, path = getattr(repo, "domain", None), getattr(repo, "path", None)
    if domain and path:
        return RepoName(domain, path)
    raise InvalidArgument(f"invalid repository {repo!r}")


def display_ref(repo: RepoName, reference: str) -> str:
    sep = "@" if oci.is_digest(reference) else ":"
    return f"{repo}{sep}{reference}"


def manifest_url(host: RegistryHost, repo: RepoName, reference: str) -> str:
    return _with_ns(host, repo, f"{host.api_root}/{repo.repository}/manifests/{reference}")


def blob_url(host: RegistryHost, repo: RepoName, digest: str) -> str:
    return _with_ns(host, repo, f"{host.api_root}/{repo.repository}/blobs/{digest}")


def upload_url(host: RegistryHost, repo: RepoName) -> str:
    return f"{host.api_root}/{repo.repository}/blobs/uploads/"


def _with_ns(host: RegistryHost, repo: RepoName, url: str) -> str:
    # Mirrors learn which upstream namespace is meant from ?ns= (as containerd sends it).
    if host.is_mirror:
        return url + "?" + urlencode({"ns": repo.registry})
    return url


# --- credentials and auth ----------------------------------------------------------------

@dataclass(frozen=True)
class Challenge:
    scheme: str                      # lower-case: "bearer", "basic", ...
    params: dict[str, str] = field(default_factory=dict)


_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68_RE = re.compile(r"[ \t]+([A-Za-z0-9\-._~+/]+=*)[ \t]*(?:,|$)")
_BARE_VALUE_RE = re.compile(r"[^,\s]*")


def parse_www_authenticate(headers: str | Iterable[str]) -> list[Challenge]:
    """Parse one or more WWW-Authenticate header values (RFC 7235) into challenges.

    ``Bearer realm="https://auth/token",service="registry",scope="repository:x:pull"``
    gives ``[Challenge("bearer", {"realm": ..., "service": ..., "scope": ...})]``;
    several challenges may share one header value, separated by commas.
    """
    values = [headers] if isinstance(headers, str) else list(headers)
    out: list[Challenge] = []
    for value in values:
        pos, n = 0, len(value)
        current: Challenge | None = None
        while pos < n:
            while pos < n and value[pos] in " \t,":
                pos += 1
            if pos >= n:
                break
            m = _TOKEN_RE.match(value, pos)
            if not m:
                break  # malformed: keep what we have
            tok, j = m.group(0), m.end()
            while j < n and value[j] in " \t":
                j += 1
            if current is not None and j < n and value[j] == "=":
                j += 1
                while j < n and value[j] in " \t":
                    j += 1
                if j < n and value[j] == '"':
                    j += 1
                    buf = []
                    while j < n and value[j] != '"':
                        if value[j] == "\\" and j + 1 < n:
                            j += 1
                        buf.append(value[j])
                        j += 1
                    j += 1  # the closing quote
                    val = "".join(buf)
                else:
                    vm = _BARE_VALUE_RE.match(value, j)  # matches (maybe empty) at any j
                    val, j = (vm.group(0), vm.end()) if vm is not None else ("", j)
                current.params[tok.lower()] = val
                pos = j
                continue
            current = Challenge(tok.lower(), {})
            out.append(current)
            pos = m.end()
            t68 = _TOKEN68_RE.match(value, pos)
            if t68:  # e.g. "Negotiate abc==": an opaque token, not parameters
                pos = t68.end()
                current = None
    return out


@dataclass
class _Token:
    value: str
    expires_at: float


class _AuthState:
    """What we learned about one host's auth: its challenge and the tokens we hold."""

    def __init__(self) -> None:
        self.challenge: Challenge | None = None
        self.tokens: dict[tuple[str, str, str, str], _Token] = {}
        self.lock = asyncio.Lock()


# --- results ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchedManifest:
    descriptor: Descriptor
    data: bytes


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved down to one platform's manifest and config."""

    repo: RepoName
    reference: str
    root: Descriptor                  # what the reference points at (index or manifest)
    index: Index | None
    manifest_descriptor: Descriptor
    manifest: Manifest
    manifest_bytes: bytes
    config: ImageConfig
    config_bytes: bytes
    root_bytes: bytes = b""

    @property
    def digest(self) -> str:
        """The image's repo digest (the root's digest, as ``crictl images --digests`` shows)."""
        return self.root.digest


class _Retryable(Exception):
    """A failure worth retrying (5xx, 429, a dropped connection)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _HostNotFound(Exception):
    """404 from one host; the next host may have it."""


# --- client -------------------------------------------------------------------------------

class RegistryClient:
    """Talks to OCI distribution registries.  Use as ``async with RegistryClient(...) as c``."""

    def __init__(self, *, hosts_dir: str | None = None, insecure_hosts: Iterable[str] = (),
                 retries: int = 3, backoff: float = 0.5, backoff_max: float = 8.0,
                 stall_timeout: float = 60.0, connect_timeout: float = 30.0,
                 user_agent: str = USER_AGENT, trust_env: bool = True,
                 node_credentials: Callable[[str, str], Credentials | None] | None = None) -> None:
        self.hosts_dir = hosts_dir
        # (host as contacted, repository) -> the node's credentials; blocking (it may run a
        # credential helper), so it is called in a thread.  Used where the caller's own
        # credentials are absent or meant for another host.
        self.node_credentials = node_credentials
        self.insecure_hosts = tuple(insecure_hosts)
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.stall_timeout = stall_timeout
        self.connect_timeout = connect_timeout
        self.user_agent = user_agent
        self.trust_env = trust_env
        self._clients: dict[TLSSettings, httpx.AsyncClient] = {}
        self._auth: dict[str, _AuthState] = {}
        self._retired: list[httpx.AsyncClient] = []  # replaced by reconfigure, closed once idle

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        clients += self._retired
        self._retired = []
        for c in clients:
            await c.aclose()

    async def reconfigure(self, hosts_dir: str | None, insecure_hosts: Iterable[str], idle: bool) -> None:
        """Use a new hosts config from now on (a daemon reload).

        The connections are dropped too, so that CA and client certificate files are read
        again; ``idle`` says no request is in flight, else the old connections are closed
        at the next idle reconfigure or at ``aclose``.
        """
        self.hosts_dir = hosts_dir
        self.insecure_hosts = tuple(insecure_hosts)
        self._retired += self._clients.values()
        self._clients = {}
        if idle:
            retired, self._retired = self._retired, []
            for c in retired:
                await c.aclose()

    # -- plumbing ---------------------------------------------------------------------

    def hosts(self, registry: str, capability: str) -> list[RegistryHost]:
        hosts = [h for h in resolve_hosts(registry, self.hosts_dir, self.insecure_hosts) if h.can(capability)]
        if not hosts:
            raise InvalidArgument(f"no host configured for registry {registry} with the {capability!r} capability")
        return hosts

    def _client(self, tls: TLSSettings) -> httpx.AsyncClient:
        c = self._clients.get(tls)
        if c is None:
            c = httpx.AsyncClient(
                verify=_ssl_context(tls),
                timeout=httpx.Timeout(self.stall_timeout, connect=self.connect_timeout),
                headers={"User-Agent": self.user_agent},
                trust_env=self.trust_env,
                follow_redirects=False,
            )
            self._clients[tls] = c
        return c

    def _client_for(self, host: RegistryHost, url: str) -> httpx.AsyncClient:
        """The client for *url*.  A host's TLS exceptions (``skip_verify``, its client
        certificate) apply to that host only.  A token server or redirect target on another
        host gets the TLS settings configured for *that* host (``certs.d/<host:port>``), or
        else default verification, which still trusts the CA files of the host that sent us
        there (a private registry's token server is commonly signed by the same CA)."""
        netloc = _netloc(url)
        if netloc == host.netloc.lower():
            return self._client(host.tls)
        if self.hosts_dir:
            try:
                own = resolve_hosts(netloc, self.hosts_dir, self.insecure_hosts)
            except InvalidArgument:
                own = []
            for h in own:
                if h.netloc.lower() == netloc and not h.tls.is_default:
                    return self._client(h.tls)
        return self._client(TLSSettings(ca_files=host.tls.ca_files))

    def _auth_state(self, host: RegistryHost) -> _AuthState:
        st = self._auth.get(host.url)
        if st is None:
            st = self._auth[host.url] = _AuthState()
        return st

    async def _sleep_backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(self.backoff * (2 ** attempt), self.backoff_max))

    async def _authorization(self, host: RegistryHost, scope: str, creds: Credentials | None,
                             force_refresh: bool = False) -> str | None:
        if creds is not None and not creds.applies_to(host):
            creds = None
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        st = self._auth_state(host)
        ch = st.challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            pair = creds.basic() if creds else None
            if pair is None and creds is not None and creds.identity_token:
                pair = (creds.username or "<token>", creds.identity_token)
            if pair is None:
                return None
            return "Basic " + base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode()
        if ch.scheme == "bearer":
            realm = ch.params.get("realm", "")
            service = ch.params.get("service", "")
            key = (realm, service, scope, creds.identity() if creds else "")
            async with st.lock:
                tok = st.tokens.get(key)
                if tok is not None and not force_refresh and tok.expires_at > time.monotonic():
                    return f"Bearer {tok.value}"
                tok = await self._fetch_token(host, ch, scope, creds)
                st.tokens[key] = tok
                return f"Bearer {tok.value}"
        return None

    async def _fetch_token(self, host: RegistryHost, ch: Challenge, scope: str,
                           creds: Credentials | None) -> _Token:
        realm = ch.params.get("realm")
        name = host.netloc
        if not realm:
            raise Unauthenticated(f"authentication to registry {name} failed: bearer challenge has no realm")
        rparts = urlsplit(realm)
        if rparts.scheme not in ("http", "https") or not rparts.netloc:
            raise Unauthenticated(f"authentication to registry {name} failed: invalid token realm {realm!r}")
        service = ch.params.get("service", "")
        scopes = [s for s in [scope] if s]
        extra = ch.params.get("scope")
        if extra and extra not in scopes:
            scopes.append(extra)
        client = self._client_for(host, realm)  # the host's TLS settings are for the host only
        who = "anonymously"
        last_exc: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                if creds is not None and creds.identity_token:
                    who = "with the identity token"
                    form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                            "client_id": "moorage", "access_type": "offline"}
                    if service:
                        form["service"] = service
                    if scopes:
                        form["scope"] = " ".join(scopes)
                    resp = await _send_streamed(client, "POST", realm, data=form)
                    if resp.status_code in (404, 405):
                        await resp.aclose()
                        # Not an OAuth2 endpoint: send the identity token as a password instead.
                        resp = await _send_streamed(client, "GET", realm, params=_token_params(service, scopes),
                                                    auth=(creds.username or "<token>", creds.identity_token))
                else:
                    pair = creds.basic() if creds else None
                    params = _token_params(service, scopes)
                    if pair:
                        who = f"as user {pair[0]!r}"
                    resp = await _send_streamed(client, "GET", realm, params=params, auth=pair)
                # Read only as much as a token (or an error) can be: the body is untrusted.
                try:
                    if resp.status_code == 200:
                        body = await _read_bounded(resp, _MAX_TOKEN_BODY, strict=True)
                    else:
                        body = await _read_bounded(resp, _MAX_ERROR_BODY)
                except ValueError:
                    raise Unauthenticated(f"authentication to registry {name} failed: token server {realm} "
                                          f"sent a response over the {_MAX_TOKEN_BODY} byte limit") from None
                finally:
                    await resp.aclose()
            except httpx.TransportError as e:
                last_exc = e
                if attempt < self.retries:
                    await self._sleep_backoff(attempt)
                    continue
                raise Unavailable(f"token server {realm} for registry {name} is unreachable: {_exc_text(e)}") from None
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                await self._sleep_backoff(attempt)
                continue
            break
        else:  # pragma: no cover - loop always breaks or raises
            raise Unavailable(f"token server {realm} for registry {name}: {last_exc}")
        if resp.status_code in (401, 403):
            raise Unauthenticated(
                f"authentication to registry {name} failed: token server {realm} rejected the request "
                f"{who} (HTTP {resp.status_code}){_error_detail(body)}")
        if resp.status_code != 200:
            raise Unavailable(f"token server {realm} for registry {name} answered HTTP {resp.status_code}"
                              f"{_error_detail(body)}")
        try:
            doc = safejson.loads(body, what="token response", max_size=_MAX_TOKEN_BODY)
        except InvalidArgument:
            raise Unauthenticated(f"authentication to registry {name} failed: token server {realm} "
                                  "returned something that is not JSON") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise Unauthenticated(f"authentication to registry {name} failed: token server {realm} "
                                  "returned no token")
        ttl = doc.get("expires_in")
        ttl = float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else DEFAULT_TOKEN_TTL
        # Refresh a little early so a token never expires in flight.
        return _Token(token, time.monotonic() + max(1.0, ttl - min(10.0, ttl / 4)))

    async def _send(self, host: RegistryHost, method: str, url: str, *, scope: str,
                    creds: Credentials | None, headers: dict[str, str] | None = None,
                    content: bytes | None = None, stream: bool = False,
                    follow_redirects: bool = False, timeout: httpx.Timeout | None = None) -> httpx.Response:
        """One request with auth handling.  Returns the response (streamed if asked).

        Raises Unauthenticated / PermissionDenied; _Retryable for 5xx/429/transport errors.
        """
        creds = await self._credentials_for(host, scope, creds)
        authed = False
        for _ in range(3):
            h = httpx.Headers(list(host.headers))
            # Bodies are read raw (aiter_raw) and verified byte for byte: never let a registry or a
            # proxy compress them (httpx would otherwise offer gzip, deflate, br and zstd).
            h["Accept-Encoding"] = "identity"
            for k, v in (headers or {}).items():
                h[k] = v
            authz = await self._authorization(host, scope, creds, force_refresh=authed)
            if authz:
                h["Authorization"] = authz
            try:
                resp = await self._send_following(host, method, url, h, content, stream,
                                                  follow_redirects, timeout, headers or {})
            except httpx.TransportError as e:
                where = _netloc(str(e.request.url)) if _has_request(e) else host.netloc.lower()
                if _is_cert_error(e) and where != host.netloc.lower():
                    raise Unavailable(f"TLS verification of {where} (where registry {host.netloc} sent us) "
                                      f"failed: {_cert_error_text(e)}") from None
                if _is_cert_error(e):
                    raise Unavailable(
                        f"TLS verification of registry {host.netloc} failed: {_cert_error_text(e)}; add the "
                        f"registry's CA with ca = \"/path/ca.crt\" in certs.d/{host.namespace or host.netloc}"
                        "/hosts.toml (or set skip_verify = true)") from None
                raise _Retryable(f"{method} {url}: {_exc_text(e)}") from e
            if resp.status_code == 400 and host.scheme == "http":
                body = await _read_bounded(resp, _MAX_ERROR_BODY)
                if b"HTTP request to an HTTPS server" in body:
                    await resp.aclose()
                    raise Unavailable(f"registry {host.netloc} speaks HTTPS but was contacted over plain HTTP; "
                                      f"set server = \"https://{host.netloc}\" in certs.d/"
                                      f"{host.namespace or host.netloc}/hosts.toml")
                resp._content = body  # keep it readable for the caller
            if resp.status_code in RETRY_STATUSES:
                body = await _read_bounded(resp, _MAX_ERROR_BODY)
                await resp.aclose()
                raise _Retryable(f"{method} {url}: HTTP {resp.status_code}{_error_detail(body)}")
            if resp.status_code == 403:
                body = await _read_bounded(resp, _MAX_ERROR_BODY)
                await resp.aclose()
                raise PermissionDenied(f"registry {host.netloc} denied access to {scope or url}"
                                       f"{_error_detail(body)}")
            if resp.status_code != 401:
                return resp
            body = await _read_bounded(resp, _MAX_ERROR_BODY)
            await resp.aclose()
            challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
            usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
            has_creds = creds is not None and not creds.empty and creds.applies_to(host)
            given_token = authz is not None and creds is not None and bool(creds.registry_token)
            if authed or given_token or (authz is not None and not usable):
                if has_creds:
                    pair = creds.basic() if creds is not None and not creds.registry_token else None
                    whose = f" for user {pair[0]!r}" if pair and pair[0] else ""
                    raise Unauthenticated(f"authentication to registry {host.netloc} failed: "
                                          f"the registry rejected the credentials{whose}{_error_detail(body)}")
                raise Unauthenticated(f"authentication to registry {host.netloc} failed: access to "
                                      f"{scope or url} was refused{_error_detail(body)}; "
                                      "check the image name and supply credentials if it is private")
            if not usable:
                raise Unauthenticated(f"registry {host.netloc} requires an unsupported authentication "
                                      f"scheme: {resp.headers.get('www-authenticate', '(none given)')}")
            ch = next((c for c in usable if c.scheme == "bearer"), usable[0])
            if ch.scheme == "basic" and not has_creds:
                raise Unauthenticated(f"authentication to registry {host.netloc} failed: the registry "
                                      "requires a username and password and none were given")
            self._auth_state(host).challenge = ch
            authed = True
        raise Unauthenticated(f"authentication to registry {host.netloc} failed")  # pragma: no cover

    async def _credentials_for(self, host: RegistryHost, scope: str,
                               creds: Credentials | None) -> Credentials | None:
        """The caller's credentials when they are for this host, else the node's for it."""
        if creds is not None and not creds.empty and creds.applies_to(host):
            return creds
        if self.node_credentials is None:
            return creds
        # scope is "repository:<name>:<actions>"; names never hold a colon
        repository = scope.split(":")[1] if scope.startswith("repository:") else ""
        node = await asyncio.to_thread(self.node_credentials, host.netloc, repository)
        return node if node is not None else creds

    async def _send_following(self, host: RegistryHost, method: str, url: str, h: httpx.Headers,
                              content: bytes | None, stream: bool, follow_redirects: bool,
                              timeout: httpx.Timeout | None, plain_headers: dict[str, str]) -> httpx.Response:
        """Send one request, following redirects ourselves when asked: each hop uses the client
        for its own host (so a host's TLS exceptions never extend to where it redirects), and
        credentials and the host's configured headers go to the configured host only."""
        t = timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
        for _ in range(_MAX_REDIRECTS + 1):
            client = self._client_for(host, url)
            req = client.build_request(method, url, headers=h, content=content, timeout=t)
            resp = await client.send(req, stream=stream, follow_redirects=False)
            if not (follow_redirects and resp.has_redirect_location):
                return resp
            await resp.aclose()
            url = urljoin(url, resp.headers["location"])
            if resp.status_code == 303 and method != "HEAD":
                method, content = "GET", None
            if _netloc(url) != host.netloc.lower() or (host.scheme == "https" and not url.startswith("https:")):
                h = httpx.Headers({"Accept-Encoding": "identity"})
                for k, v in plain_headers.items():
                    h[k] = v
        raise _Retryable(f"{method} {url}: more than {_MAX_REDIRECTS} redirects")

    async def _with_retries(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run *fn()* retrying _Retryable failures; give Unavailable when they persist."""
        for attempt in range(self.retries + 1):
            try:
                return await fn()
            except _Retryable as e:
                if attempt >= self.retries:
                    raise Unavailable(f"{what}: giving up after {attempt + 1} attempts: {e.message}") from None
                log.debug("retrying %s after: %s", what, e.message)
                await self._sleep_backoff(attempt)
        raise AssertionError("unreachable")

    async def _over_hosts(self, repo: RepoName, capability: str, what: str,
                          fn: Callable[[RegistryHost], Awaitable[T]]) -> T:
        """Try *fn(host)* on each host in order; mirrors fall through on not-found/unavailable."""
        hosts = self.hosts(repo.registry, capability)
        errors: list[MoorageError] = []
        for i, host in enumerate(hosts):
            last = i == len(hosts) - 1
            try:
                return await self._with_retries(f"{what} from {host.netloc}", functools.partial(fn, host))
            except _HostNotFound as e:
                err: MoorageError = NotFound(str(e))
            except (Unavailable, Unauthenticated, PermissionDenied) as e:
                err = e
            if last:
                raise err
            log.info("%s: host %s failed (%s); trying the next host", what, host.url, err.message)
            errors.append(err)
        raise AssertionError("unreachable")

    # -- manifests ------------------------------------------------------------------------------

    async def resolve(self, ref: Any, *, credentials: Credentials | None = None) -> Descriptor:
        """Resolve a tag or digest reference to the descriptor of what it names."""
        repo, reference = split_reference(ref)
        shown = display_ref(repo, reference)
        scope = f"repository:{repo.repository}:pull"

        async def attempt(host: RegistryHost) -> Descriptor:
            url = manifest_url(host, repo, reference)
            resp = await self._send(host, "HEAD", url, scope=scope, creds=credentials,
                                    headers={"Accept": oci.MANIFEST_ACCEPT})
            await resp.aclose()
            if resp.status_code == 404:
                raise _HostNotFound(f"manifest unknown: {shown} not found")
            if resp.status_code == 200:
                dcd = resp.headers.get("docker-content-digest", "")
                ct = resp.headers.get("content-type", "").split(";", 1)[0].strip()
                length = resp.headers.get("content-length", "")
                if (oci.is_digest(dcd) and (ct in oci.INDEX_TYPES or ct in oci.MANIFEST_TYPES)
                        and length.isdigit()):
                    if oci.is_digest(reference) and dcd != reference:
                        raise DataLoss(f"registry {host.netloc} answered digest {dcd} for {shown}")
                    return Descriptor(ct, dcd, int(length))
                if ct in oci.SCHEMA1_TYPES:
                    raise InvalidArgument(f"{shown} is a Docker schema 1 image, which is not supported; "
                                          "re-push it with a current client")
            elif resp.status_code not in (405, 400):
                raise Unavailable(f"HEAD {shown} on {host.netloc}: unexpected HTTP {resp.status_code}")
            # HEAD gave too little: fetch the manifest itself.
            fm = await self._get_manifest(host, repo, reference, credentials)
            return fm.descriptor

        return await self._over_hosts(repo, "resolve", f"resolving {shown}", attempt)

    async def _get_manifest(self, host: RegistryHost, repo: RepoName, reference: str,
                            creds: Credentials | None, expected: Descriptor | None = None) -> FetchedManifest:
        shown = display_ref(repo, reference)
        url = manifest_url(host, repo, reference)
        resp = await self._send(host, "GET", url, scope=f"repository:{repo.repository}:pull", creds=creds,
                                headers={"Accept": oci.MANIFEST_ACCEPT}, stream=True)
        try:
            if resp.status_code == 404:
                body = await _read_bounded(resp, _MAX_ERROR_BODY)
                raise _HostNotFound(f"manifest unknown: {shown} not found{_error_detail(body, 'MANIFEST_UNKNOWN')}")
            if resp.status_code != 200:
                body = await _read_bounded(resp, _MAX_ERROR_BODY)
                raise Unavailable(f"GET manifest {shown} from {host.netloc}: HTTP {resp.status_code}"
                                  f"{_error_detail(body)}")
            cl = resp.headers.get("content-length", "")
            if cl.isdigit() and int(cl) > oci.MAX_MANIFEST_SIZE:
                raise InvalidArgument(f"manifest {shown} is {cl} bytes, over the "
                                      f"{oci.MAX_MANIFEST_SIZE} byte limit")
            try:
                data = await _read_bounded(resp, oci.MAX_MANIFEST_SIZE, strict=True)
            except httpx.TransportError as e:
                raise _Retryable(f"reading manifest {shown}: {_exc_text(e)}") from e
            except ValueError:
                raise InvalidArgument(f"manifest {shown} is over the {oci.MAX_MANIFEST_SIZE} byte limit") from None
        finally:
            await resp.aclose()
        media_type = oci.sniff_media_type(data, resp.headers.get("content-type"))
        if media_type in oci.SCHEMA1_TYPES:
            raise InvalidArgument(f"{shown} is a Docker schema 1 image, which is not supported; "
                                  "re-push it with a current client")
        if media_type not in oci.INDEX_TYPES and media_type not in oci.MANIFEST_TYPES:
            raise InvalidArgument(f"manifest {shown} from {host.netloc} has unsupported media type "
                                  f"{clip(media_type or 'unknown')}")
        want = expected.digest if expected else (reference if oci.is_digest(reference) else "")
        if want:
            got = oci.compute_digest(data, want)
            if got != want:
                raise DataLoss(f"manifest {shown} from {host.netloc} failed verification: "
                               f"expected {want}, got {got}")
            digest = want
        else:
            dcd = resp.headers.get("docker-content-digest", "")
            got = oci.compute_digest(data, dcd if oci.is_digest(dcd) else None)
            if dcd and oci.is_digest(dcd) and dcd != got:
                raise DataLoss(f"manifest {shown} from {host.netloc} does not match its "
                               f"Docker-Content-Digest {dcd} (content is {got})")
            digest = got
        if expected is not None and expected.size != len(data):
            raise DataLoss(f"manifest {shown} from {host.netloc} is {len(data)} bytes, its descriptor "
                           f"says {expected.size}")
        return FetchedManifest(Descriptor(media_type, digest, len(data)), data)

    async def fetch_manifest(self, repo: Any, reference: str | Descriptor, *,
                             credentials: Credentials | None = None) -> FetchedManifest:
        """Fetch manifest/index bytes by tag, digest or descriptor, verified."""
        r = as_repo(repo)
        expected = reference if isinstance(reference, Descriptor) else None
        ref = reference.digest if isinstance(reference, Descriptor) else reference
        if expected is not None and expected.size > oci.MAX_MANIFEST_SIZE:
            raise InvalidArgument(f"manifest {display_ref(r, ref)} is {expected.size} bytes, over the "
                                  f"{oci.MAX_MANIFEST_SIZE} byte limit")
        return await self._over_hosts(r, "pull", f"fetching manifest {display_ref(r, ref)}",
                                      lambda host: self._get_manifest(host, r, ref, credentials, expected))

    async def resolve_image(self, ref: Any, *, platform: Platform | None = None,
                            credentials: Credentials | None = None,
                            read_config: Any = None) -> ResolvedImage:
        """Resolve *ref*, pick the manifest for *platform* (default: this host), fetch its config.

        ``read_config(repo, descriptor) -> bytes`` (async), when given, supplies the config blob
        instead of a download (e.g. from a content store, so concurrent pulls fetch it once);
        it must return verified bytes.
        """
        from moorage.images.platform import Matcher
        repo, reference = split_reference(ref)
        shown = display_ref(repo, reference)
        root_fm = await self.fetch_manifest(repo, reference, credentials=credentials)
        root = root_fm.descriptor
        index: Index | None = None
        fm, mdesc = root_fm, root
        seen = {root.digest}
        depth = 0
        while fm.descriptor.media_type in oci.INDEX_TYPES:
            what = f"image index {shown}" if depth == 0 else f"image index {fm.descriptor.digest} of {shown}"
            if depth > oci.MAX_INDEX_DEPTH:
                raise InvalidArgument(f"{what} from {repo.registry}: indexes nest more than "
                                      f"{oci.MAX_INDEX_DEPTH} levels deep")
            parsed = await asyncio.to_thread(oci.parse_index, fm.data, fm.descriptor.media_type, what)
            if index is None:
                index = parsed
            chosen = _choose_entry(parsed, platform, what)
            if chosen.digest in seen:
                raise InvalidArgument(f"{what} from {repo.registry} refers to {chosen.digest}, which "
                                      "contains it (an index cycle)")
            seen.add(chosen.digest)
            fm = await self.fetch_manifest(repo, chosen, credentials=credentials)
            if _doc_kind(fm.descriptor.media_type) != _doc_kind(chosen.media_type):
                raise InvalidArgument(f"{what} from {repo.registry}: entry {chosen.digest} is declared "
                                      f"{clip(chosen.media_type)} but the registry served "
                                      f"{clip(fm.descriptor.media_type)}")
            mdesc = Descriptor(fm.descriptor.media_type, chosen.digest, chosen.size, chosen.platform,
                               chosen.annotations)
            depth += 1
        manifest = await asyncio.to_thread(oci.parse_manifest, fm.data, mdesc.media_type,
                                           f"image manifest {mdesc.digest} of {shown}")
        if manifest.config.media_type not in oci.CONFIG_TYPES:
            raise InvalidArgument(f"{shown} is not a container image: config media type "
                                  f"{clip(manifest.config.media_type)}")
        if read_config is not None:
            config_bytes = await read_config(repo, manifest.config)
        else:
            config_bytes = await self.read_blob(repo, manifest.config, max_size=oci.MAX_CONFIG_SIZE,
                                                credentials=credentials)
        config = await asyncio.to_thread(oci.parse_config, config_bytes,
                                         f"image config {manifest.config.digest} of {shown}")
        if index is None:
            m = Matcher(platform)
            if config.os and config.architecture and not m.match(config.platform):
                raise NotFound(f"image {shown} is for platform {config.platform}, not {m.want}; "
                               f"available platforms: {config.platform}")
        oci.check_manifest_layers(manifest, config, shown)
        return ResolvedImage(repo=repo, reference=reference, root=root, index=index,
                             manifest_descriptor=mdesc, manifest=manifest, manifest_bytes=fm.data,
                             config=config, config_bytes=config_bytes, root_bytes=root_fm.data)

    # -- blobs ----------------------------------------------------------------------------------

    async def read_blob(self, repo: Any, desc: Descriptor, *, max_size: int,
                        credentials: Credentials | None = None) -> bytes:
        """A whole (small) blob in memory, verified; refuses descriptors over *max_size*."""
        r = as_repo(repo)
        if desc.size > max_size:
            raise InvalidArgument(f"blob {desc.digest} of {r} is {desc.size} bytes, over the {max_size} byte limit")
        buf = bytearray()
        async for chunk in self.fetch_blob(r, desc, credentials=credentials):
            buf += chunk
        return bytes(buf)

    async def fetch_blob(self, repo: Any, desc: Descriptor, *,
                         credentials: Credentials | None = None) -> AsyncIterator[bytes]:
        """Stream a blob's bytes; verified against ``desc`` (size and digest) at the end.

        Interrupted transfers are retried (resuming with Range where possible); a
        transfer without progress for ``stall_timeout`` seconds raises DeadlineExceeded.
        """
        r = as_repo(repo)
        oci.validate_digest(desc.digest, "blob digest")
        hasher = oci.hasher_for(desc.digest)
        received = 0
        hosts = self.hosts(r.registry, "pull")
        scope = f"repository:{r.repository}:pull"
        what = f"blob {desc.digest} of {r}"
        no_timeout = httpx.Timeout(None, connect=self.connect_timeout)
        for hi, host in enumerate(hosts):
            last_host = hi == len(hosts) - 1
            attempt = 0
            while True:
                url = blob_url(host, r, desc.digest)
                headers = {"Accept-Encoding": "identity"}
                if received:
                    headers["Range"] = f"bytes={received}-"
                try:
                    try:
                        resp = await asyncio.wait_for(
                            self._send(host, "GET", url, scope=scope, creds=credentials, headers=headers,
                                       stream=True, follow_redirects=True, timeout=no_timeout),
                            self.stall_timeout)
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"download of {what} from {host.netloc} stalled: no response for "
                            f"{self.stall_timeout:g}s") from None
                    try:
                        if resp.status_code == 404:
                            raise _HostNotFound(f"{what} not found on {host.netloc}")
                        if resp.status_code == 416 and received == desc.size:
                            pass  # we had everything already
                        elif resp.status_code not in (200, 206):
                            body = await _read_bounded(resp, _MAX_ERROR_BODY)
                            raise Unavailable(f"GET {what} from {host.netloc}: HTTP {resp.status_code}"
                                              f"{_error_detail(body)}")
                        skip = 0
                        complete = _complete_length(resp)
                        if resp.status_code == 206:
                            start = _content_range_start(resp.headers.get("content-range", ""))
                            if start is None or start > received:
                                raise _Retryable(f"{what}: bad Content-Range "
                                                 f"{resp.headers.get('content-range')!r}")
                            skip = received - start
                        elif resp.status_code == 200:
                            skip = received  # server ignored Range: drop what we already have
                        it = resp.aiter_raw().__aiter__()
                        while resp.status_code != 416:
                            try:
                                chunk = await asyncio.wait_for(it.__anext__(), self.stall_timeout)
                            except StopAsyncIteration:
                                break
                            except TimeoutError:
                                raise DeadlineExceeded(
                                    f"download of {what} from {host.netloc} stalled: no data for "
                                    f"{self.stall_timeout:g}s after {received} of {desc.size} bytes") from None
                            except httpx.TransportError as e:
                                raise _Retryable(f"{what}: connection lost after {received} of "
                                                 f"{desc.size} bytes: {_exc_text(e)}") from e
                            if skip:
                                if len(chunk) <= skip:
                                    skip -= len(chunk)
                                    continue
                                chunk, skip = chunk[skip:], 0
                            if received + len(chunk) > desc.size:
                                raise DataLoss(f"{what} from {host.netloc} is larger than its declared "
                                               f"size {desc.size}; refusing it")
                            received += len(chunk)
                            hasher.update(chunk)
                            yield chunk
                    finally:
                        await resp.aclose()
                    if received < desc.size:
                        if complete is not None and complete < desc.size:
                            # a whole, well-formed answer that is shorter: not a network fault
                            raise DataLoss(f"{what} from {host.netloc} is {complete} bytes, smaller than "
                                           f"its declared size {desc.size}; refusing it")
                        raise _Retryable(f"{what}: transfer ended after {received} of {desc.size} bytes")
                    got = f"{hasher.name}:{hasher.hexdigest()}"
                    if got != desc.digest:
                        raise DataLoss(f"{what} from {host.netloc} failed verification: "
                                       f"content digest is {got}, expected {desc.digest}")
                    return
                except _Retryable as e:
                    if attempt >= self.retries:
                        err: MoorageError = Unavailable(f"downloading {what} from {host.netloc}: "
                                                        f"giving up after {attempt + 1} attempts: {e.message}")
                        if last_host:
                            raise err from None
                        log.info("%s; trying the next host", err.message)
                        break
                    log.debug("retrying %s: %s", what, e.message)
                    await self._sleep_backoff(attempt)
                    attempt += 1
                except _HostNotFound as e:
                    if last_host:
                        raise NotFound(str(e)) from None
                    break
                except (Unauthenticated, PermissionDenied, Unavailable) as e:
                    if last_host or received:
                        raise
                    log.info("%s: host %s failed (%s); trying the next host", what, host.url, e.message)
                    break

    # -- push ----------------------------------------------------------------------------------

    async def blob_exists(self, repo: Any, digest: str, *, credentials: Credentials | None = None,
                          capability: str = "pull") -> bool:
        r = as_repo(repo)
        host = self.hosts(r.registry, capability)[-1]

        async def go() -> bool:
            resp = await self._send(host, "HEAD", blob_url(host, r, digest),
                                    scope=f"repository:{r.repository}:pull", creds=credentials)
            await resp.aclose()
            return resp.status_code == 200
        return await self._with_retries(f"checking blob {digest} in {r}", go)

    async def push_blob(self, repo: Any, data: bytes, media_type: str = "application/octet-stream", *,
                        credentials: Credentials | None = None) -> Descriptor:
        """Upload *data* as a blob (monolithic POST + PUT); skips blobs already present."""
        r = as_repo(repo)
        digest = oci.sha256_digest(data)
        desc = Descriptor(media_type, digest, len(data))
        host = self.hosts(r.registry, "push")[-1]
        scope = f"repository:{r.repository}:pull,push"

        async def go() -> Descriptor:
            head = await self._send(host, "HEAD", blob_url(host, r, digest), scope=scope, creds=credentials)
            await head.aclose()
            if head.status_code == 200:
                return desc
            start = await self._send(host, "POST", upload_url(host, r), scope=scope, creds=credentials,
                                     content=b"")
            body = await _read_bounded(start, _MAX_ERROR_BODY)
            await start.aclose()
            if start.status_code != 202 or not start.headers.get("location"):
                raise Unavailable(f"starting upload of {digest} to {r}: HTTP {start.status_code}"
                                  f"{_error_detail(body)}")
            loc = urljoin(upload_url(host, r), start.headers["location"])
            sep = "&" if "?" in loc else "?"
            put = await self._send(host, "PUT", f"{loc}{sep}{urlencode({'digest': digest})}", scope=scope,
                                   creds=credentials, content=data,
                                   headers={"Content-Type": "application/octet-stream"})
            body = await _read_bounded(put, _MAX_ERROR_BODY)
            await put.aclose()
            if put.status_code not in (201, 204):
                raise Unavailable(f"uploading {digest} to {r}: HTTP {put.status_code}{_error_detail(body)}")
            return desc
        return await self._with_retries(f"pushing blob {digest} to {r}", go)

    async def push_manifest(self, repo: Any, reference: str, data: bytes, media_type: str, *,
                            credentials: Credentials | None = None) -> Descriptor:
        """PUT a manifest or index under a tag or its digest."""
        r = as_repo(repo)
        digest = oci.sha256_digest(data)
        if oci.is_digest(reference) and reference != digest:
            raise InvalidArgument(f"pushing manifest to {r}@{reference}: content digest is {digest}")
        host = self.hosts(r.registry, "push")[-1]
        scope = f"repository:{r.repository}:pull,push"

        async def go() -> Descriptor:
            resp = await self._send(host, "PUT", manifest_url(host, r, reference), scope=scope,
                                    creds=credentials, content=data, headers={"Content-Type": media_type})
            body = await _read_bounded(resp, _MAX_ERROR_BODY)
            await resp.aclose()
            if resp.status_code not in (200, 201, 204):
                raise Unavailable(f"pushing manifest {display_ref(r, reference)}: HTTP {resp.status_code}"
                                  f"{_error_detail(body)}")
            dcd = resp.headers.get("docker-content-digest")
            if dcd and dcd != digest:
                raise DataLoss(f"registry {host.netloc} stored manifest as {clip(dcd)}, expected {digest}")
            return Descriptor(media_type, digest, len(data))
        return await self._with_retries(f"pushing manifest {display_ref(r, reference)}", go)


# --- helpers ------------------------------------------------------------------------------------

def _doc_kind(media_type: str) -> str:
    """"index", "manifest" or the media type itself: what a descriptor says it points at."""
    if media_type in oci.INDEX_TYPES:
        return "index"
    if media_type in oci.MANIFEST_TYPES:
        return "manifest"
    return media_type


def _choose_entry(index: Index, platform: Platform | None, what: str) -> Descriptor:
    """The entry of *index* to follow: the best manifest for *platform*, else (as containerd
    walks nested indexes) the first nested index whose platform is unset or matches."""
    from moorage.images.platform import Matcher, select_manifest
    try:
        return select_manifest(index.manifests, platform, what)
    except NotFound:
        m = Matcher(platform)
        for d in index.manifests:
            if d.media_type in oci.INDEX_TYPES and (d.platform is None or m.match(d.platform)):
                return d
        raise

def _ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if tls.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    for ca in tls.ca_files:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise InvalidArgument(f"cannot load registry CA certificate {ca}: {e}") from None
    for cert, key in tls.client_pairs:
        try:
            ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as e:
            raise InvalidArgument(f"cannot load registry client certificate {cert}: {e}") from None
    return ctx


def _has_request(e: httpx.TransportError) -> bool:
    try:
        return e.request is not None
    except RuntimeError:  # httpx raises when the error carries no request
        return False


def _netloc(url: str) -> str:
    return urlsplit(url).netloc.lower()


async def _send_streamed(client: httpx.AsyncClient, method: str, url: str, *,
                         auth: httpx.Auth | tuple[str, str] | None = None, **kw: Any) -> httpx.Response:
    """A streamed request whose body arrives uncompressed (it is read raw and bounded)."""
    req = client.build_request(method, url, headers={"Accept-Encoding": "identity"}, **kw)
    return await client.send(req, stream=True, auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT)


def _token_params(service: str, scopes: list[str]) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if service:
        params.append(("service", service))
    params.extend(("scope", s) for s in scopes)
    return params


def _complete_length(resp: httpx.Response) -> int | None:
    """The blob's full length a response claims to deliver whole (Content-Length of a 200,
    the total of a 206's Content-Range), or None when it does not say."""
    if resp.status_code == 200:
        cl = resp.headers.get("content-length", "")
        return int(cl) if cl.isdigit() and len(cl) < 20 else None
    m = re.match(r"\s*bytes\s+\d+-\d+/(\d{1,19})\s*$", resp.headers.get("content-range", ""))
    return int(m.group(1)) if m else None


def _content_range_start(v: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", v)
    return int(m.group(1)) if m else None


async def _read_bounded(resp: httpx.Response, limit: int, strict: bool = False) -> bytes:
    """Read at most *limit* bytes of a (possibly streamed) body.  strict: ValueError if longer."""
    if not resp.is_stream_consumed and not getattr(resp, "_content", None):
        buf = bytearray()
        try:
            async for chunk in resp.aiter_raw():
                buf += chunk
                if len(buf) > limit:
                    if strict:
                        raise ValueError("body too large")
                    break
        except httpx.StreamConsumed:  # pragma: no cover
            pass
        except httpx.TransportError:
            if strict:
                raise
        return bytes(buf[:limit])
    return resp.content[:limit]


def _is_cert_error(e: BaseException) -> bool:
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 10:
        if isinstance(cur, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _cert_error_text(e: BaseException) -> str:
    s = str(e)
    m = re.search(r"certificate verify failed: ([^(]+)", s)
    return f"certificate verify failed: {m.group(1).strip()}" if m else s


def _exc_text(e: BaseException) -> str:
    s = str(e)
    return f"{type(e).__name__}: {s}" if s else type(e).__name__


def _error_detail(body: bytes, skip_code: str = "") -> str:
    """": <registry error message>" from a distribution error body, or ""."""
    if not body:
        return ""
    try:
        doc = safejson.loads(body, what="error body", max_size=_MAX_ERROR_BODY)
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list) and errs:
            parts = []
            for e in errs[:3]:
                if isinstance(e, dict):
                    code, msg = str(e.get("code", ""))[:64], str(e.get("message", ""))[:200]
                    if code == skip_code:
                        continue
                    parts.append(f"{code}: {msg}" if code else msg)
            return f" ({'; '.join(parts)})" if parts else ""
        if isinstance(doc, dict) and isinstance(doc.get("details") or doc.get("error"), str):
            return f" ({str(doc.get('details') or doc.get('error'))[:200]})"
    except InvalidArgument:
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    return f" ({text})" if text and text.isprintable() else ""
