#!/usr/bin/env bash
# Damselfly demo on loopback, no outside network: builds the binaries, starts a local origin serving a
# generated file, one supernode and N peers (separate dfget processes with their own stores), then
# prints what each peer got from where and how many bytes the origin served.
#   bash scripts/demo.sh            # 6 peers, 128 MiB
#   PEERS=8 SIZE_MIB=256 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-6}
SIZE_MIB=${SIZE_MIB:-128}

echo "==> building (release)"
cargo build --release --locked --workspace --bins -q
BIN=target/release

WORK=$(mktemp -d /tmp/damselfly-demo.XXXXXX)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/www"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$WORK/www/demo.bin"
WANT=$(sha256sum "$WORK/www/demo.bin" | cut -d' ' -f1)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=127.0.0.1:$(free_port); HTTP=127.0.0.1:$(free_port)

"$BIN/damselfly-origin" --dir "$WORK/www" > "$WORK/origin.addr" 2> "$WORK/origin.log" &
for _ in $(seq 50); do grep -q listening "$WORK/origin.addr" 2>/dev/null && break; sleep 0.1; done
ORIGIN=$(sed -n 's/^listening on //p' "$WORK/origin.addr")
"$BIN/supernode" --grpc-addr "$GRPC" --http-addr "$HTTP" --data-dir "$WORK/supernode" 2> "$WORK/supernode.log" &
for _ in $(seq 100); do curl -sf "http://$HTTP/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
echo "==> origin http://$ORIGIN serves a ${SIZE_MIB} MiB file; supernode at $GRPC; $PEERS peers start at once"

URL="http://$ORIGIN/files/demo.bin"
start=$(date +%s.%N)
for i in $(seq 1 "$PEERS"); do
  "$BIN/dfget" "$URL" -O "$WORK/peer$i.out" --no-agent --data-dir "$WORK/peer$i" --supernode "$GRPC" -q \
    > "$WORK/peer$i.summary" 2> "$WORK/peer$i.log" &
done
fail=0
for i in $(seq 1 "$PEERS"); do wait %$((i + 2)) || fail=1; done
end=$(date +%s.%N)

echo
printf '%-8s %-6s %12s %12s %12s\n' peer sha256 from_peers from_supernode from_origin
for i in $(seq 1 "$PEERS"); do
  line=$(cat "$WORK/peer$i.summary")
  field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$line"; }
  ok=$([ "$(sha256sum "$WORK/peer$i.out" 2>/dev/null | cut -d' ' -f1)" = "$WANT" ] && echo ok || echo BAD)
  printf '%-8s %-6s %12s %12s %12s\n' "peer$i" "$ok" "$(field peers)" "$(field supernode)" "$(field origin)"
  [ "$ok" = ok ] || { fail=1; tail -5 "$WORK/peer$i.log"; }
done
SERVED=$(curl -s "http://$ORIGIN/_stats" | sed 's/.*"bytes": \([0-9]*\).*/\1/')
echo
echo "origin served $SERVED bytes for $PEERS copies of $((SIZE_MIB << 20)) bytes ($(python3 -c "print(f'{$SERVED/($SIZE_MIB<<20):.2f}')") x the file) in $(python3 -c "print(f'{$end-$start:.1f}')") s"
exit $fail
