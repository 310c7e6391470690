#!/usr/bin/env bash
# Benchmark: AGENTS hosts pull the same multi-layer image (~IMAGE_MIB) at once with skopeo, each
# through its own dfdaemon in mirror mode, with the registry's upload (through damselfly-throttle),
# the supernode's and every agent's capped at the same rate B; baseline in the same run: the same
# AGENTS skopeo pulls straight from the (capped) registry. Also reads dfdaemon's RSS, idle and peak (the largest
# of the agents), and the supernode's peak (it seeds the three layers).
# Prints one line:
#   registry agents=8 image=300MiB ... p2p_s=.. direct_s=.. direct_over_p2p=.. registry_bytes_ratio=.. (direct: 8.00) rss_idle_mib=.. rss_peak_mib=.. sn_rss_peak_mib=..
# Env: AGENTS (8), IMAGE_MIB (300, split 1/2, 1/3, 1/6 over three layers), RATE_MIB (40), PROFILE
# (release; dev uses the tests' optimized dev build), BIN (a directory of built binaries: no build).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
AGENTS=${AGENTS:-8}
IMAGE_MIB=${IMAGE_MIB:-300}
RATE_MIB=${RATE_MIB:-40}
need_tools curl docker-registry skopeo umoci

build_bins
# As in p2p.sh: work in RAM when there is room, so the shared disk is not what is measured.
ram_workdir $(( (2 * AGENTS + 5) * IMAGE_MIB )) damselfly-bench
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/out" "$WORK/logs" "$WORK/registry"
RATE="${RATE_MIB}MiB"

# The image: three layers of random (incompressible) bytes.
umoci init --layout "$WORK/oci" >/dev/null
umoci new --image "$WORK/oci:app" >/dev/null
for part in 2 3 6; do
  umoci unpack --rootless --image "$WORK/oci:app" "$WORK/bundle" >/dev/null
  head -c "$(( (IMAGE_MIB << 20) / part ))" /dev/urandom > "$WORK/bundle/rootfs/layer-$part.bin"
  umoci repack --image "$WORK/oci:app" "$WORK/bundle" >/dev/null
  rm -rf "$WORK/bundle"
done

# The registry (distribution) on loopback, and a front capping what it sends at B.
REG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
  || shuf -i 20000-60000 -n 1)
cat > "$WORK/registry/config.yml" <<EOF
version: 0.1
log:
  accesslog:
    disabled: false
  level: warn
storage:
  filesystem:
    rootdirectory: $WORK/registry/data
http:
  addr: 127.0.0.1:$REG_PORT
EOF
docker-registry serve "$WORK/registry/config.yml" > "$WORK/registry.log" 2>&1 &
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$REG_PORT/v2/" >/dev/null && break; sleep 0.1; done
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$WORK/oci:app" \
  "docker://127.0.0.1:$REG_PORT/bench/app:v1" >/dev/null
"$BIN/damselfly-throttle" --upstream "127.0.0.1:$REG_PORT" --rate "$RATE" > "$WORK/throttle.addr" &
for _ in $(seq 100); do grep -q "stats on" "$WORK/throttle.addr" 2>/dev/null && break; sleep 0.1; done
REGISTRY=$(sed -n 's/^listening on //p' "$WORK/throttle.addr")
# Bytes in one pull: the manifest's config and layer sizes.
S=$(skopeo inspect --raw --tls-verify=false "docker://$REGISTRY/bench/app:v1" \
  | grep -o '"size":[0-9]*' | cut -d: -f2 | awk '{ s += $1 } END { printf "%d\n", s }')
STATS=$(sed -n 's/^stats on //p' "$WORK/throttle.addr")
# Bytes the registry sent to anyone (blobs, manifests, answers), counted by the capping front.
registry_bytes() {
  local n
  exec 3<>"/dev/tcp/${STATS%:*}/${STATS#*:}"
  read -r n <&3
  exec 3<&-
  echo "$n"
}

start_supernode --upload-rate "$RATE"
pids=()
for i in $(seq 1 "$AGENTS"); do
  # shellcheck disable=SC2046
  "$BIN/dfdaemon" --supernode "$GRPC" --registry-mirror "http://$REGISTRY" --data-dir "$WORK/agent$i" \
    --agent-socket "$WORK/agent$i.sock" --proxy-addr 127.0.0.1:0 --upload-addr 127.0.0.1:0 \
    --metrics-addr 127.0.0.1:0 --upload-rate "$RATE" $(tls_flags "agent$i") 2> "$WORK/logs/agent$i.log" &
  pids+=($!)
done
PROXIES=()
for i in $(seq 1 "$AGENTS"); do
  for _ in $(seq 100); do grep -q "dfdaemon ready" "$WORK/logs/agent$i.log" 2>/dev/null && break; sleep 0.1; done
  PROXIES+=("$(sed -n 's/.*dfdaemon ready proxy=\([0-9.:]*\).*/\1/p' "$WORK/logs/agent$i.log" | head -1)")
done
sleep 1
rss_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
IDLE=0
for p in "${pids[@]}"; do r=$(rss_kib "$p" VmRSS); [ "$r" -gt "$IDLE" ] && IDLE=$r; done

# P2P: every host pulls through its own agent.
before=$(registry_bytes)
t0=$(now); jobs_=()
for i in $(seq 1 "$AGENTS"); do
  skopeo --insecure-policy copy -q --src-tls-verify=false "docker://${PROXIES[$((i - 1))]}/bench/app:v1" \
    "oci:$WORK/out/p2p$i:app" > "$WORK/logs/skopeo-p2p$i.log" 2>&1 &
  jobs_+=($!)
done
for j in "${jobs_[@]}"; do wait "$j" || { echo "bench: a pull through dfdaemon failed" >&2; cat "$WORK"/logs/skopeo-p2p*.log >&2; exit 1; }; done
t1=$(now)
P2P_BYTES=$(( $(registry_bytes) - before ))
PEAK=0
for p in "${pids[@]}"; do r=$(rss_kib "$p" VmHWM); [ "$r" -gt "$PEAK" ] && PEAK=$r; done
SN_PEAK=$(rss_kib "$SN_PID" VmHWM)
rm -rf "$WORK"/out/p2p*

# Baseline: the same pulls straight from the registry.
before=$(registry_bytes)
t2=$(now); jobs_=()
for i in $(seq 1 "$AGENTS"); do
  skopeo --insecure-policy copy -q --src-tls-verify=false "docker://$REGISTRY/bench/app:v1" \
    "oci:$WORK/out/direct$i:app" > "$WORK/logs/skopeo-direct$i.log" 2>&1 &
  jobs_+=($!)
done
for j in "${jobs_[@]}"; do wait "$j" || { echo "bench: a direct pull failed" >&2; exit 1; }; done
t3=$(now)
DIRECT_BYTES=$(( $(registry_bytes) - before ))

p2p=$(calc %.2f "$t1 - $t0")
direct=$(calc %.2f "$t3 - $t2")
echo "registry agents=$AGENTS image=${IMAGE_MIB}MiB layers=3 rate=${RATE_MIB}MiB/s fs=$FS" \
  "bound_s=$(calc %.2f "$S / 1048576 / $RATE_MIB") p2p_s=$p2p direct_s=$direct direct_over_p2p=$(calc %.2f "$direct / $p2p")" \
  "registry_bytes_ratio=$(calc %.2f "$P2P_BYTES / $S") (direct: $(calc %.2f "$DIRECT_BYTES / $S"))" \
  "rss_idle_mib=$(calc %.1f "$IDLE / 1024") rss_peak_mib=$(calc %.1f "$PEAK / 1024")" \
  "sn_rss_peak_mib=$(calc %.1f "$SN_PEAK / 1024")"
