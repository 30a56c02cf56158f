#!/usr/bin/env bash
# Builds an image from the repository's Dockerfiles without Docker or a registry:
#   tools/images/build.sh trainer     (Dockerfile, CPU flavour)
#   tools/images/build.sh operator    (Dockerfile.operator)
# and prints the path of its OCI archive, for `ctr images import` (RealNodes.import_image).
#
# - buildah and mmdebstrap are Debian bookworm's, unpacked (not installed) into
#   $BLOOMRUN_HOME/images/tools; buildah links libgpgme11, which its chroot re-exec cannot
#   find through LD_LIBRARY_PATH, so that one library is apt-get installed if missing.
# - The base is Debian bookworm (minbase) made by mmdebstrap from deb.debian.org, built once
#   per suite into the cache, and given to either Dockerfile as --build-arg BASE (the same
#   recipe as the release image otherwise: CUDA for the trainer, slim Python for the
#   operator; PYTHON=python3.11 is bookworm's).
# - `bud --isolation chroot --force-rm` (no user namespaces, no runtime needed; a failed
#   build leaves no working container holding gigabytes behind), storage in the cache
#   folder, the pip cache a build cache mount there too (TMPDIR), the host's CA bundle
#   passed as the secret `ca` (this machine's TLS is intercepted): used, not baked in.
# - The archive is cached by the hash of its inputs: the Dockerfile, .dockerignore, the
#   files of the build context it copies (a snapshot, built from), the base's digest and the
#   build arguments.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=${1:?usage: build.sh trainer|operator}
home=${BLOOMRUN_HOME:-$HOME/.cache/bloomrun}/images
case $image in
  trainer) dockerfile=Dockerfile; args=(--build-arg PYTHON=python3.11) ;;
  operator) dockerfile=Dockerfile.operator; args=(--build-arg PYTHON=python3.11) ;;
  *) echo "unknown image $image (trainer, operator)" >&2; exit 2 ;;
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

# The build context is a snapshot of the files the Dockerfiles may COPY, taken once: the key
# is computed over it and the build reads it, so they agree even when the working tree (a
# shared one) changes while the build runs.
context=$(mktemp -d "$home/tmp/context.XXXXXX")
trap 'rm -rf "$context"' EXIT
(cd "$repo" && git ls-files -co --exclude-standard "$dockerfile" .dockerignore requirements \
   pyproject.toml README.md bloomrun | grep -v __pycache__ | sort |
   while read -r file; do [[ -f $file ]] && echo "$file"; done | tar -cf - -T - ) | tar -xf - -C "$context"
# buildah's layer cache keys a COPY on the copied files' modes and times as well as their
# bytes: normalised, a fresh clone (checkout times, another umask) reuses the layers of an
# identical tree instead of reinstalling torch. 2000-01-01: wheels refuse pre-1980 times.
chmod -R u=rwX,go=rX "$context"
find "$context" -exec touch -h -d @946684800 {} +
key=$( (cd "$context" && find . -type f | LC_ALL=C sort | xargs sha256sum &&
        echo "$base_id ${args[*]}") | sha256sum | cut -c1-12)
out=$home/$image-$key.tar
if [[ -f $out ]]; then echo "$out"; exit 0; fi

start=$(date +%s)
tag=localhost/bloomrun-$image:$key
"${buildah[@]}" bud --isolation chroot "${policy[@]}" --pull-never --layers --force-rm \
  --build-arg BASE="$base" "${args[@]}" \
  --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
  -f "$context/$dockerfile" -t "$tag" "$context" >&2
"${buildah[@]}" push "${policy[@]}" -q "$tag" "oci-archive:$out.part:bloomrun.local/$image:$key" >&2
mv "$out.part" "$out"
echo "$(( $(date +%s) - start ))" > "$out.build-seconds"
# One archive and one tagged image per name are kept (the trainer's are 3.6 and 7 GB):
# removing an older tag frees the layers only it used (a lock change leaves a 7 GB
# dependency layer behind, which filled this machine's disk once); the layers the new image
# shares with it stay cached for the next build.
for old in "$home/$image"-*.tar; do
  [[ $old == "$out" ]] || rm -f "$old" "$old.build-seconds"
done
# (This buildah's `images NAME` knows no repository without a tag: filter the whole list.)
"${buildah[@]}" images --format '{{.Name}}:{{.Tag}}' | { grep -x "localhost/bloomrun-$image:[0-9a-f]*" || true; } |
  while read -r ref; do [[ $ref == "$tag" ]] || "${buildah[@]}" rmi "$ref" >/dev/null 2>&1 || true; done
echo "$out"
