#!/usr/bin/env bash
# The side-by-side load benchmark (issue 11): direct to the upstream over TLS, nginx as a
# TLS-originating reverse proxy, and gpulink sealing with aws-esdk, in one run against a
# native nginx upstream on loopback. Installs what it needs (each only when missing),
# builds gpulink in release, then runs benches/compare.py, which starts, measures and
# stops everything and prints the table that goes into BENCHMARKS.md.
#
#   bash benches/compare.sh            # the full run (about 4 minutes after the installs)
#   bash benches/compare.sh --quick    # shorter phases, for trying it out (about 1.5 minutes)
#   bash benches/compare.sh --instructions   # per-request counts a busy machine does not change
#                                            # (callgrind instructions, perf stat syscalls/futex/
#                                            # context switches); no oha, about 5 minutes
#
# Tools are cached in ${GPULINK_BENCH_CACHE:-~/.cache/gpulink-bench}. Traffic stays on
# 127.253.x.y and 127.254.x.y. Not part of CI (it takes minutes and wants a quiet machine).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/apt.sh
. scripts/lib/apt.sh

cache="${GPULINK_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpulink-bench}"
mkdir -p "$cache"
oha_version=1.16.0

# nginx (upstream and the proxy under comparison) and wrk, from Debian's packages.
missing=""
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing="$missing nginx-light"
command -v wrk >/dev/null || missing="$missing wrk"
instructions=""
for arg in "$@"; do [ "$arg" = --instructions ] && instructions=1; done
if [ -n "$instructions" ]; then
  command -v valgrind >/dev/null || missing="$missing valgrind"
  command -v perf >/dev/null || missing="$missing linux-perf"
fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "benches/compare.sh: please install$missing (Debian packages)" >&2
    exit 1
  fi
  # shellcheck disable=SC2086 # one word per package
  apt_install_without_services $missing
fi

# oha (fixed-rate load with latency correction), built once into the cache.
oha="$cache/oha-$oha_version/bin/oha"
if [ -z "$instructions" ] && [ ! -x "$oha" ]; then
  echo "installing oha $oha_version into $cache (once; several minutes on a small machine)" >&2
  start=$(date +%s)
  cargo install --locked "oha@$oha_version" --root "$cache/oha-$oha_version"
  echo "oha installed in $(( $(date +%s) - start )) s" >&2
fi

# moto as KMS, as the test suite uses it (same requirements, same .venv).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt

cargo build --locked --release --bin gpulink

exec python3 benches/compare.py --oha "$oha" --gpulink "${CARGO_TARGET_DIR:-target}/release/gpulink" \
  --python .venv/bin/python --moto .venv/bin/moto_server "$@"
