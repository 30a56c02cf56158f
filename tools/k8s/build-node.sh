#!/usr/bin/env bash
# Builds the real test nodes' programs once into the folder `bindir.sh node` names:
#   kubelet          from the pinned k8s.io/kubernetes (node/go.mod, same version as the
#                    control plane: refused otherwise)
#   pause, probe     node/pause, node/probe: static programs the tests make images of
#   containerd, containerd-shim-runc-v2, ctr, runc, cni/{bridge,host-local,loopback}
#                    from Debian's packages (containerd, runc, containernetworking-plugins),
#                    unpacked with dpkg-deb rather than installed, so the machine gains no
#                    service, no unit and no package: the whole runtime lives in this folder.
# Safe to run again: a complete folder is left alone (the warm no-op is one hash).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$(bash "$here/bindir.sh" node)
if [[ -f $bin/.complete ]]; then exit 0; fi

pinned() { awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$here/$1/go.mod"; }
version=$(pinned kubernetes)
if [[ $(pinned node) != "$version" ]]; then
  echo "tools/k8s/node/go.mod pins k8s.io/kubernetes $(pinned node), the control plane $version" >&2
  exit 1
fi

mkdir -p "$(dirname "$bin")"
work=$(mktemp -d "$(dirname "$bin")/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/bin
mkdir -p "$out/cni"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
jobs=${BLOOMRUN_BUILD_JOBS:-2}
start=$(date +%s)

minor=${version#v1.}; minor=${minor%%.*}
kflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  kflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
echo "building kubelet, pause, probe ..." >&2
(cd "$here/node" &&
  go build -p "$jobs" -trimpath -ldflags "$kflags" -o "$out/" k8s.io/kubernetes/cmd/kubelet &&
  go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$out/" ./pause ./probe)

echo "unpacking Debian's containerd, runc, containernetworking-plugins ..." >&2
packages=(containerd runc containernetworking-plugins)
(cd "$work" && { apt-get download "${packages[@]}" 2>/dev/null ||
  { apt-get update -qq && apt-get download "${packages[@]}"; }; })
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/deb"; done
cp "$work"/deb/usr/bin/{containerd,containerd-shim-runc-v2,ctr} "$work/deb/usr/sbin/runc" "$out/"
cp "$work"/deb/usr/lib/cni/{bridge,host-local,loopback} "$out/cni/"
(cd "$work" && ls *.deb) > "$out/debs"
# runc links libseccomp; say so now rather than when the first pod starts.
if ldd "$out/runc" | grep -q "not found"; then
  ldd "$out/runc" >&2; echo "runc's libraries are missing (apt-get install libseccomp2)" >&2; exit 1
fi

echo "$(( $(date +%s) - start ))" > "$out/build-seconds"
touch "$out/.complete"
if ! mv -T "$out" "$bin" 2>/dev/null; then
  if [[ ! -f $bin/.complete ]]; then rm -rf "$bin"; mv -T "$out" "$bin"; fi
fi
echo "built into $bin in $(cat "$bin/build-seconds") s" >&2
