#!/usr/bin/env bash
# Benchmark: one host, nothing cached anywhere: `dfget` of one file through a fresh supernode (its
# seed from the origin, then the peer's download from it, cluster TLS) against `curl` of the same
# file from the same origin, loopback uncapped by default (where 10-25 Gbit/s datacenter links put
# us). Every repetition starts a new supernode and peer with empty stores. Prints one line:
#   single size=512MiB rate=none fs=tmpfs reps=3 curl_s=.. dfget_s=.. dfget_over_curl=.. throughput_ratio=.. curl_cpu_s=.. origin_for_curl_cpu_s=.. dfget_cpu_s=.. sn_cpu_s=.. origin_for_dfget_cpu_s=.. dfget_cpu_over_wall=..
# curl_s and dfget_s are medians; throughput_ratio = curl_s / dfget_s (target ≥ 0.9). Where the
# time goes: CPU seconds (medians) of curl and of the origin serving it, of dfget, of the
# supernode (its seed and its upload to the peer) and of the origin serving the seed, and
# dfget_cpu_over_wall = their sum / dfget_s (2.0 = both cores busy the whole time: CPU-bound).
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
med() { printf '%s\n' "$@" | median; }
TIMEFORMAT='%3U %3S'
# timed_cpu FILE LOG CMD...: runs CMD, its output into LOG; its CPU seconds (user + system) into FILE.
timed_cpu() {
  local f=$1 log=$2 rc=0; shift 2
  { time "$@" > "$log" 2>&1; } 2> "$f.time" || rc=$?
  awk '{ printf "%.2f\n", $1 + $2 }' "$f.time" > "$f"
  return "$rc"
}
curls=() dfgets=() curl_cpu=() origin_curl_cpu=() dfget_cpu=() sn_cpu=() origin_dfget_cpu=() over_wall=()
for r in $(seq 1 "$REPS"); do
  o0=$(cpu_s "$ORIGIN_PID")
  t0=$(now)
  timed_cpu "$WORK/curl.cpu" "$WORK/logs/curl$r.log" curl -sf -o "$WORK/out/direct" "$URL"
  t1=$(now)
  curl_cpu+=("$(cat "$WORK/curl.cpu")")
  origin_curl_cpu+=("$(calc %.2f "$(cpu_s "$ORIGIN_PID") - $o0")")
  check "$WORK/out/direct"
  rm -f "$WORK/out/direct"
  curls+=("$(calc %.3f "$t1 - $t0")")

  rm -rf "$WORK/supernode" "$WORK/peer" "$WORK/pki/supernode."*
  start_supernode
  flags=$(tls_flags "peer$r")
  s0=$(cpu_s "$SN_PID") o0=$(cpu_s "$ORIGIN_PID")
  t0=$(now)
  # shellcheck disable=SC2086
  timed_cpu "$WORK/dfget.cpu" "$WORK/logs/dfget$r.log" "$BIN/dfget" "$URL" -O "$WORK/out/p2p" \
    --no-agent --data-dir "$WORK/peer" --supernode "$GRPC" $flags -q \
    || { echo "bench: dfget failed" >&2; cat "$WORK/logs/dfget$r.log" >&2; exit 1; }
  t1=$(now)
  dfget_cpu+=("$(cat "$WORK/dfget.cpu")")
  sn_cpu+=("$(calc %.2f "$(cpu_s "$SN_PID") - $s0")")
  origin_dfget_cpu+=("$(calc %.2f "$(cpu_s "$ORIGIN_PID") - $o0")")
  over_wall+=("$(calc %.2f "(${dfget_cpu[-1]} + ${sn_cpu[-1]} + ${origin_dfget_cpu[-1]}) / ($t1 - $t0)")")
  check "$WORK/out/p2p"
  rm -f "$WORK/out/p2p"
  dfgets+=("$(calc %.3f "$t1 - $t0")")
  kill "$SN_PID"; wait "$SN_PID" 2>/dev/null || true
done

curl_s=$(printf '%s\n' "${curls[@]}" | median)
dfget_s=$(printf '%s\n' "${dfgets[@]}" | median)
echo "single size=${SIZE_MIB}MiB rate=$([ "$RATE_MIB" = 0 ] && echo none || echo "${RATE_MIB}MiB/s") fs=$FS reps=$REPS" \
  "curl_s=$curl_s dfget_s=$dfget_s dfget_over_curl=$(calc %.2f "$dfget_s / $curl_s")" \
  "throughput_ratio=$(calc %.2f "$curl_s / $dfget_s")" \
  "curl_cpu_s=$(med "${curl_cpu[@]}") origin_for_curl_cpu_s=$(med "${origin_curl_cpu[@]}")" \
  "dfget_cpu_s=$(med "${dfget_cpu[@]}") sn_cpu_s=$(med "${sn_cpu[@]}") origin_for_dfget_cpu_s=$(med "${origin_dfget_cpu[@]}")" \
  "dfget_cpu_over_wall=$(med "${over_wall[@]}") (curl: ${curls[*]}; dfget: ${dfgets[*]})"
