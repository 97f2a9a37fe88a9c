#!/usr/bin/env bash
# Installs every system package tessera builds, tests and demos with.
# Idempotent: asks apt-get only for what is missing, so a second run is a no-op.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config
  libtorch-dev libopenblas0-pthread          # libtorch; OpenBLAS (reference BLAS is ~27x slower)
  libgloo-dev libopenmpi-dev openmpi-bin     # communication backends
  libhdf5-dev libzstd-dev libxxhash-dev      # checkpoints
  python3-h5py python3-hdf5plugin python3-numpy python3-zstandard  # checkpoint test: read with another reader
  zlib1g-dev                                 # gzip-compressed datasets (fashion-MNIST)
  libgtest-dev libgmock-dev                  # tests
  libcli11-dev libtomlplusplus-dev nlohmann-json3-dev libssl-dev
  libcurl4-openssl-dev etcd-server etcd-client  # the etcd rendezvous store (HTTP gateway) and its tests
  fortunes dataset-fashion-mnist             # training data
  python3 gnuplot-nox iproute2                # plots from the benchmarks; namespaces + tc for --link
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
