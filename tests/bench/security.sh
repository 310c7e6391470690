#!/usr/bin/env bash
# What security costs: runs tests/bench/p2p.sh and tests/bench/registry.sh with cluster TLS on
# (the default: mutual TLS on the scheduler link, HTTPS on every piece port) and with
# --plaintext, alternating, ROUNDS times each, and compares the P2P times (tickets are checked
# in both: they cannot be turned off). Prints one line:
#   security rounds=2 rate=40MiB/s p2p_tls_s=.. p2p_plain_s=.. p2p_ratio=.. registry_tls_s=.. registry_plain_s=.. registry_ratio=..
# ratio = TLS / plaintext (target <= 1.05). Env: ROUNDS (2), RATE_MIB (40; a high rate such as
# 400 takes the caps out and shows the CPU cost), and the knobs of both benchmarks.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
ROUNDS=${ROUNDS:-2}
export RATE_MIB=${RATE_MIB:-40}
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$2"; }
declare -A sum=()
for _ in $(seq 1 "$ROUNDS"); do
  for bench in p2p registry; do
    for mode in plain tls; do
      if [ "$mode" = plain ]; then line=$(PLAINTEXT=1 bash "tests/bench/$bench.sh"); else line=$(bash "tests/bench/$bench.sh"); fi
      echo "  $mode: $line" >&2
      t=$(field p2p_s "$line")
      [ -n "$t" ] || { echo "bench: no p2p_s in: $line" >&2; exit 1; }
      sum[$bench-$mode]=$(calc %.3f "${sum[$bench-$mode]:-0} + $t")
    done
  done
done
avg() { calc %.2f "${sum[$1]} / $ROUNDS"; }
echo "security rounds=$ROUNDS rate=${RATE_MIB}MiB/s" \
  "p2p_tls_s=$(avg p2p-tls) p2p_plain_s=$(avg p2p-plain) p2p_ratio=$(calc %.3f "${sum[p2p-tls]} / ${sum[p2p-plain]}")" \
  "registry_tls_s=$(avg registry-tls) registry_plain_s=$(avg registry-plain) registry_ratio=$(calc %.3f "${sum[registry-tls]} / ${sum[registry-plain]}")"
