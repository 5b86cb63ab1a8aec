"""A fake cgroup and /proc file system and fake runtime objects for the stats collector tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


V1_STAT = """cache 1000
rss 2000
total_cache 8388608
total_rss 67108864
total_inactive_file 4194304
total_pgfault 20000
total_pgmajfault 7
"""


def fake_fs(files: dict[str, str]) -> Callable[[str], str | None]:
    """A ``reader`` for the stats functions: a file's text, or None where ``files`` has none."""
    return files.get


def v1_files(base: str = "/cg", limit: str = "9223372036854771712\n") -> dict[str, str]:
    return {
        f"{base}/memory/c/memory.usage_in_bytes": f"{80 * MiB}\n",
        f"{base}/memory/c/memory.limit_in_bytes": limit,
        f"{base}/memory/c/memory.stat": V1_STAT,
        f"{base}/memory/c/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        f"{base}/cpuacct/c/cpuacct.usage": "123456789\n",
        f"{base}/pids/c/pids.current": "4\n",
    }


V1_DIRS = {"memory": "/cg/memory/c", "cpuacct": "/cg/cpuacct/c", "cpu": "/cg/cpu/c", "pids": "/cg/pids/c"}


@dataclass
class Ctr:
    id: str
    sandbox_id: str
    state: str = "CONTAINER_RUNNING"
    pid: int = 0
    name: str = "c_pod_0"
    metadata: dict[str, Any] = field(default_factory=lambda: {"name": "c", "attempt": 1})
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    snapshot_key: str = ""
    image_name: str = "busybox"
    image_ref: str = "sha256:x"


@dataclass
class Sb:
    id: str
    state: str = "SANDBOX_READY"
    pid: int = 0
    name: str = "pod_ns_uid_0"
    cgroup_parent: str = "/kubepods/podA"
    netns_path: str = ""
    metadata: dict[str, Any] = field(default_factory=lambda: {"name": "pod", "namespace": "ns", "uid": "u", "attempt": 0})
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class FakeRuntime:
    """The two listing calls of the runtime the stats collector uses (labels and state are not filtered)."""

    def __init__(self, sbs: Iterable[Sb], ctrs: Iterable[Ctr]) -> None:
        self.sandboxes = {s.id: s for s in sbs}
        self.containers = {c.id: c for c in ctrs}

    def list_containers(self, id_prefix: str = "", sandbox_id: str = "", labels: dict[str, str] | None = None,
                        state: str | None = None) -> list[Ctr]:
        return [c for c in self.containers.values() if c.id.startswith(id_prefix)
                and c.sandbox_id.startswith(sandbox_id)]

    def list_sandboxes(self, id_prefix: str = "", labels: dict[str, str] | None = None, state: str | None = None) -> list[Sb]:
        return [s for s in self.sandboxes.values() if s.id.startswith(id_prefix)]


def make_v2_host(tmp_path: Path, rel: str, usage_usec: int, current: int) -> Path:
    d = tmp_path / rel.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.current").write_text(f"{current}\n")
    (d / "memory.max").write_text("max\n")
    (d / "memory.stat").write_text("anon 100\nfile 0\ninactive_file 0\npgfault 1\npgmajfault 0\n")
    (d / "cpu.stat").write_text(f"usage_usec {usage_usec}\n")
    (d / "pids.current").write_text("1\n")
    (d / "cgroup.procs").write_text("")
    return d

