#!/usr/bin/env bash
# Sets up the machine if needed, then runs the whole test suite (as root:
# integration tests run real containers, mounts and network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
exec .venv/bin/python -m pytest -n 2 "$@" test
