import pytest

from moorage.core.errors import InvalidArgument
from moorage.images.digest import Digest
from moorage.images.reference import Reference, is_image_id, parse_reference

H = "a" * 64
H512 = "b" * 128

VALID = [
    # input, domain, path, tag, digest, str, familiar
    ("busybox", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest", "busybox:latest"),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None,
     "docker.io/library/busybox:1.36", "busybox:1.36"),
    ("library/busybox", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest", "busybox:latest"),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest", "busybox:latest"),
    ("index.docker.io/foo/bar", "docker.io", "foo/bar", "latest", None,
     "docker.io/foo/bar:latest", "foo/bar:latest"),
    ("foo/bar", "docker.io", "foo/bar", "latest", None, "docker.io/foo/bar:latest", "foo/bar:latest"),
    ("foo/bar/baz:v1", "docker.io", "foo/bar/baz", "v1", None,
     "docker.io/foo/bar/baz:v1", "foo/bar/baz:v1"),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", None,
     "registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
    ("host:5000/ns/name:tag", "host:5000", "ns/name", "tag", None,
     "host:5000/ns/name:tag", "host:5000/ns/name:tag"),
    ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest", "localhost/x:latest"),
    ("localhost:5000/x", "localhost:5000", "x", "latest", None,
     "localhost:5000/x:latest", "localhost:5000/x:latest"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None,
     "127.0.0.1:5000/x:latest", "127.0.0.1:5000/x:latest"),
    ("[::1]:5000/x:t", "[::1]:5000", "x", "t", None, "[::1]:5000/x:t", "[::1]:5000/x:t"),
    (f"busybox@sha256:{H}", "docker.io", "library/busybox", None, f"sha256:{H}",
     f"docker.io/library/busybox@sha256:{H}", f"busybox@sha256:{H}"),
    (f"busybox:1.36@sha256:{H}", "docker.io", "library/busybox", "1.36", f"sha256:{H}",
     f"docker.io/library/busybox:1.36@sha256:{H}", f"busybox:1.36@sha256:{H}"),
    (f"quay.io/a/b@sha512:{H512}", "quay.io", "a/b", None, f"sha512:{H512}",
     f"quay.io/a/b@sha512:{H512}", f"quay.io/a/b@sha512:{H512}"),
    ("a.b-c/d__e.f-g--h_i:T_.-x", "a.b-c", "d__e.f-g--h_i", "T_.-x", None,
     "a.b-c/d__e.f-g--h_i:T_.-x", "a.b-c/d__e.f-g--h_i:T_.-x"),
    # uppercase first component is treated as a registry host (docker's rule)
    ("Example/foo", "Example", "foo", "latest", None, "Example/foo:latest", "Example/foo:latest"),
    # "localhost:5000" without a path is the image "localhost" with tag "5000" (as in docker)
    ("localhost:5000", "docker.io", "library/localhost", "5000", None,
     "docker.io/library/localhost:5000", "localhost:5000"),
    ("busybox:" + "t" * 128, "docker.io", "library/busybox", "t" * 128, None,
     "docker.io/library/busybox:" + "t" * 128, "busybox:" + "t" * 128),
]


@pytest.mark.parametrize("inp,domain,path,tag,digest,canonical,familiar", VALID)
def test_valid(inp, domain, path, tag, digest, canonical, familiar):
    r = parse_reference(inp)
    assert r.domain == domain
    assert r.path == path
    assert r.tag == tag
    assert (str(r.digest) if r.digest else None) == digest
    assert str(r) == canonical
    assert r.familiar() == familiar
    assert r.name == f"{domain}/{path}"
    # canonical form re-parses to itself
    assert parse_reference(str(r)) == r


INVALID = [
    ("", "reference is empty"),
    ("Busybox", "must be lowercase"),
    ("docker.io/Library/busybox", "must be lowercase"),
    ("quay.io/Foo/bar:tag", "must be lowercase"),
    ("busybox@sha256:abc", "needs 64 hex characters"),
    ("busybox@sha256:" + "A" * 64, "lowercase hexadecimal"),
    ("busybox@md5:" + "a" * 32, "unsupported algorithm"),
    ("busybox@sha256", "<algorithm>:<hex>"),
    ("busybox@" + H, "<algorithm>:<hex>"),
    ("busybox:tag@sha256:" + H + "@sha256:" + H, "more than one"),
    ("busybox:" + "t" * 129, "tag"),
    ("busybox:-bad", "tag"),
    ("busybox:", "tag"),
    ("busybox:ta/g", "domain"),  # "busybox:ta" is read as host:port, and "ta" is no port
    ("a" * 250 + "/b", "255"),
    ("x/" + "a" * 254, "255"),
    (H, "image ID"),
    ("foo//bar", "empty path component"),
    ("foo/", "empty path component"),
    ("-foo/bar", "path component"),
    ("foo/bar-", "path component"),
    ("foo/b..ar", "path component"),
    ("my_host.com:port/x", "domain"),
    ("host-.com/x", "domain"),
    (":tag", "at least one component"),
    ("busy box", "whitespace"),
    ("@sha256:" + H, "at least one component"),
]


@pytest.mark.parametrize("inp,reason", INVALID)
def test_invalid(inp, reason):
    with pytest.raises(InvalidArgument) as ei:
        parse_reference(inp)
    msg = ei.value.message
    assert msg.startswith(f"invalid reference \"{inp}\": ")
    assert reason in msg


def test_lowercase_message_exact():
    with pytest.raises(InvalidArgument) as ei:
        parse_reference("Busybox")
    assert ei.value.message == 'invalid reference "Busybox": repository name must be lowercase'


def test_length_limit_boundary():
    # docker.io/library/ is 18 characters: a 237-character name is exactly 255.
    ok = parse_reference("a" * 237)
    assert len(ok.name) == 255
    with pytest.raises(InvalidArgument):
        parse_reference("a" * 238)


def test_no_default_tag():
    r = parse_reference("busybox", default_tag=None)
    assert r.tag is None and str(r) == "docker.io/library/busybox"


def test_docker_ref_drops_tag_when_digested():
    r = parse_reference(f"busybox:1@sha256:{H}")
    assert r.docker_ref() == f"docker.io/library/busybox@sha256:{H}"
    assert parse_reference("busybox").docker_ref() == "docker.io/library/busybox:latest"


def test_with_tag_and_digest():
    r = parse_reference("busybox").with_tag("x")
    assert str(r) == "docker.io/library/busybox:x"
    with pytest.raises(InvalidArgument):
        r.with_tag("bad tag")
    assert str(r.with_digest(f"sha256:{H}")).endswith(f":x@sha256:{H}")
    assert Reference.parse("busybox") == parse_reference("busybox")


def test_digest_helper():
    d = Digest.parse(f"sha256:{H}")
    assert (d.algorithm, d.hex, str(d)) == ("sha256", H, f"sha256:{H}")
    assert Digest.parse(d) is d
    assert Digest.from_bytes(b"") == Digest.parse(
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert Digest.parse(f"sha512:{H512}").algorithm == "sha512"
    for bad in ["", "sha256", f"sha256:{H}0", f"SHA256:{H}", f"sha256:{'g' * 64}", f"sha1:{'a' * 40}"]:
        with pytest.raises(InvalidArgument):
            Digest.parse(bad)
    assert is_image_id(f"sha256:{H}")
    assert not is_image_id("busybox")
