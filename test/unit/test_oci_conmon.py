"""Pure parts of runtime/conmon.py and runtime/oci.py: command lines, messages, error text."""

from __future__ import annotations

import struct

import pytest

from moorage.core.errors import AlreadyExists, FailedPrecondition, NotFound
from moorage.runtime.conmon import (
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    ConmonOptions,
    clean_runtime_error,
    conmon_argv,
    ctl_message,
    parse_exit_file,
    parse_inotify_events,
    parse_sync_message,
)
from moorage.runtime.oci import OCIRuntimeError, _classify


def base(**kw) -> ConmonOptions:
    d = dict(conmon_path="/usr/bin/conmon", runtime_path="/usr/sbin/runc", cid="abc", cuuid="abc",
             runtime_root="/run/m/runc", container_pidfile="/b/pidfile")
    d.update(kw)
    return ConmonOptions(**d)


def pairs(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("-")}


def test_create_argv_like_crio():
    argv = conmon_argv(base(name="web", bundle="/b", log_path="/var/log/pods/x/0.log", exit_dir="/run/m/exits",
                            persist_dir="/run/m/conmon/abc", conmon_pidfile="/run/m/conmon/abc/conmon.pid",
                            socket_dir="/run/m/attach", log_level="debug"))
    assert argv[0] == "/usr/bin/conmon"
    p = pairs(argv)
    assert p["--api-version"] == "1"
    assert p["-c"] == "abc" and p["-u"] == "abc" and p["-n"] == "web"
    assert p["-r"] == "/usr/sbin/runc" and p["-b"] == "/b" and p["-p"] == "/b/pidfile"
    assert p["-l"] == "k8s-file:/var/log/pods/x/0.log"
    assert p["--exit-dir"] == "/run/m/exits" and p["--persist-dir"] == "/run/m/conmon/abc"
    assert p["--conmon-pidfile"] == "/run/m/conmon/abc/conmon.pid"
    assert p["--socket-dir-path"] == "/run/m/attach"
    assert p["--runtime-arg"] == "--root=/run/m/runc"
    assert p["--log-level"] == "debug"
    for flag in ("--sync", "--stdin", "--terminal", "--systemd-cgroup", "--exec", "--leave-stdin-open"):
        assert flag not in argv


def test_flags_for_stdin_tty_systemd():
    argv = conmon_argv(base(stdin=True, leave_stdin_open=True, terminal=True, systemd_cgroup=True,
                            log_size_max=1024, extra_runtime_args=("--debug",)))
    assert {"--stdin", "--leave-stdin-open", "--terminal", "--systemd-cgroup"} <= set(argv)
    assert pairs(argv)["--log-size-max"] == "1024"
    assert argv.count("--runtime-arg") == 2 and "--debug" in argv
    # stdin_once: no --leave-stdin-open
    assert "--leave-stdin-open" not in conmon_argv(base(stdin=True))


def test_exec_argv_uses_passthrough_and_sync():
    argv = conmon_argv(base(cuuid="e1", passthrough=True, sync=True, exec_process_spec="/x/process.json",
                            timeout=7))
    p = pairs(argv)
    assert p["-l"] == "passthrough" and p["--exec-process-spec"] == "/x/process.json"
    assert "--exec" in argv and "--sync" in argv and p["--timeout"] == "7"
    assert "-b" not in argv and "--exit-dir" not in argv  # must not touch the container's ctl fifo or exit file
    assert "--exec-attach" in conmon_argv(base(exec_process_spec="/p.json", exec_attach=True))


def test_bad_log_level():
    with pytest.raises(ValueError):
        conmon_argv(base(log_level="verbose"))


@pytest.mark.parametrize("line,data,message", [
    (b'{"data": 4242}\n', 4242, None),
    (b'{"data": -1, "message": "exec: \\"/nope\\": stat /nope: no such file or directory"}\n', -1,
     'exec: "/nope": stat /nope: no such file or directory'),
    ('{"pid": 12}', 12, None),
    ('{"exit_code": 3}', 3, None),
    ('{"data": 0, "message": "command timed out"}', 0, "command timed out"),
])
def test_parse_sync_message(line, data, message):
    m = parse_sync_message(line)
    assert (m.data, m.message) == (data, message)


def test_parse_sync_message_salvages_unescaped_control_chars():
    m = parse_sync_message('{"data": -1, "message": "bad\x01thing"}')
    assert m.data == -1 and "thing" in m.message
    with pytest.raises(ValueError):
        parse_sync_message("garbage")


def test_clean_runtime_error_logrus_and_json_and_plain():
    logrus = ('time="2024-01-01T00:00:00Z" level=error msg="runc create failed: unable to start container '
              'process: exec: \\"/nope\\": stat /nope: no such file or directory"\n')
    assert clean_runtime_error(logrus) == ('runc create failed: unable to start container process: '
                                           'exec: "/nope": stat /nope: no such file or directory')
    js = '{"level":"error","msg":"container does not exist","time":"x"}\n'
    assert clean_runtime_error(js) == "container does not exist"
    assert clean_runtime_error(b"crun: executable file `/nope` not found\n") == "crun: executable file `/nope` not found"
    assert clean_runtime_error('time="x" level=info msg="noise"\nreal error\nreal error\n') == "real error"
    assert clean_runtime_error("") == ""
    # runc warns before it fails (no memory cgroup yet to count OOM kills in): the failure is the message.
    warned = ('time="x" level=warning msg="unable to get oom kill count" error="openat2 ...: no such file"\n'
              'time="x" level=error msg="runc create failed: failed to write \\"9\\": out of range"\n')
    assert clean_runtime_error(warned) == 'runc create failed: failed to write "9": out of range'
    assert clean_runtime_error('time="x" level=warning msg="only a warning"\n') == "only a warning"
    assert clean_runtime_error('{"level":"warning","msg":"w"}\n{"level":"error","msg":"e"}\n') == "e"


def test_ctl_and_exit_file_formats():
    assert ctl_message(2) == b"2 0 0\n"
    assert ctl_message(1, 24, 80) == b"1 24 80\n"
    assert parse_exit_file(b"143") == 143
    assert parse_exit_file("-1\n") == -1


def test_parse_inotify_events():
    def ev(wd, mask, name):
        raw = name.encode() + b"\0" * (16 - len(name))
        return struct.pack("iIII", wd, mask, 0, len(raw)) + raw
    buf = ev(1, IN_MOVED_TO, "abc") + ev(1, IN_Q_OVERFLOW, "")
    assert parse_inotify_events(buf) == [(1, IN_MOVED_TO, "abc"), (1, IN_Q_OVERFLOW, "")]


@pytest.mark.parametrize("text,cls", [
    ("container does not exist", NotFound),
    ("error opening file `/run/m/crun/c1/status`: No such file or directory", NotFound),
    ("cannot open directory '/run/m/crun/c1': No such file or directory", NotFound),
    ("container with id exists: c1", AlreadyExists),
    ("container with given ID already exists", AlreadyExists),
    ("cannot kill container: container not running", FailedPrecondition),
    ("the container `c1` is not in `created` or `stopped` state", FailedPrecondition),
    ("cannot delete container c1 that is not stopped: running", FailedPrecondition),
    ('exec: "/nope": stat /nope: no such file or directory', OCIRuntimeError),
])
def test_classify(text, cls):
    err = _classify(text, "c1", "runc kill", "/run/m/crun")
    assert type(err) is cls
    if cls is not NotFound:
        assert text in err.message
