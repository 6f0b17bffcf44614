#!/usr/bin/env bash
# The soak: `scripts/soak.sh [seconds]` (default 600). Starts moto, `gpulink sim` and
# `gpulink run` as separate processes on 127.193.x.y, drives steady load through every
# ENI failure (down, blackhole, slow, healthy) and SIGHUP reloads through every phase,
# round after round, and fails on any lost request (one that got no answer, or failed
# although the cluster never saw it), any request delivered twice, or proxy RSS growth
# over 5 % after the two warm-up rounds. A short version (four rounds) is `soak_short` in
# tests/suite/soak.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPULINK_SOAK_SECS="${1:-600}"
exec bash scripts/test.sh --test suite -- --ignored --nocapture soak::soak_long
