#!/usr/bin/env bash
# The dependency tree holds one HTTP stack and one TLS stack: aws-sdk-kms's default
# features would bring a second, older hyper/rustls, and rcgen's would bring ring. And
# the shipped sidecar (the `gpulink` package without its default `dev-tools` feature, as
# the .deb and the image build it) carries no test equipment: no simulator, no CA
# generator. (That the product library cannot depend on the simulator needs no check:
# the simulator depends on it, so the reverse edge is a cycle cargo refuses.)
set -euo pipefail
cd "$(dirname "$0")/.."
dups=$(cargo tree --locked -d --depth 0 -e normal | grep -E '^(hyper|hyper-util|h2|http|rustls|tokio-rustls) v' || true)
if [ -n "$dups" ]; then
  echo "more than one version of a network-stack crate:" >&2
  echo "$dups" >&2
  exit 1
fi
ring=$(cargo tree --locked -e normal -i ring 2>/dev/null | grep -E '^ring v' || true)
if [ -n "$ring" ]; then
  echo "ring is in the dependency tree; rustls, rcgen and the AWS SDK must all use aws-lc-rs" >&2
  cargo tree --locked -e normal -i ring >&2
  exit 1
fi
shipped=$(cargo tree --locked -e normal -p gpulink --no-default-features --prefix none \
  | grep -E '^(rcgen|gpulink-sim) v' | sort -u || true)
if [ -n "$shipped" ]; then
  echo "test equipment in the shipped binary (cargo tree -e normal -p gpulink --no-default-features):" >&2
  echo "$shipped" >&2
  exit 1
fi
echo "dependency check: one hyper, one rustls, no ring; no simulator or rcgen in the shipped binary"
