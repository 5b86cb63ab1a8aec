#!/usr/bin/env bash
# Regenerate the CRI v1 Python bindings (moorage.cri.api: api_pb2.py, api_pb2.pyi,
# api_pb2_grpc.py) from cri/api/api.proto. Safe to run repeatedly.
#
#   hack/gen-proto.sh              # uses .venv/bin/python
#   PYTHON=/path/to/python hack/gen-proto.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT=moorage/cri/api   # moorage/cri is the symlink to cri/

# Compile through the import root so the descriptor is registered as
# "moorage/cri/api/api.proto" (no clash with other files called api.proto) and the
# generated imports are absolute within the moorage.cri.api package.
"$PYTHON" -m grpc_tools.protoc \
    -I . \
    --python_out=. \
    --pyi_out=. \
    --grpc_python_out=. \
    "$OUT/api.proto"

# If the proto is ever compiled with -I cri/api, protoc emits a top-level
# "import api_pb2"; turn it into a package-relative import.
sed -i -E 's/^import api_pb2 as api__pb2$/from . import api_pb2 as api__pb2/' "$OUT/api_pb2_grpc.py"

if grep -qE '^import api_pb2' "$OUT/api_pb2_grpc.py"; then
    echo "gen-proto: unexpected top-level api_pb2 import left in $OUT/api_pb2_grpc.py" >&2
    exit 1
fi

"$PYTHON" -c 'from moorage.cri.api import api_pb2, api_pb2_grpc'
echo "gen-proto: regenerated $OUT/api_pb2.py, api_pb2.pyi, api_pb2_grpc.py"
