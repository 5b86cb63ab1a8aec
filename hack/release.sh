#!/usr/bin/env bash
# Builds the release artifacts into dist/ (or --out DIR):
#   moorage-<version>-py3-none-any.whl   the wheel: `pip install` it into a venv (hack/install-node.sh does)
#   moorage-<version>.tar.gz             the sdist
#   moorage.pyz                          one-file zipapp of the same package, WITHOUT dependencies
#   moorage-<version>-node.tar.gz        the wheel, hack/install-node.sh, the unit, CNI and crictl
#                                        files and docs/install.md: copy it to a node, unpack, run
#   SHA256SUMS
#
# The build reads only the tracked files (their work-tree contents) from a copy in a temporary
# directory, so it never writes build/ or *.egg-info into the checkout and untracked files never
# leak into a release.  Outside a git checkout (e.g. an unpacked sdist) the tree is copied as is.
#
# Why the zipapp carries no dependencies: grpcio, protobuf's upb, zstandard and friends are
# compiled extensions, which Python cannot import from inside a zip; bundling only the pure
# ones would still leave the file useless without the others.  So moorage.pyz is run by an
# interpreter that has them: `/opt/moorage/venv/bin/python moorage.pyz version`, or a
# `python3` with `pip install -r` of the wheel's requirements.  It is a convenient way to
# carry one version of moorage to a node that already has the dependencies, not a
# self-contained binary.
#
# Python: $PYTHON, else the checkout's .venv (made by hack/install-deps.sh if missing).  It needs
# the `build` module, setuptools and wheel (the test extras have them); no network is used.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD

out=dist
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "release: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z ${PYTHON:-} ]]; then
  [[ -x .venv/bin/python ]] || hack/install-deps.sh
  PYTHON=.venv/bin/python
fi
PYTHON=$(command -v "$PYTHON")
[[ $PYTHON == /* ]] || PYTHON=$src/$PYTHON  # the build runs in another directory (no realpath: a venv's link must stay)
# What [build-system] asks for, checked here rather than by `build`: setuptools >= 70.1 makes
# wheels itself, so the separate `wheel` distribution it also names is optional (and not in .venv).
"$PYTHON" - <<'PYEOF' || { echo "release: $PYTHON cannot build (pip install build 'setuptools>=70.1')" >&2; exit 1; }
import importlib.util
import build  # noqa: F401
import setuptools
assert tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (68, 0)
assert importlib.util.find_spec("setuptools.command.bdist_wheel") or importlib.util.find_spec("wheel.bdist_wheel")
PYEOF

stage=$(mktemp -d "${TMPDIR:-/tmp}/moorage-release.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/src" "$stage/dist" "$stage/pyz"

if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  if [[ -n $(git -C "$src" status --porcelain --untracked-files=no) ]]; then
    echo "release: warning: tracked files have uncommitted changes; they go into this build" >&2
  fi
  # Reproducible timestamps inside the archives: the commit's time.
  SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$src" log -1 --format=%ct)}
  export SOURCE_DATE_EPOCH
  git -C "$src" ls-files -z | while IFS= read -r -d '' f; do
    [[ -e $f || -L $f ]] && printf '%s\0' "$f"  # skip tracked files deleted in the work tree
  done | tar --null -T - -cf - | tar -xf - -C "$stage/src"
else
  tar --exclude=./.venv --exclude=./dist --exclude=./build --exclude='./*.egg-info' --exclude=./.git \
    -cf - . | tar -xf - -C "$stage/src"
fi

# The wheel and the sdist, both from the source tree (setuptools follows moorage/<layer> symlinks).
(cd "$stage/src" && "$PYTHON" -m build --no-isolation --skip-dependency-check --sdist --wheel --outdir "$stage/dist" . >"$stage/build.log" 2>&1) || {
  tail -n 40 "$stage/build.log" >&2; echo "release: build failed" >&2; exit 1; }
whl=$(ls "$stage"/dist/moorage-*.whl)
sdist=$(ls "$stage"/dist/moorage-*.tar.gz)

# The zipapp: the wheel's package plus a __main__ that explains missing dependencies.
"$PYTHON" -m zipfile -e "$whl" "$stage/pyz"
rm -rf "$stage"/pyz/moorage-*.dist-info
cat > "$stage/pyz/__main__.py" <<'EOF'
"""moorage as one file; its dependencies come from the interpreter that runs it (see hack/release.sh)."""

import sys

try:
    from moorage.cri.cli import main
except ImportError as e:
    sys.exit(f"moorage.pyz: {e}; run it with a Python that has moorage's dependencies installed, "
             "e.g. /opt/moorage/venv/bin/python moorage.pyz (docs/install.md)")
sys.exit(main())
EOF
"$PYTHON" -m zipapp "$stage/pyz" -o "$stage/dist/moorage.pyz" -p '/usr/bin/env python3' -c

# The node bundle: what hack/install-node.sh needs, in the checkout's layout, so that the same
# script runs from a checkout or from the unpacked bundle.
version=$(basename "$whl" | cut -d- -f2)
node=moorage-$version-node
for f in hack/install-node.sh manifests/systemd/moorage.service manifests/cni/10-moorage-bridge.conflist \
         manifests/crictl.yaml docs/install.md README.md; do
  mkdir -p "$(dirname "$stage/node/$node/$f")"
  cp -p "$stage/src/$f" "$stage/node/$node/$f"
done
mkdir -p "$stage/node/$node/dist"
cp "$whl" "$stage/node/$node/dist/"
tar -C "$stage/node" --sort=name --owner=0 --group=0 --numeric-owner ${SOURCE_DATE_EPOCH:+--mtime=@$SOURCE_DATE_EPOCH} \
  -czf "$stage/dist/$node.tar.gz" "$node"

names=("$(basename "$whl")" "$(basename "$sdist")" moorage.pyz "$node.tar.gz")
mkdir -p "$out"
rm -f "$out"/moorage-*.whl "$out"/moorage-*.tar.gz "$out/moorage.pyz" "$out/SHA256SUMS"
for n in "${names[@]}"; do cp "$stage/dist/$n" "$out/"; done
(cd "$out" && sha256sum "${names[@]}" > SHA256SUMS)
echo "release: built in $out:" >&2
(cd "$out" && ls -l "${names[@]}" SHA256SUMS) >&2
