"""Content digests (``algorithm:hex``) as used by OCI descriptors.

Only the algorithms the OCI image spec registers are accepted: ``sha256``
(64 lowercase hex characters) and ``sha512`` (128).  Anything else is
rejected with :class:`~runtime.errors.InvalidArgument`, because a digest we
cannot verify is as good as no digest.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from moorage.core.errors import InvalidArgument
from moorage.core.safejson import clip

# algorithm -> number of hex characters in an encoded digest
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

_ALGORITHM_GRAMMAR = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*")
_HEX = re.compile(r"[a-f0-9]+")
# sha512: 6 + 1 + 128; a longer value cannot be a digest we know, and is not quoted whole
_MAX_DIGEST_LENGTH = 160


class Hasher(Protocol):
    """What hashlib's objects offer (their class is private to hashlib)."""

    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, value: str | Digest) -> Digest:
        """Parse and validate ``sha256:<64 hex>`` / ``sha512:<128 hex>``."""
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str):
            raise InvalidArgument(f"invalid digest: expected a string like \"sha256:<hex>\", got {type(value).__name__}")
        if len(value) > _MAX_DIGEST_LENGTH or not value.isprintable():
            raise InvalidArgument(f"invalid digest {clip(value, 80)}: expected \"<algorithm>:<hex>\" of at most "
                                  f"{_MAX_DIGEST_LENGTH} printable characters")
        algorithm, sep, encoded = value.partition(":")
        if not sep or not algorithm or not encoded:
            raise InvalidArgument(
                f"invalid digest \"{value}\": expected the form \"<algorithm>:<hex>\", e.g. \"sha256:<64 hex characters>\""
            )
        if not _ALGORITHM_GRAMMAR.fullmatch(algorithm):
            raise InvalidArgument(f"invalid digest \"{value}\": malformed algorithm \"{algorithm}\"")
        expected_len = ALGORITHMS.get(algorithm)
        if expected_len is None:
            raise InvalidArgument(
                f"invalid digest \"{value}\": unsupported algorithm \"{algorithm}\" (supported: {', '.join(ALGORITHMS)})"
            )
        if not _HEX.fullmatch(encoded):
            raise InvalidArgument(
                f"invalid digest \"{value}\": the encoded part must be lowercase hexadecimal [a-f0-9]"
            )
        if len(encoded) != expected_len:
            raise InvalidArgument(
                f"invalid digest \"{value}\": {algorithm} needs {expected_len} hex characters, got {len(encoded)}"
            )
        return cls(algorithm, encoded)

    @classmethod
    def from_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        if algorithm not in ALGORITHMS:
            raise InvalidArgument(f"unsupported digest algorithm \"{algorithm}\"")
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Hasher:
        """A fresh hashlib object for this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        """``sha256:0123456789ab`` – for log lines, not for lookups."""
        return f"{self.algorithm}:{self.hex[:12]}"


def parse_digest(value: str | Digest) -> Digest:
    return Digest.parse(value)


def new_hasher(algorithm: str = "sha256") -> Hasher:
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"unsupported digest algorithm \"{algorithm}\"")
    return hashlib.new(algorithm)
