"""A StopContainer issued at any moment after StartContainer reaches the container's handler.

The kernel discards a signal sent from outside to a PID namespace's init unless
the init has a handler for it (pid_namespaces(7)), so a stop that arrives before
the program has installed its SIGTERM handler used to be lost, and the stop
waited out the whole grace period before SIGKILL.  moorage now reads the
process's handler mask first and, while the signal would be dropped, sends it only once a handler exists
(runtime/procsig.py).  Exit code 7 below means the program's own TERM handler
ran; 137 would mean it was SIGKILLed at the end of the grace period.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import time

import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.runtime_env import RuntimeEnv

GRACE = 30  # seconds; a stop that takes anywhere near this waited out the timeout
SLOW = 10.0


def _start_then_stop(env: RuntimeEnv, sid: str, pcfg: pb.PodSandboxConfig, script: str) -> tuple[float, int]:
    cid = env.create(sid, pcfg, ["sh", "-c", script])
    try:
        env.start(cid)
        t0 = time.monotonic()
        env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=GRACE), timeout=GRACE + 60)
        took = time.monotonic() - t0
        return took, env.status(cid).status.exit_code
    finally:
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)


@pytest.mark.parametrize("handler", ["runc", "crun"])
def test_a_stop_before_the_handler_exists_reaches_it_once_installed(env: RuntimeEnv, handler: str) -> None:
    sid, pcfg = env.run_pod(handler=handler)
    # the handler appears 0.5 s after start: the first SIGTERM is certainly discarded
    took, code = _start_then_stop(env, sid, pcfg, "sleep 0.5; trap 'exit 7' TERM; while :; do sleep 0.05; done")
    assert code == 7, f"exit {code}: the program's TERM handler never ran"
    assert took < SLOW, f"the stop took {took:.1f}s: it waited out the grace period"


def test_a_program_without_a_handler_is_still_killed_at_the_timeout(env: RuntimeEnv) -> None:
    sid, pcfg = env.run_pod()
    cid = env.create(sid, pcfg, ["sh", "-c", "while :; do sleep 0.05; done"])
    env.start(cid)
    t0 = time.monotonic()
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2), timeout=60)
    assert time.monotonic() - t0 >= 1.5
    assert env.status(cid).status.exit_code == 137


def test_hundreds_of_start_stop_pairs_never_wait_out_the_timeout(env: RuntimeEnv) -> None:
    pairs, workers = 200, 4
    sid, pcfg = env.run_pod()
    script = "trap 'exit 7' TERM; while :; do sleep 0.05; done"
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda _: _start_then_stop(env, sid, pcfg, script), range(pairs)))
    slow = [(t, c) for t, c in results if t >= SLOW]
    killed = [(t, c) for t, c in results if c != 7]
    times = sorted(t for t, _ in results)
    print(f"{pairs} start->stop pairs: stop p50 {statistics.median(times) * 1000:.0f} ms, "
          f"max {times[-1] * 1000:.0f} ms, waited out the timeout: {len(slow)}, not by the handler: {len(killed)}")
    assert not slow and not killed, (slow, killed)


def test_start_then_stop_of_a_signalfd_init_ends_by_sigterm_every_time(env: RuntimeEnv) -> None:
    """catatonit as the container's PID 1 blocks every signal and reads them from a signalfd, so
    it has no handler to see in SigCgt: the stop signal must still go out at once (it is queued,
    not dropped), every time.  Counted by how each container ended: 143 is SIGTERM reaching the
    child through catatonit, 137 would be the SIGKILL at the end of the (long) grace period."""
    rounds = 100
    sid, pcfg = env.run_pod()
    codes = []
    for _ in range(rounds):
        cid = env.create(sid, pcfg, ["/usr/bin/catatonit", "--", "sleep", "100000"])
        try:
            env.start(cid)
            env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=GRACE), timeout=GRACE + 60)
            st = env.status(cid).status
            assert st.state == pb.CONTAINER_EXITED
            codes.append(st.exit_code)
        finally:
            env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)
    by_code = {c: codes.count(c) for c in set(codes)}
    print(f"{rounds} start->stop rounds of a catatonit init, exit codes: {by_code}")
    assert by_code == {143: rounds}, by_code
