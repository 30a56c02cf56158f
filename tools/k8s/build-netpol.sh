#!/usr/bin/env bash
# Builds the real test nodes' NetworkPolicy enforcement once into the folder `bindir.sh netpol`
# names (tests/cluster/real_policy.py runs it):
#   kube-network-policies  sigs.k8s.io/kube-network-policies (SIG Network), its own cmd,
#                          unchanged: decides each new connection of the pods by the cluster's
#                          NetworkPolicies, reading the packets from an NFQUEUE
#   netpol-queue           netpol/queue: puts those packets on the queue (this kernel has no
#                          nftables `queue` expression, only the xtables NFQUEUE target)
#   netprobe               netpol/netprobe: the `pods` tests' listen-and-dial test image
# A folder of its own (not build-net.sh's nor build-node.sh's), so that adding it re-keyed no
# existing cache. Safe to run again: a complete folder is left alone (the warm no-op is one hash).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$(bash "$here/bindir.sh" netpol)
if [[ -f $bin/.complete ]]; then exit 0; fi

mkdir -p "$(dirname "$bin")"
work=$(mktemp -d "$(dirname "$bin")/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/bin
mkdir -p "$out"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
jobs=${BLOOMRUN_BUILD_JOBS:-2}
start=$(date +%s)

cd "$here/netpol"
echo "building kube-network-policies ..." >&2
go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$out/kube-network-policies" \
  sigs.k8s.io/kube-network-policies/cmd
echo "building netpol-queue and netprobe ..." >&2
go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$out/netpol-queue" ./queue
go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$out/netprobe" ./netprobe

echo "$(( $(date +%s) - start ))" > "$out/build-seconds"
touch "$out/.complete"
if ! mv -T "$out" "$bin" 2>/dev/null; then
  if [[ ! -f $bin/.complete ]]; then rm -rf "$bin"; mv -T "$out" "$bin"; fi
fi
echo "built into $bin in $(cat "$bin/build-seconds") s" >&2
