#!/usr/bin/env bash
# Installs everything moorage needs on a Debian machine: the native parts (apt),
# a virtualenv in .venv with moorage and its test extras, and the default CNI
# network when /etc/cni/net.d is empty.  Idempotent; quiet when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(runc crun conmon catatonit containernetworking-plugins busybox-static docker-registry
      iproute2 iptables skopeo criu zstd openssl procps util-linux)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install-deps: moorage needs Python >= 3.11 ($PY is $("$PY" -V 2>&1))" >&2
  exit 1
fi
stamp=.venv/.moorage-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x .venv/bin/python ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "install-deps: preparing .venv" >&2
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv/bin/python -c 'import moorage.cri.api.api_pb2_grpc, grpc, pyroute2, prometheus_client, opentelemetry.sdk' \
    || { echo "install-deps: the virtualenv is incomplete" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# The default pod network, only where the node has none.
conf_dir=${MOORAGE_CNI_CONF_DIR:-/etc/cni/net.d}  # overridable to verify this step without touching the node
if [[ -f manifests/cni/10-moorage-bridge.conflist ]] && [[ -z "$(ls -A "$conf_dir" 2>/dev/null)" ]]; then
  mkdir -p "$conf_dir"
  install -m 0644 manifests/cni/10-moorage-bridge.conflist "$conf_dir/"
  echo "install-deps: installed the default CNI network into $conf_dir" >&2
fi
