"""oom_score_adj within what this process may set."""

from __future__ import annotations


def _own_oom_floor() -> int | None:
    """Our oom_score_adj when we may not go below it (no CAP_SYS_RESOURCE), else None."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
        if eff & (1 << 24):  # CAP_SYS_RESOURCE
            return None
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read().strip())
    except (OSError, StopIteration, ValueError):
        return None


OOM_FLOOR = _own_oom_floor()


def restrict_oom_score_adj(oci_spec: dict) -> dict:
    """Raise a spec's oomScoreAdj to what this process may set, as containerd does when
    it lacks CAP_SYS_RESOURCE (runc would otherwise fail with EACCES)."""
    proc = oci_spec.get("process") or {}
    if OOM_FLOOR is not None and "oomScoreAdj" in proc and proc["oomScoreAdj"] < OOM_FLOOR:
        proc["oomScoreAdj"] = OOM_FLOOR
    return oci_spec
