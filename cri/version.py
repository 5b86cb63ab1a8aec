"""Version strings, in a leaf module: the CLI and the Version RPC read them without the daemon."""

from __future__ import annotations

from moorage import __version__

VERSION = __version__
CRI_API_VERSION = "v1"
# VersionResponse.version: the version of the kubelet's runtime API the CRI asks runtimes to report.
KUBELET_API_VERSION = "0.1.0"
RUNTIME_NAME = "moorage"
