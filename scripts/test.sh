#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: installs the Python test dependencies
# (moto as KMS, the official AWS Encryption SDK) into .venv and the ESDK 3.x line with the
# ESDK CLI into .venv-esdk3, starts one moto server on a free loopback port for all tests,
# and runs every Rust test.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/apt.sh
. scripts/lib/apt.sh

# The packaging tests: cargo-deb builds the .deb (tests/suite/packaging.rs), and, as root,
# debootstrap + systemd-nspawn boot a real systemd to install it in
# (tests/suite/systemd_boot.rs); nginx is the cluster's TLS + HTTP/2 front in tests/suite/goaway.rs,
# Prometheus's promtool lints /metrics in tests/suite/cutover_metrics.rs, and headless
# Chromium renders the status page in tests/suite/status_page.rs; podman with runc
# (the runtime tests/suite/image.rs names) runs the image there: its runtime stage with
# this build's binary, about 30 s, and Debian's docker-registry (the distribution
# registry) with skopeo prove scripts/pin-images.sh against a real registry on loopback;
# the whole Dockerfile, a cold release build in a
# container, only with GPULINK_IMAGE_TEST=dockerfile (README: "Build the image without a
# registry"). Each is installed only when missing.
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install --locked cargo-deb@3.8.0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
  command -v systemd-nspawn >/dev/null || missing="$missing systemd-container"
  command -v dpkg-deb >/dev/null || missing="$missing dpkg"
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing="$missing nginx-light"
  command -v promtool >/dev/null || missing="$missing prometheus"
  command -v chromium >/dev/null || missing="$missing chromium"
  command -v podman >/dev/null || missing="$missing podman"
  command -v runc >/dev/null || missing="$missing runc"
  command -v skopeo >/dev/null || missing="$missing skopeo"
  command -v docker-registry >/dev/null || missing="$missing docker-registry"
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one word per package
    apt_install_without_services $missing
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
if [ ! -x .venv-esdk3/bin/python ]; then
  python3 -m venv .venv-esdk3
fi
.venv-esdk3/bin/pip install --quiet --disable-pip-version-check -r tests/requirements-esdk3.txt

export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true

port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.venv/bin/moto_server -H 127.0.0.1 -p "$port" >/tmp/gpulink-test-moto.log 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  if .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; then
    break
  fi
  sleep 0.2
done
export GPULINK_TEST_MOTO_URL="http://127.0.0.1:$port"

cargo test --locked "$@"
