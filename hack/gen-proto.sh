#!/usr/bin/env bash
# Regenerate the CRI v1 Python bindings (moorage.cri.api: api_pb2.py, api_pb2.pyi,
# api_pb2_grpc.py) from cri/api/api.proto, and the NRI messages (moorage.nri.api:
# api_pb2.py/.pyi from NRI's api.proto, ttrpc_pb2.py/.pyi from ttrpc.proto). NRI speaks
# ttrpc, not gRPC, so no service stubs are generated for it. Safe to run repeatedly.
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

NRI=moorage/nri/api   # a real package (not a symlink)
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. "$NRI/api.proto" "$NRI/ttrpc.proto"
# NRI's Field enum has a value named None: legal in protobuf, not as a Python stub name
# (api_pb2.Field.Value("None") still reaches it).
# LinuxIOPriority's field "class" is a keyword: the stub takes it as **kwargs, typed here.
sed -i -E 's/, \*\*kwargs\) -> None/, **kwargs: object) -> None/' "$NRI/api_pb2.pyi"
sed -i -E '/^(    )?None: _?(ClassVar\[)?Field\]?$/d' "$NRI/api_pb2.pyi"
"$PYTHON" -c 'from moorage.nri.api import api_pb2, ttrpc_pb2'
echo "gen-proto: regenerated $NRI/api_pb2.py, api_pb2.pyi, ttrpc_pb2.py, ttrpc_pb2.pyi"
