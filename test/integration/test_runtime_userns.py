"""User-namespaced pods (CRI userns_options) end to end over gRPC: the real daemon, runc and crun.

moorage id-maps the rootfs itself (idmapped image layers under the overlay), chowns the pod
files and mounts /dev/shm for the pod's root; see docs/architecture.md "User namespaces".
"""

import json
import os
import uuid

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.cri import pod_config

SLEEP = ["sleep", "1000"]
FIELD = "linux.security_context.namespace_options.userns_options"


def mapping(host: int, length: int = 65536, ctr: int = 0) -> pb.IDMapping:
    return pb.IDMapping(host_id=host, container_id=ctr, length=length)


def userns_pod(host: int | None = None, uids=None, gids=None, mode=pb.POD, **kw) -> pb.PodSandboxConfig:
    if host is not None:
        uids = uids or [mapping(host)]
        gids = gids or [mapping(host)]
    nso = pb.NamespaceOption(userns_options=pb.UserNamespace(mode=mode, uids=uids or [], gids=gids or []))
    return pod_config(name=f"u-{uuid.uuid4().hex[:8]}", linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(namespace_options=nso)), **kw)


def ctr_linux(pcfg: pb.PodSandboxConfig, **kw) -> pb.LinuxContainerConfig:
    """As the kubelet does: the container carries its pod's namespace options."""
    nso = pcfg.linux.security_context.namespace_options
    return pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(namespace_options=nso, **kw))


def fresh_host_base() -> int:
    """A host id range of 65536 no other test of this module uses at the same time."""
    return 65536 * (100 + uuid.uuid4().int % 20000)


@pytest.fixture(autouse=True, scope="module")
def searchable_base(module_env):
    """The daemon's temporary base is 0700 (mkdtemp): the pods' mapped root must get through it."""
    os.chmod(module_env.d.base, 0o711)


@pytest.fixture(params=["runc", "crun"])
def handler(request, env) -> str:
    status = env.rt.Status(pb.StatusRequest(verbose=True), timeout=30)
    feats = {h.name: h.features.user_namespaces for h in status.runtime_handlers}
    assert feats.get("") and feats.get(request.param), json.loads(status.info["features"])
    return request.param


def test_status_advertises_user_namespaces_for_each_handler_and_the_default(env):
    status = env.rt.Status(pb.StatusRequest(verbose=True), timeout=30)
    feats = {h.name: h.features.user_namespaces for h in status.runtime_handlers}
    assert feats == {"": True, "runc": True, "crun": True}
    why = json.loads(status.info["features"])["handlers"]
    # crun 1.8.1 has no `features` command; its --version is enough to know its namespaces.
    assert why["crun"]["user_namespaces"].startswith("available (crun 1.8")
    assert not status.features.user_namespaces_host_network


def test_pod_user_namespace_end_to_end(env, handler):
    base = fresh_host_base()
    host_dir = os.path.join(env.d.base, f"vol-{uuid.uuid4().hex[:6]}")
    os.makedirs(host_dir, mode=0o777)
    os.chmod(host_dir, 0o777)
    sid, pcfg = env.run_pod(userns_pod(base), handler=handler)
    cid = env.run(sid, pcfg, SLEEP, linux=ctr_linux(pcfg),
                  mounts=[pb.Mount(container_path="/vol", host_path=host_dir)])
    # The mapping, as the process inside sees it.
    assert env.sh(cid, "cat /proc/self/uid_map").split() == ["0", str(base), "65536"]
    assert env.sh(cid, "cat /proc/self/gid_map").split() == ["0", str(base), "65536"]
    assert env.sh(cid, "id -u; id -g").split() == ["0", "0"]
    # The image's files are root's inside (id-mapped layers), setuid bits kept.
    assert env.sh(cid, "stat -c '%u %g' / /bin /etc/passwd").split() == ["0", "0"] * 3
    # Writable as root inside: the rootfs, /dev/shm, the pod's hosts file; and root owns them.
    env.sh(cid, "echo hi > /made-here && echo shm > /dev/shm/x && echo '10.9.9.9 extra' >> /etc/hosts")
    assert env.sh(cid, "stat -c '%u %g' /made-here /dev/shm /dev/shm/x /etc/hosts /etc/resolv.conf "
                       "/etc/hostname").split() == ["0", "0"] * 6
    assert "10.9.9.9 extra" in env.sh(cid, "cat /etc/hosts")
    # On the host, what the container made belongs to the mapped ids.
    env.sh(cid, "echo v > /vol/f && mkdir /vol/d")
    for p in ("f", "d"):
        st = os.stat(os.path.join(host_dir, p))
        assert (st.st_uid, st.st_gid) == (base, base), p
    hosts = os.path.join(env.d.root, "sandboxes", sid, "hosts")
    st = os.stat(hosts)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (base, base, 0o644)
    pid = env.pid(cid)
    with open(f"/proc/{pid}/mountinfo") as f:
        mountinfo = f.read()
    upper = [line.split("upperdir=")[1].split(",")[0] for line in mountinfo.splitlines()
             if " / / " in line and "upperdir=" in line]
    assert upper, mountinfo
    st = os.stat(os.path.join(upper[0], "made-here"))
    assert (st.st_uid, st.st_gid) == (base, base)
    with open(f"/proc/{pid}/status") as f:
        ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid:", "Gid:"))}
    assert ids["Uid"][0] == str(base) and ids["Gid"][0] == str(base)
    # A second container of the same pod joins the same namespace.
    c2 = env.run(sid, pcfg, SLEEP, linux=ctr_linux(pcfg))
    assert os.readlink(f"/proc/{env.pid(c2)}/ns/user") == os.readlink(f"/proc/{pid}/ns/user")
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")


def test_nonroot_image_user_in_a_user_namespace(env, handler):
    base = fresh_host_base()
    sid, pcfg = env.run_pod(userns_pod(base), handler=handler)
    cid = env.run(sid, pcfg, SLEEP, image=env.reg.images["nonroot"].ref, linux=ctr_linux(pcfg))
    assert env.sh(cid, "id -u; id -g; pwd").split() == ["1234", "1234", "/home/tester"]
    # Its home (owned by 1234 in the image) is its own inside; it can write there and in /dev/shm.
    assert env.sh(cid, "stat -c %u /home/tester").strip() == "1234"
    env.sh(cid, "touch /home/tester/mine /dev/shm/mine")
    assert env.exec(cid, ["touch", "/etc/not-mine"]).exit_code != 0
    with open(f"/proc/{env.pid(cid)}/status") as f:
        uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
    assert uid == str(base + 1234)


def test_mode_node_is_the_host_user_namespace(env):
    sid, pcfg = env.run_pod(userns_pod(mode=pb.NODE))
    cid = env.run(sid, pcfg, SLEEP, linux=ctr_linux(pcfg))
    with open("/proc/self/uid_map") as f:
        assert env.sh(cid, "cat /proc/self/uid_map").split() == f.read().split()


@pytest.mark.parametrize(("pod", "match"), [
    (lambda b: userns_pod(uids=[mapping(b), mapping(b + 65536, ctr=65536)], gids=[mapping(b)]),
     rf"{FIELD}\.uids: 2 ranges given"),
    (lambda b: userns_pod(uids=[mapping(b), mapping(b + 1000, ctr=70000)], gids=[mapping(b)]),
     rf"{FIELD}\.uids\[1\]\.host_id: range .* overlaps uids\[0\]"),
    (lambda b: userns_pod(uids=[mapping(b, length=100000)], gids=[mapping(b, length=100000)]),
     rf"{FIELD}\.uids\[0\]\.length: 100000 is not a multiple of 65536"),
    (lambda b: userns_pod(uids=[mapping(b, ctr=1)], gids=[mapping(b, ctr=1)]),
     rf"{FIELD}\.uids\[0\]\.container_id: must be 0"),
    (lambda b: userns_pod(uids=[mapping(b)], gids=[mapping(b)], mode=pb.NODE),
     rf"{FIELD}: mode NODE .* takes no uid/gid mappings"),
    (lambda b: userns_pod(mode=pb.CONTAINER), rf"{FIELD}\.mode: user namespace mode CONTAINER"),
    (lambda b: userns_pod(mode=pb.TARGET), rf"{FIELD}\.mode: user namespace mode TARGET"),
    (lambda b: userns_pod(uids=[mapping(b)]), rf"{FIELD}\.gids: a pod user namespace needs"),
])
def test_bad_mappings_are_invalid_argument(env, pod, match):
    with pytest.raises(grpc.RpcError) as e:
        env.run_pod(pod(fresh_host_base()))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert __import__("re").search(match, e.value.details()), e.value.details()
    assert not env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items


def test_host_ids_of_another_pod_are_refused(env):
    base = fresh_host_base()
    sid, first = env.run_pod(userns_pod(base))
    with pytest.raises(grpc.RpcError) as e:
        env.run_pod(userns_pod(uids=[mapping(base + 65536 // 2, ctr=0)], gids=[mapping(base + 10 * 65536)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{FIELD}: host ids already mapped by pod sandbox {sid}" in e.value.details()
    # A new attempt of the same pod keeps its mapping (the kubelet does so for the pod's life).
    again = pb.PodSandboxConfig()
    again.CopyFrom(first)
    again.metadata.attempt = 1
    env.run_pod(again)
    # Once the first pod is removed its ids are free again.
    env.cleanup()
    env.run_pod(userns_pod(base))


def test_container_asking_for_another_user_namespace_is_invalid(env):
    sid, pcfg = env.run_pod(userns_pod(fresh_host_base()))
    other = userns_pod(fresh_host_base())
    with pytest.raises(grpc.RpcError) as e:
        env.create(sid, pcfg, SLEEP, linux=ctr_linux(other))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the container's user namespace must be its pod's" in e.value.details()
