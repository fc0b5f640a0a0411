"""Placement quality: how full the cluster is when the first replica no longer fits.

A seeded random stream of ModelDeployments of mixed sizes (1, 2, 4 or 8 GPUs per replica,
Exclusive; or Shared with 8-24 GiB per replica), 1-3 replicas each, arrives at an empty,
heterogeneous cluster (4- and 8-GPU nodes, H100 80 GB and L40S 48 GB). Each configuration places
the stream until the first replica that does not fit without eviction; we report the share of
GPUs in use then (a GPU is in use when any replica holds it or shares it), how many replicas were
placed, and how many of them landed on a node that already ran a replica of their deployment
(spread). Side by side, in the same run and on the same streams:

- availability, roundrobin, weighted, binpack: modelfleet's engine with fragmentation-aware
  ranking (the default), Shared replicas sharing GPUs by memory; `<name>_nofrag`: the same
  strategy alone (MODELFLEET_FRAGMENTATION_AWARE=false).
- least_allocated: plain least-allocated spreading, what the default kube-scheduler's
  NodeResourcesFit LeastAllocated scoring does with `nvidia.com/gpu` as the resource: the node
  with the largest share of free GPUs after placement (integer score 0-100), ties broken at random;
  it cannot share a GPU, so a Shared replica takes one whole GPU.
- most_allocated (reference only): the same scoring reversed (bin packing), whole GPUs.

- `<name>_whole` (availability, binpack): Shared replicas take one whole GPU, as in the
  kube-scheduler references: the like-for-like comparison with them.
- `<name>_consolidate`, `<name>_nofrag_consolidate`: the same, and when a replica does not fit,
  `plan_consolidation` (one move per deployment per arrival) and its moves run make-before-break
  before the replica is placed again; the first failure is then the first replica that neither
  fits nor gets room by moves. Figures: moves per placed replica, and the most Ready replicas one
  deployment had fewer than before a plan at any step ("down": the moves run make-before-break,
  so this stays 0), and the time of each plan (p99 over every plan of the run).

Several seeds; medians. Last line: <config>_util=<share> <config>_replicas=<n> per
configuration, <config>_colocated=<n> for modelfleet's (the references do not spread),
<config>_moves_per_replica and <config>_max_down for the consolidating ones, and
consolidation_plan_p99_ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, replace

from modelfleet.placement import (
    ClusterView,
    Consolidation,
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
    plan_consolidation,
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


@dataclass(frozen=True)
class Outcome:
    util: float  # share of GPUs in use at the first failure
    replicas: int  # replicas placed before it
    # Of those, placed on a node that already ran one of their deployment (None: not tracked).
    colocated: int | None = None
    moves: int = 0  # replicas moved by consolidation
    down: int = 0  # the most Ready replicas one deployment had fewer than before a plan, at once
    plan_s: tuple[float, ...] = ()  # time of each consolidation plan


def request_of(
    model: Model, n: int, strategy: PlacementStrategy, whole: bool = False
) -> ReplicaRequest:
    shared = model.shared_mib is not None and not whole
    return ReplicaRequest(
        deployment=DeploymentRef("bench", model.name),
        pod=f"{model.name}-instance-{n}",
        gpu_count=model.gpus,
        memory_mib=model.shared_mib if shared else None,
        sharing=SharingMode.SHARED if shared else SharingMode.EXCLUSIVE,
        strategy=strategy,
    )


def run_engine(
    nodes: list[NodeInfo],
    stream: list[Model],
    strategy: PlacementStrategy,
    frag: bool = True,
    consolidate: bool = False,
    whole: bool = False,
) -> Outcome:
    settings = PlacementSettings(memory_margin_mib=1024, fragmentation_aware=frag)
    view = build_view(nodes, [], settings)
    placed = colocated = moves = down = 0
    templates: dict[DeploymentRef, ReplicaRequest] = {}
    plan_s: list[float] = []
    for model, n in replicas_of(stream):
        request = request_of(model, n, strategy, whole)
        templates.setdefault(request.deployment, request)
        decision = decide(view, request)
        if not isinstance(decision, Placed) and consolidate:
            # One move per deployment per arrival (the budget's interval here).
            t0 = time.perf_counter()
            plan = plan_consolidation(view, request, templates, default_budget=1)
            plan_s.append(time.perf_counter() - t0)
            if isinstance(plan, Consolidation):
                view, lost = run_moves(view, plan)
                moves += len(plan.moves)
                down = max(down, lost)
                decision = decide(view, request)
        if not isinstance(decision, Placed):
            break
        if request.deployment in view.nodes[decision.node].deployments:
            colocated += 1
        # Replicas arrive slower than they start: the previous one is ready (not yet measured,
        # so the ledger still holds its memory) when the next one is placed.
        ready = replace(decision.replica, state=ReplicaState.READY)
        view = view.with_placed(replace(decision, replica=ready))
        placed += 1
    return Outcome(gpus_in_use(view), placed, colocated, moves, down, tuple(plan_s))


def run_moves(view: ClusterView, plan: Consolidation) -> tuple[ClusterView, int]:
    """Run a plan make-before-break, as the operator must: each copy is placed, starts and is
    Ready, then its old replica is deleted. Returns the view and the most Ready replicas any
    deployment had fewer than before the plan, at any step."""
    before = dict(view.serving)
    lost = 0
    for k, move in enumerate(plan.moves):
        old = move.replica
        copy = replace(
            old,
            pod=f"{old.pod}-m{k}",
            node=move.node,
            gpu_ids=move.gpu_ids,
            state=ReplicaState.READY,
        )
        view = view.with_placed(
            Placed(
                move.node,
                move.gpu_ids,
                move.uuids,
                move.reason,
                0.0,
                view.cursor,
                PlacementStrategy.AVAILABILITY,
                False,
                copy,
            )
        )
        view = replace(
            view, serving={**view.serving, old.deployment: view.serving.get(old.deployment, 0) + 1}
        )
        view = view.with_removed([old])
        lost = max([lost, *(before[d] - view.serving.get(d, 0) for d in before)])
    return view, lost


def gpus_in_use(view: ClusterView) -> float:
    total = sum(n.healthy_gpus for n in view.nodes.values())
    used = sum(1 for n in view.nodes.values() for g in n.gpus if g.replicas())
    return used / total


def run_scheduler(nodes: list[NodeInfo], stream: list[Model], seed: int, most: bool) -> Outcome:
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
    return Outcome(1 - sum(free) / sum(total), placed)


STRATEGIES = {
    "availability": PlacementStrategy.AVAILABILITY,
    "roundrobin": PlacementStrategy.ROUND_ROBIN,
    "weighted": PlacementStrategy.WEIGHTED,
    "binpack": PlacementStrategy.BIN_PACK,
}


def run_seed(seed: int, node_count: int) -> tuple[dict[str, Outcome], int]:
    """Every configuration on one seed's cluster and stream."""
    nodes = make_nodes(node_count, 8, seed, mixed_sizes=True)
    nodes = [replace(n, taints=()) for n in nodes]
    stream = model_stream(seed, 4000)
    out: dict[str, Outcome] = {}
    for name, strategy in STRATEGIES.items():
        out[name] = run_engine(nodes, stream, strategy)
        out[f"{name}_nofrag"] = run_engine(nodes, stream, strategy, frag=False)
    for name, strategy in STRATEGIES.items():
        out[f"{name}_consolidate"] = run_engine(nodes, stream, strategy, consolidate=True)
        out[f"{name}_nofrag_consolidate"] = run_engine(
            nodes, stream, strategy, frag=False, consolidate=True
        )
    for name in ("availability", "binpack"):
        out[f"{name}_whole"] = run_engine(nodes, stream, STRATEGIES[name], whole=True)
    out["least_allocated"] = run_scheduler(nodes, stream, seed, most=False)
    out["most_allocated"] = run_scheduler(nodes, stream, seed, most=True)
    return out, sum(len(n.gpus) for n in nodes)


def _p99_ms(times: list[float]) -> float:
    if not times:
        return 0.0
    times = sorted(times)
    return times[max(int(len(times) * 0.99) - 1, 0)] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, list[Outcome]] = {}
    header = "util / replicas / colocated / moves / down"
    for seed in range(args.seeds):
        out, gpus = run_seed(seed, args.nodes)
        print(f"seed {seed} ({args.nodes} nodes, {gpus} GPUs): {header}")
        for name, o in out.items():
            results.setdefault(name, []).append(o)
            co = "-" if o.colocated is None else str(o.colocated)
            print(f"  {name:34} {o.util:6.1%} {o.replicas:5d} {co:>4} {o.moves:4d} {o.down:2d}")
    print(f"medians: {header} / moves per placed replica")
    parts = []
    most = statistics.median(r.replicas for r in results["most_allocated"])
    for name, runs in results.items():
        util = statistics.median(r.util for r in runs)
        placed = statistics.median(r.replicas for r in runs)
        parts.append(f"{name}_util={util:.3f}")
        parts.append(f"{name}_replicas={placed:.0f}")
        co = "-"
        if runs[0].colocated is not None:
            co = f"{statistics.median(r.colocated or 0 for r in runs):.0f}"
            parts.append(f"{name}_colocated={co}")
        line = f"  {name:34} {util:6.1%} {placed:5.0f} {co:>4}"
        if name.endswith("_consolidate"):
            moves = statistics.median(r.moves for r in runs)
            per = statistics.median(r.moves / max(r.replicas, 1) for r in runs)
            down = max(r.down for r in runs)
            parts.append(f"{name}_moves_per_replica={per:.3f}")
            parts.append(f"{name}_max_down={down}")
            line += f" {moves:4.0f} {down:2d} {per:.3f} ({placed / most:.1%} of most_allocated)"
        print(line)
    plans = [t for runs in results.values() for r in runs for t in r.plan_s]
    print(f"consolidation plans: {len(plans)}, p99 {_p99_ms(plans):.2f} ms")
    parts.append(f"consolidation_plan_p99_ms={_p99_ms(plans):.2f}")
    print(" ".join(parts))


if __name__ == "__main__":
    main()
