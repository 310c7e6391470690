#!/usr/bin/env bash
# Benchmark: one host, nothing cached anywhere: `dfget` of one file through a fresh supernode (its
# seed from the origin, then the peer's download from it, cluster TLS) against `curl` of the same
# file from the same origin, loopback uncapped by default (where 10-25 Gbit/s datacenter links put
# us). Every repetition starts a new supernode and peer with empty stores. Prints one line:
#   single size=512MiB rate=none fs=tmpfs reps=3 curl_s=.. dfget_s=.. dfget_over_curl=.. throughput_ratio=..
# curl_s and dfget_s are medians; throughput_ratio = curl_s / dfget_s (target ≥ 0.9).
# Env: SIZE_MIB (512), RATE_MIB (0: the origin uncapped), REPS (3), PROFILE (release; dev uses the
# tests' optimized dev build), BIN (built binaries: no build).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
SIZE_MIB=${SIZE_MIB:-512}
RATE_MIB=${RATE_MIB:-0}
REPS=${REPS:-3}
need_tools curl

build_bins
ram_workdir $(( 4 * SIZE_MIB + 64 )) damselfly-single
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/www" "$WORK/out" "$WORK/logs"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$WORK/www/blob"
WANT=$(sha256sum "$WORK/www/blob" | cut -d' ' -f1)
rate=()
[ "$RATE_MIB" = 0 ] || rate=(--rate "${RATE_MIB}MiB")
start_origin "$WORK/www" "${rate[@]}"
URL="http://$ORIGIN/files/blob"

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
curls=() dfgets=()
for r in $(seq 1 "$REPS"); do
  t0=$(now)
  curl -sf -o "$WORK/out/direct" "$URL"
  t1=$(now)
  check "$WORK/out/direct"
  rm -f "$WORK/out/direct"
  curls+=("$(calc %.3f "$t1 - $t0")")

  rm -rf "$WORK/supernode" "$WORK/peer" "$WORK/pki/supernode."*
  start_supernode
  t0=$(now)
  # shellcheck disable=SC2046
  "$BIN/dfget" "$URL" -O "$WORK/out/p2p" --no-agent --data-dir "$WORK/peer" --supernode "$GRPC" \
    $(tls_flags "peer$r") -q > "$WORK/logs/dfget$r.log" 2>&1 \
    || { echo "bench: dfget failed" >&2; cat "$WORK/logs/dfget$r.log" >&2; exit 1; }
  t1=$(now)
  check "$WORK/out/p2p"
  rm -f "$WORK/out/p2p"
  dfgets+=("$(calc %.3f "$t1 - $t0")")
  kill "$SN_PID"; wait "$SN_PID" 2>/dev/null || true
done

curl_s=$(printf '%s\n' "${curls[@]}" | median)
dfget_s=$(printf '%s\n' "${dfgets[@]}" | median)
echo "single size=${SIZE_MIB}MiB rate=$([ "$RATE_MIB" = 0 ] && echo none || echo "${RATE_MIB}MiB/s") fs=$FS reps=$REPS" \
  "curl_s=$curl_s dfget_s=$dfget_s dfget_over_curl=$(calc %.2f "$dfget_s / $curl_s")" \
  "throughput_ratio=$(calc %.2f "$curl_s / $dfget_s") (curl: ${curls[*]}; dfget: ${dfgets[*]})"
