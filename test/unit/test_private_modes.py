"""Root-only modes for what may hold secrets, at creation and tightened at start (issue #14)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from moorage.core.fs import open_private, private_dir, restrict_file
from moorage.core.store import DB_NAME, Store


def _mode(p: Path | str) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_new_store_files_are_root_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        s = Store(str(tmp_path))
        s.close()
    finally:
        os.umask(old)
    files = [p for p in tmp_path.iterdir() if p.name.startswith(DB_NAME)]
    assert files and all(_mode(p) == 0o600 for p in files), [(p.name, oct(_mode(p))) for p in files]


def test_store_files_left_readable_by_an_older_version_are_tightened(tmp_path: Path) -> None:
    Store(str(tmp_path)).close()
    names = [DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"]
    for n in names:
        p = tmp_path / n
        p.touch(exist_ok=True)
        os.chmod(p, 0o644)
    s = Store(str(tmp_path))
    try:
        assert [oct(_mode(tmp_path / n)) for n in names] == [oct(0o600)] * 3
    finally:
        s.close()


def test_private_dir_makes_and_tightens(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b"
    private_dir(str(new))
    assert _mode(new) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    private_dir(str(loose))
    assert _mode(loose) == 0o700


def test_open_private_writes_0600_even_over_a_looser_file(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text("old")
    os.chmod(p, 0o644)
    with open_private(str(p)) as f:
        f.write("{}")
    assert (p.read_text(), _mode(p)) == ("{}", 0o600)
    q = tmp_path / "new.json"
    with open_private(str(q)) as f:
        f.write("x")
    assert _mode(q) == 0o600


def test_restrict_file_keeps_owner_bits_and_leaves_links_and_missing_paths(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_text("x")
    os.chmod(p, 0o754)
    restrict_file(str(p))
    assert _mode(p) == 0o700
    target = tmp_path / "t"
    target.write_text("x")
    os.chmod(target, 0o644)
    link = tmp_path / "l"
    link.symlink_to(target)
    restrict_file(str(link))
    assert _mode(target) == 0o644
    restrict_file(str(tmp_path / "missing"))  # no error
