"""Node registry credentials: a Docker-style auth file and ``docker-credential-<helper>``s.

The file is the one the kubelet reads (``config.json``)::

    {"auths": {"registry.example:5000": {"auth": "<base64 user:password>"},
               "https://*.example.com/team": {"username": "u", "password": "p"},
               "other.example": {"identitytoken": "<refresh token>"}},
     "credHelpers": {"gcr.io": "gcloud"},
     "credsStore": "pass"}

The legacy ``.dockercfg`` form (the ``auths`` map at the top level) is read too.

Key matching follows the kubelet's rules, so one file means the same to both: a key may
carry a scheme (ignored) and a path; its host is matched label by label with ``*`` globs
(``*.example.com`` matches ``a.example.com``, not ``example.com``), its port must equal the
registry's (a key without a port does not match ``host:5000``), and its path must be a
prefix, by whole components, of the repository.  Docker Hub's spellings
(``https://index.docker.io/v1/``, ``registry-1.docker.io``, ``docker.io``) are one host.
The most specific match wins: a literal host before a glob, then the longest path.

For a host, a helper comes first (``credHelpers`` for it, else ``credsStore``), then
``auths``.  A helper that answers "not found" falls through to ``auths``; one that is
missing, fails, times out or prints nonsense is an error naming the helper and the host.
Secrets never reach a log line, an error message or the store: ``Credentials`` hides them
from ``repr`` and the messages here only name files, helpers and hosts.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from moorage.core import safejson
from moorage.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from moorage.images.credentials import Credentials

log = logging.getLogger(__name__)

HELPER_PREFIX = "docker-credential-"
DOCKER_HUB = "docker.io"
_HUB_LABELS = ("docker", "io")
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HUB_SERVER_URL = "https://index.docker.io/v1/"  # what helpers know Docker Hub by
HELPER_CACHE_SECONDS = 30.0  # a pull makes many requests; one helper run serves them all
_MAX_HELPER_OUTPUT = 1024 * 1024
MAX_AUTH_FILE = 16 * 1024 * 1024


@dataclass(frozen=True)
class _Key:
    """A parsed auth file key: host labels (may hold ``*``), port, path components."""

    text: str
    labels: tuple[str, ...]
    port: str
    path: tuple[str, ...]

    @property
    def glob(self) -> bool:
        return any("*" in label for label in self.labels)

    def matches(self, labels: tuple[str, ...], port: str, path: tuple[str, ...]) -> bool:
        if len(labels) != len(self.labels) or port != self.port:
            return False
        if not all(fnmatch.fnmatchcase(have, want) for have, want in zip(labels, self.labels)):
            return False
        return path[:len(self.path)] == self.path

    def rank(self) -> tuple[int, int]:
        return (0 if self.glob else 1, len(self.path))


def _split_host(netloc: str) -> tuple[tuple[str, ...], str]:
    host, port = netloc.lower(), ""
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        host, port = host[:end + 1], host[end + 2:] if end >= 0 and host[end + 1:end + 2] == ":" else ""
        return (host,), port
    if host.count(":") == 1:
        host, port = host.split(":")
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
    return tuple(host.split(".")), port


def parse_key(key: str) -> _Key:
    """``https://host:port/path/`` (scheme and path optional) → a matchable key."""
    s = key.strip()
    for scheme in ("https://", "http://"):
        if s.lower().startswith(scheme):
            s = s[len(scheme):]
            break
    netloc, _, path = s.partition("/")
    labels, port = _split_host(netloc)
    parts = tuple(p for p in path.split("/") if p)
    if labels == _HUB_LABELS and parts[:1] == ("v1",):
        parts = parts[1:]  # the legacy index URL names the whole hub, not a "v1" namespace
    return _Key(key, labels, port, parts)


def _decode_auth(where: str, value: Any) -> tuple[str, str]:
    try:
        raw = base64.b64decode(str(value), validate=False).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise FailedPrecondition(f"{where}: \"auth\" is not base64 of user:password") from None
    user, sep, password = raw.partition(":")
    if not sep:
        raise FailedPrecondition(f"{where}: \"auth\" does not encode user:password")
    return user, password


def _entry_credentials(where: str, entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        raise FailedPrecondition(f"{where}: expected an object")
    def text(name: str) -> str:
        v = entry.get(name) or ""
        if not isinstance(v, str):
            raise FailedPrecondition(f"{where}: \"{name}\" must be a string")
        return v
    username, password = text("username"), text("password")
    if text("auth"):
        username, password = _decode_auth(where, entry["auth"])
    creds = Credentials(username=username, password=password, identity_token=text("identitytoken"),
                        registry_token=text("registrytoken"))
    return None if creds.empty else creds


@dataclass
class AuthFile:
    """The parsed file: ``auths`` entries, ``credHelpers``, ``credsStore``."""

    auths: list[tuple[_Key, Credentials]]
    helpers: list[tuple[_Key, str]]
    store: str

    @classmethod
    def parse(cls, path: str, data: bytes) -> AuthFile:
        try:
            doc = safejson.loads(data, what=f"registry auth file {path}", max_size=MAX_AUTH_FILE)
        except InvalidArgument as e:  # the message names the file, never its content
            raise FailedPrecondition(e.message) from None
        if not isinstance(doc, dict):
            raise FailedPrecondition(f"registry auth file {path}: expected a JSON object")
        known = ("auths", "credHelpers", "credsStore")
        if any(k in doc for k in known):
            auths = doc.get("auths") or {}
        else:
            auths = {k: v for k, v in doc.items() if isinstance(v, dict)}  # legacy .dockercfg
        if not isinstance(auths, dict):
            raise FailedPrecondition(f"registry auth file {path}: \"auths\" must be an object")
        entries = []
        for key, entry in auths.items():
            creds = _entry_credentials(f"registry auth file {path}: auths[{key!r}]", entry)
            if creds is not None:
                entries.append((parse_key(key), creds))
        helpers_doc = doc.get("credHelpers") or {}
        if not isinstance(helpers_doc, dict) or not all(isinstance(v, str) for v in helpers_doc.values()):
            raise FailedPrecondition(f"registry auth file {path}: \"credHelpers\" must map hosts to helper names")
        store = doc.get("credsStore") or ""
        if not isinstance(store, str):
            raise FailedPrecondition(f"registry auth file {path}: \"credsStore\" must be a helper name")
        for name in [store, *helpers_doc.values()]:
            if name and ("/" in name or name.startswith(".")):
                raise FailedPrecondition(f"registry auth file {path}: invalid credential helper name {name!r}")
        return cls(auths=entries, helpers=[(parse_key(k), v) for k, v in helpers_doc.items() if v], store=store)


def _best(items: list[tuple[_Key, Any]], labels: tuple[str, ...], port: str, path: tuple[str, ...]) -> Any:
    found = [(k, v) for k, v in items if k.matches(labels, port, path)]
    if not found:
        return None
    return max(found, key=lambda kv: kv[0].rank())[1]


class NodeCredentials:
    """Credentials this node holds for registries (thread-safe; ``lookup`` blocks)."""

    def __init__(self, auth_file: str, helper_timeout: float = 10.0, *,
                 cache_seconds: float = HELPER_CACHE_SECONDS) -> None:
        self.auth_file = auth_file
        self.helper_timeout = helper_timeout
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._parsed: AuthFile | None = None
        self._stamp: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of what _parsed holds
        self._helper_cache: dict[tuple[str, str], tuple[float, Credentials | None]] = {}

    def _load(self) -> AuthFile | None:
        """The file as it is now (re-read when it changed); None when there is none."""
        if not self.auth_file:
            return None
        try:
            st = os.stat(self.auth_file)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FailedPrecondition(f"registry auth file {self.auth_file}: {e.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp == self._stamp:
                return self._parsed
        try:
            with open(self.auth_file, "rb") as f:
                data = f.read(MAX_AUTH_FILE)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FailedPrecondition(f"registry auth file {self.auth_file}: {e.strerror}") from None
        parsed = AuthFile.parse(self.auth_file, data)
        with self._lock:
            self._parsed, self._stamp = parsed, stamp
            self._helper_cache.clear()  # the helpers configured may have changed
        return parsed

    def lookup(self, host: str, repository: str = "") -> Credentials | None:
        """Credentials for ``host`` (``host[:port]``, as contacted) and ``repository``, or None."""
        parsed = self._load()
        if parsed is None:
            return None
        labels, port = _split_host(host)
        path = tuple(p for p in repository.split("/") if p)
        helper = _best(parsed.helpers, labels, port, path) or parsed.store
        if helper:
            creds = self._from_helper(helper, host)
            if creds is not None:
                return creds
        found: Credentials | None = _best(parsed.auths, labels, port, path)
        return found

    # -- helpers ----------------------------------------------------------------------------

    def _from_helper(self, helper: str, host: str) -> Credentials | None:
        labels, _ = _split_host(host)
        server = _HUB_SERVER_URL if labels == _HUB_LABELS else host
        now = time.monotonic()
        with self._lock:
            hit = self._helper_cache.get((helper, server))
            if hit is not None and hit[0] > now:
                return hit[1]
        creds = run_helper(helper, server, self.helper_timeout)
        with self._lock:
            self._helper_cache[(helper, server)] = (now + self.cache_seconds, creds)
        return creds


def run_helper(helper: str, server: str, timeout: float) -> Credentials | None:
    """``docker-credential-<helper> get`` for ``server``; None when it has nothing for it."""
    name = HELPER_PREFIX + helper
    what = f"credential helper {name} for registry {server}"
    exe = shutil.which(name)
    if exe is None:
        raise FailedPrecondition(f"{what}: {name} is not on the daemon's PATH")
    try:
        proc = subprocess.run([exe, "get"], input=server.encode(), capture_output=True, timeout=timeout,
                              check=False, close_fds=True)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what}: no answer within {timeout:g}s") from None
    except OSError as e:
        raise FailedPrecondition(f"{what}: cannot run it: {e.strerror}") from None
    if proc.returncode != 0:
        # A failing helper reports on stdout (the protocol) or stderr; neither holds a secret then.
        msg = (proc.stdout or proc.stderr)[:_MAX_HELPER_OUTPUT].decode(errors="replace").strip()
        if "credentials not found" in msg.lower():
            return None
        first = msg.splitlines()[0][:200] if msg else ""
        raise Unavailable(f"{what}: exited with status {proc.returncode}" + (f": {first}" if first else ""))
    try:
        doc = safejson.loads(proc.stdout[:_MAX_HELPER_OUTPUT], what=what, max_size=_MAX_HELPER_OUTPUT)
    except InvalidArgument:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("Username", ""), str) \
            or not isinstance(doc.get("Secret", ""), str):
        # never quote the output: it is meant to hold a secret
        raise Unavailable(f"{what}: answered something that is not {{\"Username\", \"Secret\"}} JSON")
    user, secret = doc.get("Username") or "", doc.get("Secret") or ""
    if not secret:
        return None
    if user == "<token>":  # the protocol's marker for an identity (refresh) token
        return Credentials(identity_token=secret)
    return Credentials(username=user, password=secret)
