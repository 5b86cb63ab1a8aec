"""images.registry pure parts: WWW-Authenticate parsing, references, URLs, credentials."""

from __future__ import annotations

import base64

import pytest

from moorage.core.errors import InvalidArgument
from moorage.images.hosts import parse_hosts_toml, resolve_hosts
from moorage.images.registry import (
    Challenge,
    Credentials,
    RepoName,
    as_repo,
    blob_url,
    display_ref,
    manifest_url,
    parse_www_authenticate,
    split_reference,
    upload_url,
)

DIG = "sha256:" + "ab" * 32


@pytest.mark.parametrize("header, want", [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
     'scope="repository:library/busybox:pull"',
     [Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                           "scope": "repository:library/busybox:pull"})]),
    ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
    ('bearer Realm=https://x/token, Service=s', [Challenge("bearer", {"realm": "https://x/token", "service": "s"})]),
    ('Bearer realm="a\\"b", error="insufficient_scope"',
     [Challenge("bearer", {"realm": 'a"b', "error": "insufficient_scope"})]),
    ('Negotiate abc==, Basic realm="r"', [Challenge("negotiate", {}), Challenge("basic", {"realm": "r"})]),
    ('Basic realm="r", Bearer realm="t",scope="repository:a:pull,push"',
     [Challenge("basic", {"realm": "r"}), Challenge("bearer", {"realm": "t", "scope": "repository:a:pull,push"})]),
    ("", []),
])
def test_parse_www_authenticate(header, want):
    assert parse_www_authenticate(header) == want


def test_parse_www_authenticate_multiple_headers():
    got = parse_www_authenticate(['Basic realm="a"', 'Bearer realm="b"'])
    assert [c.scheme for c in got] == ["basic", "bearer"]


@pytest.mark.parametrize("ref, registry, repo, reference", [
    ("busybox", "docker.io", "library/busybox", "latest"),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36"),
    ("foo/bar", "docker.io", "foo/bar", "latest"),
    ("index.docker.io/foo/bar:t", "docker.io", "foo/bar", "t"),
    ("127.0.0.1:5000/test/busybox:latest", "127.0.0.1:5000", "test/busybox", "latest"),
    ("localhost/x", "localhost", "x", "latest"),
    (f"quay.io/a/b:tag@{DIG}", "quay.io", "a/b", DIG),
    (f"reg.example:5000/a@{DIG}", "reg.example:5000", "a", DIG),
])
def test_split_reference(ref, registry, repo, reference):
    assert split_reference(ref) == (RepoName(registry, repo), reference)


def test_split_reference_accepts_reference_objects():
    class Ref:
        domain, path, tag, digest = "quay.io", "a/b", "t", None
    assert split_reference(Ref()) == (RepoName("quay.io", "a/b"), "t")
    Ref.digest = DIG
    assert split_reference(Ref()) == (RepoName("quay.io", "a/b"), DIG)


@pytest.mark.parametrize("bad", ["", "a b", "Foo/Bar:x" + "", "x@sha256:zz", "reg.example/"])
def test_split_reference_invalid(bad):
    with pytest.raises(InvalidArgument):
        split_reference(bad)


def test_urls_for_server_and_mirror():
    repo = RepoName("docker.io", "library/busybox")
    mirror, server = parse_hosts_toml('[host."https://mirror.example/prefix"]\n', "docker.io")
    assert manifest_url(server, repo, "latest") == \
        "https://registry-1.docker.io/v2/library/busybox/manifests/latest"
    assert blob_url(server, repo, DIG) == f"https://registry-1.docker.io/v2/library/busybox/blobs/{DIG}"
    assert upload_url(server, repo) == "https://registry-1.docker.io/v2/library/busybox/blobs/uploads/"
    assert manifest_url(mirror, repo, DIG) == \
        f"https://mirror.example/prefix/v2/library/busybox/manifests/{DIG}?ns=docker.io"
    [local] = resolve_hosts("127.0.0.1:5000")
    assert manifest_url(local, RepoName("127.0.0.1:5000", "t/x"), "1.0") == \
        "http://127.0.0.1:5000/v2/t/x/manifests/1.0"


def test_display_ref_and_as_repo():
    r = as_repo("127.0.0.1:5000/test/busybox")
    assert r == RepoName("127.0.0.1:5000", "test/busybox")
    assert display_ref(r, "nope") == "127.0.0.1:5000/test/busybox:nope"
    assert display_ref(r, DIG) == f"127.0.0.1:5000/test/busybox@{DIG}"
    with pytest.raises(InvalidArgument):
        as_repo("nohost")


def test_credentials():
    c = Credentials(auth=base64.b64encode(b"user:pa:ss").decode())
    assert c.basic() == ("user", "pa:ss")
    assert Credentials(username="u", password="p").basic() == ("u", "p")
    assert Credentials().empty and Credentials().basic() is None
    assert Credentials(identity_token="t").basic() is None
    with pytest.raises(InvalidArgument):
        Credentials(auth=base64.b64encode(b"nocolon").decode()).basic()
    # identity is stable and does not contain the secret
    assert Credentials(password="secret").identity() == Credentials(password="secret").identity()
    assert "secret" not in Credentials(password="secret").identity()


def test_credentials_server_address_scoping():
    [server] = resolve_hosts("registry.example:5000")
    [hub] = resolve_hosts("docker.io")
    assert Credentials(username="u").applies_to(server)
    assert Credentials(username="u", server_address="registry.example:5000").applies_to(server)
    assert Credentials(username="u", server_address="https://registry.example:5000/v2/").applies_to(server)
    assert not Credentials(username="u", server_address="other.example").applies_to(server)
    assert Credentials(username="u", server_address="https://index.docker.io/v1/").applies_to(hub)
