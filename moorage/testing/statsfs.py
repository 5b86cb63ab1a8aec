"""A fake cgroup and /proc file system and fake runtime objects for the stats collector tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moorage.runtime.context import RuntimeSettings
from moorage.runtime.records import Container, Sandbox
from moorage.testing import records

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


#: Real records for the fakes below.
Ctr = records.container
Sb = records.sandbox


class FakeRuntime:
    """What ``runtime.stats.StatsSource`` asks of the runtime."""

    def __init__(self, sbs: list[Sandbox], ctrs: list[Container]) -> None:
        self.s = RuntimeSettings(root_dir="", state_dir="", handlers={})
        self.images: Any = None  # tests put a fake with container_usage here
        self.sandboxes = {s.id: s for s in sbs}
        self.containers = {c.id: c for c in ctrs}

    def list_containers(self, id_prefix: str = "", sandbox_id: str = "", labels: object = None,
                        state: object = None) -> list[Container]:
        return [c for c in self.containers.values() if c.id.startswith(id_prefix)
                and c.metadata.sandbox_id.startswith(sandbox_id)]

    def list_sandboxes(self, id_prefix: str = "", labels: object = None, state: object = None) -> list[Sandbox]:
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

