#!/usr/bin/env bash
# Builds the real test nodes' cluster networking once into the folder `bindir.sh net` names:
#   coredns          from github.com/coredns/coredns (net/go.mod): the pods' cluster DNS
#   nft + its libs   from Debian's nftables, libnftables1, libnftnl11, libjansson4, unpacked
#                    with dpkg-deb (not installed): the service-IP DNAT that stands in for
#                    kube-proxy (this machine has nf_tables in its kernel but no iptables)
# A folder of its own (not build-node.sh's), so that adding it re-keyed no existing cache.
# Safe to run again: a complete folder is left alone (the warm no-op is one hash).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$(bash "$here/bindir.sh" net)
if [[ -f $bin/.complete ]]; then exit 0; fi

mkdir -p "$(dirname "$bin")"
work=$(mktemp -d "$(dirname "$bin")/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/bin
mkdir -p "$out/lib"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
jobs=${BLOOMRUN_BUILD_JOBS:-2}
start=$(date +%s)

echo "building coredns ..." >&2
(cd "$here/net" && go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$out/coredns" \
  github.com/coredns/coredns)

echo "unpacking Debian's nftables ..." >&2
packages=(nftables libnftables1 libnftnl11 libjansson4)
(cd "$work" && { apt-get download "${packages[@]}" 2>/dev/null ||
  { apt-get update -qq && apt-get download "${packages[@]}"; }; })
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/deb"; done
cp "$work/deb/usr/sbin/nft" "$out/nft.bin"
cp -P "$work"/deb/usr/lib/x86_64-linux-gnu/lib{nftables,nftnl,jansson}.so* "$out/lib/"
# A wrapper, so that callers run `nft` and the unpacked libraries are found.
cat > "$out/nft" <<'WRAP'
#!/bin/sh
dir=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH=$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec "$dir/nft.bin" "$@"
WRAP
chmod +x "$out/nft"
(cd "$work" && ls *.deb) > "$out/debs"
if LD_LIBRARY_PATH=$out/lib ldd "$out/nft.bin" | grep -q "not found"; then
  LD_LIBRARY_PATH=$out/lib ldd "$out/nft.bin" >&2; echo "nft's libraries are missing" >&2; exit 1
fi

echo "$(( $(date +%s) - start ))" > "$out/build-seconds"
touch "$out/.complete"
if ! mv -T "$out" "$bin" 2>/dev/null; then
  if [[ ! -f $bin/.complete ]]; then rm -rf "$bin"; mv -T "$out" "$bin"; fi
fi
echo "built into $bin in $(cat "$bin/build-seconds") s" >&2
