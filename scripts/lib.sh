# Shared by scripts/demo.sh and tests/bench/*.sh: build, install missing Debian tools, start the
# test origin and a supernode on loopback with ephemeral ports.

# need_tools CMD[:PACKAGE]...: installs the Debian package (default: named like the command) of every
# missing command when run as root.
need_tools() {
  local missing=() t
  for t in "$@"; do command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "missing tools: ${missing[*]} (install them, or run as root)" >&2
    return 1
  fi
}

# start_origin DIR [ARGS...]: sets ORIGIN (host:port) and ORIGIN_PID; logs in $WORK/origin.log
start_origin() {
  local dir=$1; shift
  "$BIN/damselfly-origin" --dir "$dir" "$@" > "$WORK/origin.addr" 2> "$WORK/origin.log" &
  ORIGIN_PID=$!
  for _ in $(seq 100); do grep -q listening "$WORK/origin.addr" 2>/dev/null && break; sleep 0.1; done
  ORIGIN=$(sed -n 's/^listening on //p' "$WORK/origin.addr")
  [ -n "$ORIGIN" ] || { echo "origin did not start" >&2; cat "$WORK/origin.log" >&2; return 1; }
}

# tls_flags NAME [IP]: the --tls-* flags of a new host certificate NAME (SAN IP, default 127.0.0.1)
# under the cluster CA in $WORK/pki, both made by `supernode certs`; `--plaintext` when PLAINTEXT=1
# (the benchmarks' security-off baseline).
tls_flags() {
  if [ "${PLAINTEXT:-0}" = 1 ]; then echo --plaintext; return; fi
  "$BIN/supernode" certs --dir "$WORK/pki" --name "$1" --san "${2:-127.0.0.1}" > /dev/null
  echo --tls-ca "$WORK/pki/ca.crt" --tls-cert "$WORK/pki/$1.crt" --tls-key "$WORK/pki/$1.key"
}

# start_supernode [ARGS...]: sets GRPC and HTTP (host:port) and SN_PID; logs in $WORK/supernode.log.
# Origins here are on loopback, which a supernode's origin policy refuses unless allowed.
start_supernode() {
  : > "$WORK/supernode.log"   # a restart must not find the last one's "ready"
  # shellcheck disable=SC2046 # tls_flags prints separate words (paths without spaces)
  "$BIN/supernode" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --data-dir "$WORK/supernode" \
    --allow-address 127.0.0.0/8 $(tls_flags supernode) "$@" \
    2> "$WORK/supernode.log" &
  SN_PID=$!
  for _ in $(seq 100); do grep -q "supernode ready" "$WORK/supernode.log" 2>/dev/null && break; sleep 0.1; done
  GRPC=$(sed -n 's/.*grpc_addr=\([0-9.:]*\).*/\1/p' "$WORK/supernode.log" | head -1)
  HTTP=$(sed -n 's/.*http_addr=\([0-9.:]*\).*/\1/p' "$WORK/supernode.log" | head -1)
  [ -n "$GRPC" ] || { echo "supernode did not start" >&2; cat "$WORK/supernode.log" >&2; return 1; }
}

# build_bins: sets BIN, the directory of the workspace's binaries: $BIN if given (nothing is built),
# else built with PROFILE (release; `dev` is the tests' optimized dev build, target/debug).
build_bins() {
  if [ -z "${BIN:-}" ]; then
    PROFILE=${PROFILE:-release}
    cargo build --profile "$PROFILE" --locked --workspace --bins -q
    BIN=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
  fi
  BIN=$(realpath "$BIN")
}

# ram_workdir NEED_MIB NAME: sets WORK to a new directory NAME.XXXXXX, in RAM (/dev/shm) when it has
# NEED_MIB free, else under /tmp (FS says which: tmpfs or disk). Emulated hosts would each have a
# disk of their own; on one machine they would measure the shared disk instead.
ram_workdir() {
  local free
  free=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 { print $4 }')
  if [ -n "$free" ] && [ "$free" -gt "$1" ]; then FS=tmpfs; WORK=$(mktemp -d "/dev/shm/$2.XXXXXX")
  else FS=disk; WORK=$(mktemp -d "/tmp/$2.XXXXXX"); fi
}

# check FILE...: every file has sha256 $WANT, or the benchmark stops naming the first that differs.
check() {
  local f
  for f in "$@"; do
    [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$WANT" ] || { echo "bench: $f differs" >&2; exit 1; }
  done
}

# oci_layer FN [ARGS...]: adds a layer to the OCI image $WORK/oci:app holding what `FN ARGS ROOTFS`
# writes into the unpacked rootfs (umoci, no daemon).
oci_layer() {
  umoci unpack --rootless --image "$WORK/oci:app" "$WORK/bundle" > /dev/null
  "$@" "$WORK/bundle/rootfs"
  umoci repack --image "$WORK/oci:app" "$WORK/bundle" > /dev/null
  rm -rf "$WORK/bundle"
}

origin_bytes() { curl -s "http://$ORIGIN/_stats" | sed 's/.*"bytes": \([0-9]*\).*/\1/'; }

now() { date +%s.%N; }
# cpu_s PID: CPU seconds (user + system) the running process PID has used so far.
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / t }' "/proc/$1/stat"; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
