"""Registry host configuration, compatible with containerd's ``certs.d`` layout.

For a registry namespace such as ``docker.io`` or ``127.0.0.1:5000`` we look for
``<hosts_dir>/<namespace>/hosts.toml`` (then ``<hosts_dir>/_default/hosts.toml``)
and produce the ordered list of hosts to try: every ``[host."..."]`` entry in
file order (mirrors), then the ``server`` (or the default upstream).  Without a
``hosts.toml`` the Docker-style certificate files in the namespace directory
(``*.crt`` CAs, ``*.cert``/``*.key`` client pairs) still apply to the default host.

Defaults: ``https://<namespace>``, except plain HTTP for loopback hosts
(``localhost``, ``127.0.0.0/8``, ``::1``) and hosts listed as insecure;
``docker.io`` goes to ``https://registry-1.docker.io``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from moorage.core.errors import InvalidArgument
from moorage.core.safejson import clip

ALL_CAPABILITIES = ("pull", "resolve", "push")
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"
DEFAULT_NAMESPACE_DIR = "_default"


@dataclass(frozen=True)
class TLSSettings:
    skip_verify: bool = False
    ca_files: tuple[str, ...] = ()
    client_pairs: tuple[tuple[str, str], ...] = ()  # (cert, key); key "" when the cert file holds both

    @property
    def is_default(self) -> bool:
        return not self.skip_verify and not self.ca_files and not self.client_pairs


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint to try for a registry namespace."""

    url: str                      # scheme://host[:port][/path] as configured
    api_root: str                 # URL that "/<repo>/manifests/..." is appended to (ends in /v2 unless override_path)
    capabilities: tuple[str, ...] = ALL_CAPABILITIES
    tls: TLSSettings = field(default_factory=TLSSettings)
    override_path: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    is_mirror: bool = False       # False for the namespace's own server
    namespace: str = ""           # the registry namespace (e.g. "docker.io") this host serves

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def netloc(self) -> str:
        return urlsplit(self.url).netloc

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def host_without_port(netloc: str) -> str:
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    if netloc.count(":") == 1:
        return netloc.split(":", 1)[0]
    return netloc


def is_loopback(netloc: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1, with or without a port."""
    h = host_without_port(netloc).lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _is_insecure(netloc: str, insecure_hosts: tuple[str, ...]) -> bool:
    if is_loopback(netloc):
        return True
    bare = host_without_port(netloc)
    return netloc in insecure_hosts or bare in insecure_hosts


def default_server(namespace: str, insecure_hosts: tuple[str, ...] = ()) -> str:
    if namespace == DOCKER_HUB:
        return DOCKER_HUB_SERVER
    scheme = "http" if _is_insecure(namespace, insecure_hosts) else "https"
    return f"{scheme}://{namespace}"


def _api_root(url: str, override_path: bool) -> str:
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not override_path:
        if not path.endswith("/v2"):
            path = path + "/v2"
    elif not path:
        path = ""
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _normalize_url(raw: str, insecure_hosts: tuple[str, ...], what: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidArgument(f"{what}: host URL must be a non-empty string")
    raw = raw.strip()
    if len(raw) > 2048 or not raw.isprintable() or any(c.isspace() for c in raw):
        raise InvalidArgument(f"{what}: host URL {clip(raw)} must be at most 2048 printable characters "
                              "without spaces")
    if "://" not in raw:
        netloc = raw.split("/", 1)[0]
        scheme = "http" if _is_insecure(netloc, insecure_hosts) else "https"
        raw = f"{scheme}://{raw}"
    try:
        parts = urlsplit(raw)
    except ValueError as e:  # e.g. an unclosed "[" of an IPv6 address
        raise InvalidArgument(f"{what}: {clip(raw)} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"{what}: unsupported scheme {clip(parts.scheme, 20)} in {clip(raw)} "
                              "(use http or https)")
    if not parts.netloc:
        raise InvalidArgument(f"{what}: {clip(raw)} has no host")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _resolve_path(p: str, base_dir: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base_dir, p)


def _parse_ca(v: Any, base_dir: str, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (_resolve_path(v, base_dir),)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(_resolve_path(x, base_dir) for x in v)
    raise InvalidArgument(f"{what}: ca must be a path or a list of paths")


def _parse_client(v: Any, base_dir: str, what: str) -> tuple[tuple[str, str], ...]:
    # containerd accepts: "cert-and-key.pem", ["cert", "key"], [["c1","k1"], ["c2","k2"]], ["pem1", "pem2"]?
    if v is None:
        return ()
    if isinstance(v, str):
        return ((_resolve_path(v, base_dir), ""),)
    if isinstance(v, list):
        if len(v) == 2 and all(isinstance(x, str) for x in v):
            # a single [cert, key] pair
            return ((_resolve_path(v[0], base_dir), _resolve_path(v[1], base_dir)),)
        out = []
        for item in v:
            if isinstance(item, str):
                out.append((_resolve_path(item, base_dir), ""))
            elif isinstance(item, list) and len(item) in (1, 2) and all(isinstance(x, str) for x in item):
                key = _resolve_path(item[1], base_dir) if len(item) == 2 else ""
                out.append((_resolve_path(item[0], base_dir), key))
            else:
                raise InvalidArgument(f"{what}: client entries must be a path or a [cert, key] pair")
        return tuple(out)
    raise InvalidArgument(f"{what}: client must be a path, a [cert, key] pair or a list of pairs")


def _parse_capabilities(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ALL_CAPABILITIES
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InvalidArgument(f"{what}: capabilities must be a list of strings")
    bad = [x for x in v if x not in ALL_CAPABILITIES]
    if bad:
        raise InvalidArgument(f"{what}: unknown capabilities {clip(', '.join(bad))} (known: pull, resolve, push)")
    return tuple(x for x in ALL_CAPABILITIES if x in v)


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}")


def _parse_headers(v: Any, what: str) -> tuple[tuple[str, str], ...]:
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise InvalidArgument(f"{what}: header must be a table")
    out: list[tuple[str, str]] = []
    for k, val in v.items():
        if isinstance(val, str):
            vals = [val]
        elif isinstance(val, list) and all(isinstance(x, str) for x in val):
            vals = val
        else:
            raise InvalidArgument(f"{what}: header {clip(k, 40)} must be a string or a list of strings")
        # A header line must stay one line: no CR/LF (request splitting) or other control characters.
        if not _HEADER_NAME.fullmatch(k):
            raise InvalidArgument(f"{what}: header name {clip(k, 40)} is not a valid HTTP field name")
        for x in vals:
            if any(c in x for c in "\r\n\x00") or not x.replace("\t", " ").isprintable():
                raise InvalidArgument(f"{what}: header {clip(k, 40)} has a control character in its value")
        out.extend((k, x) for x in vals)
    return tuple(out)


def _host_from_table(url: str, table: dict, base_dir: str, insecure_hosts: tuple[str, ...],
                     what: str, *, is_mirror: bool, namespace: str) -> RegistryHost:
    skip = table.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise InvalidArgument(f"{what}: skip_verify must be true or false")
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise InvalidArgument(f"{what}: override_path must be true or false")
    norm = _normalize_url(url, insecure_hosts, what)
    return RegistryHost(
        url=norm,
        api_root=_api_root(norm, override),
        capabilities=_parse_capabilities(table.get("capabilities"), what),
        tls=TLSSettings(
            skip_verify=skip,
            ca_files=_parse_ca(table.get("ca"), base_dir, what),
            client_pairs=_parse_client(table.get("client"), base_dir, what),
        ),
        override_path=override,
        headers=_parse_headers(table.get("header"), what),
        is_mirror=is_mirror,
        namespace=namespace,
    )


def parse_hosts_toml(text: str, namespace: str, base_dir: str = "/",
                     insecure_hosts: tuple[str, ...] = (), source: str = "hosts.toml") -> list[RegistryHost]:
    """Parse hosts.toml content for *namespace* into the ordered host list."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{source}: invalid TOML: {str(e)[:200]}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise InvalidArgument(f"{source}: invalid TOML: nested too deeply") from None
    hosts: list[RegistryHost] = []
    host_tables = doc.get("host", {})
    if not isinstance(host_tables, dict):
        raise InvalidArgument(f"{source}: [host] must be a table of tables")
    for url, table in host_tables.items():  # tomllib keeps file order
        if not isinstance(table, dict):
            raise InvalidArgument(f"{source}: host {clip(url)} must be a table")
        hosts.append(_host_from_table(url, table, base_dir, insecure_hosts, f"{source} host {clip(url)}",
                                      is_mirror=True, namespace=namespace))
    server = doc.get("server")
    if server is not None and not isinstance(server, str):
        raise InvalidArgument(f"{source}: server must be a string URL")
    server_url = server or default_server(namespace, insecure_hosts)
    # Top-level keys configure the server itself.
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    server_host = _host_from_table(server_url, top, base_dir, insecure_hosts, f"{source} server",
                                   is_mirror=False, namespace=namespace)
    # A [host."<server>"] entry identical to the server is not repeated.
    if not any(h.url == server_host.url for h in hosts):
        hosts.append(server_host)
    else:
        # containerd treats an entry naming the server like the server; keep its settings, mark it.
        hosts = [RegistryHost(**{**h.__dict__, "is_mirror": False}) if h.url == server_host.url else h
                 for h in hosts]
    return hosts


def _docker_style_certs(d: str) -> TLSSettings:
    cas: list[str] = []
    pairs: list[tuple[str, str]] = []
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return TLSSettings()
    for n in names:
        p = os.path.join(d, n)
        if n.endswith(".crt"):
            cas.append(p)
        elif n.endswith(".cert"):
            key = os.path.join(d, n[: -len(".cert")] + ".key")
            if os.path.exists(key):
                pairs.append((p, key))
    return TLSSettings(ca_files=tuple(cas), client_pairs=tuple(pairs))


def _namespace_dirs(namespace: str) -> list[str]:
    names = [namespace]
    if namespace == DOCKER_HUB:
        names.append("registry-1.docker.io")
    # containerd also looks up "host_port_" style directories (for file systems without ':').
    if ":" in namespace and not namespace.startswith("["):
        h, port = namespace.rsplit(":", 1)
        names.append(f"{h}_{port}_")
    return names


def resolve_hosts(namespace: str, hosts_dir: str | None = None,
                  insecure_hosts: tuple[str, ...] | list[str] = ()) -> list[RegistryHost]:
    """The ordered hosts to try for registry *namespace* (e.g. "docker.io", "127.0.0.1:5000")."""
    insecure = tuple(insecure_hosts)
    if not namespace or "/" in namespace:
        raise InvalidArgument(f"invalid registry host {namespace!r}")
    if hosts_dir:
        for name in _namespace_dirs(namespace):
            d = os.path.join(hosts_dir, name)
            f = os.path.join(d, "hosts.toml")
            if os.path.isfile(f):
                return _load_file(f, d, namespace, insecure)
            if os.path.isdir(d):
                tls = _docker_style_certs(d)
                if not tls.is_default:
                    url = default_server(namespace, insecure)
                    return [RegistryHost(url=url, api_root=_api_root(url, False), tls=tls,
                                         namespace=namespace)]
        d = os.path.join(hosts_dir, DEFAULT_NAMESPACE_DIR)
        f = os.path.join(d, "hosts.toml")
        if os.path.isfile(f):
            return _load_file(f, d, namespace, insecure)
    url = default_server(namespace, insecure)
    return [RegistryHost(url=url, api_root=_api_root(url, False), namespace=namespace)]


def _load_file(path: str, base_dir: str, namespace: str, insecure: tuple[str, ...]) -> list[RegistryHost]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(1024 * 1024 + 1)
    except OSError as e:
        raise InvalidArgument(f"cannot read registry hosts config {path}: {e.strerror}") from None
    if len(raw) > 1024 * 1024:
        raise InvalidArgument(f"registry hosts config {path} is larger than 1 MiB")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"registry hosts config {path} is not UTF-8") from None
    return parse_hosts_toml(text, namespace, base_dir, insecure, source=path)
