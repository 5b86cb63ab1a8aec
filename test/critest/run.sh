#!/usr/bin/env bash
# Run the upstream CRI conformance suite (critest, kubernetes-sigs/cri-tools) against moorage.
#
#   test/critest/run.sh [CRITEST_BINARY] [-- extra critest/ginkgo flags]
#
# CRITEST (env) or the first argument names an existing critest binary; this script never
# builds or downloads it (see test/critest/README.md).  It starts, on temporary dirs:
#   * Debian's docker-registry on 127.0.0.1:<free port> with the offline critest stand-in
#     images (test/critest/images.py), and certs.d/<upstream>/hosts.toml mirrors to it;
#   * a CNI bridge it owns (mrgcrit<N>, 10.234.<N>.0/24, host address .1, isGateway false);
#   * a moorage daemon with its own socket, root, state, CNI and metrics port;
# runs critest with the default skip list (below; CRITEST_SKIP replaces it, CRITEST_FOCUS
# adds -ginkgo.focus), then removes pods and stops everything it started, by PID.
#
# Environment:
#   CRITEST            critest binary (or argument 1)
#   CRITEST_FOCUS      ginkgo focus regexp (default: all)
#   CRITEST_SKIP       ginkgo skip regexp (default: $DEFAULT_SKIP)
#   CRITEST_EXTRA_SKIP appended to the skip regexp with "|"
#   CRITEST_TIMEOUT    whole-suite timeout for ginkgo (default 90m)
#   CRITEST_REPORT_DIR where to keep the JUnit report and logs (default: the work dir, kept
#                      when critest fails, else removed)
#   CRITEST_NRI        1 (default): run moorage's NRI on its own socket and pass it to critest
#                      (-nri-socket), so critest's NRI specs run; 0: NRI off, those specs skip
#   MOORAGE_PYTHON     python with moorage installed (default: <repo>/.venv/bin/python)
#   KEEP_WORKDIR=1     keep the temporary work dir
# Exit status: critest's.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${MOORAGE_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

CRITEST_BIN="${CRITEST:-}"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then CRITEST_BIN="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
EXTRA_ARGS=("$@")
if [ -z "$CRITEST_BIN" ] || [ ! -x "$CRITEST_BIN" ]; then
    echo "run.sh: no critest binary (set CRITEST or pass its path); see test/critest/README.md" >&2
    exit 2
fi
[ "$(id -u)" = 0 ] || { echo "run.sh: must run as root" >&2; exit 2; }
REGISTRY_BIN="$(command -v docker-registry || echo /usr/bin/docker-registry)"
[ -x "$REGISTRY_BIN" ] || { echo "run.sh: docker-registry is not installed" >&2; exit 2; }

# Specs that cannot pass offline or on this kind of host; reasons in README.md.
DEFAULT_SKIP='public image with digest should be pulled and removed'   # pinned upstream digest
DEFAULT_SKIP+='|runtime should support MaskedPaths'                      # busybox-static runs ls as an applet
SKIP="${CRITEST_SKIP-$DEFAULT_SKIP}"
[ -n "${CRITEST_EXTRA_SKIP:-}" ] && SKIP="${SKIP:+$SKIP|}$CRITEST_EXTRA_SKIP"
FOCUS="${CRITEST_FOCUS:-}"

WORK="$(mktemp -d /tmp/mrg-critest-XXXXXX)"
chmod 711 "$WORK"   # user-namespaced pods' mapped root must get through to the rootfs (0700 from mktemp)
REPORT_DIR="${CRITEST_REPORT_DIR:-$WORK/report}"
mkdir -p "$REPORT_DIR" "$WORK/registry" "$WORK/certs.d" "$WORK/cni/net.d" "$WORK/cni/data"
REG_PID=""; DAEMON_PID=""; BRIDGE=""
SOCK="$WORK/moorage.sock"
NRI="${CRITEST_NRI:-1}"
NRI_SOCK="$WORK/nri.sock"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

stop_pid() {  # stop_pid PID [timeout]: TERM, wait, then KILL; only the PID given
    local pid="$1" t="${2:-30}" i=0
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && [ $i -lt $((t * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        "$PY" - "$SOCK" <<'PYEOF' 2>/dev/null
import sys, grpc
from moorage.cri.api import api_pb2 as pb, api_pb2_grpc as pbg
ch = grpc.insecure_channel("unix://" + sys.argv[1]); rt = pbg.RuntimeServiceStub(ch)
for p in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items:
    for call, req in ((rt.StopPodSandbox, pb.StopPodSandboxRequest), (rt.RemovePodSandbox, pb.RemovePodSandboxRequest)):
        try:
            call(req(pod_sandbox_id=p.id), timeout=60)
        except grpc.RpcError as e:
            print("cleanup:", p.id, e.code(), file=sys.stderr)
PYEOF
    fi
    stop_pid "$DAEMON_PID" 30
    stop_pid "$REG_PID" 10
    if [ -n "$BRIDGE" ]; then ip link del "$BRIDGE" 2>/dev/null; fi
    # portmap's host-wide masquerade chains (snat for localhost port mappings): remove
    # them if this run created them.
    if [ "$HAD_HOSTPORT_MASQ" = 0 ]; then
        iptables -t nat -D POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ 2>/dev/null
        iptables -t nat -F CNI-HOSTPORT-MASQ 2>/dev/null; iptables -t nat -X CNI-HOSTPORT-MASQ 2>/dev/null
        iptables -t nat -F CNI-HOSTPORT-SETMARK 2>/dev/null; iptables -t nat -X CNI-HOSTPORT-SETMARK 2>/dev/null
        if [ "$(iptables -t nat -S CNI-HOSTPORT-DNAT 2>/dev/null | grep -c '^-A')" = 0 ]; then
            for chain in PREROUTING OUTPUT; do
                iptables -t nat -D "$chain" -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT 2>/dev/null
            done
            iptables -t nat -X CNI-HOSTPORT-DNAT 2>/dev/null
        fi
    fi
    # unmount anything left under the work dir, deepest first, then remove it
    awk -v b="$WORK/" 'index($2, b) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null; done
    if [ "${KEEP_WORKDIR:-0}" = 1 ] || { [ $rc -ne 0 ] && [ -z "${CRITEST_REPORT_DIR:-}" ]; }; then
        echo "run.sh: work dir kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
HAD_HOSTPORT_MASQ=0
iptables -t nat -S CNI-HOSTPORT-MASQ >/dev/null 2>&1 && HAD_HOSTPORT_MASQ=1
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- registry ---------------------------------------------------------------------------------
REG_PORT="$(free_port)"
cat > "$WORK/registry/config.yml" <<YEOF
{"version": "0.1", "log": {"level": "warn", "accesslog": {"disabled": true}},
 "storage": {"filesystem": {"rootdirectory": "$WORK/registry/storage"}, "delete": {"enabled": true},
             "maintenance": {"uploadpurging": {"enabled": false}}},
 "http": {"addr": "127.0.0.1:$REG_PORT", "secret": "moorage-critest"}}
YEOF
"$REGISTRY_BIN" serve "$WORK/registry/config.yml" >"$WORK/registry/registry.log" 2>&1 </dev/null &
REG_PID=$!
for _ in $(seq 300); do
    "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$REG_PORT/v2/', timeout=1)" \
        2>/dev/null && break
    kill -0 "$REG_PID" 2>/dev/null || { echo "run.sh: registry died" >&2; cat "$WORK/registry/registry.log" >&2; exit 1; }
    sleep 0.1
done
echo "run.sh: registry 127.0.0.1:$REG_PORT (pid $REG_PID); building and pushing critest images" >&2
(cd "$REPO" && "$PY" test/critest/images.py --registry "127.0.0.1:$REG_PORT" --certs-d "$WORK/certs.d" \
    --work "$WORK/layouts" >"$WORK/images.json") || { echo "run.sh: image push failed" >&2; exit 1; }

# --- CNI: a bridge and subnet this run owns -----------------------------------------------------
N=$(( (RANDOM % 200) + 20 ))
while ip link show "mrgcrit$N" >/dev/null 2>&1; do N=$(( (RANDOM % 200) + 20 )); done
BRIDGE="mrgcrit$N"
ip link add "$BRIDGE" type bridge && ip addr add "10.234.$N.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up \
    || { echo "run.sh: cannot create bridge $BRIDGE" >&2; exit 1; }
cat > "$WORK/cni/net.d/10-critest.conflist" <<CEOF
{"cniVersion": "1.0.0", "name": "moorage-critest-$N", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$WORK/cni/data",
            "ranges": [[{"subnet": "10.234.$N.0/24", "rangeStart": "10.234.$N.10", "gateway": "10.234.$N.1"}]]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
CEOF

# --- daemon -------------------------------------------------------------------------------------
METRICS_PORT="$(free_port)"
cat > "$WORK/config.toml" <<TEOF
socket = "$SOCK"
root_dir = "$WORK/root"
state_dir = "$WORK/state"
log_level = "debug"
[metrics]
address = "127.0.0.1:$METRICS_PORT"
[cni]
conf_dir = "$WORK/cni/net.d"
[images]
registry_config_path = "$WORK/certs.d"
[nri]
enable = $([ "$NRI" = 1 ] && echo true || echo false)
socket_path = "$NRI_SOCK"
plugin_path = "$WORK/nri/plugins"
plugin_config_path = "$WORK/nri/conf.d"
[runtime]
# critest's user-namespace specs map 100000 ids (0 1000 100000), not the kubelet's multiple of 65536.
userns_length_multiple = 1
TEOF
(cd "$REPO" && exec "$PY" -m moorage.cri.cli serve --config "$WORK/config.toml") >"$REPORT_DIR/daemon.log" 2>&1 </dev/null &
DAEMON_PID=$!
for _ in $(seq 300); do
    [ -S "$SOCK" ] && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { echo "run.sh: moorage died" >&2; tail -50 "$REPORT_DIR/daemon.log" >&2; exit 1; }
    sleep 0.1
done
echo "run.sh: moorage on $SOCK (pid $DAEMON_PID); running critest" >&2

ARGS=(--runtime-endpoint "unix://$SOCK" --image-endpoint "unix://$SOCK" --config /dev/null
      "-ginkgo.timeout=${CRITEST_TIMEOUT:-90m}" -ginkgo.no-color
      "-ginkgo.junit-report=$REPORT_DIR/junit.xml")
[ "$NRI" = 1 ] && ARGS+=(-nri-socket "$NRI_SOCK")
[ -n "$SKIP" ] && ARGS+=("-ginkgo.skip=$SKIP")
[ -n "$FOCUS" ] && ARGS+=("-ginkgo.focus=$FOCUS")
"$CRITEST_BIN" "${ARGS[@]}" "${EXTRA_ARGS[@]}" 2>&1 | tee "$REPORT_DIR/critest.log"
RC=${PIPESTATUS[0]}
echo "run.sh: critest exit status $RC; report in $REPORT_DIR" >&2
exit "$RC"
