#!/usr/bin/env bash
# Prints the folder the test cluster's binaries are cached in:
#   $BLOOMRUN_HOME/k8s/<kubernetes version>-<hash of the pins>/bin
# The hash covers every go.mod/go.sum here, so changing any pinned
# version (kwok, helm, etcd too) builds into a fresh folder instead of reusing stale binaries.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
home=${BLOOMRUN_HOME:-$HOME/.cache/bloomrun}
version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$here/kubernetes/go.mod")
pins=$(cd "$here" && cat */go.mod */go.sum | sha256sum | cut -c1-10)
echo "$home/k8s/$version-$pins/bin"
