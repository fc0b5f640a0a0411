"""Placement quality: how full the cluster is when the first replica no longer fits.

A seeded random stream of ModelDeployments of mixed sizes (1, 2, 4 or 8 GPUs per replica,
Exclusive; or Shared with 8-24 GiB per replica), 1-3 replicas each, arrives at an empty,
heterogeneous cluster (4- and 8-GPU nodes, H100 80 GB and L40S 48 GB). Each strategy places the
stream until the first replica that does not fit without eviction; we report the share of GPUs in
use then (a GPU is in use when any replica holds it or shares it) and how many replicas were
placed. Side by side, in the same run and on the same stream:

- Availability, RoundRobin, Weighted: modelfleet's engine, Shared replicas share GPUs by memory.
- least_allocated: plain least-allocated spreading, what the default kube-scheduler's
  NodeResourcesFit LeastAllocated scoring does with `nvidia.com/gpu` as the resource: the node
  with the largest share of free GPUs after placement (integer score 0-100), ties broken at random;
  it cannot share a GPU, so a Shared replica takes one whole GPU.
- most_allocated (reference only): the same scoring reversed (bin packing), whole GPUs.

Several seeds; medians. Last line: <strategy>_util=<share> <strategy>_replicas=<n> per strategy.
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass, replace

from modelfleet.placement import (
    DeploymentRef,
    NodeInfo,
    Placed,
    PlacementSettings,
    PlacementStrategy,
    ReplicaRequest,
    ReplicaState,
    SharingMode,
    build_view,
    decide,
)
from placement_workload import make_nodes


@dataclass(frozen=True)
class Model:
    name: str
    replicas: int
    gpus: int
    shared_mib: int | None  # None: Exclusive


def model_stream(seed: int, count: int) -> list[Model]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if rng.random() < 0.3:
            out.append(Model(f"m{i}", rng.randint(1, 3), 1, rng.choice((8192, 16384, 24576))))
        else:
            gpus = rng.choices((1, 2, 4, 8), weights=(40, 30, 20, 10))[0]
            out.append(Model(f"m{i}", rng.randint(1, 3), gpus, None))
    return out


def replicas_of(stream: list[Model]) -> list[tuple[Model, int]]:
    return [(m, n) for m in stream for n in range(1, m.replicas + 1)]


def run_engine(
    nodes: list[NodeInfo], stream: list[Model], strategy: PlacementStrategy
) -> tuple[float, int]:
    view = build_view(nodes, [], PlacementSettings(memory_margin_mib=1024))
    placed = 0
    for model, n in replicas_of(stream):
        request = ReplicaRequest(
            deployment=DeploymentRef("bench", model.name),
            pod=f"{model.name}-instance-{n}",
            gpu_count=model.gpus,
            memory_mib=model.shared_mib,
            sharing=SharingMode.SHARED if model.shared_mib else SharingMode.EXCLUSIVE,
            strategy=strategy,
        )
        decision = decide(view, request)
        if not isinstance(decision, Placed):
            break
        # Replicas arrive slower than they start: the previous one is ready (not yet measured,
        # so the ledger still holds its memory) when the next one is placed.
        ready = replace(decision.replica, state=ReplicaState.READY)
        view = view.with_placed(replace(decision, replica=ready))
        placed += 1
    total = sum(n.healthy_gpus for n in view.nodes.values())
    used = sum(1 for n in view.nodes.values() for g in n.gpus if g.replicas())
    return used / total, placed


def run_scheduler(
    nodes: list[NodeInfo], stream: list[Model], seed: int, most: bool
) -> tuple[float, int]:
    rng = random.Random(seed)
    total = [len(n.gpus) for n in nodes]
    free = list(total)
    placed = 0
    for model, _ in replicas_of(stream):
        need = model.gpus  # a Shared replica still takes one whole nvidia.com/gpu
        scores = [
            (100 * (free[i] - need)) // total[i] for i in range(len(nodes)) if free[i] >= need
        ]
        fitting = [i for i in range(len(nodes)) if free[i] >= need]
        if not fitting:
            break
        best = min(scores) if most else max(scores)
        choice = rng.choice([i for i, s in zip(fitting, scores, strict=True) if s == best])
        free[choice] -= need
        placed += 1
    return 1 - sum(free) / sum(total), placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=7)
    args = parser.parse_args()
    names = ["availability", "roundrobin", "weighted", "least_allocated", "most_allocated"]
    results: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    for seed in range(args.seeds):
        nodes = make_nodes(args.nodes, 8, seed, mixed_sizes=True)
        nodes = [replace(n, taints=()) for n in nodes]
        stream = model_stream(seed, 4000)
        results["availability"].append(run_engine(nodes, stream, PlacementStrategy.AVAILABILITY))
        results["roundrobin"].append(run_engine(nodes, stream, PlacementStrategy.ROUND_ROBIN))
        results["weighted"].append(run_engine(nodes, stream, PlacementStrategy.WEIGHTED))
        results["least_allocated"].append(run_scheduler(nodes, stream, seed, most=False))
        results["most_allocated"].append(run_scheduler(nodes, stream, seed, most=True))
        gpus = sum(len(n.gpus) for n in nodes)
        row = "  ".join(f"{k} {v[-1][0]:.1%}/{v[-1][1]}" for k, v in results.items())
        print(f"seed {seed} ({args.nodes} nodes, {gpus} GPUs): util/replicas {row}")
    parts = []
    for name, runs in results.items():
        parts.append(f"{name}_util={statistics.median(r[0] for r in runs):.3f}")
        parts.append(f"{name}_replicas={statistics.median(r[1] for r in runs):.0f}")
    print(" ".join(parts))


if __name__ == "__main__":
    main()
