#!/usr/bin/env bash
# Damselfly demo of the main job, on loopback, no outside network: builds the binaries, starts a
# private registry (TLS with its own CA, htpasswd auth) holding a test image, behind a front that
# caps what it sends at RATE_MIB and counts it; one supernode and HOSTS agents (each its own
# process with its own store, as on separate hosts, uploads capped at the same rate). Every host
# pulls the image at once through its agent (skopeo, agent as registry mirror); then, as root, one
# host starts a container lazily (containerd + dfsnapshotter: nothing downloaded up front) and
# another does a full `ctr images pull` + `ctr run` from the registry. Prints per host: time,
# bytes from peers / supernode / registry; the registry's bytes against the image's size; lazy
# start against full pull.
#   bash scripts/demo.sh                       # 3 hosts, 64 MiB image, 40 MiB/s
#   HOSTS=6 IMAGE_MIB=256 bash scripts/demo.sh
#   bash scripts/demo.sh files                 # the file demo (scripts/demo-files.sh)
# Env: HOSTS (3), IMAGE_MIB (64), RATE_MIB (40), PROFILE (release), BIN (built binaries: no build).
# (The demo's own registry password is passed to skopeo and ctr as arguments, as their baselines
# take it; dfsnapshotter reads it from stdin.)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = files ]; then exec bash scripts/demo-files.sh; fi
. scripts/lib.sh
HOSTS=${HOSTS:-3}
IMAGE_MIB=${IMAGE_MIB:-64}
RATE_MIB=${RATE_MIB:-40}
LAZY=$([ "$(id -u)" = 0 ] && echo 1 || echo 0)
need_tools curl python3 docker-registry htpasswd:apache2-utils skopeo umoci busybox:busybox-static
[ "$LAZY" = 0 ] || need_tools containerd ctr:containerd runc

echo "==> building (release)"
build_bins
WORK=$(mktemp -d /tmp/damselfly-demo.XXXXXX)
cleanup() {
  for s in "$WORK"/*/containerd.sock; do
    [ -S "$s" ] && ctr -a "$s" -n demo tasks ls -q 2>/dev/null | xargs -r -n1 ctr -a "$s" -n demo tasks kill -s 9 2>/dev/null
  done
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  grep -o "$WORK[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  pkill -f "dfsnapshotter fuse-manager --root $WORK" 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/logs" "$WORK/registry" "$WORK/hosts.d"
RATE="${RATE_MIB}MiB"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
fail() { echo "demo: $1" >&2; [ -z "${2:-}" ] || tail -20 "$2" >&2; exit 1; }

echo "==> a private registry (TLS, htpasswd) with a ${IMAGE_MIB} MiB image"
"$BIN/supernode" certs --dir "$WORK/registry-pki" --name registry --san 127.0.0.1 > /dev/null
PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
htpasswd -Bbn demo "$PASS" > "$WORK/registry/htpasswd" 2> /dev/null
umoci init --layout "$WORK/oci" > /dev/null
umoci new --image "$WORK/oci:app" > /dev/null
base() { mkdir -p "$1/bin"; cp "$(command -v busybox)" "$1/bin/busybox"; ln -s busybox "$1/bin/sh"; echo "hello from damselfly" > "$1/hello"; }
data() { head -c $(( (IMAGE_MIB << 20) / 2 )) /dev/urandom > "$1/data-$(date +%s%N).bin"; }
oci_layer base; oci_layer data; oci_layer data
umoci config --image "$WORK/oci:app" --config.cmd /bin/sh > /dev/null
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
  tls:
    certificate: $WORK/registry-pki/registry.crt
    key: $WORK/registry-pki/registry.key
auth:
  htpasswd:
    realm: demo
    path: $WORK/registry/htpasswd
YML
docker-registry serve "$WORK/registry/config.yml" > "$WORK/logs/registry.log" 2>&1 &
CA="$WORK/registry-pki/ca.crt"
for _ in $(seq 100); do curl -s --cacert "$CA" -o /dev/null "https://127.0.0.1:$REG_PORT/v2/" && break; sleep 0.1; done
mkdir -p "$WORK/certs.d" && cp "$CA" "$WORK/certs.d/ca.crt"
skopeo --insecure-policy copy -q --dest-cert-dir "$WORK/certs.d" --dest-creds "demo:$PASS" \
  "oci:$WORK/oci:app" "docker://127.0.0.1:$REG_PORT/demo/app:v1" > /dev/null \
  || fail "pushing the image failed" "$WORK/logs/registry.log"
"$BIN/damselfly-throttle" --upstream "127.0.0.1:$REG_PORT" --rate "$RATE" > "$WORK/throttle.addr" &
for _ in $(seq 100); do grep -q "stats on" "$WORK/throttle.addr" 2>/dev/null && break; sleep 0.1; done
REGISTRY=$(sed -n 's/^listening on //p' "$WORK/throttle.addr")
STATS=$(sed -n 's/^stats on //p' "$WORK/throttle.addr")
registry_bytes() { # bytes the registry has sent to anyone, counted by the capping front
  local n
  exec 3<>"/dev/tcp/${STATS%:*}/${STATS#*:}"
  read -r n <&3
  exec 3<&-
  echo "$n"
}
S=$(skopeo inspect --raw --cert-dir "$WORK/certs.d" --creds "demo:$PASS" "docker://$REGISTRY/demo/app:v1" \
  | grep -o '"size":[0-9]*' | cut -d: -f2 | awk '{ s += $1 } END { printf "%d\n", s }')
# containerd and dfsnapshotter find the registry's CA where containerd users keep it.
mkdir -p "$WORK/hosts.d/$REGISTRY"
printf 'server = "https://%s"\n[host."https://%s"]\n  ca = "%s"\n' "$REGISTRY" "$REGISTRY" "$CA" \
  > "$WORK/hosts.d/$REGISTRY/hosts.toml"

start_supernode --upload-rate "$RATE" --upstream-ca "$CA"
echo "==> supernode at $GRPC; $HOSTS hosts, each an agent (registry mirror) with its own store"
for i in $(seq 1 "$HOSTS"); do
  mkdir -p "$WORK/host$i"
  # shellcheck disable=SC2046
  "$BIN/dfdaemon" --supernode "$GRPC" --registry-mirror "https://$REGISTRY" --upstream-ca "$CA" \
    --allow-address 127.0.0.0/8 --data-dir "$WORK/host$i/agent" --agent-socket "$WORK/host$i/agent.sock" \
    --proxy-addr 127.0.0.1:0 --upload-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
    --upload-rate "$RATE" $(tls_flags "host$i") 2> "$WORK/logs/agent$i.log" &
done
for i in $(seq 1 "$HOSTS"); do
  for _ in $(seq 100); do grep -q "dfdaemon ready" "$WORK/logs/agent$i.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "dfdaemon ready" "$WORK/logs/agent$i.log" || fail "agent $i did not start" "$WORK/logs/agent$i.log"
  sed -n 's/.*dfdaemon ready proxy=\([0-9.:]*\).*/\1/p' "$WORK/logs/agent$i.log" | head -1 > "$WORK/host$i/proxy"
  sed -n 's/.*dfdaemon ready.* metrics=\([0-9.:]*\).*/\1/p' "$WORK/logs/agent$i.log" | head -1 > "$WORK/host$i/metrics"
done
from() { # from HOST SOURCE: bytes the host's agent downloaded from SOURCE (peer, supernode, origin)
  curl -s "http://$(cat "$WORK/host$1/metrics")/metrics" \
    | awk -v f="from=\"$2\"" '/^damselfly_peer_download_bytes_total/ && index($0, f) { s += $2 } END { printf "%d\n", s }'
}

echo "==> every host pulls demo/app:v1 through its agent at once (skopeo)"
before=$(registry_bytes)
pulls=()
for i in $(seq 1 "$HOSTS"); do
  (
    t0=$(now)
    skopeo --insecure-policy copy -q --src-tls-verify=false --src-creds "demo:$PASS" \
      "docker://$(cat "$WORK/host$i/proxy")/demo/app:v1" "oci:$WORK/host$i/pulled:app" \
      > "$WORK/logs/pull$i.log" 2>&1
    calc %.2f "$(now) - $t0" > "$WORK/host$i/time"
  ) &
  pulls+=($!)
done
for i in $(seq 1 "$HOSTS"); do
  wait "${pulls[$((i - 1))]}" || fail "host$i's pull through its agent failed" "$WORK/logs/pull$i.log"
done
PULLED=$(( $(registry_bytes) - before ))
WANT=$(cd "$WORK/host1/pulled/blobs/sha256" && ls | sort | tr '\n' ' ')

echo
printf '%-7s %7s %12s %15s %14s %s\n' host time_s from_peers from_supernode from_registry image
for i in $(seq 1 "$HOSTS"); do
  same=$([ "$(cd "$WORK/host$i/pulled/blobs/sha256" && ls | sort | tr '\n' ' ')" = "$WANT" ] && echo ok || echo DIFFERENT)
  printf '%-7s %7s %12s %15s %14s %s\n' "host$i" "$(cat "$WORK/host$i/time")" "$(from "$i" peer)" \
    "$(from "$i" supernode)" "$(from "$i" origin)" "$same"
done
echo
echo "registry sent $PULLED bytes for $HOSTS pulls of a $S-byte image" \
  "($(calc %.2f "$PULLED / $S") x the image; straight from the registry: $HOSTS.00 x)"

if [ "$LAZY" = 0 ]; then
  echo "(lazy start skipped: containerd and FUSE mounts need root)"
  exit 0
fi

# start_containerd HOST [SNAPSHOTTER_SOCKET]: a containerd of the host's own.
start_containerd() {
  local d="$WORK/$1" cfg
  cfg="version = 2
root = \"$d/containerd/root\"
state = \"$d/containerd/state\"
disabled_plugins = [\"io.containerd.grpc.v1.cri\"]
[grpc]
  address = \"$d/containerd.sock\""
  if [ -n "${2:-}" ]; then
    cfg="$cfg
[proxy_plugins]
  [proxy_plugins.damselfly]
    type = \"snapshot\"
    address = \"$2\""
  fi
  mkdir -p "$d/containerd" && echo "$cfg" > "$d/containerd/config.toml"
  containerd --config "$d/containerd/config.toml" > "$WORK/logs/$1-containerd.log" 2>&1 &
  for _ in $(seq 200); do [ -S "$d/containerd.sock" ] && break; sleep 0.1; done
}
IMAGE="$REGISTRY/demo/app:v1"

echo
echo "==> host1 starts a container lazily (dfsnapshotter: layers mounted from their index, read through the agent)"
"$BIN/dfsnapshotter" --root "$WORK/host1/snapshots" --socket "$WORK/host1/snapshotter.sock" \
  --metrics-addr "127.0.0.1:$(free_port)" --agent-socket "$WORK/host1/agent.sock" \
  --hosts-dir "$WORK/hosts.d" 2> "$WORK/logs/host1-snapshotter.log" &
for _ in $(seq 100); do [ -S "$WORK/host1/snapshotter.sock" ] && break; sleep 0.1; done
start_containerd host1 "$WORK/host1/snapshotter.sock"
t0=$(now)
echo "$PASS" | "$BIN/dfsnapshotter" pull --containerd "$WORK/host1/containerd.sock" -n demo \
  --root "$WORK/host1/snapshots" --hosts-dir "$WORK/hosts.d" --user demo --password-stdin "$IMAGE" > "$WORK/logs/lazy-pull.log" 2>&1 \
  || fail "dfsnapshotter pull failed" "$WORK/logs/lazy-pull.log"
LAZY_PULL_S=$(calc %.2f "$(now) - $t0")
grep -q "could not be mounted lazily" "$WORK/logs/lazy-pull.log" && fail "layers were not mounted lazily" "$WORK/logs/lazy-pull.log"
ctr -a "$WORK/host1/containerd.sock" -n demo run --rm --snapshotter damselfly "$IMAGE" lazy /bin/sh -c 'cat /hello' \
  > "$WORK/logs/lazy-run.log" 2>&1 || fail "the lazy container did not run" "$WORK/logs/lazy-run.log"
LAZY_S=$(calc %.2f "$(now) - $t0")
grep -q "hello from damselfly" "$WORK/logs/lazy-run.log" || fail "the lazy container printed nothing" "$WORK/logs/lazy-run.log"

echo "==> host2 does a full pull and start from the registry (ctr images pull + ctr run, overlayfs)"
start_containerd host2
t0=$(now)
ctr -a "$WORK/host2/containerd.sock" -n demo images pull --hosts-dir "$WORK/hosts.d" --user "demo:$PASS" "$IMAGE" \
  > "$WORK/logs/full-pull.log" 2>&1 || fail "ctr images pull failed" "$WORK/logs/full-pull.log"
ctr -a "$WORK/host2/containerd.sock" -n demo run --rm "$IMAGE" full /bin/sh -c 'cat /hello' \
  > "$WORK/logs/full-run.log" 2>&1 || fail "the full container did not run" "$WORK/logs/full-run.log"
FULL_S=$(calc %.2f "$(now) - $t0")
echo
echo "lazy start $LAZY_S s (pull $LAZY_PULL_S s) (container printed: $(cat "$WORK/logs/lazy-run.log")) vs full pull + start $FULL_S s" \
  "($(calc %.1f "$FULL_S / $LAZY_S") x)"
