# Sourced by scripts/test.sh and benches/compare.sh: installs Debian packages without
# letting any of them start a service during the install (nginx's default site would take
# :80, Prometheus :9090), through a policy-rc.d that refuses, present for the install only.
# Exits the calling script when the install fails.
apt_install_without_services() {
  local added_policy="" installed=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
  fi
  apt-get update &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" &&
    installed=1
  [ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d
  [ -n "$installed" ] || { echo "cannot install: $*" >&2; exit 1; }
}
