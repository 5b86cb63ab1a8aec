"""RuntimeContext.settle_exit: the one rule for a process whose conmon may be gone (fake runc, no root)."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime

import pytest

from moorage.core.errors import NotFound
from moorage.core.store import Store
from moorage.runtime.context import CONMON_GONE_MESSAGE, CONMON_LOST_MESSAGE, LOST_STATE_MESSAGE
from moorage.runtime.oci import ContainerState, ExitStatus
from moorage.runtime.service import Runtime, RuntimeSettings


class FakeRunc:
    """What runc and conmon say about one process: ``status`` None means runc does not know it."""

    def __init__(self, status: str | None, conmon: bool, exit_code: int | None = None) -> None:
        self.status = status
        self.conmon = conmon
        self.exit_code = exit_code
        self.signals: list[int] = []

    def exit_status(self, cid: str) -> ExitStatus | None:
        if self.exit_code is None:
            return None
        return ExitStatus(code=self.exit_code, finished_at=datetime.now(UTC), oom_killed=False)

    def conmon_pid(self, cid: str) -> int | None:
        return 4242 if self.conmon else None

    async def state(self, cid: str) -> ContainerState:
        if self.status is None:
            raise NotFound(cid)
        return ContainerState(id=cid, status=self.status, pid=77, bundle="", created="")

    async def kill(self, cid: str, sig: int, all: bool = False) -> None:
        self.signals.append(int(sig))
        if sig == signal.SIGKILL:
            self.status = "stopped"


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    settings = RuntimeSettings(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"),
                               handlers={"runc": "/bin/true"}, netns_dir=str(tmp_path / "netns"))
    return Runtime(settings, Store(str(tmp_path / "root")), None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("runc,expected,killed", [
    (FakeRunc("running", conmon=True), None, False),  # supervised: keep watching
    (FakeRunc("running", conmon=True, exit_code=3), (3, "Error", ""), False),
    (FakeRunc("stopped", conmon=False, exit_code=0), (0, "Completed", ""), False),
    (FakeRunc("running", conmon=False), (137, "Error", CONMON_LOST_MESSAGE), True),
    (FakeRunc("paused", conmon=False), (137, "Error", CONMON_LOST_MESSAGE), True),
    (FakeRunc("stopped", conmon=False), (255, "Error", CONMON_GONE_MESSAGE), False),
    (FakeRunc(None, conmon=False), (255, "Error", LOST_STATE_MESSAGE), False),
])
def test_settle_exit(runtime, runc, expected, killed):
    runtime.ctx.runtimes["runc"] = runc
    outcome = asyncio.run(runtime.ctx.settle_exit("c" * 64, "runc"))
    if expected is None:
        assert outcome is None
    else:
        assert outcome is not None and (outcome.code, outcome.reason, outcome.message) == expected
    assert (signal.SIGKILL in runc.signals) == killed
    if killed:
        assert runc.status == "stopped"  # it answered only once runc said the process was gone


def test_end_process_gives_up_on_a_process_that_will_not_die(runtime):
    runc = FakeRunc("running", conmon=False)

    async def unkillable(cid: str, sig: int, all: bool = False) -> None:
        runc.signals.append(int(sig))

    runc.kill = unkillable  # type: ignore[method-assign]
    runtime.ctx.runtimes["runc"] = runc
    assert asyncio.run(runtime.ctx.end_process("c" * 64, "runc", timeout=0.2)) is False
    assert runc.signals == [signal.SIGKILL]  # killed once, then waited
