#!/usr/bin/env bash
# Installs what the test cluster's real nodes need from Debian's packages: containerd, runc, the
# CNI plugins (bridge, host-local, loopback) and iproute2. Only what is missing is installed; a
# second run does nothing. The packages' services are never started or enabled: every real node
# starts its own containerd as a plain process (hack/realnodes.sh).
#
#   hack/install-node-deps.sh            install what is missing (needs root and apt-get)
#   hack/install-node-deps.sh --check    exit 0 when everything is there, else say what is missing
set -euo pipefail

log() { printf '[install-node-deps] %s\n' "$*" >&2; }
die() { printf '[install-node-deps] error: %s\n' "$*" >&2; exit 1; }

# command -> Debian package
declare -A NEED=(
  [containerd]=containerd
  [ctr]=containerd
  [runc]=runc
  [/usr/lib/cni/bridge]=containernetworking-plugins
  [/usr/lib/cni/host-local]=containernetworking-plugins
  [/usr/lib/cni/loopback]=containernetworking-plugins
  [ip]=iproute2
  [unshare]=util-linux
  [nsenter]=util-linux
)

missing_packages() {
  local what
  for what in "${!NEED[@]}"; do
    if [[ $what == /* ]]; then [[ -x $what ]] && continue; else command -v "$what" >/dev/null && continue; fi
    echo "${NEED[$what]}"
  done | sort -u
}

pkgs=$(missing_packages)
if [[ ${1:-} == --check ]]; then
  [[ -z $pkgs ]] || { log "missing Debian packages: $(echo $pkgs) (run hack/install-node-deps.sh as root)"; exit 1; }
  exit 0
fi
[[ $# -eq 0 ]] || die "unknown argument '$1' (usage: $0 [--check])"
[[ -z $pkgs ]] && exit 0
[[ $(id -u) -eq 0 ]] || die "real nodes need these Debian packages: $(echo $pkgs); install them as root (sudo hack/install-node-deps.sh) or run without real nodes (REAL_NODES=0)"
command -v apt-get >/dev/null || die "no apt-get: install $(echo $pkgs) with this system's package manager"

log "installing $(echo $pkgs) from Debian's packages"
# The containerd package starts and enables its service on install; a policy-rc.d that refuses
# keeps this machine's services as they were (removed again whatever happens).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
fi
cleanup() { if (( own_policy )); then rm -f "$policy"; fi; }
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2 || die "apt-get update failed: check the Debian mirror in /etc/apt/sources.list"
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $pkgs >&2 || die "apt-get install $(echo $pkgs) failed"
if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  systemctl disable --now containerd.service >/dev/null 2>&1 || true
fi
left=$(missing_packages)
[[ -z $left ]] || die "still missing after install: $(echo $left)"
log "installed $(echo $pkgs)"
