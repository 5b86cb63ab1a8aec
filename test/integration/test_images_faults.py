"""Bad input and faults over gRPC against a real daemon and the real registry.

Missing tags, wrong and right credentials (basic and token auth over TLS), tampered
blobs, hostile layers, dropped and stalled transfers (through a forwarding proxy in
front of the real registry).  After every failed pull nothing is left: no image,
no blob, no snapshot, no ingest.
"""

from __future__ import annotations

import base64
import os
import shutil

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.testing.imagesenv import (
    RegistryProxy,
    content_files,
    list_images,
    pull,
    snapshot_entries,
    status,
)
from moorage.testing.registry import FakeResponse
from moorage.testing.testimages import EVIL_TARGET_DIR

pytestmark = pytest.mark.integration


def assert_nothing_stored(d) -> None:
    assert list_images(d) == []
    assert content_files(d) == []
    assert snapshot_entries(d) == []


def pull_error(d, ref: str, auth: pb.AuthConfig | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        pull(d, ref, auth)
    return ei.value


@pytest.fixture
def tls_daemon(daemon_factory):
    """A daemon whose certs.d trusts the test CA for the given registry."""
    def make(reg, extra: str = ""):
        d = daemon_factory(extra_config=extra, start=False)
        d.write_config()
        shutil.copytree(reg.hosts_dir, os.path.join(d.base, "certs.d"), dirs_exist_ok=True)
        return d.start()
    return make


# --- registry answers ------------------------------------------------------------------------

def test_missing_tag_is_not_found_naming_the_reference(daemon, registry):
    ref = f"{registry.host}/test/busybox:no-such-tag"
    e = pull_error(daemon, ref)
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-tag" in e.details() and "test/busybox" in e.details()
    e = pull_error(daemon, f"{registry.host}/test/no-such-repo:latest")
    assert e.code() == grpc.StatusCode.NOT_FOUND and "no-such-repo" in e.details()
    assert_nothing_stored(daemon)


@pytest.mark.parametrize("which", ["auth_registry", "token_registry"])
def test_wrong_credentials_fail_naming_the_registry(request, tls_daemon, which):
    reg = request.getfixturevalue(which)
    d = tls_daemon(reg)
    ref = reg.ref("busybox")
    for auth in (pb.AuthConfig(username=reg.username, password="wrong"), None):
        e = pull_error(d, ref, auth)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.details()
        assert "authentication" in e.details() and "failed" in e.details() and reg.host in e.details()
    assert_nothing_stored(d)


@pytest.mark.parametrize("which", ["auth_registry", "token_registry"])
def test_right_credentials_through_cri_auth_config(request, tls_daemon, which):
    reg = request.getfixturevalue(which)
    d = tls_daemon(reg)
    ref = reg.ref("busybox")
    iid = pull(d, ref, pb.AuthConfig(username=reg.username, password=reg.password))
    assert iid == reg.images["busybox"].layout.manifests[0].config_digest
    d.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=iid)), timeout=60)
    # the "auth" field (base64 user:password) with a server address
    token = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    assert pull(d, ref, pb.AuthConfig(auth=token, server_address=reg.host)) == iid
    assert status(d, ref).image.id == iid


# --- tampered and hostile content -------------------------------------------------------------

def test_blob_whose_digest_does_not_match_stores_nothing(daemon, registry):
    img = registry.images["multilayer"]
    layer = img.layout.manifests[0].layers[1]

    def tamper(req, n):
        if req.method == "GET" and req.route.endswith(layer):
            return "tamper"
        return None

    with RegistryProxy(registry.host) as proxy:
        async def hook(req, n):
            if tamper(req, n):
                up = await proxy._client.get(f"http://{registry.host}{req.path}")
                body = bytearray(up.content)
                body[len(body) // 2] ^= 0xFF
                return FakeResponse(200, {"Content-Type": "application/octet-stream"}, bytes(body))
            return None

        proxy.hook = hook
        e = pull_error(daemon, f"{proxy.host}/test/multilayer:latest")
    assert e.code() == grpc.StatusCode.DATA_LOSS, e.details()
    assert layer in e.details() and "verification" in e.details()
    assert_nothing_stored(daemon)
    assert os.listdir(os.path.join(daemon.root, "images", "content", "ingest")) == []


EVIL_REASONS = {
    "evil-dotdot": '".."',
    "evil-symlink-abs": "symbolic link",
    "evil-symlink-rel": "symbolic link",
    "evil-hardlink-outside": "escapes the root",
    "evil-device": "device",
}


@pytest.mark.parametrize("name", sorted(EVIL_REASONS))
def test_hostile_layers_fail_with_a_reason_and_leave_nothing(daemon, registry, name):
    img = registry.images[name]
    pwned = os.path.join(EVIL_TARGET_DIR, "pwned")
    assert not os.path.exists(pwned)
    e = pull_error(daemon, img.ref)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert EVIL_REASONS[name] in e.details(), e.details()
    assert img.layout.manifests[0].layers[1] in e.details()  # names the layer
    assert not os.path.exists(pwned)
    for escaped in ("/escape.txt", "/escape2.txt", "/tmp/escape.txt", "/tmp/escape2.txt"):
        assert not os.path.exists(escaped)
    assert_nothing_stored(daemon)


def test_absolute_paths_are_contained(daemon, registry):
    img = registry.images["evil-absolute"]
    pull(daemon, img.ref)
    assert not os.path.exists("/abs-escape.txt")
    snaps = os.path.join(daemon.root, "images", "snapshotter", "snapshots")
    found = [dp for dp, _, fs in os.walk(snaps) if "abs-escape.txt" in fs]
    assert len(found) == 1 and found[0].startswith(snaps)


# --- network faults ------------------------------------------------------------------------------

def test_connection_dropped_mid_blob_is_retried(daemon, registry):
    img = registry.images["multilayer"]
    layer = img.layout.manifests[0].layers[0]

    with RegistryProxy(registry.host) as proxy:
        async def drop_first(req, n):
            if req.method == "GET" and req.route.endswith(layer) and n == 1:
                up = await proxy._client.get(f"http://{registry.host}{req.path}")
                return FakeResponse(200, {"Content-Type": "application/octet-stream"}, up.content,
                                    send_only=len(up.content) // 2, then="drop")
            return None

        proxy.hook = drop_first
        iid = pull(daemon, f"{proxy.host}/test/multilayer:latest")
        assert proxy.blob_gets()[layer] == 2
    assert iid == img.layout.manifests[0].config_digest
    assert os.listdir(os.path.join(daemon.root, "images", "content", "ingest")) == []


def test_connection_dropped_every_time_fails_cleanly(daemon_factory, registry):
    d = daemon_factory(extra_config="pull_retries = 1\n")  # lands in the fixture's [images] table
    img = registry.images["busybox"]
    layer = img.layout.manifests[0].layers[0]

    def always_drop(req, n):
        if req.method == "GET" and req.route.endswith(layer):
            return FakeResponse(200, {"Content-Type": "application/octet-stream"}, b"x" * 100_000,
                                send_only=1000, then="drop")
        return None

    with RegistryProxy(registry.host, always_drop) as proxy:
        e = pull_error(d, f"{proxy.host}/test/busybox:latest")
    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
    assert layer in e.details() or "blob" in e.details()
    assert_nothing_stored(d)
    assert os.listdir(os.path.join(d.root, "images", "content", "ingest")) == []


def test_stalled_download_is_cancelled(daemon_factory, registry):
    d = daemon_factory(extra_config="stall_timeout = 1.0\npull_retries = 0\n")
    img = registry.images["busybox"]
    layer = img.layout.manifests[0].layers[0]

    def stall(req, n):
        if req.method == "GET" and req.route.endswith(layer):
            return FakeResponse(200, {"Content-Type": "application/octet-stream"}, b"x" * 100_000,
                                send_only=1000, then="stall")
        return None

    with RegistryProxy(registry.host, stall) as proxy:
        e = pull_error(d, f"{proxy.host}/test/busybox:latest")
    assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), e.details()
    assert "progress" in e.details() or "stall" in e.details(), e.details()
    assert_nothing_stored(d)
