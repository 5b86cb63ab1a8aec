#!/usr/bin/env bash
# Installs moorage on a node from a release (docs/install.md):
#   <venv>                                    a virtualenv with the wheel and its dependencies
#   /etc/systemd/system/moorage.service       the unit (Type=notify), ExecStart pointing at <venv>
#   /etc/moorage/config.toml                  `moorage config default` (every key, commented)
#   /etc/cni/net.d/10-moorage-bridge.conflist the default bridge network, only if the node has none
#   /etc/crictl.yaml                          crictl pointed at moorage's socket
#   /usr/share/doc/moorage/                   README.md and install.md
# Existing files are kept (and named in the output) unless --force; the venv is upgraded in place.
#
# Usage: hack/install-node.sh [--wheel FILE] [--venv DIR] [--root DIR] [--python PY] [--force] [--enable]
#   --wheel   the wheel to install (default: the newest dist/moorage-*.whl next to this script;
#             hack/release.sh makes it)
#   --venv    where the virtualenv goes on the node (default /opt/moorage/venv)
#   --root    install under DIR instead of / (DESTDIR-style, for staging and tests); systemctl is
#             then never called.  The venv is made at DIR/<venv>, and a venv only works at the path
#             it was made in: a staged root is for inspection, not for copying onto a node.
#   --python  the interpreter for the venv (default python3; moorage needs >= 3.11)
#   --force   replace existing config, unit, CNI and crictl files
#   --enable  also `systemctl enable --now moorage` (without it: daemon-reload only)
#
# The venv's dependencies come from pip's configured index (or its cache / --find-links).  The
# native parts (runc or crun, conmon, catatonit, CNI plugins, iptables) are Debian packages:
# `apt-get install runc conmon catatonit containernetworking-plugins iptables`; `moorage check`
# tells what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)  # a checkout or an unpacked moorage-<version>-node.tar.gz

wheel="" venv=/opt/moorage/venv root="" python=python3 force=0 enable=0
while (($#)); do
  case $1 in
    --wheel) wheel=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --force) force=1; shift ;;
    --enable) enable=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-node: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $venv == /* ]] || { echo "install-node: --venv must be an absolute path" >&2; exit 2; }
if [[ -n $root ]]; then
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
  [[ $root == / ]] && root=""
fi
if [[ -z $wheel ]]; then
  wheel=$(ls -t "$here"/dist/moorage-*.whl 2>/dev/null | head -n1 || true)
  [[ -n $wheel ]] || { echo "install-node: no dist/moorage-*.whl; run hack/release.sh or pass --wheel" >&2; exit 2; }
fi
[[ -f $wheel ]] || { echo "install-node: $wheel: no such file" >&2; exit 2; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
  echo "install-node: moorage needs Python >= 3.11 ($python is $("$python" -V 2>&1 || echo missing))" >&2; exit 1; }

say() { echo "install-node: $*" >&2; }

# put SRC DST MODE: install SRC at DST unless DST exists (then only with --force).
put() {
  local src=$1 dst=$2 mode=$3
  if [[ -e $dst || -L $dst ]] && ((!force)); then
    say "kept $dst (exists; --force replaces it)"
    return 0
  fi
  mkdir -p "$(dirname "$dst")"
  install -m "$mode" "$src" "$dst"
  say "installed $dst"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. The software: a venv of its own, so the node's Python packages are never touched.
if [[ ! -x $root$venv/bin/python ]]; then
  "$python" -m venv "$root$venv"
  say "created the virtualenv $root$venv"
fi
# Dependencies first (upgraded as the wheel asks), then exactly this wheel even if a build of the
# same version is already there.
pipq() { "$root$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v '^WARNING: Location' >&2 || true; }
pipq --upgrade "$wheel"
pipq --force-reinstall --no-deps "$wheel"
"$root$venv/bin/moorage" version >/dev/null || { say "the installed moorage does not run"; exit 1; }
say "installed $(basename "$wheel") into $root$venv ($("$root$venv/bin/moorage" version))"

# 2. The unit, running the venv's command.
sed "s|^ExecStart=/opt/moorage/venv/bin/moorage |ExecStart=$venv/bin/moorage |" \
  "$here/manifests/systemd/moorage.service" > "$tmp/moorage.service"
grep -q "^ExecStart=$venv/bin/moorage " "$tmp/moorage.service" || { say "the unit's ExecStart was not rewritten"; exit 1; }
put "$tmp/moorage.service" "$root/etc/systemd/system/moorage.service" 0644

# 3. The config: every key with its default and comment, from the version just installed.
"$root$venv/bin/moorage" config default > "$tmp/config.toml"
put "$tmp/config.toml" "$root/etc/moorage/config.toml" 0644

# 4. The pod network, only where the node has none: CNI takes the first file in lexical order,
#    so a second network would silently shadow (or be shadowed by) the node's own.
conflist=$here/manifests/cni/10-moorage-bridge.conflist
netd=$root/etc/cni/net.d
others=$(find "$netd" -maxdepth 1 \( -name '*.conflist' -o -name '*.conf' -o -name '*.json' \) \
          ! -name "$(basename "$conflist")" 2>/dev/null | sort || true)
if [[ -n $others ]] && ((!force)); then
  say "kept the node's CNI network ($(echo "$others" | xargs -n1 basename | paste -sd' ')); not installing $(basename "$conflist")"
else
  put "$conflist" "$netd/$(basename "$conflist")" 0644
fi

# 5. crictl, and the docs the unit's Documentation= names.
put "$here/manifests/crictl.yaml" "$root/etc/crictl.yaml" 0644
mkdir -p "$root/usr/share/doc/moorage"
install -m 0644 "$here/README.md" "$here/docs/install.md" "$root/usr/share/doc/moorage/"

# 6. systemd, only on the real root of a node that runs it.
if [[ -z $root ]] && [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  if ((enable)); then
    systemctl enable --now moorage.service
    say "moorage.service enabled and started"
  else
    say "next: systemctl enable --now moorage.service"
  fi
elif ((enable)); then
  say "not enabling: $([[ -n $root ]] && echo "--root was given" || echo "systemd is not running")"
fi
