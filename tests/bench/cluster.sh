#!/usr/bin/env bash
# Benchmark: HOSTS hosts in network namespaces fetch one SIZE_MIB file at once. Every host, the origin
# and the supernode has its own link to a bridge, shaped to RATE_MBIT in each direction with DELAY_MS
# of latency per direction (tests/bench/netns.sh). Three runs on the same links: Damselfly (an agent
# on every host, dfget through it, one supernode, cluster TLS), a BitTorrent swarm (aria2 on every host,
# opentracker, an aria2 seeder at the origin) and every host straight from the origin (curl). With
# RACKS > 1 the hosts sit in racks whose bridges reach the core (origin, supernode) over one uplink
# each, shaped to RACK_MBIT. Prints one line:
#   cluster hosts=16 racks=1 size=128MiB rate=100Mbit delay=0ms bound_s=.. p2p_p50_s=.. p2p_p99_s=..
#   p2p_over_bound=.. bt_over_bound=.. direct_over_bound=.. bt_over_p2p=.. origin_bytes_ratio=..
#   host_upload_ratio=.. rack_in_over_size=.. cross_rack_pieces=..
# With SUPERNODES > 1 the supernodes form a cluster (each replicates its tasks' metadata to the next
# in their rendezvous order); KILL_OWNER_AT kills -9 the task's owner that many bound_s into the
# Damselfly run, CHAOS_AT kills -9 a quarter of the hosts (agent and dfget) at random then; the line
# adds supernodes=, killed_hosts= and takeover_pieces= (pieces the next owner got back from peers),
# and the times and ratios are over the hosts that were not killed.
# bound_s = S/B, the time for one host to receive S through its own link; *_over_bound compare the
# last host to finish with it. origin_bytes_ratio: bytes the origin sent in the Damselfly run / S.
# host_upload_ratio: bytes the hosts sent in the Damselfly run / (HOSTS × S), the share of the
# content that hosts served each other. rack_in_over_size: most bytes that entered one rack over its
# uplink in the Damselfly run / S (one copy per rack would be 1.0); cross_rack_pieces: piece
# assignments to a parent outside the peer's rack (the supernode's metric; one per piece and rack).
# Env: HOSTS (16), SIZE_MIB (128), RATE_MBIT (100), DELAY_MS (0: needs netem, which these machines'
# kernel lacks), RACKS (1), RACK_MBIT (2 × RATE_MBIT), LOCATIONS (1: each dfget gives its rack as
# --location; 0: none, the scheduler's choice ignores racks), AGENT (1: every host runs dfdaemon and
# dfget asks it; 0: dfget's embedded peer, which leaves once it has the file),
# SWARM (1: run the BitTorrent swarm), DIRECT (1: run the direct baseline, which takes HOSTS × bound),
# SUPERNODE_TOML (lines of the supernode's config, e.g. 'piece_size = "1MiB"'), DFGET_ARGS (extra
# dfget flags), SUPERNODES (1..3), KILL_OWNER_AT, CHAOS_AT (fractions of bound_s; unset: no kill),
# KEEP_WORK=1 (keep the logs), PROFILE (release; dev uses the tests' optimized dev
# build), BIN (a directory of built binaries: no build). Needs root (namespaces); installs curl,
# iproute2, aria2, opentracker and mktorrent.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/bench/netns.sh
HOSTS=${HOSTS:-16}
SIZE_MIB=${SIZE_MIB:-128}
RATE_MBIT=${RATE_MBIT:-100}
DELAY_MS=${DELAY_MS:-0}
RACKS=${RACKS:-1}
RACK_MBIT=${RACK_MBIT:-$((2 * RATE_MBIT))}
LOCATIONS=${LOCATIONS:-1}
AGENT=${AGENT:-1}
SWARM=${SWARM:-1}
DIRECT=${DIRECT:-1}
SUPERNODES=${SUPERNODES:-1}
[ "$SUPERNODES" -ge 1 ] && [ "$SUPERNODES" -le 3 ] || { echo "cluster.sh: SUPERNODES must be 1..3" >&2; exit 1; }
if [ -n "${KILL_OWNER_AT:-}" ] && [ "$SUPERNODES" -lt 2 ]; then
  echo "cluster.sh: KILL_OWNER_AT needs SUPERNODES >= 2 (someone must take over)" >&2; exit 1
fi
[ "$(id -u)" = 0 ] || { echo "cluster.sh: needs root (network namespaces)" >&2; exit 1; }
[ "$HOSTS" -ge 1 ] && [ "$HOSTS" -le 250 ] || { echo "cluster.sh: HOSTS must be 1..250" >&2; exit 1; }
need_tools curl ip:iproute2 tc:iproute2 aria2c:aria2 opentracker mktorrent

build_bins
# One run's files at a time.
ram_workdir $(( (2 * HOSTS + 3) * SIZE_MIB )) damselfly-cluster
cleanup() {
  kill $(jobs -p) 2>/dev/null || true; ns_cleanup; wait 2>/dev/null || true
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "cluster.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$WORK/www" "$WORK/logs"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$WORK/www/blob"
WANT=$(sha256sum "$WORK/www/blob" | cut -d' ' -f1)
S=$((SIZE_MIB << 20))

# wait_for WHAT SECONDS CMD...: polls CMD every 0.1 s until it succeeds, or fails naming WHAT.
wait_for() {
  local what=$1 secs=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "cluster.sh: timed out waiting for $what" >&2; return 1; }
    sleep 0.1
  done
}

ORIGIN_IP=10.77.0.1
# Supernode N (1-based) is namespace sn (N=1) or snN, at 10.77.0.(N+1).
sn_ns() { if [ "$1" = 1 ]; then echo sn; else echo "sn$1"; fi; }
sn_ip() { echo "10.77.0.$(( $1 + 1 ))"; }
SN_LIST=$(for n in $(seq 1 "$SUPERNODES"); do printf '%s:8002,' "$(sn_ip "$n")"; done); SN_LIST=${SN_LIST%,}
host_ip() { echo "10.77.1.$1"; }
host_rack() { echo $(( ($1 - 1) % RACKS + 1 )); }
# The --location a host's dfget gives: its rack, unless LOCATIONS=0 (or there is one rack).
host_location() { if [ "$RACKS" -gt 1 ] && [ "$LOCATIONS" = 1 ]; then echo "rack-$(host_rack "$1")"; fi; }
ns_init
ns_add_host origin "$ORIGIN_IP" br0 "$RATE_MBIT" "$DELAY_MS"
for n in $(seq 1 "$SUPERNODES"); do ns_add_host "$(sn_ns "$n")" "$(sn_ip "$n")" br0 "$RATE_MBIT" "$DELAY_MS"; done
if [ "$RACKS" -gt 1 ]; then
  for r in $(seq 1 "$RACKS"); do ns_add_rack "$r" "$RACK_MBIT" "$DELAY_MS"; done
fi
for i in $(seq 1 "$HOSTS"); do
  br=br0
  if [ "$RACKS" -gt 1 ]; then br=br$(host_rack "$i"); fi
  ns_add_host "h$i" "$(host_ip "$i")" "$br" "$RATE_MBIT" "$DELAY_MS"
done

ORIGIN=$ORIGIN_IP:8080
URL="http://$ORIGIN/files/blob"
ns_exec origin "$BIN/damselfly-origin" --dir "$WORK/www" --addr "$ORIGIN" \
  > "$WORK/logs/origin.out" 2> "$WORK/logs/origin.log" &
wait_for "the origin" 10 grep -q listening "$WORK/logs/origin.out"
origin_sent() { ns_exec origin curl -sf "http://$ORIGIN/_stats" | sed 's/.*"bytes": \([0-9]*\).*/\1/'; }
printf '%s\n' "${SUPERNODE_TOML:-}" > "$WORK/supernode.toml"
declare -a SN_DEAD
for n in $(seq 1 "$SUPERNODES"); do
  ip=$(sn_ip "$n")
  cluster=()
  if [ "$SUPERNODES" -gt 1 ]; then cluster=(--cluster-address "$ip:8002" --cluster-supernode "$SN_LIST"); fi
  # (Certificates one at a time: the first creates the CA.)
  read -r -a tls <<< "$(tls_flags "supernode$n" "$ip")"
  ns_exec "$(sn_ns "$n")" "$BIN/supernode" --grpc-addr "$ip:8002" --http-addr "$ip:8001" \
    --data-dir "$WORK/supernode$n" --allow-address 10.77.0.0/16 "${tls[@]}" \
    --config "$WORK/supernode.toml" "${cluster[@]}" 2> "$WORK/logs/supernode$n.log" &
done
for n in $(seq 1 "$SUPERNODES"); do
  wait_for "supernode $n" 30 grep -q "supernode ready" "$WORK/logs/supernode$n.log"
done
# sn_metric NAME: the sum of metric NAME over the supernodes still running.
sn_metric() {
  local n sum=0 v
  for n in $(seq 1 "$SUPERNODES"); do
    [ -z "${SN_DEAD[n]:-}" ] || continue
    if [ "${PLAINTEXT:-0}" = 1 ]; then v=$(ns_exec "$(sn_ns "$n")" curl -sf "http://$(sn_ip "$n"):8001/metrics"); else
      v=$(ns_exec "$(sn_ns "$n")" curl -sf --cacert "$WORK/pki/ca.crt" --cert "$WORK/pki/supernode$n.crt" \
        --key "$WORK/pki/supernode$n.key" "https://$(sn_ip "$n"):8001/metrics"); fi
    v=$(echo "$v" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }')
    sum=$(calc %.0f "$sum + $v")
  done
  echo "$sum"
}

# run_hosts KIND: starts host_cmd KIND I on every host at once; each writes $WORK/done/KIND-hI
# (its finish time) when it succeeds. Sets T0 and HOST_PIDS.
run_hosts() {
  local kind=$1 i
  mkdir -p "$WORK/done" "$WORK/out"
  HOST_PIDS=()
  T0=$(now)
  for i in $(seq 1 "$HOSTS"); do
    ( host_cmd "$kind" "$i" > "$WORK/logs/$kind-h$i.log" 2>&1 && now > "$WORK/done/$kind-h$i" ) &
    HOST_PIDS+=($!)
  done
}

# wait_hosts KIND: until every host's command of KIND has exited; fails if one failed (but for the
# hosts in KILLED).
declare -A KILLED=()
wait_hosts() {
  local i
  for i in $(seq 1 "$HOSTS"); do
    wait "${HOST_PIDS[i - 1]}" || [ -n "${KILLED[$i]:-}" ] ||
      { echo "cluster.sh: host h$i failed $1" >&2; tail -n 5 "$WORK/logs/$1-h$i.log" >&2; exit 1; }
  done
}

# survivors DIR: the files of hosts not in KILLED under DIR (out/hI).
survivors() { local i; for i in $(seq 1 "$HOSTS"); do [ -n "${KILLED[$i]:-}" ] || echo "$1/h$i"; done; }

# at FRACTION: returns once FRACTION x bound has passed since T0.
at() { local t; t=$(calc %.3f "$T0 + $1 * $bound"); while [ "$(calc %d "$(now) < $t")" = 1 ]; do sleep 0.05; done; }

# chaos_and_kill: kills -9 the task's owner at KILL_OWNER_AT and a quarter of the hosts at CHAOS_AT
# (either may be unset), in the order they fall.
chaos_and_kill() {
  local events=() e n i
  [ -z "${KILL_OWNER_AT:-}" ] || events+=("$KILL_OWNER_AT owner")
  [ -z "${CHAOS_AT:-}" ] || events+=("$CHAOS_AT hosts")
  while read -r e; do
    [ -n "$e" ] || continue
    at "${e% *}"
    case ${e#* } in
      owner)
        for n in $(seq 1 "$SUPERNODES"); do
          if grep -q "supernode::seed: seeding" "$WORK/logs/supernode$n.log"; then
            SN_DEAD[n]=1
            ip netns pids "$(ns_name "$(sn_ns "$n")")" | xargs -r kill -9
            echo "cluster.sh: killed supernode $n (the owner)" >&2; break
          fi
        done ;;
      hosts)
        for i in $(seq 1 "$HOSTS" | shuf -n $(( (HOSTS + 3) / 4 ))); do
          KILLED[$i]=1
          ip netns pids "$(ns_name "h$i")" | xargs -r kill -9
        done
        echo "cluster.sh: killed hosts ${!KILLED[*]}" >&2 ;;
    esac
  done < <(printf '%s\n' "${events[@]}" | sort -n)
}

# finish_times KIND: seconds from T0 to each host's finish, sorted.
finish_times() {
  local f
  for f in "$WORK"/done/"$1"-h*; do calc %.3f "$(cat "$f") - $T0"; echo; done | sort -n
}

# all_done KIND: whether every host has finished KIND.
all_done() { [ "$(find "$WORK/done" -name "$1-h*" | wc -l)" -ge "$HOSTS" ]; }

# await KIND SECONDS: until every host has finished KIND.
await() { wait_for "$HOSTS hosts to finish $1 (see $WORK/logs)" "$2" all_done "$1"; }

bound=$(calc %.3f "$S * 8 / ($RATE_MBIT * 1000000)")
DEADLINE=$(calc %d "60 + 20 * $bound")
declare -a DF_TLS
for i in $(seq 1 "$HOSTS"); do DF_TLS[i]=$(tls_flags "h$i" "$(host_ip "$i")"); done

host_cmd() {
  local i=$2
  case $1 in
    p2p)
      # shellcheck disable=SC2086 # DF_TLS holds separate words
      if [ "$AGENT" = 1 ]; then
        # shellcheck disable=SC2086 # DFGET_ARGS holds separate words
        ns_exec "h$i" "$BIN/dfget" "$URL" -O "$WORK/out/h$i" --agent "$WORK/agents/h$i.sock" -q ${DFGET_ARGS:-}
      else
        ns_exec "h$i" "$BIN/dfget" "$URL" -O "$WORK/out/h$i" --no-agent --data-dir "$WORK/peer/h$i" \
          --supernode "$SN_LIST" ${DF_TLS[i]} --location "$(host_location "$i")" -q ${DFGET_ARGS:-}
      fi ;;
    bt)
      ns_exec "h$i" aria2c "${ARIA[@]}" --dir "$WORK/bt/h$i" --on-bt-download-complete="$WORK/bt-done" \
        "$WORK/blob.torrent" ;;
    direct) ns_exec "h$i" curl -sf -o "$WORK/out/h$i" "$URL" ;;
  esac
}

# Damselfly: with AGENT=1 every host runs its agent (dfdaemon, which goes on serving what it holds,
# as hosts do) and dfget asks it; with AGENT=0 dfget's embedded peer leaves once it has the file.
AGENT_PIDS=()
if [ "$AGENT" = 1 ]; then
  mkdir -p "$WORK/agents"
  for i in $(seq 1 "$HOSTS"); do
    # shellcheck disable=SC2086 # DF_TLS holds separate words
    ns_exec "h$i" "$BIN/dfdaemon" --supernode "$SN_LIST" --data-dir "$WORK/peer/h$i" \
      --agent-socket "$WORK/agents/h$i.sock" --location "$(host_location "$i")" ${DF_TLS[i]} \
      2> "$WORK/logs/agent-h$i.log" &
    AGENT_PIDS+=($!)
  done
  for i in $(seq 1 "$HOSTS"); do
    wait_for "the agent of h$i" 30 grep -q "dfdaemon ready" "$WORK/logs/agent-h$i.log"
  done
fi
rack_before=()
if [ "$RACKS" -gt 1 ]; then for r in $(seq 1 "$RACKS"); do rack_before[r]=$(rack_bytes_in "$r"); done; fi
tx_before=0; for i in $(seq 1 "$HOSTS"); do tx_before=$((tx_before + $(host_tx_bytes "h$i"))); done
run_hosts p2p
chaos_and_kill
wait_hosts p2p
mapfile -t P2P < <(finish_times p2p)
mapfile -t SURVIVORS < <(survivors "$WORK/out")
check "${SURVIVORS[@]}"
P2P_ORIGIN=$(origin_sent)
# Assignments whose parent sat outside the peer's rack (the supernodes' metric), pieces a
# supernode that took the task over got back from peers.
CROSS=$(sn_metric damselfly_supernode_cross_location_assignments_total)
TAKEOVER=$(sn_metric 'damselfly_supernode_rebuilt_pieces_total{from="peer"}')
tx=0; for i in $(seq 1 "$HOSTS"); do tx=$((tx + $(host_tx_bytes "h$i"))); done
rack_max=0
if [ "$RACKS" -gt 1 ]; then
  for r in $(seq 1 "$RACKS"); do
    in=$(( $(rack_bytes_in "$r") - rack_before[r] ))
    if [ "$in" -gt "$rack_max" ]; then rack_max=$in; fi
  done
fi
if [ "${#AGENT_PIDS[@]}" -gt 0 ]; then kill "${AGENT_PIDS[@]}" 2>/dev/null || true; wait "${AGENT_PIDS[@]}" 2>/dev/null || true; fi
rm -rf "$WORK/out" "$WORK/peer"
p2p_last=${P2P[-1]}
done_hosts=${#P2P[@]}
p2p_p50=${P2P[$(( (done_hosts - 1) / 2 ))]}
p2p_p99=${P2P[$(( (done_hosts * 99 + 99) / 100 - 1 ))]}

# BitTorrent: 256 KiB pieces, no DHT or local discovery (the tracker only); every host seeds on
# until all have finished.
bt_last=
if [ "$SWARM" = 1 ]; then
  mktorrent -a "http://$ORIGIN_IP:6969/announce" -l 18 -o "$WORK/blob.torrent" "$WORK/www/blob" > /dev/null
  printf '#!/bin/sh\nnow=$(date +%%s.%%N)\necho "$now" > "%s/done/bt-$(basename "$(dirname "$3")")"\n' \
    "$WORK" > "$WORK/bt-done"
  chmod +x "$WORK/bt-done"
  ARIA=(--enable-dht=false --enable-dht6=false --bt-enable-lpd=false --file-allocation=none
    --seed-ratio=0.0 --bt-max-peers=0 --console-log-level=warn --summary-interval=0 --listen-port=6881)
  # Debian's opentracker tracks only whitelisted torrents; it chroots to -d and runs as nobody.
  mkdir -p "$WORK/tracker"
  aria2c -S "$WORK/blob.torrent" | sed -n 's/^Info Hash: //p' > "$WORK/tracker/whitelist"
  chmod 755 "$WORK" "$WORK/tracker"; chmod 644 "$WORK/tracker/whitelist"
  ns_exec origin opentracker -i "$ORIGIN_IP" -p 6969 -P 6969 -d "$WORK/tracker" -w /whitelist \
    > "$WORK/logs/opentracker.log" 2>&1 &
  wait_for "opentracker" 10 ns_exec origin curl -s -o /dev/null "http://$ORIGIN_IP:6969/stats"
  ns_exec origin aria2c "${ARIA[@]}" --dir "$WORK/www" --bt-seed-unverified=true "$WORK/blob.torrent" \
    > "$WORK/logs/bt-seed.log" 2>&1 &
  run_hosts bt
  await bt "$DEADLINE"
  mapfile -t BT < <(finish_times bt)
  for i in $(seq 1 "$HOSTS"); do ns_exec "h$i" pkill -x aria2c || true; done
  ns_exec origin pkill -x aria2c || true
  check "$WORK"/bt/h*/blob
  rm -rf "$WORK/bt"
  bt_last=${BT[-1]}
fi

# Straight from the origin.
direct_last=
if [ "$DIRECT" = 1 ]; then
  run_hosts direct
  wait_hosts direct
  mapfile -t DIRECT_T < <(finish_times direct)
  check "$WORK"/out/h*
  rm -rf "$WORK/out"
  direct_last=${DIRECT_T[-1]}
fi

ratio() { if [ -n "$1" ]; then calc %.2f "$1 / $2"; else echo -; fi; }
line="cluster hosts=$HOSTS racks=$RACKS size=${SIZE_MIB}MiB rate=${RATE_MBIT}Mbit delay=${DELAY_MS}ms"
if [ "$RACKS" -gt 1 ]; then line+=" rack_rate=${RACK_MBIT}Mbit locations=$LOCATIONS"; fi
if [ "$SUPERNODES" -gt 1 ] || [ "${#KILLED[@]}" -gt 0 ]; then
  line+=" supernodes=$SUPERNODES owner_killed_at=${KILL_OWNER_AT:--} killed_hosts=${#KILLED[@]} takeover_pieces=$TAKEOVER"
fi
line+=" bound_s=$(calc %.2f "$bound") p2p_p50_s=$(calc %.2f "$p2p_p50") p2p_p99_s=$(calc %.2f "$p2p_p99")"
line+=" p2p_over_bound=$(ratio "$p2p_last" "$bound") bt_over_bound=$(ratio "$bt_last" "$bound")"
line+=" direct_over_bound=$(ratio "$direct_last" "$bound") bt_over_p2p=$(ratio "$bt_last" "$p2p_last")"
line+=" origin_bytes_ratio=$(calc %.2f "$P2P_ORIGIN / $S")"
line+=" host_upload_ratio=$(calc %.2f "($tx - $tx_before) / ($HOSTS * $S)")"
if [ "$RACKS" -gt 1 ]; then
  line+=" rack_in_over_size=$(calc %.2f "$rack_max / $S") cross_rack_pieces=${CROSS:-?}"
fi
echo "$line"
