"""Placement speed: decisions per second and p99 decision time on a large cluster.

1,000 nodes x 8 GPUs (half H100, half L40S, 2% tainted), 4,000 replicas already placed and
measured (Exclusive 1/2/4 GPUs and Shared), then a seeded stream of replica requests of mixed
sizes, selectors and strategies. Each decision is `decide` plus applying it to the view
(`with_placed` / `with_evicted`), as the operator does. One process, pinned to one core.

The headline is CPU time of this thread per decision (`time.thread_time`): on a shared machine
wall-clock time also counts the time other processes hold the core; wall-clock figures are printed
beside it. Consolidation planning (`plan_consolidation`) is timed apart: per seed, the same cluster
with the same 4,000 replicas placed by Availability alone (fragmentation-aware ranking off, so
it is fragmented), then 40 replicas of 4 or 8 GPUs, those that fit nowhere as things are.

Last line: decisions_per_s=<x> p99_ms=<x> wall_decisions_per_s=<x> wall_p99_ms=<x>
consolidation_plans=<n> consolidation_p99_ms=<x>.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from modelfleet.placement import (
    Consolidation,
    DeploymentRef,
    Placed,
    PlacementSettings,
    PlacementStrategy,
    ReplicaRequest,
    build_view,
    decide,
    plan_consolidation,
)
from placement_workload import apply, make_nodes, measured_snapshot, random_request

# Replica sizes in GPUs (Exclusive); 30% of replicas are Shared. 4,000 of them fill about half
# of the 8,000 GPUs, and the 2,000 decisions bring it to about three quarters.
SIZES = (1, 1, 2)


def _p99(sorted_times: list[float]) -> float:
    return sorted_times[max(int(len(sorted_times) * 0.99) - 1, 0)] * 1000


def _pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {cpu})
        return f"pinned to cpu {cpu}"
    return "not pinned (no sched_setaffinity)"


def time_consolidation(
    nodes: int, gpus: int, placed: int, seed: int, plans: int
) -> tuple[list[float], int]:
    """CPU time of `plan_consolidation` on a fragmented cluster of the same size: `placed`
    replicas of the same mix spread by Availability alone (fragmentation-aware ranking off),
    then replicas of 4 or 8 GPUs, any product, that fit nowhere as things are."""
    rng = random.Random(seed)
    settings = PlacementSettings(memory_margin_mib=1024, fragmentation_aware=False)
    view = build_view(make_nodes(nodes, gpus, seed), [], settings)
    templates: dict[DeploymentRef, ReplicaRequest] = {}
    serial = 0
    while len(view.replicas) < placed:
        serial += 1
        request = random_request(rng, serial, deployments=600, sizes=SIZES)
        templates.setdefault(request.deployment, request)
        view, _ = apply(view, request)
    snapshot_nodes, snapshot_replicas = measured_snapshot(view)
    view = build_view(snapshot_nodes, snapshot_replicas, settings)
    times = []
    found = 0
    for i in range(plans):
        request = ReplicaRequest(
            deployment=DeploymentRef("default", f"probe-{i}"),
            pod=f"probe-{i}-instance-1",
            gpu_count=rng.choice((4, 8)),
            priority=2,
        )
        if isinstance(decide(view, request), Placed):
            continue
        c = time.thread_time()
        plan = plan_consolidation(view, request, templates)
        times.append(time.thread_time() - c)
        found += isinstance(plan, Consolidation)
    return times, found


def run(
    nodes: int, gpus: int, placed: int, decisions: int, seed: int
) -> tuple[tuple[float, float, float, float], list[float]]:
    rng = random.Random(seed)
    settings = PlacementSettings(memory_margin_mib=1024)
    view = build_view(make_nodes(nodes, gpus, seed), [], settings)
    serial = 0
    while len(view.replicas) < placed:
        serial += 1
        view, _ = apply(view, random_request(rng, serial, deployments=600, sizes=SIZES))
    snapshot_nodes, snapshot_replicas = measured_snapshot(view)
    t0 = time.perf_counter()
    view = build_view(snapshot_nodes, snapshot_replicas, settings)
    build_ms = (time.perf_counter() - t0) * 1000
    strategies = [None, PlacementStrategy.ROUND_ROBIN, PlacementStrategy.WEIGHTED]
    requests = [
        random_request(
            rng, serial + i + 1, deployments=600, strategy=strategies[i % 3], sizes=SIZES
        )
        for i in range(decisions)
    ]
    times = []
    walls = []
    kinds: dict[str, list[float]] = {}
    start = time.perf_counter()
    for req in requests:
        t = time.perf_counter()
        c = time.thread_time()
        view, kind = apply(view, req)
        times.append(time.thread_time() - c)
        walls.append(time.perf_counter() - t)
        kinds.setdefault(kind, []).append(times[-1])
    wall_total = time.perf_counter() - start
    total = sum(times)
    times.sort()
    walls.sort()
    p99 = _p99(times)
    outcomes = ", ".join(
        f"{k} {len(v)} (p99 {_p99(sorted(v)):.3f} ms)" for k, v in sorted(kinds.items())
    )
    used = sum(1 for n in view.nodes.values() for g in n.gpus if not g.free_whole)
    plans, found = time_consolidation(nodes, gpus, placed, seed, 40)
    print(
        f"  seed {seed}: build_view {build_ms:.0f} ms; {decisions} decisions: CPU {total:.3f} s, "
        f"p50 {statistics.median(times) * 1000:.3f} ms, p99 {p99:.3f} ms, "
        f"max {times[-1] * 1000:.3f} ms (wall {wall_total:.3f} s, p99 {_p99(walls):.3f} ms); "
        f"{outcomes}; GPUs in use at the end {used}"
    )
    print(
        f"  seed {seed}: consolidation plans (apart) {len(plans)}, {found} with moves, "
        f"p99 {_p99(sorted(plans)):.1f} ms, max {max(plans, default=0) * 1000:.1f} ms"
    )
    return (decisions / total, p99, decisions / wall_total, _p99(walls)), plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--placed", type=int, default=4000)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(
        f"placement speed: {args.nodes} nodes x {args.gpus} GPUs, {args.placed} placed; "
        f"{_pin_one_core()}"
    )
    results = [run(args.nodes, args.gpus, args.placed, args.decisions, s) for s in range(args.runs)]
    med = [statistics.median(r[0][k] for r in results) for k in range(4)]
    plans = sorted(t for r in results for t in r[1])
    print(
        f"decisions_per_s={med[0]:.0f} p99_ms={med[1]:.3f} "
        f"wall_decisions_per_s={med[2]:.0f} wall_p99_ms={med[3]:.3f} "
        f"consolidation_plans={len(plans)} consolidation_p99_ms={_p99(plans) if plans else 0:.1f}"
    )


if __name__ == "__main__":
    main()
