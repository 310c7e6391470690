#!/usr/bin/env bash
# Benchmark: the supernode's scheduler under load. PEERS simulated peers (damselfly-loadgen: real
# gRPC sessions over cluster TLS, each from its own loopback address, no piece bytes, each piece
# reported done after PIECE_DELAY) download TASKS tasks of PIECES pieces from one supernode;
# SESSIONS_PER_HOST sessions share each host's connection, as an agent's layers do.
# Prints one line:
#   loadgen peers=.. hosts=.. tasks=.. completed=.. failed=.. reconnects=.. results=.. results_per_s=.. p50_ms=.. p99_ms=.. elapsed_s=.. sn_cpu_s=.. results_per_cpu_s=.. sn_rss_mib=.. rss_kib_per_connection=.. rss_kib_per_session=.. decision_p99_ms=..
# Env: PEERS (1000), SESSIONS_PER_HOST (1), TASKS (1), PIECES (64), PIECE_DELAY (20ms), DEADLINE (120s), PLAINTEXT=1, PROFILE
# (release; `dev` uses the tests' optimized dev build), BIN (built binaries: no build).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
PEERS=${PEERS:-1000}
TASKS=${TASKS:-1}
PIECES=${PIECES:-64}
SESSIONS_PER_HOST=${SESSIONS_PER_HOST:-1}
PIECE_DELAY=${PIECE_DELAY:-20ms}
DEADLINE=${DEADLINE:-120s}
need_tools curl

build_bins
WORK=$(mktemp -d /tmp/damselfly-bench.XXXXXX)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/www"
# Small pieces: the load is the scheduling, not the seed.
printf 'piece_size = "64KiB"\n' > "$WORK/supernode.toml"
urls=()
for t in $(seq 1 "$TASKS"); do
  head -c "$((PIECES * 64 * 1024))" /dev/urandom > "$WORK/www/task$t"
done
start_origin "$WORK/www"
start_supernode --config "$WORK/supernode.toml"
SN_PID=$(jobs -p | tail -1)
for t in $(seq 1 "$TASKS"); do urls+=(--url "http://$ORIGIN/files/task$t"); done
rc=0
# shellcheck disable=SC2046
line=$("$BIN/damselfly-loadgen" --supernode "$GRPC" "${urls[@]}" --peers "$PEERS" \
  --sessions-per-host "$SESSIONS_PER_HOST" \
  --piece-delay "$PIECE_DELAY" --deadline "$DEADLINE" --supernode-pid "$SN_PID" $(tls_flags loadgen)) || rc=$?
# The supernode's own decision time (damselfly_supernode_decision_seconds): the upper bound of
# the histogram bucket holding the 99th percentile.
# A supernode that is gone leaves decision_p99_ms=none, not the run's line unprinted.
if [ "${PLAINTEXT:-0}" = 1 ]; then metrics=$(curl -sf "http://$HTTP/metrics" || true); else
  metrics=$(curl -sf --cacert "$WORK/pki/ca.crt" --cert "$WORK/pki/loadgen.crt" \
    --key "$WORK/pki/loadgen.key" "https://$HTTP/metrics" || true); fi
p99=$(echo "$metrics" | awk -F'[ "]' '/^damselfly_supernode_decision_seconds_bucket/ {
    le[n] = $2; c[n++] = $NF } END {
    for (i = 0; i < n; i++) if (c[i] >= 0.99 * c[n - 1]) { print (le[i] == "+Inf" ? "inf" : le[i] * 1000); exit } }')
echo "$line decision_p99_ms=${p99:-none}"
exit "$rc"
