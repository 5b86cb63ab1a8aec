"""The files a pod sandbox owns and its containers bind-mount: hostname, hosts, resolv.conf.

Pure functions build the contents; ``write_atomic`` puts them on disk.
"""

from __future__ import annotations

import os
import tempfile

from moorage.core.errors import InvalidArgument, clip
from moorage.runtime.model import DNSConfig

MAX_HOST_FILE = 1 << 20
# A pod without a hostname is named by its metadata name (up to a DNS subdomain's 253); the
# kernel's 64-byte limit applies to config.hostname alone, which the CRI edge checks.
MAX_HOSTNAME = 253

DEFAULT_HOSTS = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "fe00::0\tip6-mcastprefix\n"
    "fe00::1\tip6-allnodes\n"
    "fe00::2\tip6-allrouters\n"
)


def checked_hostname(hostname: str) -> str:
    """``hostname`` if it is one word the kernel takes, else InvalidArgument.

    The CRI edge checks the syntax first; this is the last guard before the name is
    written into /etc/hostname and /etc/hosts, where a newline or a space would add
    entries of the caller's choosing.
    """
    if len(hostname.encode()) > MAX_HOSTNAME or any(c.isspace() or not c.isprintable() or c == "#"
                                                    for c in hostname):
        raise InvalidArgument(f"hostname {clip(hostname)} is not one printable word of at most "
                              f"{MAX_HOSTNAME} bytes")
    return hostname


def hostname_content(hostname: str) -> str:
    """The sandbox's /etc/hostname."""
    return checked_hostname(hostname) + "\n"


def hosts_content(hostname: str, host_network: bool, host_hosts: str | None = None, pod_ip: str = "") -> str:
    """The sandbox's /etc/hosts: the node's for host-network pods, else a default."""
    if host_network and host_hosts is not None:
        return host_hosts
    text = DEFAULT_HOSTS
    checked_hostname(hostname)
    if pod_ip and any(c.isspace() for c in pod_ip):
        raise InvalidArgument(f"pod IP {clip(pod_ip)} is not an address")
    if pod_ip and hostname:
        text += f"{pod_ip}\t{hostname}\n"
    return text


def resolv_conf_content(dns: DNSConfig | None, host_resolv: str | None) -> str:
    """resolv.conf from the CRI DNSConfig; the node's when the pod asks for nothing."""
    if dns is None or not (dns.servers or dns.searches or dns.options):
        return host_resolv or ""
    for s in dns.servers:
        if not s or any(c.isspace() for c in s):
            raise InvalidArgument(f"dns_config: invalid nameserver {s!r}")
    lines = []
    if dns.searches:
        if any(not s or any(c.isspace() for c in s) for s in dns.searches):
            raise InvalidArgument(f"dns_config: invalid search domain in {dns.searches!r}")
        lines.append("search " + " ".join(dns.searches))
    lines += [f"nameserver {s}" for s in dns.servers]
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def read_host_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(MAX_HOST_FILE)
    except OSError:
        return None


def write_atomic(path: str, content: str, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``content``; ``owner`` (uid, gid) chowns it first, e.g. to the host ids
    of a user-namespaced pod's root, so the file is the pod's own inside (mode kept)."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        if owner is not None:
            os.chown(tmp, owner[0], owner[1])
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
