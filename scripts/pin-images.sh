#!/usr/bin/env bash
# Pins the Dockerfile's base images by digest: resolves each image ARG default
# (BUILD_IMAGE, RUNTIME_IMAGE: `name:tag`, or `name:tag@sha256:...` to re-pin) at the
# registry and rewrites it to `name:tag@sha256:<digest of the tag's manifest list>`, then
# drops the "# Unpinned:" note, which must stay only while some default is a bare tag.
# Run it where a registry is reachable (not on the machine this was written on), review
# the diff, commit; again whenever the bases get fixes.
#
# Usage: scripts/pin-images.sh [--registry HOST[:PORT]] [--plain-http] [DOCKERFILE]
#   DOCKERFILE     default packaging/docker/Dockerfile
#   --registry R   look every image up at R instead of its own registry (a mirror of
#                  Docker Hub and gcr.io, or a local registry holding copies): rust:1.95-
#                  bookworm is asked as R/library/rust:1.95-bookworm, gcr.io/distroless/x:t
#                  as R/distroless/x:t. The Dockerfile keeps the original names: a digest
#                  names content, so a faithful mirror's is the origin's. This is how
#                  tests/suite/image.rs runs the script against a real registry on
#                  127.0.0.1.
#   --plain-http   talk HTTP, not HTTPS, to the registry (skopeo --tls-verify=false; a
#                  local test registry only)
# Resolves with skopeo, else `docker buildx imagetools`; PIN_IMAGES_RESOLVE=CMD uses
# CMD IMAGE instead (it prints sha256:<64 hex>). Nothing is written unless every image
# resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
registry="" plain_http="" dockerfile=""
while [ $# -gt 0 ]; do
  case $1 in
    --registry) registry=${2:?--registry needs HOST[:PORT]}; shift 2 ;;
    --registry=*) registry=${1#*=}; shift ;;
    --plain-http) plain_http=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$dockerfile" ] || { echo "one DOCKERFILE only" >&2; exit 2; }; dockerfile=$1; shift ;;
  esac
done
dockerfile=${dockerfile:-packaging/docker/Dockerfile}
[ -f "$dockerfile" ] || { echo "$dockerfile: no such file" >&2; exit 2; }

# Where an image is looked up: itself, or its path (Docker's normalisation: a first
# component with a dot, a colon or "localhost" is a registry; Docker Hub's one-part
# names live under library/) at --registry.
lookup_name() {
  local image=$1 first path
  [ -n "$registry" ] || { printf '%s' "$image"; return; }
  first=${image%%/*}
  if [ "$first" != "$image" ] && { [[ $first == *.* || $first == *:* ]] || [ "$first" = localhost ]; }; then
    path=${image#*/}
  elif [[ $image == */* ]]; then
    path=$image
  else
    path=library/$image
  fi
  printf '%s/%s' "$registry" "$path"
}

resolve() {
  if [ -n "${PIN_IMAGES_RESOLVE:-}" ]; then
    $PIN_IMAGES_RESOLVE "$1"
  elif command -v skopeo >/dev/null; then
    # The digest of the manifest as the registry serves it (for a multi-arch image, the
    # list's), what `docker pull name@digest` verifies.
    # Byte for byte (a file: $(...) would strip a trailing newline and change the sum).
    local raw tls=()
    [ -z "$plain_http" ] || tls=(--tls-verify=false)
    raw=$(mktemp)
    if ! skopeo inspect "${tls[@]}" --raw "docker://$1" >"$raw"; then
      rm -f "$raw"
      return 1
    fi
    sha256sum "$raw" | awk '{print "sha256:" $1}'
    rm -f "$raw"
  elif [ -n "$plain_http" ]; then
    echo "--plain-http needs skopeo" >&2
    return 1
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
      at=$(lookup_name "$image")
      digest=$(resolve "$at") || { echo "cannot resolve $at" >&2; exit 1; }
      if ! [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]]; then
        echo "$at: not a digest: '$digest'" >&2
        exit 1
      fi
      echo "$name: $image@$digest (from $at)" >&2
      line="ARG $name=$tag@$digest"
    fi
    args[$name]=$(expand "$value")
  fi
  printf '%s\n' "$line" >>"$out"
done <"$dockerfile"
# Every image default is pinned now: the note saying otherwise goes.
sed -i '/^# Unpinned: /d' "$out"
cat "$out" >"$dockerfile"
