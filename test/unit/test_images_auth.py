"""Node registry credentials: auth file parsing, key matching, credential helpers (real scripts)."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from moorage.core.errors import FailedPrecondition, Unavailable
from moorage.images.auth import NodeCredentials, parse_key
from moorage.images.registry import Credentials


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _write(path, doc) -> str:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(path)


@pytest.mark.parametrize("key, host, repo, want", [
    ("reg.example:5000", "reg.example:5000", "a/b", True),
    ("https://reg.example:5000", "reg.example:5000", "a/b", True),
    ("https://reg.example:5000/", "reg.example:5000", "a/b", True),
    ("http://reg.example:5000/a", "reg.example:5000", "a/b", True),
    ("reg.example:5000/a", "reg.example:5000", "ab/c", False),  # whole path components only
    ("reg.example:5000/a/b/c", "reg.example:5000", "a/b", False),
    ("reg.example", "reg.example:5000", "a/b", False),  # a port must match exactly
    ("reg.example:5000", "reg.example", "a/b", False),
    ("*.example.com", "a.example.com", "x", True),
    ("*.example.com", "example.com", "x", False),
    ("*.example.com", "a.b.example.com", "x", False),
    ("REG.Example", "reg.example", "x", True),
    ("https://index.docker.io/v1/", "registry-1.docker.io", "library/busybox", True),
    ("docker.io", "registry-1.docker.io", "library/busybox", True),
    ("index.docker.io/library", "registry-1.docker.io", "library/busybox", True),
    ("other.io", "registry-1.docker.io", "library/busybox", False),
])
def test_key_matching(key, host, repo, want):
    from moorage.images.auth import _split_host
    labels, port = _split_host(host)
    assert parse_key(key).matches(labels, port, tuple(repo.split("/"))) is want


def test_auths_forms_and_most_specific_wins(tmp_path):
    path = _write(tmp_path / "config.json", {"auths": {
        "reg.example:5000": {"auth": _b64("host:pw1")},
        "https://reg.example:5000/team": {"username": "team", "password": "pw2"},
        "*.corp.example": {"auth": _b64("glob:pw3")},
        "a.corp.example": {"identitytoken": "refresh"},
        "tok.example": {"registrytoken": "bearer"},
        "empty.example": {},
    }})
    n = NodeCredentials(path)
    assert n.lookup("reg.example:5000", "other/x") == Credentials(username="host", password="pw1")
    assert n.lookup("reg.example:5000", "team/app") == Credentials(username="team", password="pw2")
    assert n.lookup("b.corp.example", "x") == Credentials(username="glob", password="pw3")
    assert n.lookup("a.corp.example", "x") == Credentials(identity_token="refresh")  # literal beats glob
    assert n.lookup("tok.example", "x") == Credentials(registry_token="bearer")
    assert n.lookup("empty.example", "x") is None
    assert n.lookup("nowhere.example", "x") is None


def test_legacy_dockercfg_and_reload_on_change(tmp_path):
    p = tmp_path / "config.json"
    _write(p, {"reg.example": {"auth": _b64("old:pw")}})
    n = NodeCredentials(str(p))
    assert n.lookup("reg.example", "x") == Credentials(username="old", password="pw")
    _write(p, {"auths": {"reg.example": {"auth": _b64("newer:password")}}})
    assert n.lookup("reg.example", "x") == Credentials(username="newer", password="password")
    os.unlink(p)
    assert n.lookup("reg.example", "x") is None  # a missing file is no credentials


def test_missing_and_disabled_file(tmp_path):
    assert NodeCredentials(str(tmp_path / "absent.json")).lookup("reg.example", "x") is None
    assert NodeCredentials("").lookup("reg.example", "x") is None


@pytest.mark.parametrize("doc, words", [
    ('{"auths": {"reg.example": {"auth": "!!!not base64 s3cret"}}}', "not base64"),
    ('{"auths": {"reg.example": {"auth": "' + _b64("nocolon-s3cret") + '"}}}', "user:password"),
    ('{"auths": "s3cret"}', "must be an object"),
    ('{"auths": {"reg.example": {"password": 5}}}', "must be a string"),
    ('{"credHelpers": {"reg.example": "../evil"}}', "invalid credential helper"),
    ('not json s3cret', "not valid JSON"),
])
def test_bad_files_are_named_without_their_contents(tmp_path, doc, words):
    path = _write(tmp_path / "config.json", doc)
    with pytest.raises(FailedPrecondition) as ei:
        NodeCredentials(path).lookup("reg.example", "x")
    assert words in ei.value.message and path in ei.value.message
    assert "s3cret" not in ei.value.message and "bm9jb2xvbi" not in ei.value.message


# -- credential helpers: real executables on PATH ------------------------------------------------

def _helper(bindir, name: str, body: str) -> None:
    p = bindir / f"docker-credential-{name}"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bindir(tmp_path, monkeypatch):
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}:{os.environ.get('PATH', '')}")
    return d


def test_helpers_precede_auths_and_get_the_server_on_stdin(tmp_path, bindir):
    log = tmp_path / "calls"
    _helper(bindir, "per", f'[ "$1" = get ] || exit 3\nread s\necho "$s" >> {log}\n'
                           'printf \'{"ServerURL":"%s","Username":"helper-user","Secret":"helper-pw"}\' "$s"\n')
    _helper(bindir, "store", 'read s\nprintf \'{"Username":"<token>","Secret":"refresh-%s"}\' "$s"\n')
    path = _write(tmp_path / "config.json", {
        "auths": {"reg.example:5000": {"auth": _b64("file:pw")}, "plain.example": {"auth": _b64("file2:pw")}},
        "credHelpers": {"reg.example:5000": "per"}, "credsStore": "store"})
    n = NodeCredentials(path)
    assert n.lookup("reg.example:5000", "a") == Credentials(username="helper-user", password="helper-pw")
    assert n.lookup("reg.example:5000", "b") == Credentials(username="helper-user", password="helper-pw")
    assert log.read_text() == "reg.example:5000\n"  # the second lookup came from the cache
    # the default store, with the identity-token marker; Docker Hub is asked by its index URL
    assert n.lookup("plain.example", "a") == Credentials(identity_token="refresh-plain.example")
    assert n.lookup("registry-1.docker.io", "library/x") == \
        Credentials(identity_token="refresh-https://index.docker.io/v1/")


def test_helper_not_found_falls_through_to_auths(tmp_path, bindir):
    _helper(bindir, "empty", 'echo "credentials not found in native keychain"\nexit 1\n')
    path = _write(tmp_path / "config.json", {"auths": {"reg.example": {"auth": _b64("file:pw")}},
                                              "credsStore": "empty"})
    assert NodeCredentials(path).lookup("reg.example", "x") == Credentials(username="file", password="pw")
    assert NodeCredentials(path).lookup("other.example", "x") is None


@pytest.mark.parametrize("body, exc, words", [
    ('echo "keychain locked" >&2\nexit 2\n', Unavailable, "exited with status 2: keychain locked"),
    ('echo \'{"Username": "u", "Secret": 7}\' # s3cret\n', Unavailable, "not {\"Username\", \"Secret\"} JSON"),
    ('echo "s3cret"\n', Unavailable, "not {\"Username\", \"Secret\"} JSON"),
    ('sleep 5\n', Unavailable, "no answer within 0.5s"),
])
def test_failing_helper_is_a_clear_error_without_the_secret(tmp_path, bindir, body, exc, words):
    _helper(bindir, "bad", body)
    path = _write(tmp_path / "config.json", {"credHelpers": {"reg.example": "bad"}})
    with pytest.raises(exc) as ei:
        NodeCredentials(path, helper_timeout=0.5).lookup("reg.example", "x")
    msg = ei.value.message
    assert words in msg and "docker-credential-bad" in msg and "reg.example" in msg
    assert "s3cret" not in msg


def test_missing_helper(tmp_path, bindir):
    path = _write(tmp_path / "config.json", {"credsStore": "nonexistent-helper"})
    with pytest.raises(FailedPrecondition, match="docker-credential-nonexistent-helper is not on the daemon's PATH"):
        NodeCredentials(path).lookup("reg.example", "x")


def test_credentials_repr_hides_secrets():
    text = repr(Credentials(username="u", password="pw-s3cret", auth="YXV0aA==", identity_token="id-s3cret",
                            registry_token="rt-s3cret"))
    assert "u" in text and "s3cret" not in text and "YXV0aA" not in text
