"""moorage.core.mount: EBUSY is retried, then the mount is detached lazily (and that is logged)."""

from __future__ import annotations

import errno
import logging

import pytest

from moorage.core import mount
from moorage.core.errors import Internal


class FakeUmount:
    """umount2(2) that fails with the given errnos, in order, then succeeds (then: not mounted)."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.calls: list[int] = []
        self.mounted = True

    def __call__(self, target: str, flags: int) -> None:
        self.calls.append(flags)
        if self.errors:
            e = self.errors.pop(0)
            raise OSError(e, "fake")
        if not self.mounted:
            raise OSError(errno.EINVAL, "not mounted")
        self.mounted = False


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(mount.time, "sleep", slept.append)
    return slept


def test_a_busy_mount_is_retried_until_it_lets_go(monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]) -> None:
    fake = FakeUmount(errno.EBUSY, errno.EBUSY, errno.EBUSY)
    monkeypatch.setattr(mount, "_umount", fake)
    mount.unmount("/x")
    assert fake.calls == [0, 0, 0, 0] and not fake.mounted
    assert no_sleep == [mount.UNMOUNT_BUSY_DELAY] * 3


def test_a_mount_busy_for_every_try_is_detached_lazily_and_logged(
        monkeypatch: pytest.MonkeyPatch, no_sleep: list[float], caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeUmount(*[errno.EBUSY] * mount.UNMOUNT_BUSY_TRIES)
    monkeypatch.setattr(mount, "_umount", fake)
    with caplog.at_level(logging.WARNING, logger="moorage.core.mount"):
        mount.unmount("/x")
    assert len(fake.calls) == mount.UNMOUNT_BUSY_TRIES + 1
    assert fake.calls[-1] == mount.MNT_DETACH and not fake.mounted
    assert len(no_sleep) == mount.UNMOUNT_BUSY_TRIES - 1
    assert "/x" in caplog.text and "lazily" in caplog.text


def test_unmount_all_retries_each_layer(monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]) -> None:
    layers = 3
    calls: list[int] = []

    def umount(target: str, flags: int) -> None:
        nonlocal layers
        calls.append(flags)
        if len(calls) % 2 == 1 and layers:  # every layer is busy once
            raise OSError(errno.EBUSY, "busy")
        if not layers:
            raise OSError(errno.EINVAL, "not mounted")
        layers -= 1

    monkeypatch.setattr(mount, "_umount", umount)
    mount.unmount_all("/x")
    assert layers == 0 and len(no_sleep) == 3


def test_a_target_that_is_not_mounted_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount, "_umount", FakeUmount(errno.EINVAL))
    mount.unmount("/x")


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]) -> None:
    fake = FakeUmount(errno.EPERM)
    monkeypatch.setattr(mount, "_umount", fake)
    with pytest.raises(Internal, match="unmount /x failed"):
        mount.unmount("/x")
    assert fake.calls == [0] and no_sleep == []
