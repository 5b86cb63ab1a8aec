"""Integration tests of runtime/oci.py: real conmon + runc/crun + busybox bundles.

Every test gets its own temporary state dir and cgroup parent and removes both,
plus every container and conmon it made, even on failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from moorage.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    MoorageError,
    NotFound,
)
from moorage.runtime import cgroups, stats
from moorage.runtime.oci import OCIRuntime, RuntimeHandler
from moorage.testing.busybox_rootfs import make_bundle

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("conmon") is None, reason="needs conmon"),
]

HANDLERS = [h for h in ("runc", "crun") if shutil.which(h)]
WAIT = 60  # generous upper bound for things that normally take milliseconds

LOG_LINE = re.compile(r"^(\S+) (stdout|stderr) ([PF]) (.*)$")


def crun_needs_private_cgroup_view() -> bool:
    """crun 1.8 refuses hybrid hosts whose cgroup2 mount still offers controllers (here: hugetlb)."""
    try:
        with open("/sys/fs/cgroup/unified/cgroup.controllers") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def make_handler(name: str, workdir: str) -> RuntimeHandler:
    path = shutil.which(name)
    assert path
    if name == "crun" and crun_needs_private_cgroup_view():
        # Run crun in a private mount namespace without the hybrid cgroup2 mount, so it
        # uses the v1 hierarchies only.  Nothing changes on the host.
        wrapper = os.path.join(workdir, "crun-v1")
        with open(wrapper, "w") as f:
            f.write(
                "#!/bin/sh\n"
                "exec unshare --mount --propagation private /bin/sh -c "
                f"'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec {path} \"$@\"' crun \"$@\"\n"
            )
        os.chmod(wrapper, 0o755)
        path = wrapper
    return RuntimeHandler(name, path)


class TrackingRuntime(OCIRuntime):
    """Remembers the conmon of every container it creates, for teardown."""

    conmons: list[int]

    async def create(self, cid, bundle, **kw):
        try:
            return await super().create(cid, bundle, **kw)
        finally:
            pid = self.conmon_pid(cid)
            if pid is not None:
                self.conmons.append(pid)


class Env:
    def __init__(self, handler_name: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="moorage-oci-")
        self.handler = make_handler(handler_name, self.dir)
        self.rt = TrackingRuntime(self.handler, os.path.join(self.dir, "state"), log_level="info")
        self.rt.conmons = []
        self.cgroup_parent = f"/moorage-test-{uuid.uuid4().hex[:10]}"
        self.cids: list[str] = []

    def bundle(self, args: list[str], **kw) -> tuple[str, str]:
        """A new container id and its bundle dir (registered for cleanup)."""
        cid = f"t{uuid.uuid4().hex[:12]}"
        self.cids.append(cid)
        b = make_bundle(os.path.join(self.dir, "bundles", cid), args,
                        cgroups_path=f"{self.cgroup_parent}/{cid}", **kw)
        return cid, str(b)

    def log_path(self, cid: str) -> str:
        return os.path.join(self.dir, "logs", f"{cid}.log")

    async def run(self, args: list[str], **kw) -> tuple[str, int]:
        cid, b = self.bundle(args, **kw)
        pid = await self.rt.create(cid, b, log_path=self.log_path(cid))
        await self.rt.start(cid)
        return cid, pid

    def cleanup(self) -> None:
        for cid in self.cids:
            subprocess.run([self.handler.path, f"--root={self.rt.root}", "delete", "-f", cid],
                           capture_output=True)
            pid = self.rt.conmon_pid(cid)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Our conmons were re-parented to pid 1, which reaps at its own pace; wait (bounded)
        # so that no zombie of ours outlives the test.
        for pid in self.rt.conmons:
            for _ in range(200):
                if not self._still_our_conmon(pid):
                    break
                time.sleep(0.05)
        try:
            cgroups.remove_cgroup(self.cgroup_parent)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _still_our_conmon(pid: int) -> bool:
        """True while *pid* is a conmon or a zombie (then it can only be ours: we knew it as conmon)."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            return False
        comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()[0]
        return comm == "conmon" and state in ("Z", "S", "R", "D")


@pytest.fixture(params=HANDLERS)
def env(request):
    e = Env(request.param)
    try:
        yield e
    finally:
        e.cleanup()


@pytest.fixture
def runc_env():
    e = Env("runc")
    try:
        yield e
    finally:
        e.cleanup()


def run(coro):
    return asyncio.run(coro)


def read_log(path: str) -> list[tuple[str, str, str, str]]:
    with open(path) as f:
        return [LOG_LINE.match(line.rstrip("\n")).groups() for line in f if line.strip()]


async def wait_for(pred, what: str):
    """Poll *pred* (sync) until true; fails only after WAIT seconds (a bound, not an assertion on speed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- tests


def test_output_goes_to_cri_log_and_exit_code_to_exit_file(env):
    async def main():
        cid, pid = await env.run(["sh", "-c", "echo hello; echo oops >&2; exit 3"])
        assert pid > 0
        assert await env.rt.wait_exit(cid, WAIT) == 3
        code, finished = env.rt.exit_code(cid)
        assert code == 3 and finished.tzinfo is not None
        with open(env.rt.exit_file(cid)) as f:
            assert f.read().strip() == "3"
        lines = read_log(env.log_path(cid))
        assert ("stdout", "F", "hello") in [l[1:] for l in lines]
        assert ("stderr", "F", "oops") in [l[1:] for l in lines]
        m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{1,9})(Z|[+-]\d\d:\d\d)$", lines[0][0])
        assert m, lines[0][0]  # RFC 3339 with nanoseconds
        parsed = datetime.fromisoformat(m.group(1) + m.group(3).replace("Z", "+00:00"))
        assert parsed.tzinfo is not None and parsed.year >= 2020
        st = await env.rt.state(cid)
        assert st.status == "stopped"
        assert env.rt.exit_status(cid).oom_killed is False
        await env.rt.delete(cid)
        assert env.rt.exit_code(cid) is None
        assert not os.path.exists(env.rt.persist_dir(cid))

    run(main())


def test_long_running_state_kill_sigterm_and_delete(env):
    async def main():
        # No pid namespace: a plain `sleep` that is not pid 1 dies of SIGTERM.
        cid, pid = await env.run(["sleep", "1000"], pid_namespace=False)
        st = await env.rt.state(cid)
        assert st.status == "running" and st.pid == pid
        assert [(c.id, c.status) for c in await env.rt.list()] == [(cid, "running")]
        assert env.rt.exit_code(cid) is None
        assert env.rt.conmon_pid(cid) is not None
        sock = env.rt.attach_socket_path(cid)
        assert os.path.exists(sock) and os.path.realpath(os.path.dirname(sock)) == os.path.realpath(st.bundle)
        waiter = asyncio.ensure_future(env.rt.wait_exit(cid, WAIT))
        await asyncio.sleep(0)
        await env.rt.kill(cid, signal.SIGTERM)
        assert await waiter == 143
        assert (await env.rt.state(cid)).status == "stopped"
        await env.rt.delete(cid)
        assert env.rt.conmon_pid(cid) is None
        with pytest.raises(NotFound):
            await env.rt.state(cid)
        await env.rt.delete(cid)  # idempotent
        await env.rt.delete(cid, force=True)

    run(main())


def test_force_delete_of_running_container_stops_conmon(env):
    async def main():
        cid, _ = await env.run(["sleep", "1000"])
        conmon = env.rt.conmon_pid(cid)
        assert conmon is not None
        with pytest.raises(FailedPrecondition):
            await env.rt.delete(cid)  # still running
        await env.rt.delete(cid, force=True)
        assert env.rt.conmon_pid(cid) is None
        assert not os.path.exists(env.rt.persist_dir(cid))
        assert not os.path.exists(env.rt.exit_file(cid))
        with pytest.raises(NotFound):
            await env.rt.state(cid)

    run(main())


def test_exec_sync_exit_code_output_limit_and_timeout(env):
    async def main():
        cid, _ = await env.run(["tail", "-f", "/dev/null"])
        code, out, err = await env.rt.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 5"], 30)
        assert (code, out, err) == (5, b"out\n", b"err\n")

        code, out, err = await env.rt.exec_sync(cid, ["cat", "/etc/hostname"], None)
        assert (code, out) == (0, b"busybox\n")

        code, out, _ = await env.rt.exec_sync(cid, ["sh", "-c", "yes | head -c 200000"], 30, max_output=1000)
        assert code == 0 and out == b"y\n" * 500

        with pytest.raises(DeadlineExceeded):
            await env.rt.exec_sync(cid, ["sh", "-c", "sleep 1000 & sleep 1001"], 1)
        # The timed-out command and what it started were killed.
        code, out, _ = await env.rt.exec_sync(cid, ["ps", "-o", "args"], 30)
        assert code == 0
        assert b"sleep 100" not in out and b"tail" in out

        # A binary the runtime cannot find is the command's failure, as a shell reports it (127).
        code, _, err = await env.rt.exec_sync(cid, ["/nope"], 30)
        assert code == 127 and b"/nope" in err
        assert not [d for d in os.listdir(env.rt.persist_dir(cid)) if d.startswith("exec-")]

    run(main())


def test_missing_executable_fails_with_runtime_message(env):
    async def main():
        cid, b = env.bundle(["/nope"])
        with pytest.raises(MoorageError) as ei:
            await env.rt.create(cid, b, log_path=env.log_path(cid))
            await env.rt.start(cid)
        msg = ei.value.message
        assert "/nope" in msg and ("no such file or directory" in msg.lower() or "not found" in msg.lower())
        await env.rt.delete(cid, force=True)
        assert env.rt.conmon_pid(cid) is None

    run(main())


def test_update_memory_limit_is_visible_in_cgroup(env):
    async def main():
        cid, pid = await env.run(["sleep", "1000"], memory_limit=256 * 1024 * 1024)
        dirs = cgroups.cgroup_dirs_for_pid(pid)
        limit_file = (os.path.join(dirs["memory"], "memory.limit_in_bytes") if "memory" in dirs
                      else os.path.join(dirs[""], "memory.max"))
        with open(limit_file) as f:
            assert int(f.read()) == 256 * 1024 * 1024
        new = 64 * 1024 * 1024
        await env.rt.update(cid, {"memory": {"limit": new, "swap": new}})
        with open(limit_file) as f:
            assert int(f.read()) == new
        sample = stats.read_cgroup(dirs)
        assert sample is not None and sample.memory is not None
        assert sample.memory["limit"] == new and (sample.memory["usage"] or 0) > 0
        assert (sample.pids or 0) >= 1
        await env.rt.delete(cid, force=True)

    run(main())


def test_reopen_log_after_rotation(runc_env):
    env = runc_env

    async def main():
        cid, _ = await env.run(["sh", "-c", "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.05; done"])
        log = env.log_path(cid)
        await wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0, "first log line")
        os.rename(log, log + ".1")
        await env.rt.reopen_log(cid)
        await wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0, "log line in the new file")
        lines = read_log(log)
        assert lines and all(l[1] == "stdout" and l[3].startswith("line") for l in lines)
        old = [int(l[3][4:]) for l in read_log(log + ".1")]
        assert int(lines[-1][3][4:]) > old[0]
        await env.rt.delete(cid, force=True)
        with pytest.raises(NotFound):
            await env.rt.reopen_log(cid)

    run(main())


def test_oom_kill_is_detected(env):
    async def main():
        limit = 16 * 1024 * 1024
        cid, _ = await env.run(["sh", "-c", "x=0123456789abcdef; while true; do x=$x$x; done"], memory_limit=limit)
        code = await env.rt.wait_exit(cid, WAIT)
        assert code == 137
        st = env.rt.exit_status(cid)
        assert st.oom_killed is True
        await env.rt.delete(cid)

    run(main())


CREATOR = r"""
import asyncio, json, sys
from moorage.runtime.oci import OCIRuntime, RuntimeHandler
async def main():
    handler, state, cid, bundle, log = sys.argv[1:6]
    rt = OCIRuntime(RuntimeHandler("runc", handler), state)
    pid = await rt.create(cid, bundle, log_path=log)
    await rt.start(cid)
    print(json.dumps({"pid": pid, "conmon": rt.conmon_pid(cid)}))
asyncio.run(main())
"""


def test_conmon_outlives_the_process_that_created_the_container(runc_env):
    env = runc_env
    cid, b = env.bundle(["sleep", "1000"], pid_namespace=False)
    creator = subprocess.Popen(
        [sys.executable, "-c", CREATOR, env.handler.path, env.rt.state_dir, cid, b, env.log_path(cid)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, err = creator.communicate()
    assert creator.returncode == 0, err
    conmon = json.loads(out)["conmon"]
    env.rt.conmons.append(conmon)
    assert conmon and env.rt.conmon_pid(cid) == conmon  # still there after its creator is gone
    with open(f"/proc/{conmon}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    assert ppid not in (os.getpid(), creator.pid, 0)  # re-parented, not our child

    async def main():
        # A fresh adapter (as after a daemon restart) sees the container and its exit.
        rt = OCIRuntime(env.handler, env.rt.state_dir)
        assert (await rt.state(cid)).status == "running"
        await rt.kill(cid, signal.SIGTERM)
        assert await rt.wait_exit(cid, WAIT) == 143
        await rt.delete(cid)

    run(main())


def test_stdin_through_attach_socket_and_stdin_once(runc_env):
    """conmon's attach socket: what we send is the container's stdin; output comes back prefixed 2/3."""
    env = runc_env
    import socket

    async def main():
        cid, b = env.bundle(["cat"])
        await env.rt.create(cid, b, log_path=env.log_path(cid), stdin=True, stdin_once=True)
        await env.rt.start(cid)
        path = env.rt.attach_socket_path(cid)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.settimeout(WAIT)
            s.connect(path)
            s.sendall(b"ping\n")
            assert s.recv(65536) == b"\x02ping\n"
            s.shutdown(socket.SHUT_WR)  # stdin_once: conmon closes the container's stdin
            assert await env.rt.wait_exit(cid, WAIT) == 0
        finally:
            s.close()
        assert [l[1:] for l in read_log(env.log_path(cid))] == [("stdout", "F", "ping")]
        await env.rt.delete(cid)

    run(main())


def test_tty_container_output_is_logged(runc_env):
    env = runc_env

    async def main():
        cid, b = env.bundle(["sh", "-c", "tty; echo hello"], terminal=True)
        await env.rt.create(cid, b, log_path=env.log_path(cid), tty=True)
        await env.rt.start(cid)
        assert await env.rt.wait_exit(cid, WAIT) == 0
        lines = read_log(env.log_path(cid))
        assert all(l[1] == "stdout" for l in lines)
        text = [l[3].rstrip("\r") for l in lines]
        assert text[0].startswith("/dev/pts/") and text[1] == "hello"
        await env.rt.delete(cid)

    run(main())


def test_create_with_an_existing_id_leaves_the_existing_container_alone(runc_env):
    env = runc_env

    async def main():
        cid, pid = await env.run(["sleep", "1000"])
        from moorage.core.errors import AlreadyExists
        with pytest.raises(AlreadyExists):
            await env.rt.create(cid, os.path.join(env.dir, "bundles", cid), log_path=env.log_path(cid))
        st = await env.rt.state(cid)
        assert st.status == "running" and st.pid == pid
        assert env.rt.conmon_pid(cid) is not None
        await env.rt.delete(cid, force=True)

    run(main())
