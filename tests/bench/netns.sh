# Emulated hosts in network namespaces, sourced by tests/bench/cluster.sh. Everything lives in
# namespaces this file creates (named "$NS_PREFIX-..."): a switch namespace holds the bridges, every
# host has one veth to it (eth0 inside the host), shaped in both directions with HTB (rate) and, with
# a delay, netem (which these machines' kernel lacks: CONFIG_NET_SCH_NETEM is not set). No address or
# link is added to the caller's namespace; ns_cleanup deletes them all.
#
#   core bridge br0 ── origin, supernodes (and the hosts, with one rack)
#     └─ uplink (shaped) ── rack bridge brR ── the hosts of rack R (with RACKS > 1)

NS_PREFIX=${NS_PREFIX:-dfb$$}
NS_ALL=()

ns_name() { echo "$NS_PREFIX-$1"; }

# ns_exec HOST CMD...: runs CMD inside HOST's namespace.
ns_exec() { local n; n=$(ns_name "$1"); shift; ip netns exec "$n" "$@"; }

# shape NS DEV RATE_MBIT DELAY_MS: HTB at RATE_MBIT on DEV's egress, and netem's DELAY_MS below it
# unless DELAY_MS is 0.
shape() {
  local ns=$1 dev=$2 rate=$3 delay=$4
  ip -n "$ns" link set "$dev" up
  tc -n "$ns" qdisc add dev "$dev" root handle 1: htb default 1
  tc -n "$ns" class add dev "$dev" parent 1: classid 1:1 htb rate "${rate}mbit" ceil "${rate}mbit" \
    quantum 60000
  if [ "$delay" != 0 ]; then
    tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: netem delay "${delay}ms" limit 100000 \
      || { echo "netns.sh: no netem in this kernel: use DELAY_MS=0" >&2; return 1; }
  fi
}

# ns_init: the switch namespace with the core bridge.
ns_init() {
  local sw; sw=$(ns_name sw)
  ip netns add "$sw"; NS_ALL+=("$sw")
  ip -n "$sw" link set lo up
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
}

# ns_add_rack R RATE_MBIT DELAY_MS: bridge brR, joined to the core by an uplink shaped both ways.
# Its counters (`rack_bytes_in R`) tell how many bytes entered the rack.
ns_add_rack() {
  local r=$1 rate=$2 delay=$3 sw; sw=$(ns_name sw)
  ip -n "$sw" link add "br$r" type bridge
  ip -n "$sw" link set "br$r" up
  ip -n "$sw" link add "up$r" type veth peer name "dn$r"
  ip -n "$sw" link set "up$r" master br0
  ip -n "$sw" link set "dn$r" master "br$r"
  shape "$sw" "up$r" "$rate" "$delay"   # core -> rack
  shape "$sw" "dn$r" "$rate" "$delay"   # rack -> core
}

# ns_add_host NAME IP BRIDGE RATE_MBIT DELAY_MS: a namespace NAME with eth0 at IP/16 on BRIDGE.
ns_add_host() {
  local name=$1 ip=$2 br=$3 rate=$4 delay=$5 ns sw
  ns=$(ns_name "$name"); sw=$(ns_name sw)
  ip netns add "$ns"; NS_ALL+=("$ns")
  ip -n "$ns" link set lo up
  ip link add "p-$name" netns "$sw" type veth peer name eth0 netns "$ns"
  ip -n "$sw" link set "p-$name" master "$br"
  ip -n "$ns" addr add "$ip/16" dev eth0
  shape "$ns" eth0 "$rate" "$delay"         # the host's uplink
  shape "$sw" "p-$name" "$rate" "$delay"    # its downlink
}

# rack_bytes_in R: bytes that have entered rack R over its uplink.
rack_bytes_in() { ip netns exec "$(ns_name sw)" cat "/sys/class/net/up$1/statistics/tx_bytes"; }

# host_tx_bytes NAME: bytes host NAME has sent.
host_tx_bytes() { ns_exec "$1" cat /sys/class/net/eth0/statistics/tx_bytes; }

ns_cleanup() {
  local n
  for n in "${NS_ALL[@]}"; do ip netns pids "$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; done
  for n in "${NS_ALL[@]}"; do ip netns del "$n" 2>/dev/null || true; done
}
