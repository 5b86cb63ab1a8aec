"""ImageFsInfo's disk usage accounting (images.service): sums per call, walks only on change."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from moorage.core.store import Store
from moorage.images import snapshotter as snapmod
from moorage.images.service import ImageService, ImageSettings


def make(tmp_path: Path, period: float = 10.0) -> tuple[ImageService, list[str]]:
    root = str(tmp_path / "root")
    svc = ImageService(ImageSettings(root_dir=root, snapshotter="native", fs_usage_period=period), Store(root))
    walked: list[str] = []
    real = svc.snapshots.usage

    def counting(key: str) -> snapmod.Usage:
        walked.append(key)
        return real(key)

    svc.snapshots.usage = counting  # type: ignore[method-assign]
    return svc, walked


def write(svc: ImageService, key: str, name: str, size: int) -> None:
    (mount,) = svc.snapshots.mounts(key)
    with open(os.path.join(mount.source, name), "wb") as f:
        f.write(b"x" * size)


def containers(svc: ImageService) -> tuple[int, int]:
    rows = asyncio.run(svc.fs_info())
    return rows[1][1], rows[1][2]


def test_layers_are_walked_when_new_or_their_container_changed(tmp_path: Path) -> None:
    svc, walked = make(tmp_path)
    assert containers(svc) == (0, 0) and walked == []  # zero layers
    tokens: dict[str, object] = {"c1": "created"}
    svc.layer_tokens = lambda: tokens
    svc.snapshots.prepare("c1")
    write(svc, "c1", "a", 100_000)
    used, inodes = containers(svc)  # one new layer: measured once
    assert used >= 100_000 and inodes >= 2 and walked == ["c1"]
    write(svc, "c1", "b", 200_000)
    assert containers(svc) == (used, inodes) and walked == ["c1"]  # same state: the account, no walk
    tokens["c1"] = "exited"
    assert containers(svc)[0] >= 300_000 and walked == ["c1", "c1"]  # its container changed: walked again

    for k in ("c2", "c3"):  # many
        svc.snapshots.prepare(k)
        tokens[k] = "created"
        write(svc, k, "f", 50_000)
    total = containers(svc)[0]
    assert total >= 400_000 and sorted(walked) == ["c1", "c1", "c2", "c3"]
    listed = []
    real_list = svc.store.list_snapshots
    svc.store.list_snapshots = lambda: listed.append(1) or real_list()  # type: ignore[method-assign]
    for _ in range(3):
        assert containers(svc)[0] == total
    assert len(walked) == 4 and listed == []  # nothing moved: the last answer, not even a store read
    svc.snapshots.remove("c2")
    assert containers(svc)[0] <= total - 50_000  # a removed layer leaves the sum at once
    assert len(walked) == 4 and "c2" not in svc._layers


def test_background_refresh_and_period_zero(tmp_path: Path) -> None:
    svc, walked = make(tmp_path, period=10.0)
    svc.snapshots.prepare("c1")
    before = containers(svc)[0]
    write(svc, "c1", "late", 100_000)
    for m in svc._layers.values():
        m.at -= 10.0  # a period has gone by
    svc._refresh_layers()  # what the background task runs every period
    assert containers(svc)[0] >= before + 100_000 and walked == ["c1", "c1"]

    always, walked0 = make(tmp_path / "b", period=0)
    always.snapshots.prepare("c1")
    containers(always)
    containers(always)
    assert walked0 == ["c1", "c1"]  # 0: walked on every call, as before the accounting
