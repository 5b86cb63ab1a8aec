"""Hostile registries, manifests, indexes and image configs, pulled over gRPC by a real daemon.

Crafted documents are pushed to the real test registry (docker-registry) when it stores
them; content it would refuse (a blob that does not hash to its digest, a body longer or
shorter than its descriptor, an over-deep or oversized manifest) is served by a proxy in
front of it.  Every case asserts the exact status and the parts of its message (registry,
reference, digest, field), that the message is bounded, that nothing is left in the
content store (ingest included), the snapshot dirs or the store's image tables, that the
daemon still answers Version, and that a good pull of the same reference then works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from moorage.cri.api import api_pb2 as pb
from moorage.images import oci
from moorage.testing import registry as registry_mod
from moorage.testing.cri import image_client, runtime_client
from moorage.testing.daemon import DaemonProcess
from moorage.testing.hostile import ImageForge, base_image, entry, image_rows, nested_json
from moorage.testing.imagesenv import RegistryProxy, content_files, list_images, pull, snapshot_entries
from moorage.testing.registry import FakeRequest, FakeResponse

pytestmark = pytest.mark.integration

#: A pull's error is cut at 2048 characters (images/service.py); with the prefix it stays below this.
MAX_DETAILS = 2300
HOST_PLATFORM = "linux/amd64"


@pytest.fixture(scope="module")
def forge(registry: registry_mod.TestRegistry) -> ImageForge:
    return ImageForge(registry.host, base_image(registry.images["busybox"].layout, HOST_PLATFORM))


def assert_clean(d: DaemonProcess) -> None:
    assert list_images(d) == []
    assert content_files(d) == []  # blobs and ingest/
    assert snapshot_entries(d) == []
    assert image_rows(d) == {"images": 0, "image_refs": 0, "snapshots": 0, "leases": 0}


def assert_responsive(d: DaemonProcess) -> None:
    r = runtime_client(d).Version(pb.VersionRequest(), timeout=10)
    assert r.runtime_name == "moorage"


def pull_error(d: DaemonProcess, ref: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        pull(d, ref)
    return ei.value


def expect_refused(d: DaemonProcess, ref: str, code: grpc.StatusCode, *words: str) -> str:
    e = pull_error(d, ref)
    details = e.details() or ""
    assert e.code() == code, details
    for w in words:
        assert w in details, (w, details)
    assert len(details) <= MAX_DETAILS
    assert_clean(d)
    assert_responsive(d)
    return details


def pull_and_remove(d: DaemonProcess, ref: str, expect_id: str | None = None) -> str:
    iid = pull(d, ref)
    if expect_id is not None:
        assert iid == expect_id
    image_client(d).RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=iid)), timeout=60)
    assert_clean(d)
    return iid


def good_config_id(forge: ImageForge) -> str:
    return oci.sha256_digest(json.dumps(forge.base.config).encode())


@pytest.fixture
def d(module_daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    assert_clean(module_daemon)
    yield module_daemon


# --- image configs -----------------------------------------------------------------------------

CONFIG_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "env-nul": ({"Env": ["PATH=/bin", "A=x\x00y"]}, ["config.Env[1] contains a NUL character"]),
    "env-no-name": ({"Env": ["=value"]}, ["config.Env[0] '=value' has no variable name"]),
    "entrypoint-nul": ({"Entrypoint": ["/bin/s\x00h"]}, ["config.Entrypoint[0] contains a NUL character"]),
    "cmd-nul": ({"Cmd": ["sh", "-c", "\x00"]}, ["config.Cmd[2] contains a NUL character"]),
    "workdir-relative": ({"WorkingDir": "srv/app"}, ["config.WorkingDir 'srv/app' is not an absolute path"]),
    "workdir-nul": ({"WorkingDir": "/srv\x00"}, ["config.WorkingDir contains a NUL character"]),
    "user-syntax": ({"User": "a:b:c"}, ["config.User 'a:b:c' is not a user, uid, user:group or uid:gid"]),
    "user-nul": ({"User": "root\x00"}, ["config.User contains a NUL character"]),
    "stop-signal": ({"StopSignal": "SIGNOPE"}, ["config.StopSignal 'SIGNOPE' is not a signal"]),
    "volume-relative": ({"Volumes": {"data": {}}}, ["config.Volumes entry 'data' is not an absolute path"]),
    "exposed-port": ({"ExposedPorts": {"http/tcp": {}}}, ["config.ExposedPorts entry 'http/tcp' is not port"]),
    "labels-huge": ({"Labels": {"blob": "x" * 300_000}}, ["config.Labels hold 300004 bytes, over the 262144"]),
    "long-value": ({"WorkingDir": "w" * 200_000}, ["config.WorkingDir 'wwww", "more characters"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_unusable_image_config_field_is_invalid_argument(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                         forge: ImageForge, case: str) -> None:
    changes, words = CONFIG_CASES[case]
    repo, ref = f"hostile/cfg-{case}", f"{registry.host}/hostile/cfg-{case}:v1"
    cfg = forge.config(**changes)
    cfg_digest = oci.sha256_digest(json.dumps(cfg).encode())
    forge.image(repo, "v1", cfg)
    expect_refused(d, ref, grpc.StatusCode.INVALID_ARGUMENT, f"image config {cfg_digest} of {ref}", *words)
    forge.image(repo, "v1")
    pull_and_remove(d, ref, good_config_id(forge))


def test_config_json_nested_100000_deep_is_invalid_argument(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                           forge: ImageForge) -> None:
    raw = nested_json(100_000)
    ref = f"{registry.host}/hostile/cfg-deep:v1"
    forge.image("hostile/cfg-deep", "v1", raw)
    expect_refused(d, ref, grpc.StatusCode.INVALID_ARGUMENT, oci.sha256_digest(raw), ref,
                   "nests more than 64 levels deep")
    forge.image("hostile/cfg-deep", "v1")
    pull_and_remove(d, ref, good_config_id(forge))


def test_config_that_is_not_json_is_invalid_argument(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                     forge: ImageForge) -> None:
    raw = b'{"architecture": "amd64", "os": ' + b"\x01" * 10_000
    ref = f"{registry.host}/hostile/cfg-notjson:v1"
    forge.image("hostile/cfg-notjson", "v1", raw)
    details = expect_refused(d, ref, grpc.StatusCode.INVALID_ARGUMENT, oci.sha256_digest(raw), "is not valid JSON")
    assert "\x01" not in details


def test_image_env_without_equals_is_accepted(d: DaemonProcess, registry: registry_mod.TestRegistry, forge: ImageForge) -> None:
    """containerd keeps such an entry (it unsets the variable when the spec is made)."""
    cfg = forge.config(Env=["PATH=/bin", "UNSET_ME"])
    forge.image("hostile/cfg-env-unset", "v1", cfg)
    pull_and_remove(d, f"{registry.host}/hostile/cfg-env-unset:v1", oci.sha256_digest(json.dumps(cfg).encode()))


def test_wrong_media_types_are_invalid_argument(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                forge: ImageForge) -> None:
    ref = f"{registry.host}/hostile/mt-layer:v1"
    forge.image("hostile/mt-layer", "v1", layer_media_type="application/x-moorage-not-a-layer")
    expect_refused(d, ref, grpc.StatusCode.INVALID_ARGUMENT, ref,
                   "has unsupported media type 'application/x-moorage-not-a-layer'")
    ref = f"{registry.host}/hostile/mt-config:v1"
    forge.image("hostile/mt-config", "v1", config_media_type="application/vnd.moorage.thing+json")
    expect_refused(d, ref, grpc.StatusCode.INVALID_ARGUMENT, ref, "is not a container image",
                   "'application/vnd.moorage.thing+json'")


# --- indexes: zero, one and many platforms; nesting --------------------------------------------

def test_index_with_zero_entries_is_not_found(d: DaemonProcess, registry: registry_mod.TestRegistry, forge: ImageForge) -> None:
    ref = f"{registry.host}/hostile/idx-empty:v1"
    forge.index("hostile/idx-empty", "v1", [])
    expect_refused(d, ref, grpc.StatusCode.NOT_FOUND, ref, f"no manifest for platform {HOST_PLATFORM}",
                   "available platforms: none")


def test_index_with_no_matching_platform_is_not_found(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                      forge: ImageForge) -> None:
    m = forge.image("hostile/idx-none", None)
    ref = f"{registry.host}/hostile/idx-none:v1"
    forge.index("hostile/idx-none", "v1", [entry(m, "linux/s390x"), entry(m, "linux/arm64/v8")])
    expect_refused(d, ref, grpc.StatusCode.NOT_FOUND, ref, "available platforms: linux/s390x, linux/arm64/v8")


def test_index_with_one_matching_platform_pulls(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                forge: ImageForge) -> None:
    m = forge.image("hostile/idx-one", None)
    forge.index("hostile/idx-one", "v1", [entry(m, HOST_PLATFORM)])
    pull_and_remove(d, f"{registry.host}/hostile/idx-one:v1", good_config_id(forge))


def test_index_with_many_entries_pulls_the_matching_one(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                        forge: ImageForge) -> None:
    other_cfg = forge.config(Env=["WHICH=other"])
    other = forge.image("hostile/idx-many", None, other_cfg)
    mine = forge.image("hostile/idx-many", None)
    forge.index("hostile/idx-many", "v1", [
        entry(other, "linux/s390x"), entry(other, "linux/arm64/v8"), entry(mine, HOST_PLATFORM),
        entry(other, "unknown/unknown", annotations={"vnd.docker.reference.type": "attestation-manifest"})])
    pull_and_remove(d, f"{registry.host}/hostile/idx-many:v1", good_config_id(forge))


def _chain(forge: ImageForge, repo: str, levels: int) -> None:
    """An index nested *levels* deep (each level without a platform) over the good image."""
    desc = forge.image(repo, None)
    top = entry(desc, HOST_PLATFORM)
    for i in range(levels):
        desc = forge.index(repo, "v1" if i == levels - 1 else None, [top])
        top = entry(desc, None)


def test_nested_index_within_the_limit_pulls(d: DaemonProcess, registry: registry_mod.TestRegistry, forge: ImageForge) -> None:
    _chain(forge, "hostile/idx-nested", 1 + oci.MAX_INDEX_DEPTH)
    pull_and_remove(d, f"{registry.host}/hostile/idx-nested:v1", good_config_id(forge))


def test_index_nesting_too_deep_is_invalid_argument(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                    forge: ImageForge) -> None:
    ref = f"{registry.host}/hostile/idx-deep:v1"
    _chain(forge, "hostile/idx-deep", 2 + oci.MAX_INDEX_DEPTH)
    expect_refused(d, ref, grpc.StatusCode.INVALID_ARGUMENT, ref, registry.host,
                   f"indexes nest more than {oci.MAX_INDEX_DEPTH} levels deep")
    _chain(forge, "hostile/idx-deep", 1)
    pull_and_remove(d, ref, good_config_id(forge))


def test_index_entry_of_the_wrong_media_type_is_invalid_argument(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                                 forge: ImageForge) -> None:
    inner = forge.index("hostile/idx-liar", None, [entry(forge.image("hostile/idx-liar", None), HOST_PLATFORM)])
    ref = f"{registry.host}/hostile/idx-liar:v1"
    forge.index("hostile/idx-liar", "v1", [entry(inner, HOST_PLATFORM, mediaType=oci.OCI_MANIFEST)])
    expect_refused(d, ref, grpc.StatusCode.INVALID_ARGUMENT, ref, inner.digest,
                   f"is declared '{oci.OCI_MANIFEST}' but the registry served '{oci.OCI_INDEX}'")


# --- content that does not match its descriptor (served by a proxy) -----------------------------

def _upstream_body(proxy: RegistryProxy, req: FakeRequest) -> Any:
    return proxy._client.get(f"http://{proxy.upstream}{req.path}", headers={"Accept": oci.MANIFEST_ACCEPT})


def _blob_case(d: DaemonProcess, registry: registry_mod.TestRegistry, name: str, digest_of: Callable[[Any], str],
               change: Callable[[bytes], tuple[bytes, dict[str, str]]], *words: str) -> None:
    img = registry.images[name]
    target = digest_of(next(m for m in img.layout.manifests if m.platform == HOST_PLATFORM))
    with RegistryProxy(registry.host) as proxy:
        async def hook(req: FakeRequest, n: int) -> FakeResponse | None:
            if req.method == "GET" and req.route.endswith(f"/blobs/{target}"):
                up = await proxy._client.get(f"http://{registry.host}{req.path}")
                body, headers = change(up.content)
                return FakeResponse(200, {"Content-Type": "application/octet-stream", **headers}, body)
            return None
        proxy.hook = hook
        ref = f"{proxy.host}/test/{name}:latest"
        expect_refused(d, ref, grpc.StatusCode.DATA_LOSS, ref, target, proxy.host, *words)
        proxy.hook = None
        pull_and_remove(d, ref)


def _flip(b: bytes) -> tuple[bytes, dict[str, str]]:
    x = bytearray(b)
    x[len(x) // 2] ^= 0x55
    return bytes(x), {}


def test_layer_whose_digest_does_not_match_is_data_loss(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    _blob_case(d, registry, "multilayer", lambda m: m.layers[-1], _flip, "failed verification")


def test_config_whose_digest_does_not_match_is_data_loss(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    _blob_case(d, registry, "busybox", lambda m: m.config_digest, _flip, "failed verification")


def test_layer_larger_than_declared_is_data_loss(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    _blob_case(d, registry, "multilayer", lambda m: m.layers[0], lambda b: (b + b"\0" * 4096, {}),
               "is larger than its declared size")


def test_layer_smaller_than_declared_is_data_loss(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    _blob_case(d, registry, "multilayer", lambda m: m.layers[0], lambda b: (b[: len(b) // 2], {}),
               "smaller than its declared size")


def _manifest_case(d: DaemonProcess, registry: registry_mod.TestRegistry, ref_of: Callable[[RegistryProxy], str],
                   respond: Callable[[FakeRequest, bytes], FakeResponse | None], code: grpc.StatusCode,
                   *words: str) -> str:
    with RegistryProxy(registry.host) as proxy:
        async def hook(req: FakeRequest, n: int) -> FakeResponse | None:
            if "/manifests/" not in req.route:
                return None
            up = await _upstream_body(proxy, req)
            return respond(req, up.content)
        proxy.hook = hook
        ref = ref_of(proxy)
        details = expect_refused(d, ref, code, ref, *words)
        proxy.hook = None
        pull_and_remove(d, ref)
    return details


def test_manifest_not_matching_the_digest_pulled_is_data_loss(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    img = registry.images["multilayer"]
    mdigest = img.manifest_digests[HOST_PLATFORM]

    def respond(req: FakeRequest, body: bytes) -> FakeResponse | None:
        if req.method == "GET" and req.route.endswith(mdigest):
            return FakeResponse(200, {"Content-Type": oci.OCI_MANIFEST}, body.replace(b'"schemaVersion"',
                                                                                      b'"schemaVersion" '))
        return None
    _manifest_case(d, registry, lambda p: f"{p.host}/test/multilayer@{mdigest}", respond,
                   grpc.StatusCode.DATA_LOSS, "failed verification", f"expected {mdigest}")


def test_manifest_not_matching_its_docker_content_digest_is_data_loss(d: DaemonProcess,
                                                                      registry: registry_mod.TestRegistry) -> None:
    liar = "sha256:" + "0" * 64

    def respond(req: FakeRequest, body: bytes) -> FakeResponse | None:
        if req.route.endswith("/manifests/latest"):
            return FakeResponse(200, {"Content-Type": json.loads(body).get("mediaType", oci.OCI_INDEX),
                                      "Docker-Content-Digest": liar}, body)
        return None
    _manifest_case(d, registry, lambda p: f"{p.host}/test/busybox:latest", respond, grpc.StatusCode.DATA_LOSS,
                   f"does not match its Docker-Content-Digest {liar}")


def test_self_referencing_index_is_data_loss(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    """An index that names its own digest cannot hash to it: the first fetch of the entry fails
    verification (a cycle can only be served by lying about content)."""
    fake = "sha256:" + "5" * 64
    size = 0
    for _ in range(3):  # the size is part of the document: settle it
        doc = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
            {"mediaType": oci.OCI_INDEX, "digest": fake, "size": size}]}).encode()
        size = len(doc)

    def respond(req: FakeRequest, body: bytes) -> FakeResponse | None:
        if req.route.endswith("/manifests/latest") or req.route.endswith(fake):
            return FakeResponse(200, {"Content-Type": oci.OCI_INDEX}, doc)
        return None
    _manifest_case(d, registry, lambda p: f"{p.host}/test/busybox:latest", respond, grpc.StatusCode.DATA_LOSS,
                   f"expected {fake}")


@pytest.mark.parametrize("media_type", [oci.OCI_MANIFEST, oci.OCI_INDEX])
def test_manifest_json_nested_100000_deep_is_invalid_argument(d: DaemonProcess, registry: registry_mod.TestRegistry,
                                                              media_type: str) -> None:
    def respond(req: FakeRequest, body: bytes) -> FakeResponse | None:
        if req.route.endswith("/manifests/latest"):
            return FakeResponse(200, {"Content-Type": media_type}, b"[" * 100_000 + b"]" * 100_000)
        return None
    _manifest_case(d, registry, lambda p: f"{p.host}/test/busybox:latest", respond,
                   grpc.StatusCode.INVALID_ARGUMENT, "nests more than 64 levels deep")


def test_manifest_of_a_million_values_is_refused_before_parsing(d: DaemonProcess,
                                                                registry: registry_mod.TestRegistry) -> None:
    """Parsing it would hold the GIL for seconds: the value count is checked first."""
    body = b'{"schemaVersion": 2, "layers": [' + b"[1]," * 1_000_000 + b"1]}"

    def respond(req: FakeRequest, _: bytes) -> FakeResponse | None:
        if req.route.endswith("/manifests/latest"):
            return FakeResponse(200, {"Content-Type": oci.OCI_MANIFEST}, body)
        return None
    _manifest_case(d, registry, lambda p: f"{p.host}/test/busybox:latest", respond,
                   grpc.StatusCode.INVALID_ARGUMENT, "holds about 2000003 values, over the limit of 100000")


def test_manifest_over_the_size_limit_is_invalid_argument(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    big = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                      "annotations": {"pad": "x" * (oci.MAX_MANIFEST_SIZE + 10)}}).encode()

    def respond(req: FakeRequest, body: bytes) -> FakeResponse | None:
        if req.route.endswith("/manifests/latest"):
            return FakeResponse(200, {"Content-Type": oci.OCI_MANIFEST}, big)
        return None
    _manifest_case(d, registry, lambda p: f"{p.host}/test/busybox:latest", respond,
                   grpc.StatusCode.INVALID_ARGUMENT, f"over the {oci.MAX_MANIFEST_SIZE} byte limit")


def test_deep_json_error_body_is_read_safely(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    def respond(req: FakeRequest, body: bytes) -> FakeResponse | None:
        if req.route.endswith("/manifests/latest"):
            return FakeResponse(404, {"Content-Type": "application/json"}, b"[" * 60_000)
        return None
    details = _manifest_case(d, registry, lambda p: f"{p.host}/test/busybox:latest", respond,
                             grpc.StatusCode.NOT_FOUND, "not found")
    assert len(details) < 500  # at most 200 characters of the body are quoted


def test_unbounded_registry_text_is_not_echoed(d: DaemonProcess, registry: registry_mod.TestRegistry) -> None:
    long_type = "application/vnd." + "x" * 100_000 + "\n+json"

    def respond(req: FakeRequest, body: bytes) -> FakeResponse | None:
        if req.route.endswith("/manifests/latest"):
            doc = json.loads(body)
            doc["mediaType"] = long_type
            return FakeResponse(200, {"Content-Type": "application/json"}, json.dumps(doc).encode())
        return None
    details = _manifest_case(d, registry, lambda p: f"{p.host}/test/busybox:latest", respond,
                             grpc.StatusCode.INVALID_ARGUMENT, "unsupported media type", "more characters")
    assert "\n" not in details and len(details) < 600
