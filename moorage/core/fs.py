"""File-system helpers shared by the layers."""

from __future__ import annotations

import shutil


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it; a missing path is fine."""
    shutil.rmtree(path, ignore_errors=True)
