#!/usr/bin/env bash
# Unpacks Debian bookworm's buildah and mmdebstrap (and the libraries buildah lacks) into
# $BLOOMRUN_HOME/images/tools-<hash of this script>, once, and prints that folder.
# Unpacked, not installed: no containers-common config lands in /etc. The one exception is
# libgpgme11: buildah re-executes itself for `--isolation chroot` with a clean environment,
# so LD_LIBRARY_PATH cannot supply it; it is apt-get installed (a library, no service).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
home=${BLOOMRUN_HOME:-$HOME/.cache/bloomrun}/images
dir=$home/tools-$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-10)
if [[ ! -f /usr/lib/x86_64-linux-gnu/libgpgme.so.11 ]]; then
  echo "installing libgpgme11 (buildah links it) ..." >&2
  { apt-get install -y -q libgpgme11 || { apt-get update -qq && apt-get install -y -q libgpgme11; }; } >&2
fi
if [[ -f $dir/.complete ]]; then echo "$dir"; exit 0; fi
mkdir -p "$home"
work=$(mktemp -d "$home/tools.XXXXXX")
trap 'rm -rf "$work"' EXIT
packages=(buildah mmdebstrap libgpgme11 libassuan0)
(cd "$work" && { apt-get download "${packages[@]}" 2>/dev/null ||
  { apt-get update -qq && apt-get download "${packages[@]}"; }; }) >&2
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
(cd "$work" && ls *.deb) > "$work/root/debs"
touch "$work/root/.complete"
mv -T "$work/root" "$dir" 2>/dev/null || [[ -f $dir/.complete ]]
echo "$dir"
