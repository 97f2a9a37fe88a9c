#!/bin/bash
# Checks scripts/netns-cluster.sh end to end: a 3-host cluster whose hosts
# reach each other and the hub, a link cut and healed, a throttle, a kill, a
# down that leaves nothing, and `with` cleaning up after a failing command and
# after SIGTERM. Exits 77 (skipped) when not root.
#
#   netns_cluster_test.sh /path/to/netns-cluster.sh
set -u

script=${1:?usage: netns_cluster_test.sh PATH/TO/netns-cluster.sh}
if [ "$(id -u)" != 0 ]; then
  echo "SKIP: needs root"
  exit 77
fi
command -v python3 >/dev/null 2>&1 || { echo "SKIP: needs python3 for the listeners"; exit 77; }

cluster() { bash "$script" "$@"; }

# A tag no other run uses now.
new_tag() {
  local t
  while :; do
    t=$(printf 't%05d' $(((RANDOM * 32768 + RANDOM) % 100000)))
    ip netns list | grep -q "^tsr-$t-" || { echo "$t"; return; }
  done
}
tag=$(new_tag)
with_tag=$(new_tag)
term_tag=$(new_tag)
trap 'cluster down "$tag"; cluster down "$with_tag"; cluster down "$term_tag"' EXIT

failures=0
check() {  # description, then the command that must succeed
  local what=$1
  shift
  if "$@"; then
    echo "ok   - $what"
  else
    echo "FAIL - $what"
    failures=$((failures + 1))
  fi
}
namespaces_left() { ip netns list | awk '{print $1}' | grep -c "^tsr-$1-" ; }

readonly port=47311
# Starts a listener that accepts (and closes) connections forever, in namespace I|hub.
listen() {
  cluster exec "$tag" "$1" -- python3 -c "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', $port)); s.listen(16)
while True: s.accept()[0].close()" >/dev/null 2>&1 &
  disown  # `down` kills it; no job notice
}
# Whether host $1 can open a TCP connection to $2 within $3 seconds.
reaches() {
  local address
  address=$(cluster addr "$tag" "$2")
  cluster exec "$tag" "$1" -- timeout "$3" bash -c "exec 3<>/dev/tcp/$address/$port" 2>/dev/null
}
# Retries reaches for a few seconds (a listener or a healed link needs a moment).
eventually_reaches() {
  local _
  for _ in $(seq 30); do
    reaches "$1" "$2" 1 && return 0
    sleep 0.2
  done
  return 1
}

cannot_reach() { ! reaches "$@"; }
addr_matches() { cluster addr "$tag" "$1" | grep -qE "$2"; }
# Whether the qdisc of DEV in namespace I|hub matches PATTERN.
qdisc_matches() { cluster exec "$tag" "$1" -- tc qdisc show dev "$2" | grep -qE "$3"; }
no_cluster_address_in_root() { ! ip -4 addr | grep -q '10\.77\.'; }

check "up 3 hosts at 50mbit" cluster up "$tag" 3 50mbit
check "4 namespaces (3 hosts + hub)" test "$(namespaces_left "$tag")" = 4
check "addr of host 2 ends in .3" addr_matches 2 '^10\.77\.[0-9]+\.3$'
check "addr of the hub ends in .254" addr_matches hub '^10\.77\.[0-9]+\.254$'
check "the root namespace has no cluster address" no_cluster_address_in_root

cluster exec "$tag" 0 -- bash -c 'exit 5'
code=$?
check "exec passes the exit code through (5, got $code)" test "$code" = 5

listen 2
listen hub
check "host 0 reaches host 2" eventually_reaches 0 2
check "host 0 reaches the hub" eventually_reaches 0 hub
check "host 1 reaches the hub" eventually_reaches 1 hub

check "link 1 down" cluster link "$tag" 1 down
check "host 1 cannot reach the hub with its link down" cannot_reach 1 hub 1
check "host 0 still reaches the hub" reaches 0 hub 2
check "link 1 up" cluster link "$tag" 1 up
check "host 1 reaches the hub again" eventually_reaches 1 hub

check "tbf on host 1's end of its link" qdisc_matches 1 eth0 'tbf.*rate 50Mbit'
check "tbf on the hub's end of it" qdisc_matches hub h1 'tbf.*rate 50Mbit'
check "throttle host 1 to 10mbit" cluster throttle "$tag" 1 10mbit
check "host 1's end shows the new rate" qdisc_matches 1 eth0 'tbf.*rate 10Mbit'
check "the hub's end shows the new rate" qdisc_matches hub h1 'tbf.*rate 10Mbit'
check "throttle host 1 off" cluster throttle "$tag" 1 off
no_tbf_on_host1() { ! qdisc_matches 1 eth0 tbf; }
check "no tbf left on host 1's link" no_tbf_on_host1

# Directly, not through the function: $! must be the process that becomes sleep.
bash "$script" exec "$tag" 2 -- sleep 60 &
sleeper=$!
for _ in $(seq 50); do
  ip netns pids "tsr-$tag-h2" | grep -qx "$sleeper" && break
  sleep 0.1
done
check "the sleeper runs in host 2" bash -c "ip netns pids tsr-$tag-h2 | grep -qx $sleeper"
check "kill host 2" cluster kill "$tag" 2
wait "$sleeper" 2>/dev/null
code=$?
check "the sleeper died of SIGKILL (exit $code)" test "$code" = 137
check "no process left in host 2" test -z "$(ip netns pids "tsr-$tag-h2")"

check "down" cluster down "$tag"
check "down leaves no tsr-$tag-* namespace" test "$(namespaces_left "$tag")" = 0
check "down again is fine (idempotent)" cluster down "$tag"

cluster with "$with_tag" 2 -- bash -c "ip netns list | grep -q tsr-$with_tag-h1 && exit 3"
code=$?
check "with passes the command's exit code through (3, got $code)" test "$code" = 3
check "with cleans up after a failing command" test "$(namespaces_left "$with_tag")" = 0

bash "$script" with "$term_tag" 1 -- sleep 60 &
runner=$!
for _ in $(seq 50); do
  [ "$(namespaces_left "$term_tag")" = 2 ] && break
  sleep 0.1
done
check "with brought its cluster up" test "$(namespaces_left "$term_tag")" = 2
kill -TERM "$runner"
wait "$runner"
check "with cleans up after SIGTERM" test "$(namespaces_left "$term_tag")" = 0

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
