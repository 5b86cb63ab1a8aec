"""Host process look-ups (who is running, by command line) and running short helper commands
without blocking the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

# Spawning a child (fork/exec of a large process, plus asyncio's per-child watcher thread) costs
# milliseconds of event loop time; these threads spawn and wait instead.  Own pool: a runc call
# waiting here must not hold up the default executor's store syncs and file work.
_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="proc")


async def run_captured(argv: list[str], *, input: bytes | None, env: dict[str, str],
                       timeout: float) -> tuple[int, bytes, bytes]:
    """(returncode, stdout, stderr) of ``argv``, spawned and waited for off the event loop.

    Raises TimeoutError after ``timeout`` seconds; on that and on cancellation the child is
    killed and reaped before this returns."""
    loop = asyncio.get_running_loop()

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    spawn = loop.run_in_executor(_POOL, start)
    try:
        proc = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):  # the spawn runs on regardless: end what it started
            started = await spawn
            started.kill()
            await loop.run_in_executor(_POOL, started.communicate)
        raise
    talk = loop.run_in_executor(_POOL, proc.communicate, input)
    try:
        out, err = await asyncio.wait_for(asyncio.shield(talk), timeout)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await talk  # sees EOF once the child is dead, and reaps it
        raise
    return proc.returncode, out, err


def cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process on the host that can still be read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args[-1:] == [b""]:
            args = args[:-1]
        yield int(entry), args
