"""The daemon over real gRPC on its unix socket."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb


def test_version(daemon):
    v = daemon.runtime.Version(pb.VersionRequest())
    assert v.runtime_name == "moorage" and v.runtime_api_version == "v1" and v.runtime_version


def test_status_conditions_and_verbose_config(daemon):
    st = daemon.runtime.Status(pb.StatusRequest())
    conds = {c.type: c for c in st.status.conditions}
    assert conds["RuntimeReady"].status is True
    assert "NetworkReady" in conds
    if not conds["NetworkReady"].status:
        assert conds["NetworkReady"].reason and conds["NetworkReady"].message
    assert not st.info
    st = daemon.runtime.Status(pb.StatusRequest(verbose=True))
    cfg = json.loads(st.info["config"])
    assert cfg["socket"] == daemon.socket and cfg["root_dir"] == daemon.root
    # "" is the default handler (runc), listed as the kubelet expects.
    assert {h.name for h in st.runtime_handlers} == {"", "runc", "crun"}


def test_unbuilt_rpc_is_unimplemented_by_name(daemon):
    # checkpoint/restore: criu cannot work on this host (`moorage check` quotes `criu check`), so the
    # three RPCs stay unbuilt and say so by name rather than pretending
    for name, req in (("CheckpointContainer", pb.CheckpointContainerRequest(container_id="x")),
                      ("CheckpointPod", pb.CheckpointPodRequest()), ("RestorePod", pb.RestorePodRequest())):
        with pytest.raises(grpc.RpcError) as e:
            getattr(daemon.runtime, name)(req)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
        assert f"RuntimeService/{name}" in e.value.details()


def test_socket_mode(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660


def test_sigterm_shuts_down_cleanly(daemon):
    assert os.path.exists(daemon.socket)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(daemon.socket)
    assert "moorage stopped" in daemon.log()


def test_second_daemon_on_same_root_is_refused(daemon):
    # Same root, another socket: the root lock refuses it.
    cfg = Path(daemon.config_path).read_text().replace(daemon.socket, daemon.socket + "2")
    other = os.path.join(daemon.base, "other.toml")
    with open(other, "w") as f:
        f.write(cfg)
    p = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "serve", "--config", other],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"another moorage daemon (pid {daemon.proc.pid}) is already running" in p.stderr
    # The first one is unharmed.
    assert daemon.runtime.Version(pb.VersionRequest()).runtime_name == "moorage"


def test_stale_socket_from_a_crash_is_replaced(daemon_factory):
    d = daemon_factory(start=False)
    d.write_config()
    # A socket file nobody listens on, as a SIGKILLed daemon leaves it.
    s = socket.socket(socket.AF_UNIX)
    s.bind(d.socket)
    s.close()
    assert os.path.exists(d.socket)
    d.start()
    assert d.runtime.Version(pb.VersionRequest()).runtime_name == "moorage"


def test_kill9_then_restart(daemon):
    daemon.kill9()
    assert os.path.exists(daemon.socket)  # left behind by the crash
    daemon.start()
    assert daemon.runtime.Status(pb.StatusRequest()).status.conditions[0].status


def test_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text('[streaming]\nport = 99999\n')
    p = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "serve", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"{bad}: key 'streaming.port'" in p.stderr


def test_check_reports_every_item_ok():
    p = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "check"], capture_output=True, text=True, timeout=60)
    # The dependency items; the CRI features follow them (informational, see test_runtime_surface).
    deps, _, feats = p.stdout.partition("\nCRI features")
    assert "mount_options" in feats
    lines = deps.strip().splitlines()
    labels = " ".join(lines)
    for item in ("runc", "crun", "conmon", "catatonit", "CNI plugins", "overlayfs", "cgroups", "namespaces", "iptables"):
        assert item in labels
    assert p.returncode == 0, p.stdout
    assert all(line.startswith("ok") for line in lines)
