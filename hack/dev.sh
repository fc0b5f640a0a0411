#!/usr/bin/env bash
# `make dev`: the whole product on the local control plane, until Ctrl-C.
#
#   hack/dev.sh           bring everything up, show it, stay up until Ctrl-C, then clean up
#   hack/dev.sh --check   the same, but exit (and clean up) right after showing it (make dev-smoke)
#
# Steps: the local control plane with simulated GPU nodes (hack/cluster.sh, kept if it was already
# up), the agent DaemonSet in modelfleet-system (hack/dev-agents.yaml), the pod runner (it starts the
# real agent and a vLLM stand-in for each pod on a simulated node), the operator, the gateway on
# 127.0.0.1:8080, then examples/. It waits until gemma3-4B has 2 ready instances on distinct nodes
# and prints the pool, the ModelDeployments and every instance with its global GPU IDs.
# On exit it stops every process it started and deletes what it applied; it stops the cluster only
# if it started it. Logs are in .dev/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CHECK=0
[[ ${1:-} == --check ]] && CHECK=1
PY="$ROOT/.venv/bin/python"
LOGS="$ROOT/.dev"
GATEWAY_PORT="${DEV_GATEWAY_PORT:-8080}"
METRICS_PORT="${DEV_METRICS_PORT:-8081}"
WAIT_S="${DEV_WAIT_S:-180}"

log() { printf '[dev] %s\n' "$*" >&2; }
die() { printf '[dev] error: %s\n' "$*" >&2; exit 1; }

# The simulated fleet only, unless asked: real nodes need root and cost memory (hack/cluster.sh).
export REAL_NODES="${REAL_NODES:-0}"
BIN="$(hack/build-control-plane.sh | tail -1)"
export PATH="$BIN:$PATH" KUBECONFIG="$ROOT/.cluster/kubeconfig"
mkdir -p "$LOGS"

PIDS=()
STARTED_CLUSTER=0
APPLIED=0
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  log "cleaning up"
  if (( APPLIED )); then
    kubectl delete -f examples/ --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  # The processes we started, by their pids, newest first (operator before the pod runner).
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if (( STARTED_CLUSTER )); then
    hack/cluster.sh down || true
  else
    kubectl delete -f hack/dev-agents.yaml --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! hack/cluster.sh status >/dev/null 2>&1; then
  hack/cluster.sh up
  STARTED_CLUSTER=1
fi

kubectl apply -f hack/dev-agents.yaml >/dev/null

start() {  # start NAME CMD...: run in the background, log to .dev/NAME.log
  local name=$1; shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  PIDS+=("$!")
  log "started $name (pid $!, log .dev/$name.log)"
}

start pod-runner "$PY" hack/pod_runner.py --kubeconfig "$KUBECONFIG" --log-dir "$LOGS/pods"
MODELFLEET_AGENT_NAMESPACE=modelfleet-system \
MODELFLEET_LEASE_NAMESPACE=modelfleet-system \
MODELFLEET_METRICS_HOST=127.0.0.1 \
MODELFLEET_METRICS_PORT="$METRICS_PORT" \
MODELFLEET_POLL_INTERVAL_S=2 \
MODELFLEET_SHARED_MODE=true \
  start operator "$PY" -m modelfleet operator --kubeconfig "$KUBECONFIG"
start gateway "$PY" -m modelfleet gateway --host 127.0.0.1 --port "$GATEWAY_PORT" --kubeconfig "$KUBECONFIG"

kubectl -n modelfleet-system rollout status daemonset/modelfleet-agent --timeout="${WAIT_S}s" >/dev/null
kubectl apply -f examples/
APPLIED=1

log "waiting for gemma3-4b: 2 ready instances on distinct nodes"
deadline=$(( $(date +%s) + WAIT_S ))
while true; do
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || die "a process exited early; see the logs in .dev/ (operator.log, pod-runner.log, gateway.log)"
  done
  ready=$(kubectl get modeldeployment gemma3-4b -o jsonpath='{.status.readyReplicas}' 2>/dev/null || true)
  nodes=$(kubectl get pods -l modelfleet.io/deployment=gemma3-4b \
    -o jsonpath='{range .items[?(@.status.podIP)]}{.spec.nodeName}{"\n"}{end}' 2>/dev/null | sort -u | grep -c . || true)
  if [[ $ready == 2 && $nodes == 2 ]]; then break; fi
  (( $(date +%s) < deadline )) || die "gemma3-4b not ready after ${WAIT_S}s; see .dev/operator.log and kubectl describe modeldeployment gemma3-4b"
  sleep 1
done

echo
echo "== GPU pool (modelfleet status --operator http://127.0.0.1:$METRICS_PORT)"
"$PY" -m modelfleet status --operator "http://127.0.0.1:$METRICS_PORT" || true
echo
echo "== kubectl get modeldeployments -o wide"
kubectl get modeldeployments -o wide
echo
echo "== instances and their global GPU IDs"
kubectl get pods -l app.kubernetes.io/component=replica -o custom-columns='INSTANCE:.metadata.name,NODE:.spec.nodeName,GPUS:.metadata.annotations.modelfleet\.io/gpus,IP:.status.podIP,READY:.status.conditions[?(@.type=="Ready")].status'
echo
cat <<EOF
The gateway listens on http://127.0.0.1:$GATEWAY_PORT (OpenAI API), for example:
  curl -s http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "gemma3-4B", "messages": [{"role": "user", "content": "hello"}]}'
Operator metrics: http://127.0.0.1:$METRICS_PORT/metrics   kubeconfig: .cluster/kubeconfig   logs: .dev/
EOF

if (( CHECK )); then
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d '{"model": "gemma3-4B", "messages": [{"role": "user", "content": "hello"}]}' || true)
  [[ $code == 200 ]] || die "the gateway answered $code for gemma3-4B"
  log "check passed: gemma3-4B has 2 ready instances on distinct nodes and answers through the gateway"
  exit 0
fi
log "up; press Ctrl-C to stop and clean up"
wait
