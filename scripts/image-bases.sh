#!/usr/bin/env bash
# Local stand-ins for the Dockerfile's two base images, for machines that have podman but
# no route to a registry (this one: neither Docker Hub nor gcr.io answers). Both are made
# from a minimal Debian bookworm root (debootstrap; tests/suite/image.rs passes the one
# tests/suite/systemd_boot.rs caches under the target directory) and this machine's Rust:
#
#   localhost/gpulink-build:rust-<version>-bookworm   for BUILD_IMAGE (rust:<v>-bookworm)
#     the root + gcc and libc6-dev (what aws-lc-rs compiles with) + the host's toolchain
#     at the places the official image uses: RUSTUP_HOME=/usr/local/rustup,
#     CARGO_HOME=/usr/local/cargo, cargo and rustc on PATH; and the CAs the host adds
#     to Debian's (/usr/local/share/ca-certificates), so cargo reaches crates.io through
#     the same network path the host uses.
#   localhost/gpulink-runtime:cc-debian12-nonroot     for RUNTIME_IMAGE (distroless/cc)
#     what distroless/cc-debian12:nonroot holds, taken from the root's packages: glibc,
#     libgcc, libssl3 when present, the CA bundle, tzdata when present, a passwd with
#     `nonroot` (65532); no shell, no package manager, nothing else.
#
# Then the Dockerfile builds as written, only its two build arguments substituted:
#
#   podman build --format docker -f packaging/docker/Dockerfile \
#     --build-arg BUILD_IMAGE=localhost/gpulink-build:rust-1.95-bookworm \
#     --build-arg RUNTIME_IMAGE=localhost/gpulink-runtime:cc-debian12-nonroot -t gpulink .
#
# Also kept: localhost/gpulink-debian-root:bookworm, the root itself as an image (the
# build image's first layer; tests/suite/image.rs runs its network-namespace holder on it).
#
# Usage: scripts/image-bases.sh DEBIAN_ROOT [--runtime-only]   (as root)
# Prints BUILD_IMAGE=, RUNTIME_IMAGE= and DEBIAN_IMAGE= lines (BUILD_IMAGE empty with
# --runtime-only, which skips the toolchain copy and the gcc install). An image that
# already exists is kept (remove it with `podman rmi` to remake it).
set -euo pipefail
root=${1:?usage: scripts/image-bases.sh DEBIAN_ROOT [--runtime-only]}
runtime_only=
[ "${2:-}" != --runtime-only ] || runtime_only=1
[ -x "$root/usr/bin/apt-get" ] || { echo "$root is not a Debian root" >&2; exit 1; }
# This machine's containers need these (no crun; a low open-files limit for runc).
podman=(podman --runtime runc)

sysroot=$(rustc --print sysroot)
version=$(rustc --version | awk '{print $2}')             # 1.95.0
short=${version%.*}                                       # 1.95
host=$(rustc -vV | awk '/^host:/ {print $2}')
build_image=localhost/gpulink-build:rust-$short-bookworm
runtime_image=localhost/gpulink-runtime:cc-debian12-nonroot
debian_image=localhost/gpulink-debian-root:bookworm

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! "${podman[@]}" image exists "$debian_image"; then
  # The root as a plain image.
  tar -C "$root" --exclude=./proc/* --exclude=./sys/* --exclude=./dev/* \
    --exclude=./var/cache/apt/archives/*.deb -c . |
    "${podman[@]}" import --quiet - "$debian_image" >/dev/null
fi

if [ -z "$runtime_only" ] && ! "${podman[@]}" image exists "$build_image"; then
  # apt and the toolchain on top of the root.
  # The toolchain without its documentation (share/doc is most of its size).
  mkdir -p "$work/toolchain"
  cp -a "$sysroot/bin" "$sysroot/lib" "$work/toolchain/"
  [ ! -d "$sysroot/libexec" ] || cp -a "$sysroot/libexec" "$work/toolchain/"
  # The CAs this machine adds to Debian's (an egress proxy's, here): cargo in the build
  # fetches crates through the same network, so the builder trusts what the host does.
  mkdir -p "$work/local-ca"
  cp /usr/local/share/ca-certificates/*.crt "$work/local-ca/" 2>/dev/null || true
  cat >"$work/Containerfile" <<EOF
FROM $debian_image
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \\
 && rm -rf /var/lib/apt/lists/*
COPY local-ca /usr/local/share/ca-certificates
RUN update-ca-certificates >/dev/null
COPY toolchain /usr/local/rustup/toolchains/$version-$host
RUN mkdir -p /usr/local/cargo/bin \\
 && for tool in cargo rustc rustdoc; do \\
      ln -s /usr/local/rustup/toolchains/$version-$host/bin/\$tool /usr/local/cargo/bin/\$tool; \\
    done
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$version
EOF
  "${podman[@]}" build --network host --ulimit nofile=1024:1024 -q -f "$work/Containerfile" \
    -t "$build_image" "$work" >/dev/null
fi

if ! "${podman[@]}" image exists "$runtime_image"; then
  # Every file of the packages distroless/cc is made of, at its real path (bookworm's
  # /lib is a symlink to usr/lib: its files are taken from there, then the symlinks
  # themselves added).
  stage=$work/runtime
  mkdir -p "$stage"
  for package in libc6 libgcc-s1 libssl3 ca-certificates tzdata netbase; do
    dpkg-query --admindir="$root/var/lib/dpkg" -W "$package" >/dev/null 2>&1 || continue
    dpkg-query --admindir="$root/var/lib/dpkg" -L "$package"
  done >"$work/listed"
  merged=""
  for link in lib lib64 bin sbin; do
    [ ! -L "$root/$link" ] || merged="$merged;s|^/$link/|/usr/$link/|"
  done
  sed -e "${merged#;}" -e 's|^/||' "$work/listed" | sort -u >"$work/paths"
  # Directories with their modes, no recursion; a listed file missing in the root (a
  # diversion) is skipped.
  tar -C "$root" --no-recursion --ignore-failed-read -T "$work/paths" -c 2>/dev/null |
    tar -C "$stage" -x
  for link in lib lib64; do
    [ ! -L "$root/$link" ] || cp -a "$root/$link" "$stage/$link"
  done
  # The CA bundle update-ca-certificates made (no package owns it) and its directory.
  mkdir -p "$stage/etc/ssl/certs"
  cp -a "$root/etc/ssl/certs/." "$stage/etc/ssl/certs/"
  cat >"$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$stage/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  install -d -m 0755 -o 65532 -g 65532 "$stage/home/nonroot"
  install -d -m 0700 "$stage/root"
  install -d -m 1777 "$stage/tmp"
  tar -C "$stage" -c . | "${podman[@]}" import --quiet \
    --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    - "$runtime_image" >/dev/null
fi
[ -z "$runtime_only" ] || build_image=
echo "BUILD_IMAGE=$build_image"
echo "RUNTIME_IMAGE=$runtime_image"
echo "DEBIAN_IMAGE=$debian_image"
