#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time: `scripts/fuzz.sh [seconds-per-target]`
# (default 30). Exit 0 means zero crashes, hangs or out-of-memory inputs; otherwise the
# failing input is in fuzz/artifacts/<target>/ (replay it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>` in fuzz/).
#
# CI (.ci/run) runs it for 20 s per target; a long run, e.g. an hour per target:
# `scripts/fuzz.sh 3600`.
#
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 unlocks them on the stable
# toolchain. libFuzzer is C++: a C++ compiler is installed (g++, through apt, as root)
# when none is present. The first build compiles every dependency with AddressSanitizer
# (minutes); later builds reuse it (fuzz/target/, or $CARGO_TARGET_DIR).
# The seed corpora in fuzz/corpus/<target>/ are read, never written: what a run finds
# goes to a scratch directory that is thrown away.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/apt.sh
. scripts/lib/apt.sh

seconds="${1:-30}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [seconds-per-target]" >&2; exit 64 ;;
esac
export RUSTC_BOOTSTRAP=1

if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_install_without_services g++
  else
    echo "fuzz: libFuzzer needs a C++ compiler (install g++)" >&2
    exit 1
  fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz@0.13.2
fi

cd fuzz
# The fuzz package has its own Cargo.lock; a stale one (a dependency added to gpulink-core
# and not here) fails here, as `--locked` fails the main build, instead of being rewritten
# by the build (cargo fuzz cannot pass --locked).
if ! cargo metadata --locked --format-version 1 >/dev/null; then
  echo "fuzz: fuzz/Cargo.lock is out of date: run \`cargo metadata --format-version 1 >/dev/null\` in fuzz/ (a minimal update) and commit it" >&2
  exit 1
fi
targets=$(cargo fuzz list)
cargo fuzz build

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=""
for target in $targets; do
  mkdir -p "$scratch/$target"
  echo "fuzz: $target for ${seconds}s"
  # -timeout: an input that takes over 20 s is a hang; -rss_limit_mb: one over 2 GiB is
  # unbounded memory. Both count as crashes.
  if ! cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
      2>"$scratch/$target.log"; then
    tail -n 60 "$scratch/$target.log"
    failed="$failed $target"
  else
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$scratch/$target.log" | tail -n 2 || true
  fi
done

if [ -n "$failed" ]; then
  echo "fuzz: crashes in:$failed (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: no crashes in $(echo $targets | wc -w) targets"
