#!/bin/sh
# netns-link.sh: two network namespaces joined by a veth pair whose both ends
# are rate-limited with a tbf qdisc -- a simulated point-to-point link on one
# machine, for `tessera-bench allreduce --link 100mbit` (which calls this).
#
#   netns-link.sh up   NAME RATE   # e.g. NAME=tlink123 RATE=100mbit
#   netns-link.sh down NAME        # removes everything `up` created; idempotent
#
# `up` creates namespaces NAME-0 (address 10.201.0.1/24) and NAME-1
# (10.201.0.2/24), veth ends NAME-v0 / NAME-v1 inside them, loopback up, and
# on each end `tc qdisc add dev X root tbf rate RATE burst 32kbit latency 400ms`.
# The addresses exist only inside these namespaces. On any failure `up` tears
# down what it made and exits non-zero. Needs root and iproute2 (ip, tc).
# NAME must be at most 12 characters (interface names are limited to 15).
set -eu

usage() {
  echo "usage: $0 up NAME RATE | down NAME" >&2
  exit 2
}

down() {
  name=$1
  # Deleting a namespace deletes the veth end inside it, and with it the peer.
  ip netns del "$name-0" 2>/dev/null || true
  ip netns del "$name-1" 2>/dev/null || true
  ip link del "$name-v0" 2>/dev/null || true
}

up() {
  name=$1
  rate=$2
  if [ "$(id -u)" != 0 ]; then
    echo "netns-link.sh: needs root (network namespaces and tc); run as root or use --link loopback" >&2
    exit 1
  fi
  for tool in ip tc; do
    command -v "$tool" >/dev/null 2>&1 || {
      echo "netns-link.sh: '$tool' not found; install iproute2" >&2
      exit 1
    }
  done
  if [ ${#name} -gt 12 ]; then
    echo "netns-link.sh: NAME '$name' is longer than 12 characters" >&2
    exit 2
  fi
  trap 'down "$name"' EXIT
  ip netns add "$name-0"
  ip netns add "$name-1"
  ip link add "$name-v0" type veth peer name "$name-v1"
  ip link set "$name-v0" netns "$name-0"
  ip link set "$name-v1" netns "$name-1"
  i=0
  for ns in "$name-0" "$name-1"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "10.201.0.$((i + 1))/24" dev "$name-v$i"
    ip -n "$ns" link set "$name-v$i" up
    ip netns exec "$ns" tc qdisc add dev "$name-v$i" root tbf rate "$rate" burst 32kbit latency 400ms
    i=$((i + 1))
  done
  trap - EXIT
}

[ $# -ge 2 ] || usage
case "$1" in
  up) [ $# -eq 3 ] || usage; up "$2" "$3" ;;
  down) [ $# -eq 2 ] || usage; down "$2" ;;
  *) usage ;;
esac
