"""Object ids: 64 hex digits, as containerd and CRI-O make them."""

from __future__ import annotations

import secrets


def new_id() -> str:
    return secrets.token_hex(32)
