"""OCI layouts as tar archives (for the archive import tests)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path


def tar_layout(layout_dir: str, out: str, mutate: Callable[[str, bytes], bytes] | None = None) -> str:
    """Write ``layout_dir`` as a tar to ``out``; ``mutate(name, data)`` may rewrite each member's bytes."""
    with tarfile.open(out, "w") as tf:
        for dirpath, _, files in os.walk(layout_dir):
            for f in sorted(files):
                full = os.path.join(dirpath, f)
                arc = os.path.relpath(full, layout_dir)
                data = Path(full).read_bytes()
                if mutate is not None:
                    data = mutate(arc, data)
                ti = tarfile.TarInfo(arc)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return out

