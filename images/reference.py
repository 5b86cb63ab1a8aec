"""Image references: parsing and normalisation compatible with docker/containerd.

Grammar (after distribution/reference)::

    reference   := name [ ":" tag ] [ "@" digest ]
    name        := [ domain "/" ] path
    domain      := host [ ":" port ]
    host        := domain-name | IPv4 | "[" IPv6 "]"
    domain-name := component ( "." component )*       ; [a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?
    path        := path-component ( "/" path-component )*
    path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag         := [\\w][\\w.-]{0,127}
    digest      := see images.digest (sha256 / sha512 only)

Normalisation (docker's ``ParseNormalizedNamed``): the first ``/``-separated
component is a domain when it contains ``.`` or ``:``, is ``localhost`` or
contains an uppercase letter; otherwise the domain is ``docker.io``.
``index.docker.io`` is an alias of ``docker.io``.  On ``docker.io`` a
single-component path gets the ``library/`` prefix.  Without tag and digest the
tag ``latest`` is added.  The full name (``domain/path``) may be at most 255
characters.  Pure module: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from moorage.core.errors import InvalidArgument
from moorage.images.digest import Digest

__all__ = ["DEFAULT_DOMAIN", "DEFAULT_TAG", "Digest", "Reference", "parse_reference"]

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255
#: name (255) + ":" + tag (128) + "@" + a sha512 digest (135) fits with room to spare; longer
#: input is refused before any pattern runs on it.
REFERENCE_LENGTH_MAX = 1024

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_HOST = rf"(?:{_DOMAIN_NAME}|{_IPV6})"
_DOMAIN_RE = re.compile(rf"{_HOST}(?::[0-9]+)?")
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True, slots=True)
class Reference:
    """A normalised image reference.

    ``domain`` e.g. ``docker.io``; ``path`` e.g. ``library/busybox``; ``tag`` or
    ``None``; ``digest`` (:class:`Digest`) or ``None``.  At least one of tag and
    digest is set after :func:`parse_reference` (``latest`` is added).
    """

    domain: str
    path: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, value: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
        return parse_reference(value, default_tag=default_tag)

    @property
    def name(self) -> str:
        """``domain/path`` – the repository, without tag or digest."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s

    def familiar_name(self) -> str:
        """Short docker form of the name: ``busybox``, ``foo/bar``, ``quay.io/x/y``."""
        if self.domain == DEFAULT_DOMAIN:
            path = self.path
            if path.startswith(OFFICIAL_REPO_PREFIX) and "/" not in path[len(OFFICIAL_REPO_PREFIX):]:
                return path[len(OFFICIAL_REPO_PREFIX):]
            return path
        return self.name

    def familiar(self) -> str:
        """Short docker form with tag/digest: ``busybox:latest``, ``quay.io/x/y@sha256:…``."""
        s = self.familiar_name()
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s

    def docker_ref(self) -> str:
        """containerd's ``ParseDockerRef`` form: when digested, the tag is dropped
        (the digest alone identifies the content); otherwise ``name:tag``."""
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return str(self)

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"invalid tag {_quoted(tag, 40)}: must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        return replace(self, tag=tag)

    def with_digest(self, digest: Digest | str) -> Reference:
        return replace(self, digest=Digest.parse(digest))


def _quoted(value: str, limit: int = 300) -> str:
    """*value* for an error message: as typed when short and printable, else escaped and cut
    (a reference comes from the caller and must not flood a status or a log line)."""
    if len(value) <= limit and value.isprintable():
        return f"\"{value}\""
    shown = repr(value[:limit])
    if len(shown) > limit:  # escapes make it longer: cut the escaped form itself
        return shown[:limit] + f"... ({len(value)} characters in all)"
    return shown + (f"... ({len(value) - limit} more characters)" if len(value) > limit else "")


def _split_domain(name: str) -> tuple[str, str]:
    i = name.find("/")
    first = name[:i] if i >= 0 else ""
    if i == -1 or (
        not any(c in first for c in ".:") and first != "localhost" and first.lower() == first
    ):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, name[i + 1:]
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_reference(value: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse and normalise ``value``; raise InvalidArgument with the reason.

    ``default_tag`` is added when the reference has neither tag nor digest
    (pass ``None`` to keep it untagged).
    """

    if not isinstance(value, str):
        raise InvalidArgument(f"invalid reference: expected a string, got {type(value).__name__}")

    def bad(reason: str) -> InvalidArgument:
        return InvalidArgument(f"invalid reference {_quoted(value)}: {reason}")

    if value == "":
        raise bad("reference is empty")
    if len(value) > REFERENCE_LENGTH_MAX:
        raise bad(f"reference is {len(value)} characters long, over the limit of {REFERENCE_LENGTH_MAX}")
    if value != value.strip() or any(c.isspace() for c in value):
        raise bad("reference must not contain whitespace")
    if _IDENTIFIER_RE.fullmatch(value):
        raise bad("a bare 64-character hexadecimal string is an image ID, not a repository name; "
                  "use \"sha256:<hex>\" to refer to an image by ID")

    name_part, at, digest_part = value.partition("@")
    digest = None
    if at:
        if "@" in digest_part:
            raise bad("more than one \"@\"")
        try:
            digest = Digest.parse(digest_part)
        except InvalidArgument as e:
            raise bad(e.message) from None

    tag = None
    slash = name_part.rfind("/")
    colon = name_part.rfind(":")
    if colon > slash:
        name_part, tag = name_part[:colon], name_part[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise bad(f"tag {_quoted(tag, 40)} is invalid: must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")

    if name_part == "":
        raise bad("repository name must have at least one component")

    domain, path = _split_domain(name_part)

    if not _DOMAIN_RE.fullmatch(domain):
        raise bad(f"domain {_quoted(domain, 40)} is invalid: expected host[:port] (e.g. registry.example.com:5000)")
    components = path.split("/")
    for comp in components:
        if comp == "":
            raise bad("repository name has an empty path component (\"//\" or a trailing \"/\")")
        if not _PATH_COMPONENT_RE.fullmatch(comp):
            if _PATH_COMPONENT_RE.fullmatch(comp.lower()):
                raise bad("repository name must be lowercase")
            raise bad(
                f"path component {_quoted(comp, 40)} is invalid: use lowercase letters and digits, "
                "separated by \".\", \"_\", \"__\" or dashes"
            )
    full_name = f"{domain}/{path}"
    if len(full_name) > NAME_TOTAL_LENGTH_MAX:
        raise bad(f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters "
                  f"(it has {len(full_name)})")

    if tag is None and digest is None and default_tag is not None:
        tag = default_tag
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def is_image_id(value: str) -> bool:
    """True for ``sha256:<64 hex>`` (how CRI callers may refer to an image by ID)."""
    try:
        d = Digest.parse(value)
    except InvalidArgument:
        return False
    return d.algorithm == "sha256"
