"""runtime.records: the state machine, the codec, and rows written before typed records."""

from __future__ import annotations

import json

import grpc
import pytest

from moorage.core.errors import Internal
from moorage.core.store import ObjectRow, Store
from moorage.cri.errors import status_for
from moorage.runtime import records
from moorage.runtime.model import (
    ContainerConfig,
    ContainerMetadata,
    ImageSpec,
    LinuxContainerResources,
    Mount,
    PodSandboxConfig,
    PodSandboxMetadata,
)
from moorage.runtime.records import (
    TRANSITIONS,
    ContainerMeta,
    ContainerPhase,
    ContainerState,
    ContainerStatus,
    ContainerUser,
    IllegalTransition,
    SandboxMeta,
    SandboxPhase,
    SandboxState,
    SandboxStatus,
    replace,
)
from moorage.runtime.service import Runtime, RuntimeSettings


def _runtime(tmp_path) -> Runtime:
    settings = RuntimeSettings(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"),
                               handlers={"runc": "/bin/true"})
    return Runtime(settings, Store(str(tmp_path / "root")), None, None)  # type: ignore[arg-type]


def _sandbox_meta(sid: str = "s1") -> SandboxMeta:
    cfg = PodSandboxConfig(metadata=PodSandboxMetadata(name="web", uid="u", namespace="ns"), labels={"app": "x"})
    return SandboxMeta(id=sid, name=f"web_ns_u_0_{sid}", created_at=5, config=cfg, runtime_handler="runc",
                       cgroup_parent="/kp", cgroups_path="/kp/s1", hostname="web", shm_path="/x/shm")


def _container_meta(cid: str = "c1") -> ContainerMeta:
    cfg = ContainerConfig(metadata=ContainerMetadata(name="app", attempt=2), image="busybox",
                          envs=[("A", "1")], mounts=[Mount(container_path="/v", image=ImageSpec(image="img"),
                                                           readonly=True)])
    return ContainerMeta(id=cid, name=f"app_web_2_{cid}", sandbox_id="s1", created_at=6, config=cfg,
                         image_ref="sha256:aa", image_name="busybox", log_path="/l", runtime_handler="runc",
                         snapshot_key=cid, stop_signal="SIGQUIT")


# -- the state machine -------------------------------------------------------------------------


def test_every_state_has_a_row_in_the_table():
    assert set(TRANSITIONS) == set(SandboxState) | set(ContainerState)
    assert all(set(v) <= set(type(k)) for k, v in TRANSITIONS.items())  # never across kinds


def test_an_illegal_transition_is_an_internal_error_and_changes_nothing(tmp_path):
    rt = _runtime(tmp_path)
    c = rt.ctx.add_container(_container_meta(), ContainerStatus(state=ContainerState.CREATED))
    c.update(lambda s: replace(s, state=ContainerState.RUNNING, pid=9))
    c.update(lambda s: replace(s, state=ContainerState.EXITED, exit_code=1))
    with pytest.raises(IllegalTransition, match="CONTAINER_EXITED -> CONTAINER_RUNNING") as err:
        c.update(lambda s: replace(s, state=ContainerState.RUNNING))
    assert status_for(err.value)[0] == grpc.StatusCode.INTERNAL
    assert c.status.state == ContainerState.EXITED
    assert records.decode_container(rt.ctx.store.get_container("c1"))[1].state == ContainerState.EXITED

    sb = rt.ctx.add_sandbox(_sandbox_meta(), SandboxStatus(phase=SandboxPhase.CREATING))
    sb.update(lambda s: replace(s, state=SandboxState.READY, phase=None))
    sb.update(lambda s: replace(s, ip="10.0.0.2"))  # same state: always allowed
    with pytest.raises(IllegalTransition):
        c.update(lambda s: replace(s, state=SandboxState.READY))  # type: ignore[arg-type]


def test_a_snapshot_cannot_change():
    sb = records.Sandbox(_sandbox_meta(), SandboxStatus(), lambda m, s: None).snapshot()
    with pytest.raises(Internal, match="snapshot"):
        sb.update(lambda s: replace(s, pid=1))


# -- the codec ----------------------------------------------------------------------------------


def test_records_round_trip_through_the_store(tmp_path):
    rt = _runtime(tmp_path)
    sb = rt.ctx.add_sandbox(_sandbox_meta(), SandboxStatus(phase=SandboxPhase.NETWORK, netns_path="/n"))
    sb.update(lambda s: replace(s, state=SandboxState.READY, phase=None, pid=7, ip="10.0.0.2",
                                additional_ips=("fd00::2",)))
    c = rt.ctx.add_container(_container_meta(), ContainerStatus(phase=ContainerPhase.CREATING))
    c.update(lambda s: replace(s, phase=None, user=ContainerUser(1, 2, [3]), mounts=[Mount(container_path="/v")],
                               resources=LinuxContainerResources(cpu_shares=5)))
    again = _runtime(tmp_path)
    again.ctx.load()
    got_sb, got_c = again.sandboxes["s1"], again.containers["c1"]
    assert (got_sb.metadata, got_sb.status) == (sb.metadata, sb.status)
    assert (got_c.metadata, got_c.status) == (c.metadata, c.status)
    assert got_c.metadata.config.envs == [("A", "1")]  # tuples stay tuples
    assert got_c.effective_config().linux.resources.cpu_shares == 5
    row = again.ctx.store.get_sandbox("s1")
    assert row.state == "SANDBOX_READY" and row.data["v"] == records.FORMAT


# Rows as the store held them before typed records (the config a dict, the rest in "extra").
OLD_SANDBOX = {
    "id": "s1", "name": "web_ns_u_0", "state": "SANDBOX_READY", "created_at": 5,
    "metadata": {"name": "web", "uid": "u", "namespace": "ns", "attempt": 0},
    "config": {"metadata": {"name": "web", "uid": "u", "namespace": "ns", "attempt": 0}, "hostname": "",
               "log_directory": "/logs", "dns_config": None, "port_mappings": [], "labels": {"app": "x"},
               "annotations": {}, "linux": {"cgroup_parent": "/kp", "security_context": None, "sysctls": {},
                                            "overhead": None, "resources": None}},
    "runtime_handler": "runc", "labels": {"app": "x"}, "annotations": {}, "netns_path": "/run/netns/s1",
    "ip": "10.0.0.2", "additional_ips": ["fd00::2"], "pid": 4242, "cgroup_parent": "/kp",
    "extra": {"cgroups_path": "/kp/s1", "hostname": "web", "shm": "/state/s1/shm"},
}
OLD_CONTAINER = {
    "id": "c1", "name": "app_web_ns_u_0_0", "sandbox_id": "s1", "state": "CONTAINER_EXITED", "created_at": 6,
    "started_at": 7, "finished_at": 8, "exit_code": 3, "reason": "Error", "message": "",
    "metadata": {"name": "app", "attempt": 0},
    "config": {"metadata": {"name": "app", "attempt": 0}, "image": "busybox", "command": ["sh"],
               "envs": [["A", "1"]], "mounts": [{"container_path": "/v", "host_path": "/state/c1/iv/0",
                                                "readonly": True, "image": {"image": "img", "image_ref": "sha256:bb"}}],
               "linux": {"resources": {"cpu_shares": 5}}, "stdin": True},
    "image_ref": "sha256:aa", "image_name": "busybox", "labels": {}, "annotations": {}, "log_path": "/l",
    "pid": 99, "runtime_handler": "runc", "snapshot_key": "c1",
    "extra": {"stop_signal": "SIGQUIT", "user": {"uid": 1, "gid": 2, "gids": [3]}, "run_as_username": ""},
}


def _insert_old(store: Store) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO sandboxes (namespace, id, name, state, created_at, data) VALUES (?,?,?,?,?,?)",
                   (store.namespace, "s1", OLD_SANDBOX["name"], "SANDBOX_READY", 5, json.dumps(OLD_SANDBOX)))
        db.execute("INSERT INTO containers (namespace, id, name, sandbox_id, state, created_at, data)"
                   " VALUES (?,?,?,?,?,?,?)", (store.namespace, "c1", OLD_CONTAINER["name"], "s1",
                                               "CONTAINER_EXITED", 6, json.dumps(OLD_CONTAINER)))
        half = dict(OLD_CONTAINER, id="c2", name="half", state="CONTAINER_CREATED", extra={"phase": "spec"})
        db.execute("INSERT INTO containers (namespace, id, name, sandbox_id, state, created_at, data)"
                   " VALUES (?,?,?,?,?,?,?)", (store.namespace, "c2", "half", "s1", "CONTAINER_CREATED", 9,
                                               json.dumps(half)))


def test_rows_written_before_typed_records_still_load(tmp_path):
    rt = _runtime(tmp_path)
    _insert_old(rt.ctx.store)
    rt.ctx.load()
    sb = rt.sandboxes["s1"]
    assert sb.status == SandboxStatus(state=SandboxState.READY, pid=4242, netns_path="/run/netns/s1",
                                      ip="10.0.0.2", additional_ips=("fd00::2",))
    assert sb.metadata.config.log_directory == "/logs" and sb.metadata.labels == {"app": "x"}
    assert (sb.metadata.cgroups_path, sb.metadata.hostname, sb.metadata.shm_path) == ("/kp/s1", "web", "/state/s1/shm")
    c = rt.containers["c1"]
    assert c.status.state == ContainerState.EXITED and c.status.exit_code == 3 and c.status.pid == 99
    assert c.status.user == ContainerUser(uid=1, gid=2, additional_gids=[3])
    assert c.metadata.stop_signal == "SIGQUIT" and c.metadata.config.stdin
    assert c.metadata.config.envs == [("A", "1")]
    cfg = c.effective_config()  # resolved mounts and updated resources were kept in the old config
    assert cfg.mounts[0].host_path == "/state/c1/iv/0" and cfg.mounts[0].image.image_ref == "sha256:bb"
    assert cfg.linux.resources.cpu_shares == 5
    assert rt.containers["c2"].status.phase == ContainerPhase.SPEC  # half-made: recovery removes it
    # The next change writes the new format.
    c.update(lambda s: replace(s, message="seen"))
    assert rt.ctx.store.get_container("c1").data["v"] == records.FORMAT


def test_unknown_stored_states_decode_safely():
    row = ObjectRow(id="c9", name="n", state="CONTAINER_PAUSED", created_at=0,
                    data=dict(OLD_CONTAINER, state="CONTAINER_PAUSED"), sandbox_id="s1")
    assert records.decode_container(row)[1].state == ContainerState.UNKNOWN
    row = ObjectRow(id="s9", name="n", state="READY", created_at=0, data=dict(OLD_SANDBOX, state="READY"))
    assert records.decode_sandbox(row)[1].state == SandboxState.READY  # very old spelling
