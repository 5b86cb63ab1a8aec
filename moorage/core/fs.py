"""File-system helpers shared by the layers."""

from __future__ import annotations

import os
import shutil
import stat
from typing import TextIO


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it; a missing path is fine."""
    shutil.rmtree(path, ignore_errors=True)


# Least privilege on disk: what may hold secrets (container env in OCI bundles, the metadata
# store, image content) is root-only.  Modes are set at creation and tightened at start for
# what an older version made looser.

def private_dir(path: str) -> None:
    """``path`` exists as a 0700 directory (made, or tightened if it was looser)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if stat.S_IMODE(os.stat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)


def restrict_file(path: str) -> None:
    """Drop group and other access to ``path`` if it exists (a symlink is left alone)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def open_private(path: str) -> TextIO:
    """``path`` opened for writing text, truncated, mode 0600 whatever it was before."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "w")
    except BaseException:
        os.close(fd)
        raise
