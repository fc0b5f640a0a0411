"""LRU eviction: the fewest replicas of other deployments whose removal makes a replica fit.

Pure functions over a `ClusterView`. A victim is never of the requesting deployment, never of a
higher priority than the requester, and never takes its deployment below `minReplicas` Ready
replicas. Among sets of the same size, lower priority goes first, then the least recently used. A
replica that is still starting, or a reservation, is never a victim; a replica already terminating
is the cheapest victim of all (its eviction is under way) and costs its deployment nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from modelfleet.placement.model import DeploymentRef, PlacedReplica, ReplicaState
from modelfleet.placement.view import GpuState, NodeState

EvictionKey = tuple[bool, int, float, str, str]


def eviction_key(rep: PlacedReplica) -> EvictionKey:
    """Order of victims: terminating first, then lower priority, least recently used, name."""
    return (
        rep.state != ReplicaState.TERMINATING,
        rep.priority,
        rep.last_used,
        rep.deployment.namespace,
        rep.pod,
    )


def _cost(victims: Iterable[PlacedReplica]) -> tuple[int, tuple[EvictionKey, ...]]:
    keys = sorted((eviction_key(v) for v in victims), reverse=True)
    # Fewer victims first; between sets of one size, the one whose most valuable victim is least
    # valuable (lower priority, then used longer ago).
    return (len(keys), tuple(keys))


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    node: NodeState
    gpus: tuple[GpuState, ...]
    victims: tuple[PlacedReplica, ...]


@dataclass(slots=True)
class _Rules:
    deployment: DeploymentRef
    priority: int
    serving: Mapping[DeploymentRef, int]  # Ready replicas per deployment
    floors: Mapping[DeploymentRef, int]

    def allowed(self, rep: PlacedReplica) -> bool:
        if rep.deployment == self.deployment:
            return False
        if rep.state == ReplicaState.TERMINATING:
            return True  # going anyway: waiting for it costs nothing
        # A starting replica has not served yet: evicting it wastes its start and lets two
        # deployments of one priority evict each other in turn. A reservation is a promise.
        return rep.priority <= self.priority and rep.state == ReplicaState.READY

    def room(self, dep: DeploymentRef) -> int:
        """Ready replicas of `dep` that may go before it reaches its floor."""
        return self.serving.get(dep, 0) - self.floors.get(dep, 0)

    def costs_floor(self, rep: PlacedReplica) -> bool:
        """True when evicting `rep` takes one Ready replica from its deployment."""
        return rep.state == ReplicaState.READY


def _within_floors(
    new: Sequence[PlacedReplica], taken: Mapping[DeploymentRef, int], rules: _Rules
) -> bool:
    extra: dict[DeploymentRef, int] = {}
    for rep in new:
        if rules.costs_floor(rep):
            extra[rep.deployment] = extra.get(rep.deployment, 0) + 1
    return all(taken.get(d, 0) + n <= rules.room(d) for d, n in extra.items())


def _count_taken(
    taken: dict[DeploymentRef, int], reps: Iterable[PlacedReplica], rules: _Rules
) -> None:
    for rep in reps:
        if rules.costs_floor(rep):
            taken[rep.deployment] = taken.get(rep.deployment, 0) + 1


def _whole_victims(
    gpu: GpuState,
    chosen: Mapping[tuple[str, str], PlacedReplica],
    rules: _Rules,
    taken: Mapping[DeploymentRef, int],
) -> list[PlacedReplica] | None:
    """Victims that free `gpu` entirely, or None when a replica on it may not go."""
    new = [r for r in gpu.replicas() if r.key not in chosen]
    if any(not rules.allowed(r) for r in new) or not _within_floors(new, taken, rules):
        return None
    return new


def _shared_victims(
    gpu: GpuState,
    chosen: Mapping[tuple[str, str], PlacedReplica],
    rules: _Rules,
    taken: Mapping[DeploymentRef, int],
    footprint: int,
    margin: int,
) -> list[PlacedReplica] | None:
    """Fewest victims that leave `footprint` MiB available on `gpu` and nothing starting there."""
    left = [r for r in gpu.replicas() if r.key not in chosen]
    must = [r for r in left if r.whole_gpus or r.state == ReplicaState.STARTING]
    if any(not rules.allowed(r) for r in must) or not _within_floors(must, taken, rules):
        return None
    gone = {r.key for r in must} | set(chosen)
    info = gpu.info
    free = info.memory_free_mib
    if gpu.holders and all(h.key in gone for h in gpu.holders):
        # A measured whole-GPU holder is what uses the GPU's memory: estimate it all freed.
        free = info.memory_total_mib if any(h.measured for h in gpu.holders) else free
    ledger = gpu.ledger_mib
    for r in gpu.shared:
        if r.key in gone:
            if r.measured:
                free += r.footprint_mib or 0
            else:
                ledger -= r.footprint_mib or 0
    available = min(free, info.memory_total_mib) - ledger - margin
    deficit = footprint - available
    if deficit <= 0:
        return must
    options = sorted((r for r in left if r.key not in gone and rules.allowed(r)), key=eviction_key)
    sizes = sorted((r.footprint_mib or 0 for r in options), reverse=True)
    need, total = 0, 0
    for size in sizes:
        if total >= deficit:
            break
        total += size
        need += 1
    if total < deficit:
        return None
    counted = dict(taken)
    _count_taken(counted, must, rules)
    picked = _cover_deficit(options, need, deficit, counted, rules)
    return None if picked is None else must + picked


def _cover_deficit(
    options: Sequence[PlacedReplica],
    need: int,
    deficit: int,
    counted: dict[DeploymentRef, int],
    rules: _Rules,
) -> list[PlacedReplica] | None:
    """The `need` victims that come first in eviction order and still cover `deficit` MiB."""
    picked: list[PlacedReplica] = []
    for i, rep in enumerate(options):
        slots = need - len(picked)
        if slots == 0:
            break
        if rules.costs_floor(rep) and counted.get(rep.deployment, 0) + 1 > rules.room(
            rep.deployment
        ):
            continue
        rest = sorted((r.footprint_mib or 0 for r in options[i + 1 :]), reverse=True)
        if (rep.footprint_mib or 0) + sum(rest[: slots - 1]) >= deficit:
            picked.append(rep)
            deficit -= rep.footprint_mib or 0
            _count_taken(counted, (rep,), rules)
    return None if deficit > 0 else picked


def _plan_node(
    node: NodeState,
    gpus: Sequence[GpuState],
    count: int,
    footprint: int | None,
    margin: int,
    rules: _Rules,
) -> EvictionPlan | None:
    allowed = rules.allowed
    # What the node says something else uses, no eviction of ours frees.
    gpus = [g for g in gpus if not g.used_elsewhere]
    if footprint is None:
        # Only GPUs that could be freed at all, ignoring floors: a cheap first cut.
        gpus = [g for g in gpus if all(allowed(r) for r in g.replicas())]
    if len(gpus) < count:
        return None
    chosen: dict[tuple[str, str], PlacedReplica] = {}
    taken: dict[DeploymentRef, int] = {}
    picked: list[GpuState] = []
    picked_ids: set[int] = set()
    for _ in range(count):
        best: tuple[tuple[int, tuple[EvictionKey, ...], int], GpuState, list[PlacedReplica]]
        best_cost: tuple[int, tuple[EvictionKey, ...], int] | None = None
        for gpu in gpus:
            if gpu.info.index in picked_ids:
                continue
            if footprint is None:
                new = _whole_victims(gpu, chosen, rules, taken)
            else:
                new = _shared_victims(gpu, chosen, rules, taken, footprint, margin)
            if new is None or (best_cost is not None and len(new) > best_cost[0]):
                continue
            cost = (*_cost(new), gpu.info.index)
            if best_cost is None or cost < best_cost:
                best_cost, best = cost, (cost, gpu, new)
        if best_cost is None:
            return None
        picked.append(best[1])
        picked_ids.add(best[1].info.index)
        for rep in best[2]:
            chosen[rep.key] = rep
        _count_taken(taken, best[2], rules)
    victims = tuple(sorted(chosen.values(), key=eviction_key))
    return EvictionPlan(node, tuple(sorted(picked, key=lambda g: g.info.index)), victims)


def _alone_allowed(rep: PlacedReplica, rules: _Rules) -> bool:
    """May `rep` be the only victim?"""
    if not rules.allowed(rep):
        return False
    return not rules.costs_floor(rep) or rules.room(rep.deployment) >= 1


def _one_victim(
    candidates: Sequence[tuple[NodeState, Sequence[GpuState], bool]],
    count: int,
    footprint: int | None,
    rules: _Rules,
) -> EvictionPlan | None:
    """The best plan with a single victim, from the per-node summaries (the common, fast case).

    Any one-victim plan is cheaper than every plan with more victims, so when one exists the
    full search is not needed.
    """
    best: tuple[tuple[EvictionKey, bool, str], PlacedReplica, NodeState, tuple[GpuState, ...]]
    best_key: tuple[EvictionKey, bool, str] | None = None
    for node, gpus, spread_ok in candidates:
        if footprint is None:
            need = count - node.whole_free
            if need <= 0 or node.max_solo_whole < need:
                continue
            for gain, rep in node.solo_whole:
                if gain < need or not _alone_allowed(rep, rules):
                    continue
                key = (eviction_key(rep), not spread_ok, node.info.name)
                if best_key is None or key < best_key:
                    freed = [
                        g
                        for g in gpus
                        if g.free_whole or (g.replicas() == (rep,) and not g.used_elsewhere)
                    ]
                    best_key, best = key, (key, rep, node, tuple(freed[:count]))
        else:
            if count != 1 or node.max_solo_shared < footprint:
                continue
            for avail, rep, index in node.solo_shared:
                if avail < footprint or not _alone_allowed(rep, rules):
                    continue
                key = (eviction_key(rep), not spread_ok, node.info.name)
                if best_key is None or key < best_key:
                    gpu = next(g for g in gpus if g.info.index == index)
                    best_key, best = key, (key, rep, node, (gpu,))
    if best_key is None:
        return None
    return EvictionPlan(best[2], best[3], (best[1],))


def plan_eviction(
    candidates: Iterable[tuple[NodeState, Sequence[GpuState], bool]],
    count: int,
    footprint: int | None,
    margin: int,
    deployment: DeploymentRef,
    priority: int,
    serving: Mapping[DeploymentRef, int],
    floors: Mapping[DeploymentRef, int],
) -> EvictionPlan | None:
    """The cheapest eviction over `candidates` (node, its eligible healthy GPUs, spread ok).

    `footprint` None means whole GPUs. Per node the GPUs are chosen greedily, cheapest first;
    across nodes the plan with the fewest victims wins, then the least valuable victims, then a
    node that keeps replicas of one deployment apart, then the node name.
    """
    rules = _Rules(deployment, priority, serving, floors)
    candidates = list(candidates)
    one = _one_victim(candidates, count, footprint, rules)
    if one is not None:
        return one
    best: tuple[tuple[int, tuple[EvictionKey, ...], bool, str], EvictionPlan] | None = None
    for node, gpus, spread_ok in candidates:
        if len(gpus) < count:
            continue
        plan = _plan_node(node, gpus, count, footprint, margin, rules)
        if plan is None or not plan.victims:
            continue
        key = (*_cost(plan.victims), not spread_ok, node.info.name)
        if best is None or key < best[0]:
            best = (key, plan)
    return None if best is None else best[1]


def blocked_reasons(
    replicas: Iterable[PlacedReplica],
    deployment: DeploymentRef,
    priority: int,
    serving: Mapping[DeploymentRef, int],
    floors: Mapping[DeploymentRef, int],
    load_floors: Mapping[DeploymentRef, int] | None = None,
) -> str:
    """Why the replicas in the way may not be evicted, in counts a person can act on.

    `load_floors`: the Ready replicas some deployments' own load needs now (autoscaled models of
    the requester's rank), which eviction leaves them like minReplicas.
    """
    load_floors = load_floors or {}
    same = higher = floor = loaded = starting = 0
    for rep in replicas:
        ready = serving.get(rep.deployment, 0)
        if rep.deployment == deployment:
            same += 1
        elif rep.priority > priority:
            higher += 1
        elif rep.state != ReplicaState.READY:
            starting += 1
        elif ready <= floors.get(rep.deployment, 0):
            floor += 1
        elif ready <= load_floors.get(rep.deployment, 0):
            loaded += 1
    parts = []
    if higher:
        parts.append(f"{higher} have a higher priority than {priority}")
    if floor:
        parts.append(f"{floor} are at their deployment's minReplicas")
    if loaded:
        parts.append(
            f"{loaded} are needed by their own deployment's load (autoscaling: a model of the "
            "same priority does not take replicas another one is using)"
        )
    if starting:
        parts.append(f"{starting} are still starting")
    if same:
        parts.append(f"{same} belong to {deployment} itself")
    if not parts:
        return "eviction cannot free enough on any one node"
    return "eviction cannot help: of the replicas in the way, " + ", ".join(parts)
