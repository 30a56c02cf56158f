#!/usr/bin/env bash
# Builds an image from the repository's Dockerfiles without Docker or a registry:
#   tools/images/build.sh trainer     (Dockerfile, CPU flavour)
# and prints the path of its OCI archive, for `ctr images import` (RealNodes.import_image).
#
# - buildah and mmdebstrap are Debian bookworm's, unpacked (not installed) into
#   $BLOOMRUN_HOME/images/tools; buildah links libgpgme11, which its chroot re-exec cannot
#   find through LD_LIBRARY_PATH, so that one library is apt-get installed if missing.
# - The base is Debian bookworm (minbase) made by mmdebstrap from deb.debian.org, built once
#   per suite into the cache, and given to the Dockerfile as --build-arg BASE (the same
#   recipe as the CUDA release image otherwise; PYTHON=python3.11 is bookworm's).
# - `bud --isolation chroot` (no user namespaces, no runtime needed), storage in the cache
#   folder, the pip cache a build cache mount there too (TMPDIR), the host's CA bundle
#   passed as the secret `ca` (this machine's TLS is intercepted): used, not baked in.
# - The archive is cached by the hash of its inputs: the Dockerfile, .dockerignore, the
#   files of the build context it copies, the base's digest and the build arguments.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=${1:?usage: build.sh trainer}
home=${BLOOMRUN_HOME:-$HOME/.cache/bloomrun}/images
case $image in
  trainer) dockerfile=Dockerfile; args=(--build-arg PYTHON=python3.11) ;;
  *) echo "unknown image $image (trainer)" >&2; exit 2 ;;
esac
mkdir -p "$home"
tools=$(bash "$here/tools.sh")
export LD_LIBRARY_PATH=$tools/usr/lib/x86_64-linux-gnu
export CONTAINERS_REGISTRIES_CONF=$here/registries.conf TMPDIR=$home/tmp
mkdir -p "$TMPDIR"
buildah=("$tools/usr/bin/buildah" --root "$home/storage" --runroot "$home/run"
         --storage-driver overlay)
policy=(--signature-policy "$here/policy.json")

# The base: a Debian rootfs from mmdebstrap, committed as localhost/bloomrun-base:bookworm.
base=localhost/bloomrun-base:bookworm
if ! "${buildah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  echo "making the Debian bookworm base with mmdebstrap ..." >&2
  perl "$tools/usr/bin/mmdebstrap" --variant=minbase --mode=root --format=tar --quiet \
    bookworm "$home/tmp/bookworm.tar" http://deb.debian.org/debian
  container=$("${buildah[@]}" from "${policy[@]}" scratch)
  "${buildah[@]}" add "$container" "$home/tmp/bookworm.tar" / >/dev/null
  "${buildah[@]}" commit "${policy[@]}" -q "$container" "$base" >/dev/null
  "${buildah[@]}" rm "$container" >/dev/null
  rm -f "$home/tmp/bookworm.tar"
fi
base_id=$("${buildah[@]}" inspect --type image --format '{{.FromImageID}}' "$base")

key=$( (cd "$repo" && cat "$dockerfile" .dockerignore &&
        git ls-files -co --exclude-standard requirements pyproject.toml README.md bloomrun |
          grep -v __pycache__ | sort | xargs sha256sum &&
        echo "$base_id ${args[*]}") | sha256sum | cut -c1-12)
out=$home/$image-$key.tar
if [[ -f $out ]]; then echo "$out"; exit 0; fi

start=$(date +%s)
tag=localhost/bloomrun-$image:$key
"${buildah[@]}" bud --isolation chroot "${policy[@]}" --pull-never --layers \
  --build-arg BASE="$base" "${args[@]}" \
  --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
  -f "$repo/$dockerfile" -t "$tag" "$repo" >&2
"${buildah[@]}" push "${policy[@]}" -q "$tag" "oci-archive:$out.part:bloomrun.local/$image:$key" >&2
mv "$out.part" "$out"
echo "$(( $(date +%s) - start ))" > "$out.build-seconds"
echo "$out"
