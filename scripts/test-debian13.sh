#!/usr/bin/env bash
# Builds and tests tessera on the second platform, Debian 13 "trixie" (libtorch 2.6, g++ 14,
# OpenMPI 5), in a chroot made with debootstrap. Run as root on a Debian machine:
#
#   scripts/test-debian13.sh              # make/reuse the root, build (Release, ninja), run ctest
#   scripts/test-debian13.sh --long       # also the tests labelled "long" (excluded by default)
#   scripts/test-debian13.sh --build-only # make/reuse the root and build; no tests
#   scripts/test-debian13.sh --shell      # an interactive shell in the prepared chroot (/src, /build)
#   scripts/test-debian13.sh -- -R Golden # extra arguments after -- go to ctest
#
# Cache (outside the source tree): the root is $TESSERA_DEBIAN13_ROOT (default
# /var/cache/tessera/debian13), the build folder is <root>/build (/build inside), so a second
# run costs an incremental build plus the suite. Delete the root folder to start over.
# Jobs: $TESSERA_JOBS (default 2), every build/test command runs under `nice -n 19`.
# TESSERA_* variables of the caller (e.g. TESSERA_RECORD_GOLDEN=1) pass into the chroot.
#
# The root is made from the archive mirror the host's apt sources name; trixie is never added to
# the host's own sources (its libc/libstdc++ would replace the host's). The source tree is mounted
# read-only at /src, /usr/local/cuda read-only when present (the NCCL backend compiles), plus
# /proc, /sys, /dev, /dev/pts and a private /dev/shm; every mount under the root is undone on
# every exit path. Multi-process tests use loopback: a chroot shares the host's network namespace.
# Not part of .ci/run: CI stays within its time and does not depend on a second archive suite.
# Exits non-zero on any failure.
set -euo pipefail

src="$(cd "$(dirname "$0")/.." && pwd)"
root="${TESSERA_DEBIAN13_ROOT:-/var/cache/tessera/debian13}"
jobs="${TESSERA_JOBS:-2}"
suite=trixie

mode=test
long=0
ctest_extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --long) long=1 ;;
    --build-only) mode=build ;;
    --shell) mode=shell ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; ctest_extra=("$@"); break ;;
    *) echo "test-debian13: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "test-debian13: $*"; }
die() { echo "test-debian13: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts): run it with sudo"

# ---- The host's archive mirror ------------------------------------------------------------
# First http(s) URI of a Debian suite (not -security) in the host's sources, deb822 or one-line.
host_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk 'BEGIN{RS=""} /Suites:[^\n]*(bookworm|trixie|stable)/ && !/-security/ {
                 if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s=substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", s); print s; exit } }' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1=="deb" && $0 !~ /-security/ && $0 ~ /debian/ { for (i=2;i<=NF;i++) if ($i ~ /^https?:/) { print $i; exit } }' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
}
host_security_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$({ grep -v '^[[:space:]]*#' "$f" | grep -Eo 'https?://[^ ]*debian-security[^ ]*' | head -n1; } || true)
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
}

# ---- Mounts: every mount under the root is undone on exit --------------------------------
cleanup() {
  local rc=$? m
  # Newest first; also catches mounts the tests made inside (tmpfs, /run/netns).
  for m in $(awk -v r="$root" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo | tac); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "test-debian13: could not unmount $m" >&2
  done
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Every mount is made private, so nothing mounted below it (here or by the tests) reaches the
# host's /dev or /src.
mount_bind() {      # source target
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mount --make-private "$2"
}
mount_ro_bind() {   # source target
  mount_bind "$1" "$2"
  mount -o remount,bind,ro "$2"
}
mount_all() {
  # The root itself becomes a mount point: `ip netns exec` (the namespace tests) remounts "/"
  # as a slave, which fails with EINVAL in a chroot whose "/" is a plain folder.
  mount_bind "$root" "$root"
  mount -t proc proc "$root/proc"
  mount -t sysfs sysfs "$root/sys"
  mount_bind /dev "$root/dev"
  mount_bind /dev/pts "$root/dev/pts"
  mount -t tmpfs -o size=4g,mode=1777 shm "$root/dev/shm"   # OpenMPI's shared-memory transport
  mount_ro_bind "$src" "$root/src"
  if [ -d /usr/local/cuda ]; then mount_ro_bind "$(readlink -f /usr/local/cuda)" "$root/usr/local/cuda"; fi
}

# mpirun as root, oversubscribed (the tests pass --allow-run-as-root --oversubscribe themselves;
# these cover a bare mpirun in --shell). Checked on OpenMPI 5.0.7: PRTE_MCA_..._mapping_policy
# is what oversubscribes; OMPI_MCA_rmaps_base_oversubscribe (OpenMPI 4's) is ignored there.
in_root() {   # command... : runs in the chroot with a clean environment
  local passenv=() v
  for v in $(compgen -e | grep '^TESSERA_' || true); do passenv+=("$v=${!v}"); done
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    OMPI_MCA_rmaps_base_oversubscribe=1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe \
    "${passenv[@]}" "$@"
}

# ---- The root: made once --------------------------------------------------------------------
if [ ! -f "$root/.tessera-root-ready" ]; then
  mirror="$(host_mirror)"
  [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources* to make the root from"
  if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap on the host"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap; }
  fi
  # debootstrap cannot resume: make the root in a scratch folder, move it into place when done.
  partial="$root.partial"
  rm -rf "$partial"
  mkdir -p "$(dirname "$root")"
  say "debootstrap $suite from $mirror into $partial (a few minutes)"
  start=$(date +%s)
  debootstrap --variant=minbase --include=ca-certificates "$suite" "$partial" "$mirror"
  security="$(host_security_mirror)"
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" "$suite" "$suite"
    if [ -n "$security" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$security" "$suite"
    fi
  } > "$partial/etc/apt/sources.list.d/debian.sources"
  rm -f "$partial/etc/apt/sources.list"
  # No daemons started by package scripts inside the chroot.
  printf '#!/bin/sh\nexit 101\n' > "$partial/usr/sbin/policy-rc.d"
  chmod +x "$partial/usr/sbin/policy-rc.d"
  echo 'APT::Install-Recommends "false";' > "$partial/etc/apt/apt.conf.d/90tessera-no-recommends"
  mkdir -p "$partial/src" "$partial/build"
  rm -rf "$root"
  mv "$partial" "$root"
  touch "$root/.tessera-root-ready"
  say "root ready in $(( $(date +%s) - start )) s"
fi
# Name resolution as on the host: tessera-run across "nodes" advertises this machine's host
# name to Gloo, which must resolve (Gloo crashes on a name getaddrinfo does not know).
cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
cp -L /etc/hosts "$root/etc/hosts" 2>/dev/null || true
mkdir -p "$root/src" "$root/build" "$root/usr/local/cuda"
mount_all

# ---- Packages: the list of scripts/setup.sh, with trixie's names --------------------------
# Parsed from setup.sh's packages=(...) so the two platforms do not drift.
mapfile -t packages < <(sed -n '/^packages=(/,/^)/p' "$src/scripts/setup.sh" | sed -e 's/#.*//' -e 's/packages=(//' -e 's/)//' | tr -s ' \t' '\n' | sed '/^$/d')
[ ${#packages[@]} -gt 10 ] || die "could not read the package list from scripts/setup.sh"
declare -A trixie_name=(
  # (no renames needed so far: every setup.sh package has the same name in trixie)
)
# The Python readers and data the tests use, in case setup.sh ever drops them.
extra=(python3-h5py python3-hdf5plugin python3-zstandard python3-numpy fortunes dataset-fashion-mnist)
want=()
for p in "${packages[@]}" "${extra[@]}"; do
  p="${trixie_name[$p]:-$p}"
  [[ " ${want[*]} " == *" $p "* ]] || want+=("$p")
done

missing=()
for p in "${want[@]}"; do
  in_root dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || ! in_root dpkg-query -W libtorch-dev >/dev/null 2>&1; then
  in_root apt-get update -qq
  candidate=$(in_root apt-cache policy libtorch-dev | awk '/Candidate:/ { print $2 }')
  say "apt-cache policy libtorch-dev in $suite: candidate $candidate"
  [[ "$candidate" == 2.* ]] || die "libtorch-dev in $suite is '$candidate', expected 2.x"
  say "installing ${missing[*]}"
  in_root apt-get install -y -qq "${missing[@]}"
fi
torch_version=$(in_root dpkg-query -W -f='${Version}' libtorch-dev)
[[ "$torch_version" == 2.* ]] || die "libtorch-dev installed in the root is '$torch_version', expected 2.x"
say "libtorch-dev $torch_version, $(in_root g++ --version | head -n1), $(in_root dpkg-query -W -f='openmpi ${Version}' libopenmpi-dev)"

if [ "$mode" = shell ]; then
  in_root bash -c 'cd /build && exec bash -i'
  exit $?
fi

# ---- Build ----------------------------------------------------------------------------------
start=$(date +%s)
generator=(-G Ninja)
[ -f "$root/build/CMakeCache.txt" ] && generator=()
in_root nice -n 19 cmake -S /src -B /build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
# -k 0: one run names every file that fails to compile on this platform, not just the first.
in_root nice -n 19 cmake --build /build -j "$jobs" -- -k 0
built=$(date +%s)
say "build took $((built - start)) s"
[ "$mode" = build ] && exit 0

# ---- Tests ----------------------------------------------------------------------------------
# Never "dry-run" (scripts/gpu-check.sh --dry-run: a second whole build); "long" on request.
label=(-LE 'long|dry-run')
[ "$long" -eq 1 ] && label=(-LE dry-run)
# Multi-process tests oversubscribe the cores on purpose: one at a time, like scripts/test.sh.
in_root bash -c 'cd /build && exec nice -n 19 ctest --output-on-failure --timeout 900 -j1 "$@"' \
  ctest "${label[@]}" "${ctest_extra[@]}"
say "tests took $(( $(date +%s) - built )) s (libtorch $torch_version)"
