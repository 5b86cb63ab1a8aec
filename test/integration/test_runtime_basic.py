"""Runtime service end to end over gRPC with the busybox test image: logs, exits, stop."""

import os
import re
from pathlib import Path

from moorage.cri.api import api_pb2 as pb

LINE = re.compile(r"^(\S+) (stdout|stderr) ([FP]) (.*)$")


def read_log(path: str) -> list[tuple[str, str, str]]:
    with open(path) as f:
        out = []
        for line in f.read().splitlines():
            m = LINE.match(line)
            assert m, f"not a CRI log line: {line!r}"
            out.append((m.group(2), m.group(3), m.group(4)))
        return out


def test_echo_into_log_read_back(env):
    logdir = env.log_dir()
    sid, pcfg = env.run_pod(log_dir=logdir)
    cid = env.run(sid, pcfg, ["sh", "-c", "echo hello; echo oops >&2; printf partial; exit 0"], log_path="c/0.log")
    st = env.wait_exited(cid)
    assert st.exit_code == 0 and st.reason == "Completed"
    assert st.log_path == os.path.join(logdir, "c/0.log")
    lines = read_log(st.log_path)
    assert ("stdout", "F", "hello") in lines
    assert ("stderr", "F", "oops") in lines
    assert ("stdout", "P", "partial") in lines


def test_log_timestamps_are_rfc3339nano(env):
    logdir = env.log_dir()
    sid, pcfg = env.run_pod(log_dir=logdir)
    cid = env.run(sid, pcfg, ["echo", "stamp"], log_path="s.log")
    env.wait_exited(cid)
    with open(os.path.join(logdir, "s.log")) as f:
        line = f.readline()
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) stdout F stamp$", line.rstrip("\n")), line


def test_exit_codes_and_reasons(env):
    sid, pcfg = env.run_pod()
    ok = env.run(sid, pcfg, ["true"])
    bad = env.run(sid, pcfg, ["sh", "-c", "exit 3"])
    s_ok, s_bad = env.wait_exited(ok), env.wait_exited(bad)
    assert (s_ok.exit_code, s_ok.reason) == (0, "Completed")
    assert (s_bad.exit_code, s_bad.reason) == (3, "Error")
    for s in (s_ok, s_bad):
        assert 0 < s.created_at <= s.started_at <= s.finished_at


def test_stop_sends_sigterm_and_container_exits_by_itself(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sh", "-c", "trap 'exit 7' TERM; touch /tmp/ready; while true; do sleep 0.1; done"])
    env.wait_file(cid, "/tmp/ready")  # the trap is set (PID 1 ignores an untrapped SIGTERM)
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=60), timeout=120)
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 7 and st.reason == "Error"


def test_stop_timeout_kills_container_ignoring_sigterm(env):
    logdir = env.log_dir()
    sid, pcfg = env.run_pod(log_dir=logdir)
    cid = env.run(sid, pcfg, ["sh", "-c", "trap 'echo got-term' TERM; echo ready; while true; do sleep 0.1; done"],
                  log_path="t.log")
    from moorage.testing.cri import wait_for
    wait_for(lambda: os.path.exists(os.path.join(logdir, "t.log")) and "ready" in Path(os.path.join(logdir, "t.log")).read_text())
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2), timeout=120)
    st = env.status(cid).status
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 137, st
    assert "got-term" in Path(os.path.join(logdir, "t.log")).read_text()


def test_image_stop_signal_is_honoured(env):
    ref = env.pull("stopsignal")
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sh", "-c", "trap 'exit 10' USR1; trap 'exit 15' TERM; touch /tmp/ready; "
                              "while true; do sleep 0.1; done"], image=ref)
    env.wait_file(cid, "/tmp/ready")
    assert env.status(cid).status.stop_signal == pb.Signal.Value("SIGNAL_SIGUSR1")
    env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=30), timeout=120)
    assert env.status(cid).status.exit_code == 10


def test_stop_and_remove_are_idempotent(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sleep", "1000"])
    for _ in range(2):
        env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
    assert env.status(cid).status.state == pb.CONTAINER_EXITED
    for _ in range(2):
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    for _ in range(2):
        env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    for _ in range(2):
        env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id="0" * 64), timeout=60)
    env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id="0" * 64), timeout=60)
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id="0" * 64), timeout=60)


def test_exit_releases_runc_state_and_cgroup_before_remove(env):
    """runc delete runs at the exit (RemoveContainer then has no runtime work); the record keeps
    the exit, and Stop and Remove of the released containers still answer OK."""
    from moorage.testing.cri import wait_for
    from moorage.testing.runtime_env import cgroup_dirs

    sid, pcfg = env.run_pod()
    cids = [env.run(sid, pcfg, ["sh", "-c", f"exit {i}"]) for i in range(3)]  # many
    for i, cid in enumerate(cids):
        assert env.wait_exited(cid).exit_code == i
    runc_root = os.path.join(env.d.state, "oci", "runc")

    def cgroups_of(cid: str) -> list[str]:
        return [dp for d in cgroup_dirs(env.cgroup_parent) for dp, _, _ in os.walk(d) if os.path.basename(dp) == cid]

    wait_for(lambda: not any(os.path.exists(os.path.join(runc_root, c)) or cgroups_of(c) for c in cids),
             what="runc's state and the cgroups of the exited containers to go")
    for i, cid in enumerate(cids):
        st = env.status(cid).status
        assert st.state == pb.CONTAINER_EXITED and st.exit_code == i
        env.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
        env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert not env.rt.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=sid))).containers


def test_remove_stops_a_running_container(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sleep", "1000"])
    pid = env.pid(cid)
    env.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    assert not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not env.rt.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(id=cid))).containers


def test_env_and_workdir(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sleep", "1000"], working_dir="/tmp",
                  envs=[pb.KeyValue(key="FOO", value=b"bar baz"), pb.KeyValue(key="PATH", value=b"/bin:/sbin")])
    assert env.sh(cid, "pwd") == "/tmp\n"
    out = env.sh(cid, "echo \"$FOO|$PATH\"; cat /proc/1/environ | tr '\\0' '\\n'")
    assert out.startswith("bar baz|/bin:/sbin\n")
    assert "FOO=bar baz" in out and "HOSTNAME=" in out
    cwd = env.sh(cid, "readlink /proc/1/cwd")
    assert cwd == "/tmp\n"


def test_exec_sync_exit_code_output_and_timeout(env):
    import grpc
    import pytest

    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, ["sleep", "1000"])
    r = env.exec(cid, ["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (r.exit_code, r.stdout, r.stderr) == (4, b"out\n", b"err\n")
    with pytest.raises(grpc.RpcError) as e:
        env.exec(cid, ["sleep", "30"], timeout=1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timed out" in e.value.details()
    # The timed-out command was killed; exec still works afterwards.
    assert "sleep 30" not in env.sh(cid, "ps -o args")
    # A missing binary is an answer, as CRI-O gives it: exit code 127 and the runtime's words.
    r = env.exec(cid, ["/no/such/binary"])
    assert r.exit_code == 127 and b"/no/such/binary" in r.stderr, r
