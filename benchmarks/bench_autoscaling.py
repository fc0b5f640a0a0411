"""The autoscaler's decision replayed over load traces, without a cluster.

Every 5 s (the operator's round) the pure decision (modelfleet.controller.autoscale) sees the
requests in the system, spread over the replicas that are ready; a replica it adds becomes ready
START_S later (a warm vLLM start), one it removes goes at once. Traces, target 16 per replica:

- ramp: 1 -> 8 replicas' worth in steps of 10 min, then back down, with +-10% noise per round;
- steady: 5 replicas' worth +-10% noise for 60 min (every count change there is a flap);

against a static deployment at maxReplicas (8) and a naive autoscaler (ceil(load / target) each
round, no tolerance, no windows), side by side in one run. Figures: seconds from a load step to
enough ready replicas, replica-seconds (GPU-seconds at one GPU per replica), seconds with more
load per ready replica than the target (where TTFT grows), and count changes.

This measures the decision and its windows only; the end-to-end run through the gateway on the
local control plane is `make bench-autoscaling-cluster` (benchmarks/bench_autoscaling_cluster.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from modelfleet.controller.autoscale import Policy, Recommendation, Signal, decide

ROUND_S = 5.0
START_S = 60.0
TARGET = 16
POLICY = Policy(1, 8, TARGET, scale_up_window=0.0, scale_down_window=300.0)


@dataclass
class Result:
    step_to_ready_s: list[float]
    replica_s: float
    overloaded_s: float
    changes: int


def ramp(rng: random.Random) -> list[tuple[float, int]]:
    """(requests in the system, replicas' worth) per round."""
    levels = [*range(1, 9), *range(7, 0, -1)]
    per_level = int(600 / ROUND_S)
    return [
        (level * TARGET * rng.uniform(0.9, 1.1), level)
        for level in levels
        for _ in range(per_level)
    ]


def steady(rng: random.Random) -> list[tuple[float, int]]:
    return [(5 * TARGET * rng.uniform(0.9, 1.1), 5) for _ in range(int(3600 / ROUND_S))]


Decider = Callable[[float, int, int, float], int]


def built_in() -> Decider:
    history: tuple[Recommendation, ...] = ()

    def run(load: float, ready: int, current: int, now: float) -> int:
        nonlocal history
        signal = Signal(waiting=load, reporting=max(ready, 1))
        d = decide(signal=signal, current=current, policy=POLICY, history=history, now=now)
        history = d.history
        return d.desired

    return run


def naive(load: float, ready: int, current: int, now: float) -> int:
    return min(POLICY.max_replicas, max(POLICY.min_replicas, math.ceil(load / TARGET)))


def static(load: float, ready: int, current: int, now: float) -> int:
    return POLICY.max_replicas


def replay(trace: list[tuple[float, int]], decider: Decider, start: int) -> Result:
    starting: list[float] = []  # ready times of replicas on their way
    ready = start
    current = start
    changes = 0
    replica_s = overloaded_s = 0.0
    step_at: float | None = None
    step_to_ready: list[float] = []
    last_need = trace[0][1]
    for i, (load, need) in enumerate(trace):
        now = i * ROUND_S
        ready += sum(1 for t in starting if t <= now)
        starting = [t for t in starting if t > now]
        if need > last_need:
            step_at = now
        last_need = need
        if step_at is not None and ready >= need:
            step_to_ready.append(now - step_at)
            step_at = None
        desired = decider(load, ready, current, now)
        if desired != current:
            changes += 1
        if desired > current:
            starting += [now + START_S] * (desired - current)
        elif desired < current:
            drop = current - desired
            cancelled = min(drop, len(starting))
            starting = starting[: len(starting) - cancelled]
            ready -= drop - cancelled
        current = desired
        replica_s += current * ROUND_S
        if load > TARGET * max(ready, 0) * 1.1:
            overloaded_s += ROUND_S
    return Result(step_to_ready, replica_s, overloaded_s, changes)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def main() -> None:
    runs = 5
    table: dict[str, dict[str, list[float]]] = {}
    for seed in range(runs):
        for name, make in (("built-in", built_in), ("naive", lambda: naive), ("static", None)):
            row = table.setdefault(name, {})
            decider = static if make is None else make()
            r = replay(ramp(random.Random(seed)), decider, 1 if make else POLICY.max_replicas)
            row.setdefault("ramp_step_to_ready_s", []).append(median(r.step_to_ready_s))
            row.setdefault("ramp_gpu_s", []).append(r.replica_s)
            row.setdefault("ramp_overloaded_s", []).append(r.overloaded_s)
            row.setdefault("ramp_changes", []).append(r.changes)
            decider = static if make is None else make()
            s = replay(steady(random.Random(100 + seed)), decider, 5 if make else 8)
            row.setdefault("steady_changes", []).append(s.changes)
    print(
        f"medians of {runs} seeds; round {ROUND_S:g}s, replica start {START_S:g}s, target {TARGET}"
    )
    print(
        f"{'':10} {'step->ready s':>14} {'GPU-s ramp':>11} {'overload s':>11} "
        f"{'changes ramp':>13} {'changes steady':>15}"
    )
    for name, row in table.items():
        print(
            f"{name:10} {median(row['ramp_step_to_ready_s']):14.0f} "
            f"{median(row['ramp_gpu_s']):11.0f} {median(row['ramp_overloaded_s']):11.0f} "
            f"{median(row['ramp_changes']):13.0f} {median(row['steady_changes']):15.0f}"
        )
    b, s, n = table["built-in"], table["static"], table["naive"]
    print(
        f"step_to_ready_s={median(b['ramp_step_to_ready_s']):.0f} "
        f"gpu_s_vs_static={median(b['ramp_gpu_s']) / median(s['ramp_gpu_s']):.2f} "
        f"overloaded_s={median(b['ramp_overloaded_s']):.0f} "
        f"steady_changes={median(b['steady_changes']):.0f} "
        f"naive_steady_changes={median(n['steady_changes']):.0f}"
    )


if __name__ == "__main__":
    main()
