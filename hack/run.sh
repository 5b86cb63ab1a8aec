#!/usr/bin/env bash
# Sets up the machine if needed, then runs the moorage daemon in the foreground
# with the default config (or /etc/moorage/config.toml if present).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
exec .venv/bin/moorage serve "$@"
