#!/usr/bin/env bash
# Builds the upstream binaries of the local test control plane from the Go module proxy:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, kwokctl and helm, and
# the kubelet of the test cluster's real nodes (hack/realnodes.sh).
# They land in a per-user cache keyed by their versions; a second run finds them and does nothing.
# The last line printed on stdout is the directory that holds the binaries.
#
#   hack/build-control-plane.sh                build what is missing (the first build is long)
#   hack/build-control-plane.sh --cached-only  print the directory if the binaries are there, else
#                                              exit 1 without building
# Versions: K8S_VERSION, ETCD_VERSION, KWOK_VERSION, HELM_VERSION; cache: MODELFLEET_CP_CACHE.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-3.6.14}"
KWOK_VERSION="${KWOK_VERSION:-0.8.0}"
HELM_VERSION="${HELM_VERSION:-3.22.0}"
GO_MIN="1.26"
CACHE="${MODELFLEET_CP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelfleet/control-plane}"
BIN="$CACHE/bin-k8s$K8S_VERSION-etcd$ETCD_VERSION-kwok$KWOK_VERSION-helm$HELM_VERSION"
TOOLS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kwok kwokctl helm)
KUBE_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)

log() { printf '[build-control-plane] %s\n' "$*" >&2; }
die() { printf '[build-control-plane] error: %s\n' "$*" >&2; exit 1; }

have_all() { for t in "${TOOLS[@]}"; do [[ -x $BIN/$t ]] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi
if [[ ${1:-} == --cached-only ]]; then
  log "not built yet: $BIN"
  exit 1
fi
[[ $# -eq 0 ]] || die "unknown argument '$1' (usage: $0 [--cached-only])"

# --- preflight: a Go toolchain new enough, and a module proxy that answers ---
command -v go >/dev/null || die "go is not on PATH; install Go >= $GO_MIN (https://go.dev/dl/) and run again"
gov=$(go env GOVERSION | sed 's/^go//')
if [[ "$(printf '%s\n%s\n' "$GO_MIN" "$gov" | sort -V | head -1)" != "$GO_MIN" ]]; then
  die "Go $gov is too old: Kubernetes $K8S_VERSION needs Go >= $GO_MIN"
fi
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0
if ! probe=$(cd "$(mktemp -d)" && timeout 60 go list -m "k8s.io/kubernetes@v$K8S_VERSION" 2>&1); then
  die "the Go module proxy ($(go env GOPROXY)) does not serve k8s.io/kubernetes@v$K8S_VERSION; check GOPROXY, the network and K8S_VERSION: ${probe##*$'\n'}"
fi

mkdir -p "$CACHE/k8s-mod" "$CACHE/etcd-mod"
OUT="$BIN.partial"
# A cache from before a tool was added: start from what it has and build only what is missing.
if [[ -d $BIN && ! -d $OUT ]]; then cp -a "$BIN" "$OUT"; fi
mkdir -p "$OUT"
start=$(date +%s)
step() { log "[$(( $(date +%s) - start ))s] $*"; }
# Runs a long command and says every 30 s that it is still going (CI logs stay alive, people wait).
with_heartbeat() {
  local what=$1; shift
  "$@" &
  local pid=$! t0
  t0=$(date +%s)
  while ! wait_for_exit "$pid" 30; do
    log "[$(( $(date +%s) - start ))s] still $what ($(( $(date +%s) - t0 ))s so far)"
  done
  wait "$pid"
}
wait_for_exit() {  # pid seconds: 0 once the process has exited, 1 if it still runs after seconds
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.2
  done
  return 1
}

# --- Kubernetes: a helper module that requires k8s.io/kubernetes and replaces every staging module ---
missing=()
for c in "${KUBE_CMDS[@]}"; do [[ -x $OUT/$c ]] || missing+=("$c"); done
if (( ${#missing[@]} )); then
  step "resolving k8s.io/kubernetes v$K8S_VERSION and its staging modules"
  cd "$CACHE/k8s-mod"
  rm -f go.mod go.sum
  go mod init local.build/k8s-bins >/dev/null 2>&1
  go mod edit -go=1.26.0 -require="k8s.io/kubernetes@v$K8S_VERSION"
  gomod=$(cd "$(mktemp -d)" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
          | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [[ -f $gomod ]] || die "could not download the go.mod of k8s.io/kubernetes@v$K8S_VERSION"
  mods=$(grep -oE '^[[:space:]]*k8s\.io/[a-z0-9.-]+ => \./staging/' "$gomod" | awk '{print $1}' || true)
  [[ -n $mods ]] || mods=$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod")
  staging="v0.${K8S_VERSION#1.}"
  for m in $mods; do go mod edit -replace="$m=$m@$staging"; done
  step "replaced $(echo $mods | wc -w) staging modules with $staging"
  pkgs=$(printf 'k8s.io/kubernetes/cmd/%s ' "${missing[@]}")
  go get $(for p in $pkgs; do printf '%s@v%s ' "$p" "$K8S_VERSION"; done) >&2
  minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  ld="-s -w"
  for kv in "gitVersion=v$K8S_VERSION" gitMajor=1 "gitMinor=$minor" gitTreeState=clean \
            "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
    ld="$ld -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  step "building ${missing[*]} (the long step)"
  with_heartbeat "building ${missing[*]}" go build -trimpath -ldflags "$ld" -o "$OUT/" $pkgs
fi

# --- etcd: its own helper module (its go.mod replaces are ignored when it is a dependency) ---
if [[ ! -x $OUT/etcd ]]; then
  step "building etcd v$ETCD_VERSION"
  cd "$CACHE/etcd-mod"
  rm -f go.mod go.sum
  go mod init local.build/etcd-bin >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  go build -trimpath -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3
fi

# --- kwok, kwokctl and helm: plain go install works (no replace directives) ---
if [[ ! -x $OUT/kwok || ! -x $OUT/kwokctl ]]; then
  step "building kwok and kwokctl v$KWOK_VERSION"
  GOBIN="$OUT" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION"
fi
if [[ ! -x $OUT/helm ]]; then
  step "building helm v$HELM_VERSION"
  minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  GOBIN="$OUT" go install -trimpath -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
fi

"$OUT/kube-apiserver" --version >&2
"$OUT/etcd" --version | head -1 >&2
rm -rf "$BIN"
mv "$OUT" "$BIN"
step "done: $BIN"
echo "$BIN"
