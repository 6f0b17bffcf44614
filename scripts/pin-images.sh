#!/usr/bin/env bash
# Pins the Dockerfile's base images by digest: resolves each image ARG default
# (BUILD_IMAGE, RUNTIME_IMAGE: `name:tag`, or `name:tag@sha256:...` to re-pin) at the
# registry and rewrites it to `name:tag@sha256:<digest of the tag's manifest list>`, then
# drops the "# Unpinned:" note, which must stay only while some default is a bare tag.
# Run it where a registry is reachable (not on the machine this was written on), review
# the diff, commit; again whenever the bases get fixes.
#
# Usage: scripts/pin-images.sh [DOCKERFILE]   (default packaging/docker/Dockerfile)
# Resolves with skopeo, else `docker buildx imagetools`; PIN_IMAGES_RESOLVE=CMD uses
# CMD IMAGE instead (it prints sha256:<64 hex>). Nothing is written unless every image
# resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
dockerfile=${1:-packaging/docker/Dockerfile}

resolve() {
  if [ -n "${PIN_IMAGES_RESOLVE:-}" ]; then
    $PIN_IMAGES_RESOLVE "$1"
  elif command -v skopeo >/dev/null; then
    # The digest of the manifest as the registry serves it (for a multi-arch image, the
    # list's), what `docker pull name@digest` verifies.
    # Byte for byte (a file: $(...) would strip a trailing newline and change the sum).
    local raw
    raw=$(mktemp)
    if ! skopeo inspect --raw "docker://$1" >"$raw"; then
      rm -f "$raw"
      return 1
    fi
    sha256sum "$raw" | awk '{print "sha256:" $1}'
    rm -f "$raw"
  elif docker buildx version >/dev/null 2>&1; then
    docker buildx imagetools inspect "$1" | awk '$1 == "Digest:" {print $2; exit}'
  else
    echo "neither skopeo nor docker buildx is installed" >&2
    return 1
  fi
}

# ARG values, in order, so ${RUST_VERSION} in an image name expands as Docker would.
declare -A args=()
expand() {
  local text=$1 name
  for name in "${!args[@]}"; do
    text=${text//\$\{$name\}/${args[$name]}}
  done
  printf '%s' "$text"
}

out=$(mktemp)
trap 'rm -f "$out"' EXIT
while IFS= read -r line || [ -n "$line" ]; do
  if [[ $line =~ ^ARG\ ([A-Z_]+)=(.*)$ ]]; then
    name=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
    if [[ $name == *_IMAGE ]]; then
      tag=${value%%@*}
      image=$(expand "$tag")
      digest=$(resolve "$image") || { echo "cannot resolve $image" >&2; exit 1; }
      if ! [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]]; then
        echo "$image: not a digest: '$digest'" >&2
        exit 1
      fi
      echo "$name: $image@$digest" >&2
      line="ARG $name=$tag@$digest"
    fi
    args[$name]=$(expand "$value")
  fi
  printf '%s\n' "$line" >>"$out"
done <"$dockerfile"
# Every image default is pinned now: the note saying otherwise goes.
sed -i '/^# Unpinned: /d' "$out"
cat "$out" >"$dockerfile"
