"""images.hosts: containerd-compatible certs.d/<host>/hosts.toml."""

from __future__ import annotations

import pytest

from moorage.core.errors import InvalidArgument
from moorage.images.hosts import (
    TLSSettings,
    is_loopback,
    parse_hosts_toml,
    resolve_hosts,
)


def _write(tmp_path, ns, text):
    d = tmp_path / ns
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d


@pytest.mark.parametrize("ns, url, api", [
    ("docker.io", "https://registry-1.docker.io", "https://registry-1.docker.io/v2"),
    ("quay.io", "https://quay.io", "https://quay.io/v2"),
    ("registry.example:5000", "https://registry.example:5000", "https://registry.example:5000/v2"),
    ("localhost:5000", "http://localhost:5000", "http://localhost:5000/v2"),
    ("127.0.0.1:5000", "http://127.0.0.1:5000", "http://127.0.0.1:5000/v2"),
    ("127.1.2.3", "http://127.1.2.3", "http://127.1.2.3/v2"),
    ("[::1]:5000", "http://[::1]:5000", "http://[::1]:5000/v2"),
])
def test_defaults(ns, url, api):
    [h] = resolve_hosts(ns)
    assert (h.url, h.api_root, h.capabilities, h.is_mirror) == (url, api, ("pull", "resolve", "push"), False)
    assert h.tls == TLSSettings()


def test_insecure_hosts_use_http():
    [h] = resolve_hosts("reg.internal:5000", insecure_hosts=["reg.internal"])
    assert h.url == "http://reg.internal:5000"
    [h] = resolve_hosts("reg.internal:5000", insecure_hosts=["reg.internal:5000"])
    assert h.url == "http://reg.internal:5000"


def test_is_loopback():
    assert is_loopback("localhost") and is_loopback("127.0.0.1:1") and is_loopback("[::1]:5")
    assert not is_loopback("10.0.0.1") and not is_loopback("example.com")


def test_mirrors_in_order_then_server(tmp_path):
    _write(tmp_path, "docker.io", '''
server = "https://registry-1.docker.io"

[host."https://mirror-b.example"]
  capabilities = ["pull", "resolve"]

[host."https://mirror-a.example:8443"]
  capabilities = ["pull"]
  skip_verify = true
''')
    hosts = resolve_hosts("docker.io", str(tmp_path))
    assert [h.url for h in hosts] == ["https://mirror-b.example", "https://mirror-a.example:8443",
                                      "https://registry-1.docker.io"]
    assert hosts[0].capabilities == ("pull", "resolve")
    assert hosts[1].capabilities == ("pull",) and hosts[1].tls.skip_verify
    assert [h.is_mirror for h in hosts] == [True, True, False]
    assert all(h.namespace == "docker.io" for h in hosts)


def test_override_path_and_v2_suffix(tmp_path):
    hosts = parse_hosts_toml('''
[host."https://m1.example/some/prefix"]
[host."https://m2.example/custom/api"]
  override_path = true
[host."https://m3.example/v2"]
''', "example.com")
    assert [h.api_root for h in hosts] == ["https://m1.example/some/prefix/v2", "https://m2.example/custom/api",
                                           "https://m3.example/v2", "https://example.com/v2"]
    assert hosts[1].override_path


def test_ca_client_header_relative_paths(tmp_path):
    d = _write(tmp_path, "reg.example", '''
server = "https://reg.example"
ca = "ca.crt"
client = [["client.cert", "client.key"]]
[header]
  x-a = "1"

[host."https://mirror.example"]
  ca = ["/abs/ca1.pem", "rel/ca2.pem"]
  client = "both.pem"
  [host."https://mirror.example".header]
    x-custom = ["a", "b"]
''')
    mirror, server = resolve_hosts("reg.example", str(tmp_path))
    assert mirror.tls.ca_files == ("/abs/ca1.pem", str(d / "rel/ca2.pem"))
    assert mirror.tls.client_pairs == ((str(d / "both.pem"), ""),)
    assert mirror.headers == (("x-custom", "a"), ("x-custom", "b"))
    assert server.tls.ca_files == (str(d / "ca.crt"),)
    assert server.tls.client_pairs == ((str(d / "client.cert"), str(d / "client.key")),)
    assert server.headers == (("x-a", "1"),)


def test_single_client_pair_form():
    [h] = parse_hosts_toml('client = ["/c.cert", "/c.key"]\n', "r.example")
    assert h.tls.client_pairs == (("/c.cert", "/c.key"),)


def test_default_fallback(tmp_path):
    _write(tmp_path, "_default", '[host."https://global-mirror.example"]\n  capabilities = ["pull", "resolve"]\n')
    hosts = resolve_hosts("quay.io", str(tmp_path))
    assert [h.url for h in hosts] == ["https://global-mirror.example", "https://quay.io"]
    # a namespace's own file wins over _default
    _write(tmp_path, "quay.io", 'server = "https://quay.io"\n')
    assert [h.url for h in resolve_hosts("quay.io", str(tmp_path))] == ["https://quay.io"]


def test_host_port_directory_form(tmp_path):
    _write(tmp_path, "reg.example_5000_", 'server = "https://other.example"\n')
    assert [h.url for h in resolve_hosts("reg.example:5000", str(tmp_path))] == ["https://other.example"]


def test_server_of_loopback_can_be_https(tmp_path):
    _write(tmp_path, "127.0.0.1:5000", 'server = "https://127.0.0.1:5000"\n')
    [h] = resolve_hosts("127.0.0.1:5000", str(tmp_path))
    assert h.url == "https://127.0.0.1:5000"


def test_scheme_less_host_entry():
    hosts = parse_hosts_toml('[host."mirror.example:5000"]\n[host."localhost:5001"]\n', "r.example")
    assert [h.url for h in hosts[:2]] == ["https://mirror.example:5000", "http://localhost:5001"]


def test_docker_style_cert_files(tmp_path):
    d = tmp_path / "reg.example"
    d.mkdir()
    (d / "ca.crt").write_text("x")
    (d / "client.cert").write_text("x")
    (d / "client.key").write_text("x")
    [h] = resolve_hosts("reg.example", str(tmp_path))
    assert h.tls.ca_files == (str(d / "ca.crt"),)
    assert h.tls.client_pairs == ((str(d / "client.cert"), str(d / "client.key")),)


def test_host_entry_naming_server_is_not_duplicated():
    hosts = parse_hosts_toml('server = "https://r.example"\n[host."https://r.example"]\n  capabilities = ["pull"]\n',
                             "r.example")
    assert [(h.url, h.capabilities, h.is_mirror) for h in hosts] == [("https://r.example", ("pull",), False)]


@pytest.mark.parametrize("text, match", [
    ("server = 5", "server"),
    ('[host."ftp://x"]', "scheme"),
    ('[host."https://x"]\ncapabilities = ["fly"]', "capabilities"),
    ('[host."https://x"]\nskip_verify = "yes"', "skip_verify"),
    ('[host."https://x"]\nca = 5', "ca"),
    ('[host."https://x"]\nheader = "x"', "header"),
    ("this is = not toml [", "TOML"),
])
def test_invalid_configs(text, match):
    with pytest.raises(InvalidArgument, match=match):
        parse_hosts_toml(text, "r.example")
