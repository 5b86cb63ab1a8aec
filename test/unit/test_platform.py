"""images.platform: host detection, normalisation, matching and selection."""

from __future__ import annotations

import pytest

from moorage.core.errors import InvalidArgument, NotFound
from moorage.images import platform as P
from moorage.images.oci import OCI_MANIFEST, Descriptor, Platform


@pytest.mark.parametrize("machine, arch, variant", [
    ("x86_64", "amd64", ""), ("aarch64", "arm64", ""), ("armv7l", "arm", "v7"),
    ("armv6l", "arm", "v6"), ("i686", "386", ""), ("ppc64le", "ppc64le", ""), ("s390x", "s390x", ""),
    ("riscv64", "riscv64", ""),
])
def test_host_platform(monkeypatch, machine, arch, variant):
    class U:
        pass
    u = U()
    u.machine = machine
    monkeypatch.setattr(P.os, "uname", lambda: u)
    assert P.host_platform() == Platform("linux", arch, variant)


@pytest.mark.parametrize("spec, want", [
    ("linux/amd64", Platform("linux", "amd64")),
    ("linux/x86_64", Platform("linux", "amd64")),
    ("linux/arm64/v8", Platform("linux", "arm64")),
    ("linux/aarch64", Platform("linux", "arm64")),
    ("linux/arm", Platform("linux", "arm", "v7")),
    ("linux/arm/7", Platform("linux", "arm", "v7")),
    ("arm64", Platform("linux", "arm64")),
])
def test_parse_and_normalize(spec, want):
    assert P.parse(spec) == want


@pytest.mark.parametrize("spec", ["", "linux/", "a/b/c/d"])
def test_parse_invalid(spec):
    with pytest.raises(InvalidArgument):
        P.parse(spec)


def test_matching_rules():
    arm7 = P.Matcher(Platform("linux", "arm", "v7"))
    assert arm7.match(Platform("linux", "arm", "v7"))
    assert arm7.match(Platform("linux", "arm", "v6"))
    assert arm7.match(Platform("linux", "arm", "v5"))
    assert not arm7.match(Platform("linux", "arm", "v8"))
    assert not arm7.match(Platform("linux", "arm64"))
    arm64 = P.Matcher(Platform("linux", "arm64"))
    assert arm64.match(Platform("linux", "arm64", "v8"))
    assert arm64.rank(Platform("linux", "arm64")) < arm64.rank(Platform("linux", "arm", "v7"))
    amd = P.Matcher(Platform("linux", "amd64"))
    assert amd.match(Platform("linux", "x86_64"))
    assert not amd.match(Platform("windows", "amd64"))
    assert not amd.match(Platform("linux", "arm64"))
    assert not amd.match(None)
    assert amd.rank(Platform("linux", "amd64")) < amd.rank(Platform("linux", "386"))


def _d(i, plat, **ann):
    return Descriptor(OCI_MANIFEST, "sha256:" + f"{i:x}" * 64, 1, plat, ann)


def test_select_manifest_prefers_exact_then_first():
    ms = [_d(1, Platform("linux", "arm", "v6")), _d(2, Platform("linux", "arm", "v7")),
          _d(3, Platform("linux", "arm", "v7"))]
    assert P.select_manifest(ms, Platform("linux", "arm", "v7")) is ms[1]
    assert P.select_manifest(ms[:1], Platform("linux", "arm", "v7")) is ms[0]


def test_select_skips_attestations():
    ms = [_d(1, Platform("unknown", "unknown"), **{"vnd.docker.reference.type": "attestation-manifest"}),
          _d(2, Platform("linux", "amd64"))]
    assert P.select_manifest(ms, Platform("linux", "amd64")) is ms[1]


def test_no_match_lists_available():
    ms = [_d(1, Platform("linux", "arm64")), _d(2, Platform("linux", "arm", "v7")), _d(3, None)]
    with pytest.raises(NotFound) as ei:
        P.select_manifest(ms, Platform("linux", "s390x"), "image index x")
    msg = ei.value.message
    assert "linux/s390x" in msg and "linux/arm64, linux/arm/v7" in msg and "image index x" in msg
