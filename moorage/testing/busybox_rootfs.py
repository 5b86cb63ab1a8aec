"""Build a busybox rootfs directory and a minimal, valid OCI bundle for tests.

Everything here is offline: the rootfs is the host's static busybox
(``busybox-static``) plus one symlink per applet.  Other test suites may reuse
it::

    from busybox_rootfs import make_bundle
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", "echo hi"],
                         cgroups_path="/moorage-test-1234/ctr")

The bundle layout is ``<dir>/config.json`` + ``<dir>/rootfs``.  Nothing is
mounted on the host; removing the directory removes everything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BUSYBOX = "/bin/busybox"

DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]

# The capability set container runtimes grant by default (Docker/containerd list).
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

_applets_cache: list[str] | None = None


def busybox_applets(busybox: str = BUSYBOX) -> list[str]:
    """Names of the applets compiled into *busybox* (``busybox --list``)."""
    global _applets_cache
    if _applets_cache is None:
        out = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout
        _applets_cache = sorted({line.strip() for line in out.splitlines() if line.strip()})
    return list(_applets_cache)


def make_rootfs(rootfs: str | os.PathLike[str], busybox: str = BUSYBOX) -> Path:
    """Create a busybox root filesystem at *rootfs* (created if missing)."""
    root = Path(rootfs)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root", "var", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in busybox_applets(busybox):
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")
    (root / "etc" / "hostname").write_text("busybox\n")
    return root


def oci_config(
    args: Iterable[str],
    *,
    env: Iterable[str] = DEFAULT_ENV,
    cwd: str = "/",
    terminal: bool = False,
    hostname: str = "busybox",
    cgroups_path: str | None = None,
    memory_limit: int | None = None,
    readonly_rootfs: bool = False,
    network_namespace: bool = True,
    pid_namespace: bool = True,
    rootfs: str = "rootfs",
) -> dict[str, Any]:
    """A minimal OCI runtime config (runtime-spec 1.0.2) accepted by runc and crun.

    ``pid_namespace=False`` keeps the host pid namespace, so the process is not
    pid 1 and default signal dispositions apply (SIGTERM kills a plain ``sleep``).
    """
    namespaces = [{"type": t} for t in ("ipc", "uts", "mount")]
    if pid_namespace:
        namespaces.insert(0, {"type": "pid"})
    if network_namespace:
        namespaces.append({"type": "network"})
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_limit is not None:
        resources["memory"] = {"limit": memory_limit, "swap": memory_limit}
    linux: dict[str, Any] = {
        "resources": resources,
        "namespaces": namespaces,
        "maskedPaths": [
            "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
        ],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    }
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": list(env),
            "cwd": cwd,
            "capabilities": {k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": readonly_rootfs},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": linux,
    }


def make_bundle(
    bundle: str | os.PathLike[str],
    args: Iterable[str],
    **config_kwargs: Any,
) -> Path:
    """Create ``<bundle>/rootfs`` (busybox) and ``<bundle>/config.json``; returns the bundle path."""
    path = Path(bundle)
    path.mkdir(parents=True, exist_ok=True)
    make_rootfs(path / "rootfs")
    write_config(path, oci_config(args, **config_kwargs))
    return path


def write_config(bundle: str | os.PathLike[str], config: dict[str, Any]) -> None:
    with open(Path(bundle) / "config.json", "w") as f:
        json.dump(config, f, indent=2)
