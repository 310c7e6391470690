#!/usr/bin/env bash
# Benchmark: starting a container from a ~1 GiB image whose command reads ~52 MiB, on real
# containerd, lazily (dfsnapshotter pull + ctr run --snapshotter damselfly) vs the baseline in the
# same run (ctr images pull + ctr run on containerd's overlayfs snapshotter), with the registry's
# upload (through damselfly-throttle), the supernode's and the agents' capped at RATE_MIB.
#   cold: the first lazy start in the cluster (the supernode seeds and indexes each layer first);
#   warm: a lazy start on another host once the indexes exist;
#   full: the baseline pull + start on a third host.
# Also: fetched_over_image (bytes the warm host's agent fetched for its start / image bytes;
# background fetching off), fuse_read_over_native (sequential read of a 200 MiB file with the
# page cache dropped, once a container read it whole: its lazy layer's FUSE mount, passthrough on
# as by default, vs containerd's unpacked layer on disk, as speed ratio; the first passthrough
# open copies the file out of the chunk file), fuse_reread_over_native (the next reads, median of
# 3), nopassthrough_read_over_native (the same on a fourth host whose dfsnapshotter runs with
# --fuse-passthrough false: every read through FUSE), passthrough_opens (host b's count), and
# small_{cold,warm}_over_native (one cat of SMALL_FILES 4 KiB files of their own layer, once a
# container read them: page cache, dentries and inodes dropped first, or not; nopassthrough_*:
# on host d, whose mounts need no opens).
# The start reads SCATTER_MIB (48) MiB more, spread over the image: host a's (the first) is
# recorded as its start set, host b prefetches it at mount, and a fifth host e, whose
# dfsnapshotter runs with --prefetch false, starts the same way without: warm_noprefetch_start_s,
# prefetch_gain = e's start / b's, recorded_layers, prefetched_mib (b's).
# Prints one line:
#   lazy image=..MiB cold_start_s=.. warm_start_s=.. full_start_s=.. full_over_lazy=.. fetched_over_image=.. warm_noprefetch_start_s=.. prefetch_gain=.. recorded_layers=.. prefetched_mib=.. fuse_read_over_native=.. nopassthrough_read_over_native=.. fuse_reread_over_native=.. passthrough_opens=.. small_cold_over_native=.. small_warm_over_native=..
# Needs root (containerd, FUSE). Env: IMAGE_MIB (1024), RATE_MIB (40), SMALL_FILES (1000), SCATTER_MIB (48),
# PROFILE (release; dev: the tests' optimized dev build), BIN (built binaries: no build).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
IMAGE_MIB=${IMAGE_MIB:-1024}
RATE_MIB=${RATE_MIB:-40}
SMALL_FILES=${SMALL_FILES:-1000}
SCATTER_MIB=${SCATTER_MIB:-48}
[ "$(id -u)" = 0 ] || { echo "bench: lazy.sh needs root (containerd, FUSE)" >&2; exit 1; }
need_tools curl docker-registry skopeo umoci busybox:busybox-static containerd ctr:containerd runc

build_bins
WORK=$(mktemp -d /tmp/damselfly-lazy.XXXXXX)
cleanup() {
  for s in "$WORK"/*/containerd/containerd.sock; do
    [ -S "$s" ] && ctr -a "$s" -n bench tasks ls -q 2>/dev/null | xargs -r -n1 ctr -a "$s" -n bench tasks kill -s 9 2>/dev/null
  done
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  grep -o "$WORK[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/logs" "$WORK/registry"
RATE="${RATE_MIB}MiB"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The image: busybox and /small-file, then a 200 MiB file, then the rest of IMAGE_MIB in
# random (incompressible) files over three more layers.
umoci init --layout "$WORK/oci" >/dev/null
umoci new --image "$WORK/oci:app" >/dev/null
base() { mkdir -p "$1/bin"; cp "$(command -v busybox)" "$1/bin/busybox"; ln -s busybox "$1/bin/sh"; echo "hello from damselfly" > "$1/small-file"; }
big() { head -c $((200 << 20)) /dev/urandom > "$1/big.bin"; }
smalls() { mkdir -p "$1/small"; head -c $((SMALL_FILES * 4096)) /dev/urandom | split -b 4096 -a 5 - "$1/small/f"; }
REST=$(( (IMAGE_MIB - 200) / 3 ))
rest() { mkdir -p "$1/data"; head -c $((REST << 20)) /dev/urandom > "$1/data/$(date +%s%N).bin"; }
oci_layer base; oci_layer smalls; oci_layer big; oci_layer rest; oci_layer rest; oci_layer rest
umoci config --image "$WORK/oci:app" --config.cmd /bin/sh >/dev/null

# The registry on loopback behind a front capping what it sends.
REG_PORT=$(free_port)
cat > "$WORK/registry/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $WORK/registry/data
http:
  addr: 127.0.0.1:$REG_PORT
YML
docker-registry serve "$WORK/registry/config.yml" > "$WORK/logs/registry.log" 2>&1 &
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$REG_PORT/v2/" >/dev/null && break; sleep 0.1; done
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$WORK/oci:app" \
  "docker://127.0.0.1:$REG_PORT/bench/app:v1" >/dev/null
"$BIN/damselfly-throttle" --upstream "127.0.0.1:$REG_PORT" --rate "$RATE" > "$WORK/throttle.addr" &
for _ in $(seq 100); do grep -q "stats on" "$WORK/throttle.addr" 2>/dev/null && break; sleep 0.1; done
REGISTRY=$(sed -n 's/^listening on //p' "$WORK/throttle.addr")
IMAGE="$REGISTRY/bench/app:v1"
S=$(skopeo inspect --raw --tls-verify=false "docker://$IMAGE" \
  | grep -o '"size":[0-9]*' | cut -d: -f2 | awk '{ s += $1 } END { printf "%d\n", s }')

start_supernode --upload-rate "$RATE"

# start_host NAME LAZY(true|false) [PASSTHROUGH(true|false)] [PREFETCH(true|false)]: an agent, (if
# LAZY) a dfsnapshotter with background fetching off and a 15 s start window, and a containerd;
# sets CTR_<NAME>, AGENT_METRICS_<NAME> and SNAP_METRICS_<NAME>.
start_host() {
  local n=$1 lazy=$2 passthrough=${3:-true} prefetch=${4:-true} d="$WORK/$1"
  mkdir -p "$d/containerd"
  # shellcheck disable=SC2046
  "$BIN/dfdaemon" --supernode "$GRPC" --data-dir "$d/agent" --agent-socket "$d/agent.sock" \
    --proxy-addr 127.0.0.1:0 --upload-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
    --upload-rate "$RATE" $(tls_flags "$n-agent") 2> "$WORK/logs/$n-agent.log" &
  for _ in $(seq 100); do grep -q "dfdaemon ready" "$WORK/logs/$n-agent.log" 2>/dev/null && break; sleep 0.1; done
  printf -v "AGENT_METRICS_$n" '%s' "$(sed -n 's/.*dfdaemon ready.* metrics=\([0-9.:]*\).*/\1/p' "$WORK/logs/$n-agent.log" | head -1)"
  local cfg="version = 2
root = \"$d/containerd/root\"
state = \"$d/containerd/state\"
disabled_plugins = [\"io.containerd.grpc.v1.cri\"]
[grpc]
  address = \"$d/containerd/containerd.sock\""
  if [ "$lazy" = true ]; then
    printf -v "SNAP_METRICS_$n" '127.0.0.1:%s' "$(free_port)"
    local m=SNAP_METRICS_$n
    "$BIN/dfsnapshotter" --root "$d/snapshots" --socket "$d/snapshotter.sock" \
      --metrics-addr "${!m}" --agent-socket "$d/agent.sock" \
      --plain-http "$REGISTRY" --background-fetch false --fuse-passthrough "$passthrough" \
      --prefetch "$prefetch" --start-window 15s 2> "$WORK/logs/$n-snapshotter.log" &
    for _ in $(seq 100); do [ -S "$d/snapshotter.sock" ] && break; sleep 0.1; done
    cfg="$cfg
[proxy_plugins]
  [proxy_plugins.damselfly]
    type = \"snapshot\"
    address = \"$d/snapshotter.sock\""
  fi
  echo "$cfg" > "$d/containerd/config.toml"
  containerd --config "$d/containerd/config.toml" > "$WORK/logs/$n-containerd.log" 2>&1 &
  for _ in $(seq 200); do [ -S "$d/containerd/containerd.sock" ] && break; sleep 0.1; done
  printf -v "CTR_$n" '%s' "$d/containerd/containerd.sock"
}
ctr_() { local sock=$1; shift; ctr -a "$sock" -n bench "$@"; }
# The command: print /small-file, read 4 MiB of /big.bin, then SCATTER_MIB MiB in 1 MiB reads spread
# evenly over the three data files.
PER=$(( SCATTER_MIB / 3 )); STEP=$(( REST / (PER > 0 ? PER : 1) ))
CMD=(/bin/sh -c "/bin/busybox cat /small-file && /bin/busybox head -c 4194304 /big.bin | /bin/busybox md5sum \
  && for f in /data/*.bin; do i=0; while [ \$i -lt $PER ]; do /bin/busybox dd if=\$f bs=1048576 skip=\$((i * $STEP)) count=1 2>/dev/null; i=\$((i + 1)); done; done | /bin/busybox md5sum")
lazy_start() { # host
  local sock=CTR_$1
  "$BIN/dfsnapshotter" pull --containerd "${!sock}" -n bench --plain-http "$REGISTRY" "$IMAGE" > "$WORK/logs/$1-pull.log"
  ctr_ "${!sock}" run --rm --snapshotter damselfly "$IMAGE" "start-$1" "${CMD[@]}" > "$WORK/logs/$1-run.log"
  grep -q "hello from damselfly" "$WORK/logs/$1-run.log"
}
fetched() { # host: bytes its agent downloaded
  local m=AGENT_METRICS_$1
  curl -s "http://${!m}/metrics" | awk '/^damselfly_peer_download_bytes_total/ { s += $2 } END { printf "%d\n", s }'
}
# read_s FILE [N]: median seconds of N (3) sequential reads of FILE (a layer's big.bin as the
# host's snapshotter serves it to overlayfs), the page cache dropped before each.
read_s() {
  local t0 t1 r n=${2:-3}
  for r in $(seq "$n"); do
    sync; echo 3 > /proc/sys/vm/drop_caches
    t0=$(now); cat "$1" > /dev/null; t1=$(now)
    calc "%.3f\n" "$t1 - $t0"
  done | sort -n | sed -n "$(( (n + 1) / 2 ))p"
}
# layer_file HOST: big.bin in the host's lazy layer mount (or, for c, containerd's unpacked layer).
layer_file() {
  find "$WORK/$1" -path '*/fs/big.bin' -print -quit 2>/dev/null
}

# small_s DIR COLD(true|false) [N]: median seconds of N (3) reads of every file of DIR (the
# small-files layer's directory) by one cat, the page cache (and with it the kernel's dentries
# and inodes) dropped before each if COLD.
small_s() {
  local t0 t1 r n=${3:-3}
  for r in $(seq "$n"); do
    sync
    [ "$2" = true ] && echo 3 > /proc/sys/vm/drop_caches
    t0=$(now); cat "$1"/* > /dev/null; t1=$(now)
    calc "%.4f\n" "$t1 - $t0"
  done | sort -n | sed -n "$(( (n + 1) / 2 ))p"
}
small_dir() { # HOST: the small-files directory of its layer mount (or c's unpacked layer)
  find "$WORK/$1" -path '*/fs/small' -type d -print -quit 2>/dev/null
}

# settled HOST METRIC WORK: waits (2 min at most) until the snapshotter metric is above zero and no
# start WORK (record|prefetch) is pending; prints the metric.
settled() {
  local m=SNAP_METRICS_$1 text v busy
  for _ in $(seq 1200); do
    text=$(curl -s "http://${!m}/metrics")
    v=$(echo "$text" | awk -v n="$2" 'index($1, n) == 1 { s += $2 } END { printf "%d\n", s }')
    busy=$(echo "$text" | awk -v w="work=\"$3\"" '/^damselfly_snapshotter_starts_pending/ && index($0, w) { s += $2 } END { printf "%d\n", s }')
    [ "$v" -gt 0 ] && [ "$busy" -eq 0 ] && { echo "$v"; return; }
    sleep 0.1
  done
  echo "bench: $1: $2 stayed 0 or $3 work pending" >&2; exit 1
}

start_host a true
t0=$(now); lazy_start a; t1=$(now)
# Host a started the image first: its start (what the reads touched within the window) is
# recorded at the supernode for later hosts to prefetch at mount.
RECORDED=$(settled a 'damselfly_snapshotter_start_sets_total{outcome="kept"}' record)
start_host b true
t2=$(now); lazy_start b; t3=$(now)
FETCHED=$(fetched b)
PREFETCHED=$(settled b damselfly_snapshotter_prefetch_bytes_total prefetch)
# The same warm start on a host that does not prefetch.
start_host e true true false
t6=$(now); lazy_start e; t7=$(now)
start_host c false
t4=$(now)
ctr_ "$CTR_c" images pull --plain-http "$IMAGE" > "$WORK/logs/c-pull.log"
ctr_ "$CTR_c" run --rm "$IMAGE" start-c "${CMD[@]}" > "$WORK/logs/c-run.log"
t5=$(now)
grep -q "hello from damselfly" "$WORK/logs/c-run.log"

# Sequential reads once local: host b reads big.bin once (fetching it), then again cold-cached.
ctr_ "$CTR_b" run --rm --snapshotter damselfly "$IMAGE" warm-b /bin/busybox cat /big.bin > /dev/null
FUSE_S=$(read_s "$(layer_file b)" 1)
FUSE2_S=$(read_s "$(layer_file b)")
PASSED=$(curl -s "http://$SNAP_METRICS_b/metrics" | awk '/^damselfly_snapshotter_passthrough_opens_total/ { print $2 }')
NATIVE_S=$(read_s "$(layer_file c)")
# Small files: host b reads them once in a container (fetching their chunks), then on the mount.
ctr_ "$CTR_b" run --rm --snapshotter damselfly "$IMAGE" smalls-b /bin/sh -c '/bin/busybox cat /small/* > /dev/null'
small_s "$(small_dir b)" false 1 > /dev/null
SMALL_COLD_S=$(small_s "$(small_dir b)" true)
SMALL_WARM_S=$(small_s "$(small_dir b)" false)
small_s "$(small_dir c)" false 1 > /dev/null
NATIVE_SMALL_COLD_S=$(small_s "$(small_dir c)" true)
NATIVE_SMALL_WARM_S=$(small_s "$(small_dir c)" false)
start_host d true false
lazy_start d
ctr_ "$CTR_d" run --rm --snapshotter damselfly "$IMAGE" warm-d /bin/busybox cat /big.bin > /dev/null
PLAIN_S=$(read_s "$(layer_file d)")
ctr_ "$CTR_d" run --rm --snapshotter damselfly "$IMAGE" smalls-d /bin/sh -c '/bin/busybox cat /small/* > /dev/null'
small_s "$(small_dir d)" false 1 > /dev/null
PLAIN_SMALL_COLD_S=$(small_s "$(small_dir d)" true)
PLAIN_SMALL_WARM_S=$(small_s "$(small_dir d)" false)

cold=$(calc %.2f "$t1 - $t0")
warm=$(calc %.2f "$t3 - $t2")
noprefetch=$(calc %.2f "$t7 - $t6")
full=$(calc %.2f "$t5 - $t4")
echo "lazy image=$((S >> 20))MiB rate=${RATE_MIB}MiB/s cold_start_s=$cold warm_start_s=$warm full_start_s=$full" \
  "full_over_lazy=$(calc %.2f "$full / $warm") fetched_over_image=$(calc %.3f "$FETCHED / $S")" \
  "warm_noprefetch_start_s=$noprefetch prefetch_gain=$(calc %.2f "$noprefetch / $warm") recorded_layers=$RECORDED prefetched_mib=$((PREFETCHED >> 20))" \
  "fuse_read_over_native=$(calc %.2f "($NATIVE_S + 0.005) / ($FUSE_S + 0.005)")" \
  "nopassthrough_read_over_native=$(calc %.2f "($NATIVE_S + 0.005) / ($PLAIN_S + 0.005)")" \
  "fuse_reread_over_native=$(calc %.2f "($NATIVE_S + 0.005) / ($FUSE2_S + 0.005)") passthrough_opens=${PASSED:-0}" \
  "small_cold_over_native=$(calc %.2f "$NATIVE_SMALL_COLD_S / $SMALL_COLD_S")" \
  "small_warm_over_native=$(calc %.2f "$NATIVE_SMALL_WARM_S / $SMALL_WARM_S")" \
  "nopassthrough_small_cold_over_native=$(calc %.2f "$NATIVE_SMALL_COLD_S / $PLAIN_SMALL_COLD_S")" \
  "nopassthrough_small_warm_over_native=$(calc %.2f "$NATIVE_SMALL_WARM_S / $PLAIN_SMALL_WARM_S")" \
  "(fuse_read_s=$FUSE_S fuse_reread_s=$FUSE2_S nopassthrough_read_s=$PLAIN_S native_read_s=$NATIVE_S" \
  "small_cold_s=$SMALL_COLD_S small_warm_s=$SMALL_WARM_S native_small_cold_s=$NATIVE_SMALL_COLD_S native_small_warm_s=$NATIVE_SMALL_WARM_S files=$SMALL_FILES)"
