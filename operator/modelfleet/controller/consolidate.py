"""The operator's side of consolidation: what the planner may move, and its moves as Pods. Pure.

`placement.plan_consolidation` finds the moves; this module gives it the deployments whose
replicas may be moved (their specs as placement requests), what is left of each one's move
budget, and turns its answer into `Consolidate`: per move, the moved deployment, the Pod it
replaces and a free instance number for the copy. `place.place` builds the copies' Pods;
`plan.compute_plan` of each moved deployment deletes the old Pod once its copy is Ready.

A copy carries labels.ANN_MOVE_OF (the old Pod), ANN_MOVE_FOR (the deployment the room is for),
ANN_MOVED_AT and ANN_MOVE_DEADLINE, so everything about a move half done is in the cluster: an
operator that restarts finds it there and finishes it (levels, not edges). The move budget is
counted from the same annotations (copies decided within the interval), so it survives a
restart too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from modelfleet import placement as P
from modelfleet.api import ModelDeployment, SharingMode
from modelfleet.api import labels as L
from modelfleet.api.times import parse_time
from modelfleet.controller.builders import PodDefaults, compute_replica_requests
from modelfleet.controller.decisions import (
    Consolidate,
    Move,
    Placed,
    PlacementRequest,
    Unplaceable,
)
from modelfleet.controller.inputs import EnginePlacer, build_replica_request
from modelfleet.controller.observed import ObservedPod
from modelfleet.controller.plan import compute_footprint_mib, compute_move_state

Key = tuple[str, str]
Consolidator = Callable[[PlacementRequest], Consolidate | Unplaceable]


@dataclass(frozen=True, slots=True)
class ConsolidationSettings:
    """The operator's consolidation settings (settings.py, MODELFLEET_CONSOLIDATION_*)."""

    enabled: bool = True
    moves_per_interval: int = 1
    interval: timedelta = timedelta(minutes=10)
    max_moves: int = 4
    move_timeout: timedelta = timedelta(minutes=15)


def compute_moves_under_way(pods: Iterable[ObservedPod]) -> list[ObservedPod]:
    """Consolidation copies whose old Pod still exists (Ready or terminating)."""
    pods = list(pods)
    by_deployment: dict[Key, list[ObservedPod]] = {}
    for pod in pods:
        by_deployment.setdefault((pod.namespace, pod.deployment), []).append(pod)
    return [
        p
        for p in pods
        if p.move_of
        and not p.deleting
        and compute_move_state(p, by_deployment[(p.namespace, p.deployment)]) is not None
    ]


def compute_move_budgets(
    pods: Iterable[ObservedPod],
    now: datetime,
    per_interval: int,
    interval: timedelta,
    abandoned: Mapping[Key, datetime | None] | None = None,
) -> dict[P.DeploymentRef, int]:
    """Moves left per deployment in the interval ending now: `per_interval` less the copies
    decided within it and a move abandoned within it (`abandoned`: each deployment's
    labels.ANN_MOVE_ABANDONED_AT); deployments not named have `per_interval` left."""
    used = Counter(
        P.DeploymentRef(p.namespace, p.deployment)
        for p in pods
        if p.moved_at is not None and now - p.moved_at < interval
    )
    for key, at in (abandoned or {}).items():
        if at is not None and now - at < interval:
            used[P.DeploymentRef(*key)] += 1
    return {ref: max(0, per_interval - n) for ref, n in used.items()}


def build_move_templates(
    deployments: Mapping[Key, ModelDeployment],
    defaults: PodDefaults,
    last_used: Mapping[Key, float],
    busy: Iterable[Key] = (),
) -> dict[P.DeploymentRef, P.ReplicaRequest]:
    """The placement request of one replica of every deployment whose replicas may be moved:
    Exclusive ones with no move under way (`busy`)."""
    skip = set(busy)
    out = {}
    for key, md in deployments.items():
        if key in skip or md.spec.gpu.sharing != SharingMode.EXCLUSIVE:
            continue
        footprint = compute_footprint_mib(md)
        request = PlacementRequest(
            namespace=key[0],
            deployment=key[1],
            ordinal=1,
            spec=md.spec,
            footprint_mib=footprint,
            requests=compute_replica_requests(md.spec, defaults),
        )
        measured = footprint if md.spec.gpu.memory is None else None
        out[P.DeploymentRef(*key)] = build_replica_request(
            request, measured, last_used.get(key, 0.0)
        )
    return out


def compute_free_ordinals(pods: Iterable[ObservedPod], count: int) -> list[int]:
    """The `count` lowest instance numbers no Pod of the deployment holds."""
    taken = {p.ordinal for p in pods}
    out: list[int] = []
    n = 0
    while len(out) < count:
        n += 1
        if n not in taken:
            out.append(n)
    return out


def convert_consolidation(
    found: P.Consolidation,
    deployments: Mapping[Key, ModelDeployment],
    pods: Sequence[ObservedPod],
    gpu_memory: Mapping[str, int],
) -> Consolidate:
    """The planner's answer as moves of Pods: each copy gets a free instance number of its
    deployment (the old Pod still holds its own while the copy starts)."""
    by_key: dict[Key, list[ObservedPod]] = {}
    for pod in pods:
        by_key.setdefault((pod.namespace, pod.deployment), []).append(pod)
    uids = {p.key: p.uid for p in pods}
    wanted = Counter(
        (m.replica.deployment.namespace, m.replica.deployment.name) for m in found.moves
    )
    free = {key: compute_free_ordinals(by_key.get(key, ()), n) for key, n in wanted.items()}
    moves = []
    for m in found.moves:
        key = (m.replica.deployment.namespace, m.replica.deployment.name)
        md = deployments[key]
        total = gpu_memory.get(m.gpu_ids[0], 0) if m.gpu_ids else 0
        placed = Placed(m.node, m.gpu_ids, m.uuids, total, m.replica.footprint_mib, m.reason)
        moves.append(
            Move(
                namespace=key[0],
                deployment=key[1],
                deployment_uid=md.metadata.uid or "",
                pod=m.replica.pod,
                pod_uid=uids.get((key[0], m.replica.pod), ""),
                ordinal=free[key].pop(0),
                placed=placed,
            )
        )
    return Consolidate(tuple(moves), found.node, found.gpu_ids, found.reason)


def build_consolidator(
    placer: EnginePlacer,
    deployments: Mapping[Key, ModelDeployment],
    pods: Sequence[ObservedPod],
    settings: ConsolidationSettings,
    defaults: PodDefaults,
    now: datetime,
) -> Consolidator:
    """A Consolidator over `placer`'s view: `deployments` are every valid ModelDeployment,
    `pods` every replica Pod (with this process's writes in flight)."""
    under_way = compute_moves_under_way(pods)
    busy = {(p.namespace, p.deployment) for p in under_way}

    def consolidate(request: PlacementRequest) -> Consolidate | Unplaceable:
        if not settings.enabled or settings.moves_per_interval <= 0:
            return Unplaceable("consolidation is off")
        abandoned = {
            key: parse_time(md.metadata.annotations.get(L.ANN_MOVE_ABANDONED_AT))
            for key, md in deployments.items()
        }
        budgets = compute_move_budgets(
            pods, now, settings.moves_per_interval, settings.interval, abandoned
        )
        templates = build_move_templates(deployments, defaults, placer.last_used, busy)
        found = placer.consolidate(
            request, templates, budgets, settings.moves_per_interval, settings.max_moves
        )
        if isinstance(found, P.Unplaceable):
            return Unplaceable(found.reason, str(found.code))
        return convert_consolidation(found, deployments, pods, placer.gpu_memory)

    return consolidate


__all__ = [
    "ConsolidationSettings",
    "Consolidator",
    "build_consolidator",
    "build_move_templates",
    "compute_free_ordinals",
    "compute_move_budgets",
    "compute_moves_under_way",
    "convert_consolidation",
]
