#!/usr/bin/env bash
# The local Kubernetes control plane for tests and development: real etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler, with kwok playing the kubelets of simulated GPU nodes,
# started by `kwokctl --runtime binary` with every component on 127.0.0.1, and beside them real
# kubelet nodes with containerd and a fake NVIDIA driver (hack/realnodes.py, hack/real-nodes.yaml).
#
#   hack/cluster.sh up [--nodes FILE]   start it (a no-op when it is already up and unchanged)
#   hack/cluster.sh down                stop it and remove its files; no process is left behind
#   hack/cluster.sh status              say whether it is up; exit 0 only when it is healthy
#
# REAL_NODES=0 starts the simulated nodes only (fast; no root needed) and stops real nodes that
# run; REAL_NODES_FILE names another real-nodes file.
#
# Everything lives in .cluster/ of this checkout (kubeconfig at .cluster/kubeconfig). The cluster
# name and its loopback pod range (127.<octet>.0.0/16) derive from the checkout path, so several
# checkouts on one machine can each run a cluster at the same time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.cluster"
export KWOK_WORKDIR="$DIR/kwok"
KUBECONFIG_FILE="$DIR/kubeconfig"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
NODES="${NODES:-$ROOT/hack/nodes.yaml}"
WAIT_S="${CLUSTER_WAIT_S:-120}"
REAL_NODES="${REAL_NODES:-1}"
REAL_NODES_FILE="${REAL_NODES_FILE:-$ROOT/hack/real-nodes.yaml}"

hash=$(printf '%s' "$ROOT" | sha256sum | cut -c1-8)
NAME="mf-$hash"
# 16..239: away from 127.0.0.x, where other local services usually listen.
OCTET=$(( 16 + 0x${hash:0:4} % 224 ))
CDIR="$KWOK_WORKDIR/clusters/$NAME"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

# Processes of this cluster: those its pid files name, and any whose command line mentions the
# cluster directory (a component whose pid file was lost). Only ever this checkout's processes.
cluster_pids() {
  local p pid
  if [[ -d $CDIR/pids ]]; then
    for p in "$CDIR"/pids/*.pid; do
      [[ -f $p ]] || continue
      pid=$(<"$p")
      [[ $pid =~ ^[0-9]+$ ]] && [[ -d /proc/$pid ]] && echo "$pid"
    done
  fi
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [[ $pid == "$$" ]] && continue
    if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$CDIR/"; then echo "$pid"; fi
  done | sort -u
}

# The binaries' directory if they are built, else "" (down and status never start a build).
cached_bin() { "$ROOT/hack/build-control-plane.sh" --cached-only 2>/dev/null | tail -1 || true; }

kubectl_() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s "$@"; }

healthy() {
  [[ -f $KUBECONFIG_FILE && -d $CDIR/pids ]] || return 1
  local p pid n=0
  for p in "$CDIR"/pids/*.pid; do
    [[ -f $p ]] || return 1
    pid=$(<"$p")
    [[ -d /proc/$pid ]] || return 1
    n=$((n + 1))
  done
  (( n >= 5 )) || return 1  # etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok
  kubectl_ get --raw /readyz >/dev/null 2>&1
}

stop_cluster() {
  if [[ -d $DIR/real ]]; then realnodes down || log "the real nodes did not stop cleanly"; fi
  if [[ -d $CDIR && -n $BIN ]]; then
    "$BIN/kwokctl" --v=WARN --name "$NAME" delete cluster >&2 2>&1 || log "kwokctl delete failed; stopping the processes directly"
  fi
  local pids deadline
  pids=$(cluster_pids)
  if [[ -n $pids ]]; then
    log "stopping leftover processes: $(echo $pids)"
    kill $pids 2>/dev/null || true
    deadline=$(( $(date +%s) + 10 ))
    while [[ -n $(cluster_pids) ]] && (( $(date +%s) < deadline )); do sleep 0.2; done
    pids=$(cluster_pids)
    [[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
  fi
  rm -rf "$CDIR" "$KUBECONFIG_FILE" "$DIR/state"
}

write_config() {
  cat >"$DIR/kwokctl.yaml" <<EOF
# Written by hack/cluster.sh; regenerated on every cluster start.
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  bindAddress: 127.0.0.1
  kubeApiserverBinary: $BIN/kube-apiserver
  kubeControllerManagerBinary: $BIN/kube-controller-manager
  kubeSchedulerBinary: $BIN/kube-scheduler
  kubectlBinary: $BIN/kubectl
  kwokControllerBinary: $BIN/kwok
  etcdBinary: $BIN/etcd
  quietPull: true
  disableQPSLimits: true
componentsPatches:
- name: kube-apiserver
  extraArgs:
  - key: advertise-address
    value: 127.0.0.1
  # One ClusterIP Service per ModelDeployment: the default /24 holds only 254 of them.
  - key: service-cluster-ip-range
    value: 10.0.0.0/16
  # Real nodes (hack/realnodes.py): reach their kubelets by InternalIP (their names resolve
  # nowhere), and as the cluster CA's admin, the only client those kubelets accept.
  - key: kubelet-preferred-address-types
    value: InternalIP,Hostname
  - key: kubelet-client-certificate
    value: $CDIR/pki/admin.crt
  - key: kubelet-client-key
    value: $CDIR/pki/admin.key
- name: kwok-controller
  extraArgs:
  # kwok plays the kubelet of the simulated nodes only; real nodes have their own.
  - key: manage-all-nodes
    value: "false"
  - key: manage-nodes-with-annotation-selector
    value: kwok.x-k8s.io/node=fake
---
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  # Pod IPs for nodes without a podCIDR; simulated GPU nodes each get their own /24.
  cidr: 127.$OCTET.255.0/24
  nodeIP: 127.$OCTET.0.254
  # kwokctl passes this object on without kwok's defaults (kwok v0.8.0), and the controller
  # refuses a parallelism of 0, so the defaults are stated here.
  podPlayStageParallelism: 4
  nodePlayStageParallelism: 4
  nodeLeaseParallelism: 4
  podsOnNodeSyncParallelism: 1
  enablePodsOnNodeSyncListPager: true
---
EOF
  cat "$ROOT/hack/kwok-stages.yaml" >>"$DIR/kwokctl.yaml"
}

# What the running cluster was made from: a change in binaries, component config or stages means a
# new cluster; a change in the CRD or the nodes file is applied to the running one.
cluster_fingerprint() {
  { echo "$BIN"; declare -f write_config; cat "$ROOT/hack/kwok-stages.yaml"; } | sha256sum | cut -c1-16
}
content_fingerprint() { cat "$ROOT/crds/"*.yaml "$NODES" | sha256sum | cut -c1-16; }

apply_content() {
  log "installing the modelfleet CRD"
  kubectl_ apply -f "$ROOT/crds/" >&2
  kubectl_ wait --for=condition=Established --timeout=60s -f "$ROOT/crds/" >&2
  log "creating simulated GPU nodes from ${NODES#"$ROOT"/}"
  "$PYTHON" "$ROOT/hack/simnodes.py" --kubeconfig "$KUBECONFIG_FILE" --nodes "$NODES" \
    --octet "$OCTET" --timeout 60
}

realnodes() { "$PYTHON" "$ROOT/hack/realnodes.py" "$1" --root "$DIR/real" --cluster "$NAME" --octet "$OCTET" "${@:2}"; }

# The real nodes: their Debian packages, the images their pods run, then the nodes themselves
# (a no-op when they are up). REAL_NODES=0 stops any that run instead.
real_nodes_up() {
  if [[ $REAL_NODES == 0 ]]; then
    [[ ! -d $DIR/real ]] || realnodes down
    return 0
  fi
  "$ROOT/hack/install-node-deps.sh"
  local images pause="" pause_ref="" modelfleet="" vllm_sim=""
  images=$("$PYTHON" "$ROOT/hack/images.py" build) || die "building the node images failed"
  eval "$images"
  realnodes up --nodes "$REAL_NODES_FILE" --bin-dir "$BIN" --kubeconfig "$KUBECONFIG_FILE" \
    --pki "$CDIR/pki" --pause-image "$pause_ref" \
    --image "$pause" --image "$modelfleet" ${vllm_sim:+--image "$vllm_sim"} \
    || die "real nodes did not start (REAL_NODES=0 starts the simulated nodes only)"
}

preflight() {
  [[ -x $PYTHON ]] || die "no Python environment at $PYTHON: run \`make install\` first (or set PYTHON)"
  [[ -f $NODES ]] || die "nodes file $NODES does not exist"
  "$PYTHON" "$ROOT/hack/simnodes.py" --check --nodes "$NODES" || die "fix the nodes file $NODES"
  BIN=$("$ROOT/hack/build-control-plane.sh" | tail -1)
  [[ -x $BIN/kwokctl ]] || die "control plane binaries not found in '$BIN'"
}

cmd_up() {
  local start state_cluster="" state_content=""
  start=$(date +%s%N)
  preflight
  mkdir -p "$DIR"
  if [[ -f $DIR/state ]]; then read -r state_cluster state_content <"$DIR/state" || true; fi
  if healthy && [[ $state_cluster == "$(cluster_fingerprint)" ]]; then
    if [[ $state_content == "$(content_fingerprint)" ]]; then
      real_nodes_up
      log "cluster $NAME is already up (KUBECONFIG=${KUBECONFIG_FILE#"$ROOT"/})"
      return 0
    fi
    apply_content
    echo "$(cluster_fingerprint) $(content_fingerprint)" >"$DIR/state"
    real_nodes_up
    log "cluster $NAME updated"
    return 0
  fi
  if [[ -d $CDIR || -n $(cluster_pids) ]]; then
    log "replacing cluster $NAME: it is not healthy or was made from other binaries (a killed run?)"
    stop_cluster
  fi
  mkdir -p "$KWOK_WORKDIR"
  write_config
  log "starting cluster $NAME (kwokctl --runtime binary, pod range 127.$OCTET.0.0/16)"
  rm -f "$KUBECONFIG_FILE"
  if ! "$BIN/kwokctl" --v=WARN --name "$NAME" --config "$DIR/kwokctl.yaml" create cluster \
      --runtime binary --kubeconfig "$KUBECONFIG_FILE" --wait "${WAIT_S}s" >&2; then
    log "kwokctl could not start the cluster; component logs are in ${CDIR#"$ROOT"/}/logs"
    tail -n 20 "$CDIR"/logs/*.log >&2 2>/dev/null || true
    stop_cluster
    die "cluster start failed"
  fi
  apply_content
  echo "$(cluster_fingerprint) $(content_fingerprint)" >"$DIR/state"
  real_nodes_up
  log "cluster $NAME is up in $(( ($(date +%s%N) - start) / 1000000 ))ms; export KUBECONFIG=${KUBECONFIG_FILE#"$ROOT"/}"
}

cmd_down() {
  BIN=$(cached_bin)
  stop_cluster
  local left
  left=$(cluster_pids)
  [[ -z $left ]] || die "processes still running after stop: $(echo $left)"
  rm -rf "$KWOK_WORKDIR" "$DIR/kwokctl.yaml"
  log "cluster $NAME is down"
}

cmd_status() {
  BIN=$(cached_bin)
  if [[ -n $BIN ]] && healthy; then
    log "cluster $NAME is up (KUBECONFIG=${KUBECONFIG_FILE#"$ROOT"/})"
    kubectl_ get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count >&2
    if [[ -d $DIR/real ]]; then realnodes status || return 1; fi
    return 0
  fi
  if [[ -d $CDIR ]]; then log "cluster $NAME is not healthy (run \`make cluster-up\` to replace it)"; else log "cluster $NAME is down"; fi
  return 1
}

action="${1:-}"
shift || true
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    *) die "unknown argument '$1' (usage: hack/cluster.sh up [--nodes FILE] | down | status)" ;;
  esac
done
case "$action" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: hack/cluster.sh up [--nodes FILE] | down | status" ;;
esac
