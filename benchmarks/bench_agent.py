"""Agent benchmark: sample-building cost per GPU, and /v1/gpus latency over real HTTP (8 GPUs).

The NVML figure uses the tests' fake `pynvml` (no GPU on the machines this runs on), so it
measures the agent's own work per GPU (calls, conversions, the reply model), not the driver's.
The latency figure is a real aiohttp server on 127.0.0.1 answering from the latest sample.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit" / "agent"))

from agent_testlib import FakeGpu, FakeNvml

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.nvml import NvmlBackend
from modelfleet.agent.server import build_app
from modelfleet.agent.simulated import (
    SimulatedBackend,
    build_sim_gpus,
    compute_sim_stats,
    parse_replica_pod,
)
from modelfleet.agent.state import AgentState, poll_once

NODE = "bench-node"
GPUS = 8


def bench_nvml_sample(rounds: int) -> float:
    """ms per GPU of one NVML sample (fake pynvml), median over rounds."""
    fake = FakeNvml(gpus=[FakeGpu(uuid=f"GPU-{i:04d}", used_mib=i * 1000) for i in range(GPUS)])
    fake.events_supported = False
    backend = NvmlBackend(NODE, nvml=fake.module())
    backend.open_blocking()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        backend.sample_blocking()
        times.append((time.perf_counter() - started) * 1000 / GPUS)
    backend.close_blocking()
    return statistics.median(times)


def bench_simulated_sample(rounds: int) -> float:
    """ms per GPU of one simulated sample with one replica pod per GPU, median over rounds."""
    backend = SimulatedBackend(NODE, build_sim_gpus(NODE, GPUS, 81559, "NVIDIA-H100-80GB-HBM3"))
    for i in range(GPUS):
        pod = {
            "metadata": {
                "name": f"m-instance-{i}",
                "namespace": "ml",
                "uid": str(i),
                "annotations": {"modelfleet.io/gpus": f"{NODE}:{i}"},
            },
            "spec": {"containers": [{"name": "vllm"}]},
            "status": {"phase": "Running"},
        }
        use = parse_replica_pod(pod, NODE)
        assert use is not None
        backend.pods[str(i)] = use
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        compute_sim_stats(NODE, backend.gpus, backend.pods.values(), backend.faults)
        times.append((time.perf_counter() - started) * 1000 / GPUS)
    return statistics.median(times)


async def bench_http(requests: int) -> tuple[float, float]:
    backend = SimulatedBackend(NODE, build_sim_gpus(NODE, GPUS, 81559, "NVIDIA-H100-80GB-HBM3"))
    metrics = AgentMetrics()
    state = AgentState(node=NODE, backend="simulated", poll_interval_s=5, metrics=metrics)
    metrics.attach(lambda: state.latest)
    await poll_once(backend, state)
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/gpus"
    latencies = []
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(requests + 50):
                started = time.perf_counter()
                async with http.get(url) as resp:
                    await resp.read()
                    assert resp.status == 200
                if i >= 50:  # warm-up
                    latencies.append((time.perf_counter() - started) * 1000)
    finally:
        await runner.cleanup()
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000, help="samples per backend")
    parser.add_argument("--requests", type=int, default=2000, help="/v1/gpus requests")
    args = parser.parse_args()
    nvml_ms = bench_nvml_sample(args.rounds)
    sim_ms = bench_simulated_sample(args.rounds // 4)
    p50, p99 = asyncio.run(bench_http(args.requests))
    print(f"NVML sample (fake pynvml), {GPUS} GPUs: {nvml_ms:.4f} ms per GPU")
    print(f"simulated sample, {GPUS} GPUs, one pod each: {sim_ms:.4f} ms per GPU")
    print(f"/v1/gpus over HTTP, {GPUS} GPUs, {args.requests} sequential requests: ", end="")
    print(f"p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    print(f"poll_ms_per_gpu={nvml_ms:.4f} sim_poll_ms_per_gpu={sim_ms:.4f} ", end="")
    print(f"gpus_p50_ms={p50:.3f} gpus_p99_ms={p99:.3f}")


if __name__ == "__main__":
    main()
