"""Least privilege on disk (issue #14, part 5): an unprivileged local user finds no secret.

A pod runs a container with a secret in its environment, from an image pulled with registry
credentials.  Then, as uid/gid 65534 (``setpriv``), every file and directory under the daemon's
root, state and log dirs (listed as root, since the unprivileged user may not list them) is
tried, and so is every process's ``/proc/<pid>/cmdline`` and ``environ``: neither the secret
env value nor the registry password nor its base64 form may be readable anywhere.  What is
readable is printed, and the store, the bundles, the content store and the runtime's state are
asserted unreadable by name.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing import registry as registrymod
from moorage.testing.cri import container_config, pod_config, runtime_client, with_infra
from moorage.testing.daemon import DaemonProcess
from moorage.testing.runtime_env import RuntimeEnv, make_daemon, remove_cgroup_tree

NOBODY = 65534

# Run as nobody: try each path given on stdin (JSON), then every process's cmdline and environ.
_PROBE = r"""
import json, os, stat, sys
paths, secrets = json.load(sys.stdin)
secrets = [s.encode() for s in secrets]
out = {"readable": [], "listable": [], "leaks": []}

def check(where, data):
    for s in secrets:
        if s in data:
            out["leaks"].append([where, secrets.index(s)])

for p in paths:
    try:
        st = os.lstat(p)
    except OSError:
        continue
    if stat.S_ISDIR(st.st_mode):
        try:
            names = os.listdir(p)
            out["listable"].append(p)
            check(p, "\n".join(names).encode())
        except OSError:
            pass
        continue
    if not stat.S_ISREG(st.st_mode):
        continue
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        continue
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(64 << 20)
        except OSError:
            continue
    out["readable"].append(p)
    check(p, data)

for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for what in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                check(f"/proc/{pid}/{what}", f.read())
        except OSError:
            pass
print(json.dumps(out))
"""


def _tree(top: str) -> list[str]:
    """Every path under ``top`` (as root), without descending into mount points (container rootfs, shm)."""
    out = [top]
    for dirpath, dirs, files in os.walk(top):
        keep = []
        for d in dirs:
            p = os.path.join(dirpath, d)
            out.append(p)
            if not os.path.ismount(p):
                keep.append(d)
        dirs[:] = keep
        out += [os.path.join(dirpath, f) for f in files]
    return out


def _as_nobody(paths: list[str], secrets: list[str]) -> dict[str, list]:
    r = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-I", "-c", _PROBE],
        input=json.dumps([paths, secrets]), capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr
    result: dict[str, list] = json.loads(r.stdout)
    return result


@pytest.fixture
def priv_env(daemon_factory: Callable[..., DaemonProcess],
             auth_registry: registrymod.TestRegistry) -> Iterator[tuple[RuntimeEnv, registrymod.TestRegistry]]:
    d, parent = make_daemon(daemon_factory, start=False)
    d.write_config()
    assert auth_registry.hosts_dir is not None
    shutil.copytree(auth_registry.hosts_dir, os.path.join(d.base, "certs.d"), dirs_exist_ok=True)
    d.start()
    env = RuntimeEnv(d, auth_registry, parent)
    try:
        yield env, auth_registry
    finally:
        env.cleanup()
        remove_cgroup_tree(parent)


def test_no_secret_is_readable_by_an_unprivileged_user(priv_env: tuple[RuntimeEnv, registrymod.TestRegistry]) -> None:
    env, reg = priv_env
    d = env.d
    assert reg.username is not None and reg.password is not None
    secret = f"moorage-secret-{uuid.uuid4().hex}"
    basic = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    secrets = [secret, reg.password, basic]

    ref = reg.ref("busybox")
    assert d.images is not None
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref),
                                           auth=pb.AuthConfig(username=reg.username, password=reg.password)),
                       timeout=120)
    logdir = env.log_dir()
    sid, pcfg = env.run_pod(pod_config(log_dir=logdir, linux=with_infra()))  # an infra bundle too
    cfg = container_config(ref, ["sh", "-c", "touch /tmp/ready; exec sleep 3600"], log_path="c.log",
                           envs=[pb.KeyValue(key="API_TOKEN", value=secret.encode())])
    cid = env.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=pcfg),
                                 timeout=120).container_id
    env.start(cid)
    env.wait_file(cid, "/tmp/ready")
    # An exec too: its process spec (with the env) is written for conmon while it runs.
    assert env.exec(cid, ["sh", "-c", "test -n \"$API_TOKEN\""]).exit_code == 0

    paths = _tree(d.root) + _tree(d.state) + _tree(logdir) + [d.log_file]
    # The secret really is on disk for root: otherwise this test proves nothing.
    bundle = os.path.join(d.state, "containers", cid, "bundle", "config.json")
    with open(bundle) as f:
        assert secret in f.read()
    db = os.path.join(d.root, "meta.db")
    assert os.path.exists(db)

    found = _as_nobody(paths, secrets)
    readable = sorted(os.path.relpath(p, d.base) for p in found["readable"])
    listable = sorted(os.path.relpath(p, d.base) for p in found["listable"])
    print(f"\nreadable by uid {NOBODY} ({len(readable)} of {len(paths)} paths):\n  " + "\n  ".join(readable))
    print(f"listable by uid {NOBODY}:\n  " + "\n  ".join(listable))
    assert found["leaks"] == [], f"secrets readable by uid {NOBODY}: {found['leaks']}"

    must_be_closed = [db, bundle, os.path.join(d.state, "sandboxes", sid, "bundle", "config.json"),
                      os.path.join(d.root, "images"), os.path.join(d.state, "oci")]
    must_be_closed += [p for p in paths if os.path.basename(p).startswith("meta.db")]
    must_be_closed += [p for p in paths if "/images/content/blobs/" in p and os.path.isfile(p)]
    assert len(must_be_closed) > 8
    opened = set(found["readable"]) | set(found["listable"])
    assert [p for p in must_be_closed if p in opened] == []
    # Modes, not just the outcome for this uid (a group could still read them).
    for p in [db, bundle] + [p for p in paths if os.path.basename(p).startswith("meta.db-")]:
        assert stat.S_IMODE(os.stat(p).st_mode) & 0o077 == 0, (p, oct(os.stat(p).st_mode))
    for p in (os.path.join(d.root, "images"), os.path.join(d.state, "oci")):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o700, p
    # The container still works as its user: it reads its rootfs, /dev/shm and pod files.
    out = env.exec(cid, ["sh", "-c", "cat /etc/hostname >/dev/null && echo x > /dev/shm/x && cat /dev/shm/x"])
    assert (out.exit_code, out.stdout) == (0, b"x\n")


def test_modes_left_loose_by_an_older_version_are_tightened_at_start(
        priv_env: tuple[RuntimeEnv, registrymod.TestRegistry]) -> None:
    env, reg = priv_env
    d = env.d
    ref = reg.ref("busybox")
    assert d.images is not None and reg.username is not None and reg.password is not None
    d.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref),
                                           auth=pb.AuthConfig(username=reg.username, password=reg.password)),
                       timeout=120)
    sid, pcfg = env.run_pod(pod_config(linux=with_infra()))
    cid = env.run(sid, pcfg, ["sleep", "3600"], image=ref)
    files = [os.path.join(d.root, "meta.db"),
             os.path.join(d.state, "containers", cid, "bundle", "config.json"),
             os.path.join(d.state, "sandboxes", sid, "bundle", "config.json")]
    dirs = [os.path.join(d.root, "images"), os.path.join(d.state, "oci")]
    d.stop()  # the pod and its container keep running
    for p in files:
        os.chmod(p, 0o644)
    for p in dirs:
        os.chmod(p, 0o755)
    d.start()
    env.rt = runtime_client(d)  # the old channel closed with the old daemon
    assert [oct(stat.S_IMODE(os.stat(p).st_mode)) for p in files] == [oct(0o600)] * len(files)
    assert [oct(stat.S_IMODE(os.stat(p).st_mode)) for p in dirs] == [oct(0o700)] * len(dirs)
    wal = os.path.join(d.root, "meta.db-wal")  # made again by SQLite, with the database's mode
    assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600
    # Still the same running container, reachable as before.
    assert env.exec(cid, ["true"]).exit_code == 0
