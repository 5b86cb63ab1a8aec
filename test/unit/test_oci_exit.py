"""Exit files, OOM flag and wait_exit of OCIRuntime, with conmon's files faked in a temp dir."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from moorage.core.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound
from moorage.runtime.oci import OCIRuntime, OCIRuntimeAPI, RuntimeHandler


@pytest.fixture
def rt(tmp_path):
    return OCIRuntime(RuntimeHandler("fake", "/bin/false"), str(tmp_path / "state"))


def write_exit(rt: OCIRuntime, cid: str, code: int) -> None:
    # conmon writes a temp file and renames it into place.
    os.makedirs(rt.exit_dir, exist_ok=True)
    tmp = os.path.join(rt.exit_dir, f".{cid}.tmp")
    with open(tmp, "w") as f:
        f.write(str(code))
    os.rename(tmp, rt.exit_file(cid))


def test_layout_and_protocol(rt, tmp_path):
    assert isinstance(rt, OCIRuntimeAPI)
    assert rt.root == str(tmp_path / "state" / "fake")
    assert rt.attach_socket_path("c1") == str(tmp_path / "state" / "attach" / "c1" / "attach")
    for bad in ("", "../x", "a/b", "-x", "x" * 200):
        with pytest.raises(InvalidArgument):
            rt.exit_file(bad)


def test_exit_status_and_oom_file(rt):
    assert rt.exit_status("c1") is None and rt.exit_code("c1") is None
    write_exit(rt, "c1", 137)
    st = rt.exit_status("c1")
    assert st.code == 137 and st.oom_killed is False and st.finished_at.tzinfo is not None
    os.makedirs(rt.persist_dir("c1"))
    open(os.path.join(rt.persist_dir("c1"), "oom"), "w").close()
    assert rt.exit_status("c1").oom_killed is True
    assert rt.exit_code("c1")[0] == 137


def test_oom_from_cgroup_counter(rt, tmp_path):
    mem = tmp_path / "memcg"
    mem.mkdir()
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    os.makedirs(rt.persist_dir("c2"))
    with open(os.path.join(rt.persist_dir("c2"), "cgroup.json"), "w") as f:
        json.dump({"memory": str(mem)}, f)
    write_exit(rt, "c2", 137)
    assert rt.exit_status("c2").oom_killed is True


def test_wait_exit_notices_many_exits(rt):
    async def main():
        cids = [f"c{i}" for i in range(50)]
        waiters = [asyncio.ensure_future(rt.wait_exit(c, 60)) for c in cids]
        await asyncio.sleep(0.05)
        for i, c in enumerate(cids):
            write_exit(rt, c, i)
        assert await asyncio.gather(*waiters) == list(range(50))
        assert rt._watcher is None and rt._poller is None  # nothing left running
        assert await rt.wait_exit("c7") == 7  # already exited: immediate

    asyncio.run(main())


def test_wait_exit_timeout(rt):
    async def main():
        with pytest.raises(DeadlineExceeded):
            await rt.wait_exit("never", 0.1)

    asyncio.run(main())


def test_wait_exit_when_conmon_vanished_without_exit_file(rt):
    async def main():
        os.makedirs(rt.persist_dir("c3"))
        # A pid that is certainly not a conmon for c3 (ourselves).
        with open(os.path.join(rt.persist_dir("c3"), "conmon.pid"), "w") as f:
            f.write(str(os.getpid()))
        with pytest.raises(Internal, match="without recording an exit code"):
            await rt.wait_exit("c3", 30)

    asyncio.run(main())


def test_operations_on_unknown_container(rt):
    async def main():
        with pytest.raises(NotFound):
            await rt.reopen_log("ghost")
        with pytest.raises(NotFound):
            await rt.exec_sync("ghost", ["true"], 1)

    asyncio.run(main())
