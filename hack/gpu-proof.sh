#!/usr/bin/env bash
# The agent's NVML backend against nvidia-smi, on a machine with NVIDIA GPUs (hack/gpu_proof.py).
#
#   hack/gpu-proof.sh [OUT_DIR]     report in OUT_DIR/gpu-proof.json (default: .)
#
# Needs python3 with the project's agent dependencies (aiohttp, pydantic, pydantic-settings,
# prometheus-client, pyyaml, grpcio, protobuf, nvidia-ml-py); PyTorch, when installed, drives the
# load phase. Where none can be installed from a registry, put their wheels in .whl/ (for the
# machine's Python) and they are installed into a temporary directory first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
mkdir -p "$out"
python=${PYTHON:-python3}
command -v nvidia-smi >/dev/null || { echo "gpu-proof: nvidia-smi not found: no NVIDIA driver here" >&2; exit 2; }
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.csv"
exec "$python" hack/gpu_proof.py --out "$out/gpu-proof.json"
