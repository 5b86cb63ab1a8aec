"""Users, capabilities, read-only rootfs, seccomp, namespaces, sysctls, DNS, mounts — over gRPC."""

import os
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config

SLEEP = ["sleep", "1000"]


def sc(**kw) -> pb.LinuxContainerConfig:
    return pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**kw))


def cap_eff(text: str) -> int:
    return next(int(l.split()[1], 16) for l in text.splitlines() if l.startswith("CapEff:"))


def test_run_as_user_and_group(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, linux=sc(run_as_user=pb.Int64Value(value=1000),
                                             run_as_group=pb.Int64Value(value=2000), supplemental_groups=[3000]))
    assert env.sh(cid, "id -u; id -g").split() == ["1000", "2000"]
    assert "3000" in env.sh(cid, "id -G").split()
    u = env.status(cid).status.user.linux
    assert (u.uid, u.gid) == (1000, 2000) and 3000 in u.supplemental_groups


def test_user_from_image_config(env):
    ref = env.reg.images["nonroot"].ref
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, image=ref)
    assert env.sh(cid, "id -u; id -g; pwd").split() == ["1234", "1234", "/home/tester"]
    assert env.status(cid).status.user.linux.uid == 1234


def test_run_as_username_resolved_in_image(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, linux=sc(run_as_username="tester"))
    assert env.sh(cid, "id -un; id -u").split() == ["tester", "1234"]


def test_run_as_username_missing_from_image(env):
    sid, pcfg = env.run_pod()
    with pytest.raises(grpc.RpcError) as e:
        env.create(sid, pcfg, SLEEP, linux=sc(run_as_username="nosuchuser"))
    assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert "nosuchuser" in e.value.details()
    assert not env.rt.ListContainers(pb.ListContainersRequest()).containers


def test_readonly_rootfs(env):
    sid, pcfg = env.run_pod()
    cid = env.run(sid, pcfg, SLEEP, linux=sc(readonly_rootfs=True))
    r = env.exec(cid, ["touch", "/newfile"])
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr
    # /etc/hosts etc. stay writable where the kubelet expects; /dev/shm is writable.
    assert env.exec(cid, ["touch", "/dev/shm/x"]).exit_code == 0


def test_dropped_capabilities_in_proc_status(env):
    sid, pcfg = env.run_pod()
    full = env.run(sid, pcfg, SLEEP)
    no_raw = env.run(sid, pcfg, SLEEP, linux=sc(capabilities=pb.Capability(drop_capabilities=["NET_RAW"])))
    none = env.run(sid, pcfg, SLEEP, linux=sc(capabilities=pb.Capability(drop_capabilities=["ALL"])))
    added = env.run(sid, pcfg, SLEEP, linux=sc(capabilities=pb.Capability(add_capabilities=["SYS_ADMIN"])))
    f = cap_eff(env.sh(full, "cat /proc/self/status"))
    assert f & (1 << 13) and f & (1 << 0)  # NET_RAW, CHOWN
    assert not f & (1 << 21)  # SYS_ADMIN not in the default set
    assert cap_eff(env.sh(no_raw, "cat /proc/self/status")) == f & ~(1 << 13)
    assert cap_eff(env.sh(none, "cat /proc/self/status")) == 0
    assert cap_eff(env.sh(added, "cat /proc/self/status")) == f | (1 << 21)


def test_seccomp_runtime_default_blocks_what_unconfined_allows(env):
    sid, pcfg = env.run_pod()
    # unshare(CLONE_NEWUSER) needs no capability, but the RuntimeDefault profile refuses it
    # (as containerd's and Docker's do).
    conf = env.run(sid, pcfg, SLEEP, linux=sc(seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)))
    unconf = env.run(sid, pcfg, SLEEP, linux=sc(seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)))
    assert "Seccomp:\t2" in env.sh(conf, "cat /proc/self/status")
    assert "Seccomp:\t0" in env.sh(unconf, "cat /proc/self/status")
    blocked = env.exec(conf, ["unshare", "-U", "true"])
    allowed = env.exec(unconf, ["unshare", "-U", "true"])
    assert allowed.exit_code == 0, allowed.stderr
    assert blocked.exit_code != 0 and b"Operation not permitted" in blocked.stderr


def test_shared_pid_namespace_shows_infra(env):
    pcfg = pod_config(name=f"p-{uuid.uuid4().hex[:8]}", linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.POD))))
    sid, pcfg = env.run_pod(pcfg)
    cid = env.run(sid, pcfg, SLEEP, linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
        namespace_options=pb.NamespaceOption(pid=pb.POD))))
    ps = env.sh(cid, "ps -o pid,args")
    assert any(l.split()[0] == "1" and "catatonit" in l for l in ps.splitlines()[1:]), ps
    assert "sleep 1000" in ps
    # Without POD sharing, the container's own process is PID 1.
    sid2, pcfg2 = env.run_pod()
    c2 = env.run(sid2, pcfg2, SLEEP)
    assert "catatonit" not in env.sh(c2, "ps -o args")
    assert env.sh(c2, "cat /proc/1/cmdline | tr '\\0' ' '").startswith("sleep 1000")


def test_sysctls_applied(env):
    pcfg = pod_config(name=f"p-{uuid.uuid4().hex[:8]}", linux=pb.LinuxPodSandboxConfig(
        sysctls={"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "123"}))
    sid, pcfg = env.run_pod(pcfg)
    cid = env.run(sid, pcfg, SLEEP)
    assert env.sh(cid, "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ip_unprivileged_port_start").split() \
        == ["1", "123"]


def test_resolv_conf_hostname_and_hosts(env):
    pcfg = pod_config(name=f"p-{uuid.uuid4().hex[:8]}", hostname="web-0",
                      dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["ns.svc.cluster.local", "cluster.local"],
                                              options=["ndots:5"]))
    sid, pcfg = env.run_pod(pcfg)
    cid = env.run(sid, pcfg, SLEEP)
    resolv = env.sh(cid, "cat /etc/resolv.conf")
    assert "nameserver 10.96.0.10" in resolv
    assert "search ns.svc.cluster.local cluster.local" in resolv
    assert "options ndots:5" in resolv
    assert env.sh(cid, "hostname; cat /etc/hostname").split() == ["web-0", "web-0"]
    assert "localhost" in env.sh(cid, "cat /etc/hosts")


def test_dev_shm_is_per_pod(env):
    sid, pcfg = env.run_pod()
    a = env.run(sid, pcfg, SLEEP)
    b = env.run(sid, pcfg, SLEEP)
    env.sh(a, "echo shared > /dev/shm/f")
    assert env.sh(b, "cat /dev/shm/f") == "shared\n"
    sid2, pcfg2 = env.run_pod()
    c = env.run(sid2, pcfg2, SLEEP)
    assert env.exec(c, ["cat", "/dev/shm/f"]).exit_code != 0


@pytest.fixture
def shared_host_dir(env):
    """A host dir that is its own rshared mount point (rslave needs a shared source)."""
    d = os.path.join(env.d.base, f"vol-{uuid.uuid4().hex[:6]}")
    os.makedirs(os.path.join(d, "sub"))
    subprocess.run(["mount", "--bind", d, d], check=True)
    subprocess.run(["mount", "--make-rshared", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-R", "-l", d], check=False)


def test_bind_mount_rslave_sees_host_mounts_made_after_start(env, shared_host_dir):
    d = shared_host_dir
    with open(os.path.join(d, "file"), "w") as f:
        f.write("from host\n")
    sid, pcfg = env.run_pod()
    mnt = pb.Mount(container_path="/data", host_path=d, propagation=pb.PROPAGATION_HOST_TO_CONTAINER)
    priv = pb.Mount(container_path="/priv", host_path=d, propagation=pb.PROPAGATION_PRIVATE, readonly=True)
    cid = env.run(sid, pcfg, SLEEP, mounts=[mnt, priv])
    assert env.sh(cid, "cat /data/file") == "from host\n"
    assert env.exec(cid, ["touch", "/priv/x"]).exit_code != 0  # read-only
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.path.join(d, "sub")], check=True)
    try:
        with open(os.path.join(d, "sub", "late"), "w") as f:
            f.write("late\n")
        assert env.sh(cid, "cat /data/sub/late") == "late\n"       # rslave: propagated
        assert env.exec(cid, ["cat", "/priv/sub/late"]).exit_code != 0  # private: not
        st = env.status(cid).status
        by_path = {m.container_path: m for m in st.mounts}
        assert by_path["/data"].propagation == pb.PROPAGATION_HOST_TO_CONTAINER
        assert by_path["/priv"].readonly
    finally:
        env.cleanup()
        subprocess.run(["umount", "-l", os.path.join(d, "sub")], check=False)


def test_bind_mount_rshared_propagates_back_to_host(env, shared_host_dir):
    d = shared_host_dir
    sid, pcfg = env.run_pod(pod_config(name=f"p-{uuid.uuid4().hex[:8]}", linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(privileged=True))))
    mnt = pb.Mount(container_path="/data", host_path=d, propagation=pb.PROPAGATION_BIDIRECTIONAL)
    cid = env.run(sid, pcfg, SLEEP, mounts=[mnt], linux=sc(privileged=True))
    env.sh(cid, "mount -t tmpfs tmpfs /data/sub && echo inner > /data/sub/f")
    try:
        assert Path(os.path.join(d, "sub", "f")).read_text() == "inner\n"
    finally:
        env.sh(cid, "umount /data/sub")
