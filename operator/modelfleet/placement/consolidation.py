"""Consolidation: the fewest replica moves that make room for a replica that does not fit.

Pure, like the rest of placement. When a replica fits on no node as things are, but the cluster
has enough GPUs free in total, moving a few other replicas to GPUs that are free elsewhere can
empty a block on one node. `plan_consolidation` finds the fewest such moves; the operator runs
them make-before-break (each moved replica starts on its new node and is Ready before its old Pod
is deleted), then places the waiting replica. Eviction stays the fallback when no moves help.

Rules (docs/placement.md, "Consolidation"):

- only Ready replicas of other ModelDeployments, of a priority not higher than the requester's,
  are moved; never one that is starting, terminating or a reservation;
- a deployment with fewer Ready replicas than its `minReplicas` is not moved; every move's new
  place is free now (never GPUs another move of the same plan frees), so every move can be run
  make-before-break and no deployment loses a Ready replica at any moment;
- at most `budgets.get(deployment, default_budget)` moves per deployment (the caller keeps the
  count per interval and passes what is left);
- a moved replica goes where `decide` would place it (same strategy, spread, selector, product,
  taints, host resources), never back onto the node being emptied;
- among plans, fewest moves first, then fewest GPUs moved; between nodes that tie on those,
  the one whose first mover is the least valuable (lower priority, then least recently used),
  then the node name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from modelfleet.placement.engine import check_request, compute_static_key, decide
from modelfleet.placement.eviction import EvictionKey, eviction_key
from modelfleet.placement.model import (
    DeploymentRef,
    Placed,
    PlacedReplica,
    ReplicaRequest,
    ReplicaState,
    Requests,
    SharingMode,
    Unplaceable,
    UnplaceableCode,
)
from modelfleet.placement.view import ClusterView, GpuState, NodeState

__all__ = ["Consolidation", "Move", "plan_consolidation"]

# Pod name suffix of the stand-ins the planner places while it searches (never a valid Pod name).
_MOVING = " (moving)"
_BLOCKER = "(consolidation target)"


@dataclass(frozen=True, slots=True)
class Move:
    """Start a copy of `replica` on `node`, on `gpu_ids`; delete `replica` once it is Ready."""

    replica: PlacedReplica
    node: str
    gpu_ids: tuple[str, ...]
    uuids: tuple[str, ...]
    reason: str  # why the copy goes there, as for a placement


@dataclass(frozen=True, slots=True)
class Consolidation:
    """Run `moves` make-before-break; the request then fits on `node`, on `gpu_ids`."""

    moves: tuple[Move, ...]
    node: str
    gpu_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A node that could hold the request once some of its replicas are moved."""

    lower_bound: int  # moves it takes at least
    deficit: int  # GPUs still to free there
    node: NodeState
    movable: tuple[tuple[int, PlacedReplica], ...]  # (GPUs its move frees, replica), best first


def _movable(
    rep: PlacedReplica,
    request: ReplicaRequest,
    view: ClusterView,
    templates: Mapping[DeploymentRef, ReplicaRequest],
    budget_of: Mapping[DeploymentRef, int],
    default_budget: int,
) -> bool:
    dep = rep.deployment
    return (
        dep != request.deployment
        and rep.state == ReplicaState.READY
        and rep.priority <= request.priority
        and dep in templates
        and budget_of.get(dep, default_budget) > 0
        and view.serving.get(dep, 0) >= view.floors.get(dep, 0)
    )


def _candidates(
    view: ClusterView,
    request: ReplicaRequest,
    templates: Mapping[DeploymentRef, ReplicaRequest],
    budgets: Mapping[DeploymentRef, int],
    default_budget: int,
) -> list[_Candidate]:
    """Eligible nodes where moving replicas could free `request.gpu_count` GPUs, with the fewest
    moves each could take at least (the largest movers first), cheapest first."""
    count = request.gpu_count
    out = []
    for name, _ in view.eligibility(compute_static_key(request)).nodes:
        node = view.nodes[name]
        if request.product is not None and node.product not in (None, request.product):
            continue
        deficit = count - node.whole_free
        if deficit <= 0 or node.healthy_gpus < count:
            continue
        if sum(gain for gain, _ in node.solo_whole) < deficit:
            continue  # even moving everything there would not free enough
        # solo_whole: per replica, the GPUs of the node that only it holds (view.py).
        movable = sorted(
            (
                (gain, r)
                for gain, r in node.solo_whole
                if _movable(r, request, view, templates, budgets, default_budget)
            ),
            key=lambda t: (-t[0], eviction_key(t[1])),
        )
        total = bound = 0
        for gain, _ in movable:
            if total >= deficit:
                break
            total += gain
            bound += 1
        if total < deficit:
            continue
        out.append(_Candidate(bound, deficit, node, tuple(movable)))
    out.sort(
        key=lambda c: (c.lower_bound, c.deficit, eviction_key(c.movable[0][1]), c.node.info.name)
    )
    return out


def _block(view: ClusterView, node: NodeState) -> ClusterView:
    """`view` with the free GPUs of `node` taken by a stand-in, so no move lands there."""
    free = tuple(g.info.gpu_id for g in node.gpus if g.free_whole or g.shared)
    if not free:
        return view
    blocker = PlacedReplica(
        deployment=DeploymentRef("", _BLOCKER),
        pod=_BLOCKER,
        node=node.info.name,
        gpu_ids=free,
        priority=1 << 30,
        state=ReplicaState.RESERVED,
    )
    strategy = view.settings.default_strategy
    return view.with_placed(
        Placed(node.info.name, free, (), "", 0.0, view.cursor, strategy, False, blocker)
    )


def _move_request(rep: PlacedReplica, template: ReplicaRequest) -> ReplicaRequest:
    """The request that places a copy of `rep`: its deployment's, with its own size, sharing
    and footprint, and a name of its own (both run for a while)."""
    return replace(
        template,
        pod=rep.pod + _MOVING,
        gpu_count=len(rep.gpu_ids),
        sharing=rep.sharing,
        memory_mib=rep.footprint_mib,
        measured_footprint_mib=None,
        priority=rep.priority,
        last_used=rep.last_used,
    )


def _fits_somewhere(view: ClusterView, request: ReplicaRequest) -> bool:
    """Whether some node the request may use has room for its GPUs (a quick bound)."""
    count = request.gpu_count
    nodes = view.nodes
    eligible = view.eligibility(compute_static_key(request)).nodes
    need = request.footprint_mib
    if request.sharing == SharingMode.SHARED and need is not None:
        return any(
            len(av := nodes[name].shared_avail) >= count and av[count - 1] >= need
            for name, _ in eligible
        )
    return any(nodes[name].whole_free >= count for name, _ in eligible)


def _host_after_moves(node: NodeState, moves: Sequence[Move], request: ReplicaRequest) -> bool:
    """Whether the node admits the request (CPU, memory, a pod slot) once the moved are gone."""
    if not node.host_known:
        return True
    freed = sum((m.replica.requests for m in moves), Requests())
    need = request.requests
    return (
        need.cpu_m <= node.cpu_free_m + freed.cpu_m
        and need.memory_bytes <= node.memory_free_bytes + freed.memory_bytes
        and need.pods <= node.pods_free + freed.pods
    )


def _try_node(
    view: ClusterView,
    request: ReplicaRequest,
    candidate: _Candidate,
    templates: Mapping[DeploymentRef, ReplicaRequest],
    budgets: Mapping[DeploymentRef, int],
    default_budget: int,
    limit: int,
) -> tuple[list[Move], list[GpuState]] | None:
    """The fewest moves (at most `limit`) that free `candidate.deficit` GPUs on its node: the
    largest movers first, skipping any that cannot go elsewhere or have no budget left."""
    node = candidate.node
    work = _block(view, node)
    used: dict[DeploymentRef, int] = {}
    moves: list[Move] = []
    freed = 0
    for gain, rep in candidate.movable:
        if freed >= candidate.deficit or len(moves) >= limit:
            break
        dep = rep.deployment
        if used.get(dep, 0) >= budgets.get(dep, default_budget):
            continue
        move = _move_request(rep, templates[dep])
        if not _fits_somewhere(work, move):
            continue  # (decide would search for an eviction, which a move never is)
        decision = decide(work, move)
        if not isinstance(decision, Placed) or decision.node == node.info.name:
            continue
        # The copy holds its new GPUs at once (make-before-break: both run for a while).
        work = work.with_placed(decision)
        used[dep] = used.get(dep, 0) + 1
        moves.append(Move(rep, decision.node, decision.gpu_ids, decision.uuids, decision.reason))
        freed += gain
    if freed < candidate.deficit or not _host_after_moves(node, moves, request):
        return None
    gone = {m.replica.key for m in moves}
    gpus = [
        g
        for g in node.gpus
        if g.free_whole
        or (
            g.info.healthy
            and not g.used_elsewhere
            and not g.info.foreign_pods
            and g.replicas()
            and all(r.key in gone for r in g.replicas())
        )
    ]
    return moves, gpus


_Cost = tuple[int, int, tuple[EvictionKey, ...], str]


def _cost(moves: Sequence[Move], node: NodeState) -> _Cost:
    keys = tuple(sorted((eviction_key(m.replica) for m in moves), reverse=True))
    return (len(moves), sum(len(m.gpu_ids) for m in moves), keys, node.info.name)


def _free_in_total(view: ClusterView, request: ReplicaRequest) -> int:
    return sum(
        view.nodes[name].whole_free
        for name, _ in view.eligibility(compute_static_key(request)).nodes
    )


def plan_consolidation(
    view: ClusterView,
    request: ReplicaRequest,
    templates: Mapping[DeploymentRef, ReplicaRequest],
    budgets: Mapping[DeploymentRef, int] | None = None,
    default_budget: int = 1,
    max_moves: int = 4,
) -> Consolidation | Unplaceable:
    """The fewest moves that make room for `request`, or why no moves can.

    `templates`: per deployment whose replicas may be moved, the request that places one of its
    replicas (its spec: selector, product, tolerations, strategy, sharing, host requests);
    deployments without one are never moved. `budgets`: moves left per deployment in this
    interval (`default_budget` for the others). `max_moves`: the most moves one plan may take.
    Whole-GPU requests only (Exclusive, or a discovery run): a Shared request fits by memory,
    which eviction frees more simply.
    """
    check_request(request)
    budgets = budgets or {}
    if request.sharing == SharingMode.SHARED and request.footprint_mib is not None:
        return Unplaceable(
            UnplaceableCode.NO_CAPACITY,
            "consolidation moves whole-GPU replicas only; a Shared replica is not planned",
        )
    count = request.gpu_count
    free = _free_in_total(view, request)
    if free < count:
        return Unplaceable(
            UnplaceableCode.NO_CAPACITY,
            f"consolidation cannot help: {free} GPU{'s' if free != 1 else ''} free in total on "
            f"the nodes that may run it, {count} needed",
        )
    best: tuple[_Cost, list[Move], list[GpuState], NodeState] | None = None
    for candidate in _candidates(view, request, templates, budgets, default_budget):
        # A node takes at least `lower_bound` moves of at least `deficit` GPUs: once that is no
        # better than the best plan, no later node (in this order) is better either.
        if best is not None and (candidate.lower_bound, candidate.deficit) >= best[0][:2]:
            break
        limit = max_moves if best is None else min(max_moves, best[0][0])
        found = _try_node(view, request, candidate, templates, budgets, default_budget, limit)
        if found is None:
            continue
        moves, gpus = found
        cost = _cost(moves, candidate.node)
        if best is None or cost < best[0]:
            best = (cost, moves, gpus, candidate.node)
    if best is None:
        return Unplaceable(
            UnplaceableCode.NO_CAPACITY,
            f"consolidation cannot help: {free} GPUs are free in total, but no node can gather "
            f"{count} with at most {max_moves} moves of Ready replicas of priority "
            f"{request.priority} or lower that fit elsewhere (within their move budgets)",
        )
    _, moves, gpus, node = best
    gpu_ids = tuple(g.info.gpu_id for g in gpus[:count])
    k = len(moves)
    what = ", ".join(f"{m.replica.deployment.namespace}/{m.replica.pod} to {m.node}" for m in moves)
    return Consolidation(
        moves=tuple(moves),
        node=node.info.name,
        gpu_ids=gpu_ids,
        reason=(
            f"nothing fits, but {free} GPUs are free in total; moving {k} replica"
            f"{'s' if k > 1 else ''} (make-before-break) frees {','.join(gpu_ids)} on "
            f"{node.info.name}: {what}"
        ),
    )
