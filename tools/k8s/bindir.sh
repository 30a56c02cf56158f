#!/usr/bin/env bash
# Prints the folder the test cluster's binaries are cached in:
#   $BLOOMRUN_HOME/k8s/<kubernetes version>-<hash of the pins>/bin
# The hash covers the control plane's go.mod/go.sum (etcd, helm, kubernetes, kwok), so
# changing any pinned version builds into a fresh folder instead of reusing stale binaries.
# `bindir.sh node` prints the real nodes' folder (build-node.sh), keyed by its own pins and
# sources: <version>-node-<hash>/bin; `bindir.sh net` the real nodes' CoreDNS and nft
# (build-net.sh): <version>-net-<hash>/bin; `bindir.sh netpol` their NetworkPolicy enforcement
# (build-netpol.sh): <version>-netpol-<hash>/bin. Separate folders, so that adding to one never
# rebuilds another (the control plane takes ~30 min on 2 cores, the node ~2 min).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
home=${BLOOMRUN_HOME:-$HOME/.cache/bloomrun}
version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$here/kubernetes/go.mod")
if [[ ${1:-} == node ]]; then
  pins=$(cd "$here" && cat node/go.mod node/go.sum node/*/*.go build-node.sh | sha256sum | cut -c1-10)
  echo "$home/k8s/$version-node-$pins/bin"
elif [[ ${1:-} == net ]]; then
  pins=$(cd "$here" && cat net/go.mod net/go.sum build-net.sh | sha256sum | cut -c1-10)
  echo "$home/k8s/$version-net-$pins/bin"
elif [[ ${1:-} == netpol ]]; then
  pins=$(cd "$here" && cat netpol/go.mod netpol/go.sum netpol/*/*.go build-netpol.sh | sha256sum | cut -c1-10)
  echo "$home/k8s/$version-netpol-$pins/bin"
else
  modules="etcd helm kubernetes kwok"  # in the order the hash has always read them
  pins=$(cd "$here" && cat $(printf '%s/go.mod ' $modules) $(printf '%s/go.sum ' $modules) \
    | sha256sum | cut -c1-10)
  echo "$home/k8s/$version-$pins/bin"
fi
