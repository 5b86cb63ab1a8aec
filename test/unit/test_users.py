"""User resolution against an image rootfs's /etc/passwd and /etc/group."""

from __future__ import annotations

import os

import pytest

from moorage.core.errors import InvalidArgument, NotFound
from moorage.runtime.users import (
    parse_group,
    parse_passwd,
    read_file_in_root,
    resolve_user,
)

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:100::/home/bob:/bin/sh
broken line without colons
nohome:x:1002:1002:::
"""

GROUP = """\
root:x:0:
users:x:100:alice
wheel:x:10:alice,bob
alice:x:1000:
video:x:44:bob , alice
staff:x:50:
"""


@pytest.fixture
def rootfs(tmp_path):
    etc = tmp_path / "rootfs" / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    return str(tmp_path / "rootfs")


def test_parsers_skip_garbage():
    users = parse_passwd(PASSWD.encode())
    assert [u.name for u in users] == ["root", "daemon", "alice", "bob", "nohome"]
    groups = parse_group(GROUP.encode())
    assert next(g for g in groups if g.name == "video").members == ("bob", "alice")


def test_default_is_root(rootfs):
    assert resolve_user(rootfs, None, None, None, [], "") == (0, 0, [0], "/root")


@pytest.mark.parametrize(
    "image_user, expected",
    [
        ("alice", (1000, 1000, [1000, 100, 10, 44], "/home/alice")),
        ("1000", (1000, 1000, [1000, 100, 10, 44], "/home/alice")),
        ("alice:staff", (1000, 50, [50, 100, 10, 44], "/home/alice")),
        ("alice:77", (1000, 77, [77, 100, 10, 44], "/home/alice")),
        ("1001:100", (1001, 100, [100, 10, 44], "/home/bob")),
        ("4242", (4242, 0, [0], "/")),
        ("4242:4242", (4242, 4242, [4242], "/")),
        ("nohome", (1002, 1002, [1002], "/")),
    ],
)
def test_image_user_forms(rootfs, image_user, expected):
    assert resolve_user(rootfs, None, None, None, [], image_user) == expected


def test_unknown_username_is_clear(rootfs):
    with pytest.raises(NotFound, match=r'user "mallory" not found in the image\'s /etc/passwd'):
        resolve_user(rootfs, None, None, None, [], "mallory")
    with pytest.raises(NotFound, match="mallory"):
        resolve_user(rootfs, None, "mallory", None, [], "")


def test_unknown_group_is_clear(rootfs):
    with pytest.raises(NotFound, match=r'group "nogroup" not found'):
        resolve_user(rootfs, None, None, None, [], "alice:nogroup")


def test_group_without_user_rejected(rootfs):
    with pytest.raises(InvalidArgument):
        resolve_user(rootfs, None, None, None, [], ":100")


def test_run_as_user_overrides_image(rootfs):
    assert resolve_user(rootfs, 1001, None, None, [], "alice") == (1001, 100, [100, 10, 44], "/home/bob")


def test_run_as_user_not_in_passwd_gets_gid0(rootfs):
    assert resolve_user(rootfs, 5555, None, None, [], "alice") == (5555, 0, [0], "/")


def test_run_as_username_wins_over_uid(rootfs):
    uid, gid, _, home = resolve_user(rootfs, 1001, "alice", None, [], "")
    assert (uid, gid, home) == (1000, 1000, "/home/alice")


def test_run_as_group_and_supplemental(rootfs):
    uid, gid, extra, _ = resolve_user(rootfs, 1000, None, 3000, [4000, 10, 4000], "")
    assert (uid, gid) == (1000, 3000)
    assert extra == [3000, 100, 10, 44, 4000]


def test_strict_policy_ignores_etc_group(rootfs):
    _, _, extra, _ = resolve_user(
        rootfs, 1000, None, 3000, [4000], "", supplemental_groups_policy="Strict"
    )
    assert extra == [3000, 4000]


def test_bad_policy(rootfs):
    with pytest.raises(InvalidArgument):
        resolve_user(rootfs, 0, None, None, [], "", supplemental_groups_policy="Loose")


def test_out_of_range_ids(rootfs):
    with pytest.raises(InvalidArgument):
        resolve_user(rootfs, -1, None, None, [], "")
    with pytest.raises(InvalidArgument):
        resolve_user(rootfs, 0, None, 1 << 33, [], "")
    with pytest.raises(InvalidArgument):
        resolve_user(rootfs, 0, None, None, [-5], "")


def test_missing_files_numeric_ok(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_user(str(empty), 12, None, 34, [56], "") == (12, 34, [34, 56], "/")
    assert resolve_user(None, None, None, None, [], "7:8") == (7, 8, [8], "/")
    with pytest.raises(NotFound):
        resolve_user(str(empty), None, None, None, [], "alice")


def test_symlink_outside_rootfs_is_not_followed_to_host(tmp_path):
    # A "host" passwd outside the rootfs with a user the image does not have.
    host = tmp_path / "host"
    host.mkdir()
    (host / "passwd").write_text("hostonly:x:777:777::/home/hostonly:/bin/sh\n")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    # Absolute symlink: must resolve inside the rootfs (where it does not exist).
    os.symlink(str(host / "passwd"), root / "etc" / "passwd")
    with pytest.raises(NotFound):
        resolve_user(str(root), None, None, None, [], "hostonly")
    # Relative symlink climbing out with ..: clamped at the rootfs.
    os.unlink(root / "etc" / "passwd")
    os.symlink("../../../../../../host/passwd", root / "etc" / "passwd")
    with pytest.raises(NotFound):
        resolve_user(str(root), None, None, None, [], "hostonly")
    assert read_file_in_root(str(root), "/etc/passwd") is None


def test_symlink_resolved_inside_rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "pw").write_text("carol:x:2000:2000::/home/carol:/bin/sh\n")
    # Absolute target is interpreted relative to the rootfs.
    os.symlink("/data/pw", root / "etc" / "passwd")
    assert resolve_user(str(root), None, None, None, [], "carol")[:2] == (2000, 2000)
    # A symlinked directory component also works, and ".." stays in the root.
    os.unlink(root / "etc" / "passwd")
    os.rename(root / "etc", root / "real-etc")
    os.symlink("../../../real-etc", root / "etc")
    (root / "real-etc" / "passwd").write_text("dave:x:3000:3001::/:/bin/sh\n")
    assert resolve_user(str(root), None, None, None, [], "dave")[:2] == (3000, 3001)


def test_symlink_loop_is_harmless(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc/passwd", root / "etc" / "passwd")
    assert read_file_in_root(str(root), "/etc/passwd") is None
    assert resolve_user(str(root), 5, None, None, [], "") == (5, 0, [0], "/")


def test_non_regular_file_is_ignored(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc" / "passwd").mkdir(parents=True)
    assert read_file_in_root(str(root), "/etc/passwd") is None
    os.rmdir(root / "etc" / "passwd")
    os.mkfifo(root / "etc" / "passwd")
    assert read_file_in_root(str(root), "/etc/passwd") is None


def test_oversized_passwd_is_refused(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"#" * 100 + b"\n")
    assert read_file_in_root(str(root), "/etc/passwd", limit=101) is not None
    with pytest.raises(InvalidArgument, match="larger than"):
        read_file_in_root(str(root), "/etc/passwd", limit=50)
