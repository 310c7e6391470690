#!/usr/bin/env bash
# Benchmark: N peers fetch S bytes at once with the origin's, the supernode's and every peer's upload
# capped at the same rate B (an emulated cluster on one machine), against the baseline of the same N
# peers downloading straight from the origin. Prints one line:
#   p2p peers=8 size=256MiB bound_s=<S/B> p2p_s=.. direct_s=.. p2p_over_bound=.. direct_over_p2p=.. origin_bytes_ratio=.. (direct: 8.00)
# Env: PEERS (8), SIZE_MIB (256), RATE_MIB (40), SUPERNODE_TOML (lines of the supernode's config, e.g.
# 'piece_size = "1MiB"'), PROFILE (release; dev uses the tests' optimized dev build), BIN (built
# binaries: no build).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
PEERS=${PEERS:-8}
SIZE_MIB=${SIZE_MIB:-256}
RATE_MIB=${RATE_MIB:-40}
need_tools curl

build_bins
# 8 peers fsyncing 256 MiB each at the same moment would measure the shared disk: work in RAM when
# there is room; the direct baseline writes to the same place.
ram_workdir $(( (2 * PEERS + 3) * SIZE_MIB )) damselfly-bench
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/www" "$WORK/out" "$WORK/logs"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$WORK/www/blob"
WANT=$(sha256sum "$WORK/www/blob" | cut -d' ' -f1)
RATE="${RATE_MIB}MiB"

start_origin "$WORK/www" --rate "$RATE"
printf '%s\n' "${SUPERNODE_TOML:-}" > "$WORK/supernode.toml"
start_supernode --upload-rate "$RATE" --config "$WORK/supernode.toml"
URL="http://$ORIGIN/files/blob"

# P2P: every peer's upload capped at B too.
t0=$(now); pids=()
for i in $(seq 1 "$PEERS"); do
  # shellcheck disable=SC2046
  "$BIN/dfget" "$URL" -O "$WORK/out/p2p$i" --no-agent --data-dir "$WORK/peer$i" --supernode "$GRPC" \
    --upload-rate "$RATE" $(tls_flags "peer$i") -q > "$WORK/logs/p2p$i.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { echo "bench: a dfget failed" >&2; cat "$WORK"/logs/p2p*.log >&2; exit 1; }; done
t1=$(now)
check "$WORK"/out/p2p*
P2P_ORIGIN=$(origin_bytes)
rm -f "$WORK"/out/p2p*

# Baseline: the same peers straight from the origin.
curl -s -XPOST "http://$ORIGIN/_reset" >/dev/null
t2=$(now); pids=()
for i in $(seq 1 "$PEERS"); do curl -sf -o "$WORK/out/direct$i" "$URL" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
t3=$(now)
check "$WORK"/out/direct*
DIRECT_ORIGIN=$(origin_bytes)

S=$((SIZE_MIB << 20))
bound=$(calc %.2f "$SIZE_MIB / $RATE_MIB")
p2p=$(calc %.2f "$t1 - $t0")
direct=$(calc %.2f "$t3 - $t2")
echo "p2p peers=$PEERS size=${SIZE_MIB}MiB rate=${RATE_MIB}MiB/s fs=$FS bound_s=$bound p2p_s=$p2p direct_s=$direct" \
  "p2p_over_bound=$(calc %.2f "$p2p / $bound") direct_over_p2p=$(calc %.2f "$direct / $p2p")" \
  "origin_bytes_ratio=$(calc %.2f "$P2P_ORIGIN / $S") (direct: $(calc %.2f "$DIRECT_ORIGIN / $S"))"
