#!/bin/bash
# netns-cluster.sh: a simulated cluster on one machine -- K network-namespace
# "hosts" on one switch, each behind its own (optionally rate-limited) link --
# for elastic-training experiments: kill a host, cut and heal its link,
# throttle it. Root only; exits 77 ("needs root") otherwise, so tests skip.
#
#   netns-cluster.sh up TAG K [RATE]        hosts 0..K-1 (namespaces tsr-TAG-h<i>, address 10.77.X.(i+1)/24)
#                                           and a hub (tsr-TAG-hub, a bridge with address 10.77.X.254);
#                                           RATE (e.g. 100mbit): tbf on both directions of every host link
#   netns-cluster.sh addr TAG I|hub         prints the address of host I (or the hub)
#   netns-cluster.sh exec TAG I|hub -- CMD  runs CMD inside that namespace (exit code passed through)
#   netns-cluster.sh kill TAG I             SIGKILL every process in host I
#   netns-cluster.sh link TAG I down|up     cut host I's link (partition) / heal it
#   netns-cluster.sh throttle TAG I RATE|off  change host I's link limit (both directions)
#   netns-cluster.sh down TAG               remove everything of TAG (idempotent; kills processes inside first)
#   netns-cluster.sh with TAG K [RATE] -- CMD   up, run CMD (in the root namespace), always down
#
# Topology: the hub namespace holds a Linux bridge br0 (address .254). Host i
# is joined to it by a veth pair: "eth0" inside tsr-TAG-h<i>, "h<i>" inside the
# hub, enslaved to br0. A link's tbf sits on eth0 (host -> hub) and on h<i>
# (hub -> host). `link down` takes h<i> down: the host's eth0 loses carrier, so
# packets vanish the way they do on a cut cable (connections time out; nothing
# is reset). The addresses exist only inside these namespaces; the root
# namespace is never touched except to create and delete them.
#
# TAG: 1 to 6 characters of [a-z0-9]. X (the third octet) is derived from TAG
# so that two clusters' addresses differ; `addr` prints the real address.
set -u

readonly kBurst=32kbit        # as in netns-link.sh: 91% of line rate at 100mbit
readonly kLatency=400ms

die() {
  echo "netns-cluster.sh: $*" >&2
  exit 2
}

usage() {
  cat >&2 <<'EOF'
usage: netns-cluster.sh up TAG K [RATE]
       netns-cluster.sh addr TAG I|hub
       netns-cluster.sh exec TAG I|hub -- CMD...
       netns-cluster.sh kill TAG I
       netns-cluster.sh link TAG I down|up
       netns-cluster.sh throttle TAG I RATE|off
       netns-cluster.sh down TAG
       netns-cluster.sh with TAG K [RATE] -- CMD...
EOF
  exit 2
}

check_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "netns-cluster.sh: needs root (network namespaces, veth, tc); run as root" >&2
    exit 77
  fi
  for tool in ip tc; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; install iproute2"
  done
}

check_tag() {
  [[ "$1" =~ ^[a-z0-9]{1,6}$ ]] || die "TAG '$1' must be 1 to 6 characters of [a-z0-9]"
}

# The third octet: a hash of TAG into 10..249.
octet() {
  local sum
  sum=$(printf '%s' "$1" | cksum | cut -d' ' -f1)
  echo $((10 + sum % 240))
}

hub_ns() { echo "tsr-$1-hub"; }
host_ns() { echo "tsr-$1-h$2"; }

# Every namespace of TAG (hosts and hub) that exists now.
namespaces_of() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^tsr-$1-(hub|h[0-9]+)\$" || true
}

ns_exists() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"
}

# Validates host index I of TAG (the namespace must exist).
host_of() {
  local tag=$1 index=$2
  [[ "$index" =~ ^[0-9]+$ ]] || die "host '$index' must be a host index (0..K-1)"
  local ns
  ns=$(host_ns "$tag" "$index")
  ns_exists "$ns" || die "host $index of cluster '$tag' does not exist (namespace $ns); run 'up' first"
  echo "$ns"
}

# SIGKILLs every process in namespace $1 and waits (up to ~5 s) until none is left.
kill_all_in() {
  local ns=$1 pids
  for _ in $(seq 50); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  echo "netns-cluster.sh: processes still alive in $ns: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')" >&2
  return 1
}

cmd_down() {
  local tag=$1 ns
  for ns in $(namespaces_of "$tag"); do
    kill_all_in "$ns" || true
  done
  # Deleting a namespace deletes the veth ends inside it, and with them their peers.
  for ns in $(namespaces_of "$tag"); do
    ip netns del "$ns" 2>/dev/null || true
  done
  return 0
}

set_rate() {  # ns dev rate|off
  local ns=$1 dev=$2 rate=$3
  if [ "$rate" = off ]; then
    ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
  else
    ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$rate" burst "$kBurst" latency "$kLatency"
  fi
}

# Runs a step of `up`; on failure removes what was made so far and exits 1.
must() {
  "$@" && return 0
  echo "netns-cluster.sh: up $tag failed at: $*; removed what was made" >&2
  cmd_down "$tag"
  exit 1
}

cmd_up() {
  local tag=$1 count=$2 rate=${3:-}
  if ! [[ "$count" =~ ^[0-9]+$ ]] || [ "$count" -lt 1 ] || [ "$count" -gt 250 ]; then
    die "K '$count' must be a number of hosts in 1..250"
  fi
  if [ -n "$(namespaces_of "$tag")" ]; then
    die "cluster '$tag' already exists ($(namespaces_of "$tag" | tr '\n' ' ')); run 'down $tag' first"
  fi
  local x hub i ns
  x=$(octet "$tag")
  hub=$(hub_ns "$tag")
  # Interrupted half way: remove the half-made cluster. (`with` installs its
  # own traps, which also cover this.)
  [ "$command" = up ] && trap 'cmd_down "$tag"; exit 1' INT TERM
  must ip netns add "$hub"
  must ip -n "$hub" link set lo up
  must ip -n "$hub" link add br0 type bridge
  must ip -n "$hub" addr add "10.77.$x.254/24" dev br0
  must ip -n "$hub" link set br0 up
  for ((i = 0; i < count; i++)); do
    ns=$(host_ns "$tag" "$i")
    must ip netns add "$ns"
    must ip -n "$ns" link set lo up
    must ip link add eth0 netns "$ns" type veth peer name "h$i" netns "$hub"
    must ip -n "$hub" link set "h$i" master br0
    must ip -n "$ns" addr add "10.77.$x.$((i + 1))/24" dev eth0
    must ip -n "$ns" link set eth0 up
    must ip -n "$hub" link set "h$i" up
    if [ -n "$rate" ]; then
      must set_rate "$ns" eth0 "$rate"
      must set_rate "$hub" "h$i" "$rate"
    fi
  done
  [ "$command" = up ] && trap - INT TERM
  return 0
}

cmd_addr() {
  local tag=$1 which=$2 x
  x=$(octet "$tag")
  if [ "$which" = hub ]; then
    echo "10.77.$x.254"
  else
    if ! [[ "$which" =~ ^[0-9]+$ ]] || [ "$which" -ge 250 ]; then
      die "host '$which' must be a host index or 'hub'"
    fi
    echo "10.77.$x.$((which + 1))"
  fi
}

cmd_exec() {
  local tag=$1 which=$2 ns
  shift 2
  [ "${1:-}" = "--" ] || usage
  shift
  [ $# -ge 1 ] || usage
  if [ "$which" = hub ]; then
    ns=$(hub_ns "$tag")
    ns_exists "$ns" || die "cluster '$tag' does not exist; run 'up' first"
  else
    ns=$(host_of "$tag" "$which") || exit 2
  fi
  exec ip netns exec "$ns" "$@"
}

cmd_kill() {
  local ns
  ns=$(host_of "$1" "$2") || exit 2
  kill_all_in "$ns"
}

cmd_link() {
  local tag=$1 index=$2 state=$3 ns
  ns=$(host_of "$tag" "$index") || exit 2
  case "$state" in
    down|up) ip -n "$(hub_ns "$tag")" link set "h$index" "$state" ;;
    *) die "link state '$state' must be 'down' or 'up'" ;;
  esac
}

cmd_throttle() {
  local tag=$1 index=$2 rate=$3 ns
  ns=$(host_of "$tag" "$index") || exit 2
  set_rate "$ns" eth0 "$rate" && set_rate "$(hub_ns "$tag")" "h$index" "$rate"
}

cmd_with() {
  local tag=$1 count=$2 rate=""
  shift 2
  if [ "${1:-}" != "--" ]; then
    rate=${1:-}
    shift || true
  fi
  [ "${1:-}" = "--" ] || usage
  shift
  [ $# -ge 1 ] || usage
  child=""
  # Always down, however we leave: normal exit, Ctrl-C, kill -- also while
  # `up` is still running, so the traps come first.
  trap 'cmd_down "$tag"' EXIT
  trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; exit 130' INT
  trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; exit 143' TERM
  cmd_up "$tag" "$count" "$rate"
  # In the background so that a signal to this script runs its trap at once
  # instead of after CMD ends.
  "$@" &
  child=$!
  wait "$child"
  local rc=$?
  child=""
  exit "$rc"
}

[ $# -ge 2 ] || usage
command=$1
tag=$2
shift 2
case "$command" in
  up|addr|exec|kill|link|throttle|down|with) ;;
  *) usage ;;
esac
check_tag "$tag"
[ "$command" = addr ] || check_root
case "$command" in
  up) { [ $# -ge 1 ] && [ $# -le 2 ]; } || usage; cmd_up "$tag" "$@" ;;
  addr) [ $# -eq 1 ] || usage; cmd_addr "$tag" "$1" ;;
  exec) [ $# -ge 3 ] || usage; cmd_exec "$tag" "$@" ;;
  kill) [ $# -eq 1 ] || usage; cmd_kill "$tag" "$1" ;;
  link) [ $# -eq 2 ] || usage; cmd_link "$tag" "$1" "$2" ;;
  throttle) [ $# -eq 2 ] || usage; cmd_throttle "$tag" "$1" "$2" ;;
  down) [ $# -eq 0 ] || usage; cmd_down "$tag" ;;
  with) [ $# -ge 3 ] || usage; cmd_with "$tag" "$@" ;;
esac
