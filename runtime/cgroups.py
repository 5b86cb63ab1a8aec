"""Locating container cgroups and reading them, for cgroup v1 and v2.

Pure parsers for the kernel's text formats (``/proc/<pid>/cgroup``,
``/proc/self/mountinfo``, ``memory.stat``, ``memory.events``, ...) are kept
separate from the thin readers that open files, so the parsers are unit-tested
without a kernel.

Naming used below:

* a *cgroup path* is what ``/proc/<pid>/cgroup`` shows and what OCI
  ``linux.cgroupsPath`` means for the cgroupfs driver: ``/kubepods/pod1/ctr``;
* a *cgroup dir* is where that path lives on the host filesystem for one
  hierarchy: ``/sys/fs/cgroup/memory/kubepods/pod1/ctr``.

On v1 each controller has its own hierarchy (and so its own dir); on v2 there is
one unified hierarchy, keyed ``""`` in the mappings returned here.

The OCI ``linux.cgroupsPath`` a container gets is built in one place,
``spec.cgroups_path``; the figures the stats RPCs need are read in one place,
``stats.read_cgroup`` (with the parsers below).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from moorage.core.errors import FailedPrecondition, InvalidArgument

CGROUP_ROOT = "/sys/fs/cgroup"
UNIFIED = ""  # key of the v2 hierarchy in controller mappings


# --------------------------------------------------------------------------- pure parsers


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Parse ``/proc/<pid>/cgroup`` into ``{controller: cgroup path}``.

    v1 lines look like ``4:memory:/kubepods/x``; co-mounted controllers
    (``2:cpu,cpuacct:/x``) yield one key per controller; named hierarchies keep
    their ``name=`` prefix (``name=systemd``).  The v2 line ``0::/x`` is keyed
    ``""``.
    """
    result: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            result[UNIFIED] = path
            continue
        for ctrl in controllers.split(","):
            result[ctrl] = path
    return result


@dataclass(frozen=True)
class CgroupMount:
    mountpoint: str
    root: str  # the cgroup path mounted there ("/" unless inside a cgroup namespace/bind mount)
    version: int  # 1 or 2
    controllers: tuple[str, ...]  # v1 controllers (incl. "name=..."); () for v2


def parse_mountinfo_cgroups(text: str) -> list[CgroupMount]:
    """Cgroup mounts from ``/proc/self/mountinfo`` text.

    A mountinfo line is ``id parent maj:min root mountpoint opts [optional...] - fstype source superopts``.
    """
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        if " - " not in line:
            continue
        left, right = line.split(" - ", 1)
        lf = left.split()
        rf = right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        fstype = rf[0]
        root, mountpoint = _unescape_mountinfo(lf[3]), _unescape_mountinfo(lf[4])
        if fstype == "cgroup2":
            mounts.append(CgroupMount(mountpoint, root, 2, ()))
        elif fstype == "cgroup":
            known = {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio",
                     "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc"}
            ctrls = tuple(o for o in rf[2].split(",") if o in known or o.startswith("name="))
            mounts.append(CgroupMount(mountpoint, root, 1, ctrls))
    return mounts


def _unescape_mountinfo(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (memory.stat, memory.events, cpu.stat, memory.oom_control)."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            result[parts[0]] = int(parts[1])
        except ValueError:
            continue
    return result


def parse_single_value(text: str) -> int | None:
    """Parse a one-number file; ``max`` (v2 "no limit") gives ``None``."""
    s = text.strip()
    if s == "max" or s == "":
        return None
    return int(s)


def parse_oom_kill_count(text: str) -> int:
    """``oom_kill`` count from v1 ``memory.oom_control`` or v2 ``memory.events`` text (0 if absent)."""
    return parse_flat_keyed(text).get("oom_kill", 0)


# v1 reports "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX * page size).
_V1_UNLIMITED_THRESHOLD = 1 << 62


def working_set(usage: int, inactive_file: int) -> int:
    """Working set as the kubelet/cAdvisor computes it: usage minus inactive file cache, floored at 0."""
    return max(0, usage - inactive_file)


def memory_stats_v1(usage_text: str, limit_text: str, stat_text: str, oom_text: str = "") -> dict[str, int | None]:
    stat = parse_flat_keyed(stat_text)
    usage = parse_single_value(usage_text)
    limit = parse_single_value(limit_text)
    if limit is not None and limit >= _V1_UNLIMITED_THRESHOLD:
        limit = None
    inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return {
        "usage": usage,
        "working_set": working_set(usage, inactive) if usage is not None else None,
        "rss": stat.get("total_rss", stat.get("rss")),
        "limit": limit,
        "pgfault": stat.get("total_pgfault", stat.get("pgfault")),
        "pgmajfault": stat.get("total_pgmajfault", stat.get("pgmajfault")),
        "oom_kills": parse_oom_kill_count(oom_text),
    }


def memory_stats_v2(current_text: str, max_text: str, stat_text: str, events_text: str = "") -> dict[str, int | None]:
    stat = parse_flat_keyed(stat_text)
    usage = parse_single_value(current_text)
    return {
        "usage": usage,
        "working_set": working_set(usage, stat.get("inactive_file", 0)) if usage is not None else None,
        "rss": stat.get("anon"),
        "limit": parse_single_value(max_text),
        "pgfault": stat.get("pgfault"),
        "pgmajfault": stat.get("pgmajfault"),
        "oom_kills": parse_oom_kill_count(events_text),
    }


def cpu_usage_ns_v2(cpu_stat_text: str) -> int | None:
    usec = parse_flat_keyed(cpu_stat_text).get("usage_usec")
    return None if usec is None else usec * 1000


# --------------------------------------------------------------------------- host readers


def cgroup_version(root: str = CGROUP_ROOT) -> int:
    """2 if *root* is a pure cgroup2 mount, else 1 (hybrid hosts count as v1)."""
    return 2 if os.path.exists(os.path.join(root, "cgroup.controllers")) else 1


def host_mounts() -> list[CgroupMount]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo_cgroups(f.read())


def _dir_for(mount: CgroupMount, path: str) -> str:
    rel = os.path.relpath(path, mount.root) if path.startswith(mount.root) else path.lstrip("/")
    rel = "" if rel == "." else rel
    return os.path.normpath(os.path.join(mount.mountpoint, rel.lstrip("/")))


def cgroup_dirs(paths: dict[str, str], mounts: list[CgroupMount] | None = None) -> dict[str, str]:
    """Map ``{controller: cgroup path}`` (as from ``/proc/<pid>/cgroup``) to host dirs.

    On a pure v2 host the result is ``{"": dir}``; on v1/hybrid one entry per
    mounted controller (plus ``""`` for a hybrid unified mount).
    """
    mounts = host_mounts() if mounts is None else mounts
    out: dict[str, str] = {}
    for m in mounts:
        if m.version == 2:
            if UNIFIED in paths:
                out.setdefault(UNIFIED, _dir_for(m, paths[UNIFIED]))
            continue
        for ctrl in m.controllers:
            if ctrl in paths:
                out.setdefault(ctrl, _dir_for(m, paths[ctrl]))
    return out


def cgroup_dirs_for_pid(pid: int, mounts: list[CgroupMount] | None = None) -> dict[str, str]:
    """Host cgroup dirs of a live process; raises ``FailedPrecondition`` if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise FailedPrecondition(f"process {pid} is gone; cannot find its cgroup") from e
    return cgroup_dirs(parse_proc_cgroup(text), mounts)


def cgroup_dirs_for_path(path: str, mounts: list[CgroupMount] | None = None) -> dict[str, str]:
    """Host dirs of an absolute cgroupfs *path* in every mounted hierarchy."""
    mounts = host_mounts() if mounts is None else mounts
    paths: dict[str, str] = {UNIFIED: path}
    for m in mounts:
        for c in m.controllers:
            paths[c] = path
    return cgroup_dirs(paths, mounts)


def systemd_slice_path(slice_name: str) -> str:
    """The cgroup path of a systemd slice: ``a-b.slice`` lives at ``/a.slice/a-b.slice``."""
    if slice_name in ("", "-.slice"):
        return "/"
    stem = slice_name.removesuffix(".slice")
    parts = stem.split("-")
    return "/" + "/".join("-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))


def parent_of_cgroups_path(cgroups_path: str) -> str:
    """The parent cgroup path of an OCI ``linux.cgroupsPath`` (cgroupfs or systemd ``slice:prefix:name``)."""
    if not cgroups_path.startswith("/") and cgroups_path.count(":") == 2:
        return systemd_slice_path(cgroups_path.split(":", 1)[0])
    return os.path.dirname(cgroups_path.rstrip("/")) or "/"


def hugetlb_missing(cgroups_path: str, *, root: str = CGROUP_ROOT,
                    mounts: list[CgroupMount] | None = None) -> str | None:
    """Why runc/crun could not set hugepage limits for a container at *cgroups_path*; None if they can.

    cgroup v2 (*root* is a cgroup2 mount): ``hugetlb`` must be in ``cgroup.controllers``
    of the container's parent (of its nearest existing ancestor: the runtime creates
    the rest, enabling what that one offers).  cgroup v1, hybrid hosts included (runc
    and crun use the v1 hierarchies there): a v1 hierarchy must have hugetlb mounted.
    """
    if cgroup_version(root) == 2:
        parts = [p for p in parent_of_cgroups_path(cgroups_path).split("/") if p and p != ".."]
        for n in range(len(parts), -1, -1):
            text = _read(os.path.join(root, *parts[:n], "cgroup.controllers"))
            if text is not None:
                if "hugetlb" in text.split():
                    return None
                return "cgroup v2: hugetlb is not in cgroup.controllers of the container's parent cgroup"
        return f"cgroup v2: {root}/cgroup.controllers is unreadable"
    mounts = host_mounts() if mounts is None else mounts
    if any(m.version == 1 and "hugetlb" in m.controllers for m in mounts):
        return None
    return "cgroup v1: no hierarchy has the hugetlb controller mounted"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
        return None
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.EINVAL, errno.ENOTSUP):
            return None
        raise


def oom_kill_count(dirs: dict[str, str]) -> int:
    """OOM kills recorded for the cgroup (v1 ``memory.oom_control``, v2 ``memory.events``)."""
    if "memory" in dirs:
        text = _read(os.path.join(dirs["memory"], "memory.oom_control"))
        if text is not None:
            return parse_oom_kill_count(text)
    if UNIFIED in dirs:
        text = _read(os.path.join(dirs[UNIFIED], "memory.events"))
        if text is not None:
            return parse_oom_kill_count(text)
    return 0


def remove_cgroup(path: str, *, mounts: list[CgroupMount] | None = None, attempts: int = 50) -> None:
    """Remove the cgroup at absolute cgroupfs *path* (and its children) in every hierarchy.

    Missing dirs are fine.  A cgroup that still has processes cannot be removed:
    after a few retries (processes may be exiting) ``FailedPrecondition`` says which.
    """
    if not path.startswith("/") or path.rstrip("/") == "" or ".." in path.split("/"):
        raise InvalidArgument(f"refusing to remove cgroup {path!r}: need an absolute path below the root")
    dirs = set(cgroup_dirs_for_path(path, mounts).values())
    busy: list[str] = []
    for top in dirs:
        if not os.path.isdir(top):
            continue
        # Children first: a cgroup dir can only go once it has no sub-cgroups.
        for cur, _subdirs, _ in os.walk(top, topdown=False):
            for _ in range(attempts):
                try:
                    os.rmdir(cur)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    time.sleep(0.02)
            else:
                busy.append(cur)
    if busy:
        raise FailedPrecondition(
            f"cgroup {path} still has processes in {', '.join(sorted(busy))}; stop them first"
        )
