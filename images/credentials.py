"""Registry credentials as plain data (the CRI AuthConfig), apart from the registry client.

Kept out of ``images/registry.py`` so that what only names credentials (the node's credential
look-up, the CRI ImageService) does not import the HTTP client before the first pull.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from moorage.core.errors import InvalidArgument
from moorage.images.hosts import RegistryHost


@dataclass(frozen=True)
class Credentials:
    """CRI AuthConfig, as plain data."""

    # The secrets stay out of repr(), so a stray log line or traceback cannot show them.
    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)              # base64("user:password")
    server_address: str = ""    # when set, only sent to this host
    identity_token: str = field(default="", repr=False)    # OAuth2 refresh token
    registry_token: str = field(default="", repr=False)    # bearer token used as is

    def basic(self) -> tuple[str, str] | None:
        if self.username or self.password:
            return self.username, self.password
        if self.auth:
            try:
                raw = base64.b64decode(self.auth, validate=False).decode()
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument("credentials: auth is not valid base64 of user:password") from None
            user, sep, pw = raw.partition(":")
            if not sep:
                raise InvalidArgument("credentials: auth must encode user:password")
            return user, pw
        return None

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.auth or self.identity_token or self.registry_token)

    def applies_to(self, host: RegistryHost) -> bool:
        if not self.server_address:
            return True
        sa = self.server_address
        netloc = urlsplit(sa).netloc if "://" in sa else sa.split("/", 1)[0]
        if netloc in ("index.docker.io", "registry-1.docker.io", "docker.io"):
            netloc = "docker.io"
        return netloc in (host.netloc, host.namespace) or (
            netloc == "docker.io" and host.netloc in ("registry-1.docker.io", "index.docker.io"))

    def identity(self) -> str:
        """A cache key for tokens obtained with these credentials (not reversible to them)."""
        h = hashlib.sha256(repr((self.username, self.password, self.auth, self.identity_token,
                                 self.registry_token)).encode()).hexdigest()
        return h[:16]
