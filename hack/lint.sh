#!/usr/bin/env bash
# The static checks CI runs before the tests: ruff (style and bug patterns) and
# mypy (types; configured in pyproject.toml).  Both must be clean.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
.venv/bin/ruff check .
.venv/bin/mypy
