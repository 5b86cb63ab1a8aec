"""Image volume sub paths: relative, no '..', and no symlink leading out of the image."""

import os

import pytest

from moorage.core.errors import InvalidArgument, NotFound
from moorage.runtime.container import _check_sub_path, _resolve_sub_path


@pytest.mark.parametrize("sub", ["..", "../x", "a/../..", "a/..", "/etc", "/", "a\0b"])
def test_bad_sub_paths_are_invalid(sub):
    with pytest.raises(InvalidArgument, match="image_sub_path"):
        _check_sub_path(sub, "img")


@pytest.mark.parametrize("sub", ["", "etc", "etc/ssl", "./etc", "etc/", "a..b", "..hidden"])
def test_good_sub_paths(sub):
    _check_sub_path(sub, "img")


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "image"
    (root / "etc" / "ssl").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "usr" / "lib").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")                  # inside: fine
    os.symlink("/etc", root / "abs")                     # absolute: the host's /etc
    os.symlink("../../../../../../..", root / "up")      # relative, out of the root
    os.symlink("etc/../../outside", root / "sneaky")
    (tmp_path / "outside").mkdir()
    return str(root)


def test_sub_path_resolves_inside(image_root):
    real = os.path.realpath(image_root)
    assert _resolve_sub_path(image_root, "", "img") == image_root
    assert _resolve_sub_path(image_root, "etc", "img") == os.path.join(real, "etc")
    assert _resolve_sub_path(image_root, "etc/passwd", "img") == os.path.join(real, "etc", "passwd")
    assert _resolve_sub_path(image_root, "lib", "img") == os.path.join(real, "usr", "lib")


@pytest.mark.parametrize("sub", ["abs", "abs/passwd", "up", "sneaky"])
def test_symlinks_out_of_the_image_are_invalid(image_root, sub):
    with pytest.raises(InvalidArgument, match="outside the image"):
        _resolve_sub_path(image_root, sub, "img")


def test_missing_sub_path_is_not_found(image_root):
    with pytest.raises(NotFound, match="does not exist"):
        _resolve_sub_path(image_root, "etc/nope", "img")
