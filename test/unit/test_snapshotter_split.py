"""Containers' writable layers under a separate container root (no mounts needed: paths only)."""

from __future__ import annotations

import os

from moorage.images import snapshotter as snapmod


def _dirs(root) -> list[str]:
    return sorted(os.listdir(os.path.join(root, "snapshots")))


def test_writable_layers_go_to_the_container_root(tmp_path):
    img, ctr = tmp_path / "img", tmp_path / "ctr"
    meta = snapmod.MemoryMetaStore()
    s = snapmod.Snapshotter(str(img), meta, backend=snapmod.BACKEND_OVERLAY, container_root=str(ctr))
    s.prepare("extract-1", None)
    s.commit("layer1", "extract-1")
    mounts = s.prepare("ctr1", "layer1", container=True)
    s.view("vol1", "layer1")
    assert _dirs(img) == ["1", "3"] and _dirs(ctr) == ["c2"]
    upper = next(o for o in mounts[0].options if o.startswith("upperdir="))
    assert upper.startswith(f"upperdir={ctr}/snapshots/c2/")
    assert s.upper_dir("ctr1") == str(ctr / "snapshots" / "c2" / "fs")
    assert s.container_dir() == str(ctr)

    # a new snapshotter over the same roots numbers on after both, and cleans orphans in both
    os.mkdir(ctr / "snapshots" / "c9")
    os.mkdir(img / "snapshots" / "8")
    s2 = snapmod.Snapshotter(str(img), meta, backend=snapmod.BACKEND_OVERLAY, container_root=str(ctr))
    assert sorted(s2.cleanup()) == ["8", "c9"]
    s2.prepare("ctr2", "layer1", container=True)
    assert _dirs(ctr) == ["c10", "c2"]
    s2.remove("ctr1")
    assert _dirs(ctr) == ["c10"] and _dirs(img) == ["1", "3"]


def test_without_a_container_root_everything_stays_together(tmp_path):
    s = snapmod.Snapshotter(str(tmp_path), snapmod.MemoryMetaStore(), backend=snapmod.BACKEND_NATIVE)
    s.prepare("ctr", None, container=True)
    assert _dirs(tmp_path) == ["1"] and s.container_dir() == str(tmp_path)
