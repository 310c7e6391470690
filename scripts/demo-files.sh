#!/usr/bin/env bash
# Damselfly file demo on loopback, no outside network (`bash scripts/demo.sh files`): builds the
# binaries, starts a local origin serving a generated file, one supernode and N peers (separate dfget
# processes with their own stores), then prints what each peer got from where and how many bytes the
# origin served.
#   bash scripts/demo.sh files            # 6 peers, 128 MiB
#   PEERS=8 SIZE_MIB=256 bash scripts/demo.sh files
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
PEERS=${PEERS:-6}
SIZE_MIB=${SIZE_MIB:-128}
need_tools curl

echo "==> building (release)"
build_bins

WORK=$(mktemp -d /tmp/damselfly-demo.XXXXXX)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/www"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$WORK/www/demo.bin"
WANT=$(sha256sum "$WORK/www/demo.bin" | cut -d' ' -f1)

start_origin "$WORK/www"
start_supernode
echo "==> origin http://$ORIGIN serves a ${SIZE_MIB} MiB file; supernode at $GRPC; $PEERS peers start at once"

URL="http://$ORIGIN/files/demo.bin"
start=$(now)
pids=()
for i in $(seq 1 "$PEERS"); do
  # shellcheck disable=SC2046
  "$BIN/dfget" "$URL" -O "$WORK/peer$i.out" --no-agent --data-dir "$WORK/peer$i" --supernode "$GRPC" -q $(tls_flags "peer$i") \
    > "$WORK/peer$i.summary" 2> "$WORK/peer$i.log" &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
end=$(now)

echo
printf '%-8s %-6s %12s %15s %12s\n' peer sha256 from_peers from_supernode from_origin
for i in $(seq 1 "$PEERS"); do
  line=$(cat "$WORK/peer$i.summary")
  field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$line"; }
  ok=$([ "$(sha256sum "$WORK/peer$i.out" 2>/dev/null | cut -d' ' -f1)" = "$WANT" ] && echo ok || echo BAD)
  printf '%-8s %-6s %12s %15s %12s\n' "peer$i" "$ok" "$(field peers)" "$(field supernode)" "$(field origin)"
  [ "$ok" = ok ] || { fail=1; tail -5 "$WORK/peer$i.log"; }
done
SERVED=$(origin_bytes)
echo
echo "origin served $SERVED bytes for $PEERS copies of $((SIZE_MIB << 20)) bytes" \
  "($(calc %.2f "$SERVED / ($SIZE_MIB * 1048576)") x the file) in $(calc %.1f "$end - $start") s"
exit $fail
