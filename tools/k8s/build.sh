#!/usr/bin/env bash
# Builds the test cluster's binaries once into the cache folder bindir.sh names:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm from
# their pinned Go modules, and prometheus/promtool unpacked from Debian's package (unpacked
# rather than installed, so no system service is started). Safe to run again: a complete
# folder is left alone; an interrupted build leaves only its temporary folder behind.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$(bash "$here/bindir.sh")
if [[ -f $bin/.complete ]]; then exit 0; fi
# One build at a time: a second `make k8s` (or a test session that needs the binaries)
# waits for the first instead of compiling the same ~30 minutes again beside it.
mkdir -p "$(dirname "$bin")"
exec 9>"$(dirname "$bin")/.build.lock"
flock 9
if [[ -f $bin/.complete ]]; then exit 0; fi

version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$here/kubernetes/go.mod")
# Every staging module must be replaced at the version matching the pinned Kubernetes.
staging=v0.${version#v1.}
if grep -E '^\s+k8s\.io/\S+ => k8s\.io/\S+ v' "$here/kubernetes/go.mod" | grep -v " $staging\$" >&2; then
  echo "tools/k8s/kubernetes/go.mod: replace lines above do not match $staging" >&2; exit 1
fi

mkdir -p "$(dirname "$bin")"
work=$(mktemp -d "$(dirname "$bin")/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/bin
mkdir -p "$out"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
jobs=${BLOOMRUN_BUILD_JOBS:-2}
start=$(date +%s)

# Without these the binaries report v0.0.0, which kubectl warns about and helm's
# kubeVersion checks refuse.
minor=${version#v1.}; minor=${minor%%.*}
kver=k8s.io/component-base/version
cver=k8s.io/client-go/pkg/version
kflags="-s -w"
for pkg in $kver $cver; do
  kflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  kflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build() {  # build MODULE_DIR LDFLAGS PACKAGES...
  local dir=$1 ldflags=$2; shift 2
  echo "building $* ..." >&2
  (cd "$here/$dir" && go build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$out/" "$@")
}
build etcd "-s -w" go.etcd.io/etcd/server/v3
mv "$out/server" "$out/etcd"  # go names a /v3 module's binary after the folder above
build kwok "-s -w" sigs.k8s.io/kwok/cmd/kwok
build helm "-s -w -X helm.sh/helm/v3/internal/version.version=v3.22.0" helm.sh/helm/v3/cmd/helm
build kubernetes "$kflags" k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl

# prometheus: Debian's binary, unpacked from the .deb (refresh the package lists once if
# they are too old to know it).
(cd "$work" && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; })
dpkg-deb -x "$work"/prometheus_*.deb "$work/deb"
cp "$work/deb/usr/bin/prometheus" "$work/deb/usr/bin/promtool" "$out/"
basename "$work"/prometheus_*.deb > "$out/prometheus.deb-version"

echo "$(( $(date +%s) - start ))" > "$out/build-seconds"
touch "$out/.complete"
# Publish with one rename, so a test run never sees a half-filled folder; when another build
# (another clone's `make test`) published first, keep its folder and drop this one.
if ! mv -T "$out" "$bin" 2>/dev/null; then
  if [[ ! -f $bin/.complete ]]; then rm -rf "$bin"; mv -T "$out" "$bin"; fi
fi
echo "built into $bin in $(cat "$bin/build-seconds") s" >&2
