"""The placement step of a plan: replicas to create become complete Pods, an eviction or a
blocker. Pure.

`place` asks a `Placer` (the engine over the cluster view, or a test's stand-in) for each ordinal
`compute_plan` left in `plan.to_place`, lowest first, and stops at the first one that does not
fit: every created Pod carries its full body and the record the in-flight book keeps, so nothing
is built twice or parsed back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TypeGuard

from modelfleet.api import ModelDeployment, SharingMode
from modelfleet.api import labels as L
from modelfleet.api.times import format_time, parse_time
from modelfleet.controller.autoscale import Recommendation
from modelfleet.controller.builders import (
    PodDefaults,
    build_replica_pod,
    build_replica_record,
    compute_replica_requests,
    compute_template_hash,
)
from modelfleet.controller.decisions import (
    Consolidate,
    Evict,
    Placed,
    PlacementRequest,
    Placer,
    Unplaceable,
)
from modelfleet.controller.observed import ObservedPod, instance_name
from modelfleet.controller.plan import (
    RESERVATION_TTL,
    Blocker,
    Consolidation,
    EventSpec,
    Eviction,
    Plan,
    PodToCreate,
    Reason,
    compute_footprint_mib,
    compute_settled_annotations,
)
from modelfleet.controller.reservations import Reservation


@dataclass(frozen=True, slots=True)
class Consolidating:
    """What `place` needs to make room by moving other replicas (controller/consolidate.py)."""

    consolidator: Callable[[PlacementRequest], Consolidate | Unplaceable]
    deployments: Mapping[tuple[str, str], ModelDeployment]  # every deployment a move may name
    under_way: Sequence[ObservedPod] = ()  # copies started for this deployment, old Pod still there
    move_timeout: timedelta = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class EvictionMark:
    """This deployment lost replicas to another one (`by`, namespace/name) at `at`."""

    at: datetime
    by: str


def compute_eviction_mark(
    md: ModelDeployment, remembered: EvictionMark | None = None
) -> EvictionMark | None:
    """The latest eviction of `md`: its annotations, or what this process decided itself and the
    watch may not show yet."""
    ann = md.metadata.annotations
    at = parse_time(ann.get(L.ANN_EVICTED_AT))
    written = EvictionMark(at, ann.get(L.ANN_EVICTED_BY, "another model")) if at else None
    if remembered is None or (written is not None and written.at >= remembered.at):
        return written
    return remembered


# How long an autoscaled model's replicas stay protected after its load last needed them: a
# lull shorter than this (requests finishing between two bursts, one scrape that missed a
# replica) does not hand them to another model of the same priority.
LOAD_HOLD_S = 30.0


@dataclass(frozen=True, slots=True)
class LoadNeed:
    """The replicas an autoscaled model's own load asks for, from its autoscaler's rounds
    (what the load implied, within the bounds, before the stabilization windows)."""

    latest: int  # in the latest round
    held: int  # the most in any round of the last LOAD_HOLD_S


def compute_load_need(
    history: Sequence[Recommendation], now: float, hold_s: float = LOAD_HOLD_S
) -> LoadNeed | None:
    """What the load asked for lately, or None when no round within `hold_s` had figures.

    `history` is the autoscaler's per-round recommendations, on the same monotonic clock as
    `now`.
    """
    recent = [r for r in history if now - r.at <= hold_s]
    if not recent:
        return None
    latest = max(recent, key=lambda r: r.at)
    return LoadNeed(latest=latest.replicas, held=max(r.replicas for r in recent))


def compute_load_floors(
    needs: Mapping[tuple[str, str], LoadNeed],
    priorities: Mapping[tuple[str, str], int],
    requester: tuple[str, str],
    priority: int,
) -> dict[tuple[str, str], int]:
    """The Ready replicas eviction must leave each autoscaled model for `requester`: what its
    own load needed over the hold, for models whose priority is not below the requester's.

    A higher priority still takes a lower one's replicas down to its minReplicas (priority is
    the order the user gave); between models of one rank, load decides: a replica its own model
    is using is not taken, so two models never take each other's replicas back and forth.
    """
    return {
        key: need.held
        for key, need in needs.items()
        if key != requester and priorities.get(key, priority - 1) >= priority
    }


def compute_may_evict(
    md: ModelDeployment,
    mark: EvictionMark | None,
    need: LoadNeed | None = None,
    rank: int = 1,
) -> bool:
    """May the `rank`-th replica of `md` (1: its first) be placed by evicting others?

    An autoscaled model with load figures evicts only for replicas its own load needs now
    (rank <= what the latest round implied, at least 1: the autoscaler's minReplicas), whether
    or not it lost replicas lately: a count left over from a past burst takes nothing from
    anyone. Any other model: an eviction victim does not evict back; a request that arrives
    after it may.
    """
    if md.spec.autoscaling.enabled and need is not None:
        return rank <= need.latest
    if mark is None:
        return True
    demand = parse_time(md.metadata.annotations.get(L.ANN_DEMAND))
    return demand is not None and demand > mark.at


def place(
    plan: Plan,
    md: ModelDeployment,
    placer: Placer,
    *,
    defaults: PodDefaults,
    now: datetime,
    deleting: Collection[tuple[str, str]] = frozenset(),
    mark: EvictionMark | None = None,
    unseen_nodes: Sequence[str] = (),
    consolidating: Consolidating | None = None,
    need: LoadNeed | None = None,
    load_floors: Mapping[tuple[str, str], int] | None = None,
    reserved: Reservation | None = None,
) -> Plan:
    """`plan` with its `to_place` ordinals placed: Pods to create, or an eviction, or a blocker.

    `deleting` holds (namespace, name) of every replica Pod in the cluster already terminating,
    so an eviction under way is waited for instead of repeated; `mark` is the deployment's last
    eviction (it then does not evict back); `unseen_nodes` are GPU nodes no agent reports, named
    when nothing fits because placement cannot see them; `consolidating`, when given, is tried
    before any eviction (and a deployment whose moves are under way waits for them); `need` is
    what this deployment's own load asks for (autoscaled models), and `load_floors` what other
    models' load needs (`compute_load_floors`): eviction leaves them that many Ready replicas.
    `reserved` is the GPUs an earlier eviction of this deployment freed and no replica of it
    holds yet (`compute_unused_reservation`): while the node still reports them in use (the
    victim's process has not let go of its memory), the replica waits for them rather than
    evicting someone else.
    """
    out = replace(
        plan,
        to_place=[],
        to_create=list(plan.to_create),
        events=list(plan.events),
        details=list(plan.details),
        annotations=dict(plan.annotations),
    )
    template_hash = compute_template_hash(md, defaults.image)
    requests = compute_replica_requests(md.spec, defaults)
    footprint = compute_footprint_mib(md)
    released = tuple(d.name for d in plan.to_delete)
    namespace, name = md.metadata.namespace or "", md.metadata.name
    # Replicas already there or coming back under their own names, before these.
    before = plan.target - len(plan.to_place)
    for i, n in enumerate(plan.to_place):
        pod_name = instance_name(name, n)
        may_evict = compute_may_evict(md, mark, need, before + i + 1)
        request = PlacementRequest(
            namespace=namespace,
            deployment=name,
            ordinal=n,
            spec=md.spec,
            footprint_mib=footprint,
            planned=tuple(c.placed for c in out.to_create),
            released=released,
            may_evict=may_evict,
            requests=requests,
            load_floors=dict(load_floors or {}),
        )
        decision = placer(request)
        if isinstance(decision, Placed):
            _add_create(out, md, n, decision, defaults, template_hash)
            continue
        if consolidating is not None and consolidating.under_way:
            out.blocker = _waits_for_moves(pod_name, consolidating.under_way)
        elif (
            consolidating is not None
            and _may_consolidate(md, decision, deleting)
            and isinstance(found := consolidating.consolidator(request), Consolidate)
        ):
            _plan_consolidation(out, md, pod_name, found, consolidating, defaults, now)
        elif isinstance(decision, Evict) and not may_evict and need is not None:
            out.blocker = _waits_within_load(pod_name, need, mark, decision.reason)
        elif isinstance(decision, Evict) and _reservation_unused(reserved, out.to_create):
            out.blocker = _waits_for_reservation(pod_name, reserved)
        elif isinstance(decision, Evict):
            _blocked_by_eviction(out, md, pod_name, decision, deleting, may_evict, mark, now)
        elif not may_evict and mark is not None:
            out.blocker = _waits_after_eviction(mark, decision.reason)
        else:
            _blocked(out, md, pod_name, decision, unseen_nodes)
        out.details.append(f"blocked at {pod_name}: {out.blocker.reason if out.blocker else ''}")
        break
    if out.blocker is None and not out.waiting_for:
        out.annotations.update(compute_settled_annotations(md))
    return out


def _may_consolidate(
    md: ModelDeployment, decision: Evict | Unplaceable, deleting: Collection[tuple[str, str]]
) -> bool:
    """Whole-GPU replicas that found no room (an eviction already under way is waited for)."""
    if md.spec.gpu.sharing != SharingMode.EXCLUSIVE:
        return False
    if isinstance(decision, Evict):
        return not all((v.namespace, v.pod) in deleting for v in decision.victims)
    return decision.code == "NoCapacity"


def _waits_for_moves(pod_name: str, under_way: Sequence[ObservedPod]) -> Blocker:
    moves = ", ".join(f"{c.namespace}/{c.move_of} to {c.node} as {c.name}" for c in under_way)
    return Blocker(
        Reason.CONSOLIDATING,
        f"{pod_name} waits for a consolidation: {len(under_way)} replica move"
        f"{'s' if len(under_way) > 1 else ''} under way ({moves}); each old replica goes once "
        "its copy is Ready",
    )


def _plan_consolidation(
    plan: Plan,
    md: ModelDeployment,
    pod_name: str,
    found: Consolidate,
    consolidating: Consolidating,
    defaults: PodDefaults,
    now: datetime,
) -> None:
    """Start a copy of each moved replica; the GPUs they free are reserved for `pod_name`."""
    namespace, name = md.metadata.namespace or "", md.metadata.name
    deadline = now + consolidating.move_timeout
    extra = {
        L.ANN_MOVE_FOR: f"{namespace}/{name}",
        L.ANN_MOVED_AT: format_time(now),
        L.ANN_MOVE_DEADLINE: format_time(deadline),
    }
    copies = []
    for move in found.moves:
        other = consolidating.deployments[(move.namespace, move.deployment)]
        template_hash = compute_template_hash(other, defaults.image)
        body = build_replica_pod(
            other, move.ordinal, move.placed, defaults=defaults, template_hash=template_hash
        )
        annotations = {
            **body["metadata"]["annotations"],
            **extra,
            L.ANN_MOVE_OF: move.pod,
            L.ANN_MOVE_OF_UID: move.pod_uid,
        }
        body = {**body, "metadata": {**body["metadata"], "annotations": annotations}}
        record = replace(
            build_replica_record(
                other, move.ordinal, move.placed, template_hash=template_hash, defaults=defaults
            ),
            move_of=move.pod,
            move_of_uid=move.pod_uid,
            move_for=f"{namespace}/{name}",
            moved_at=now,
            move_deadline=deadline,
        )
        copy_name = instance_name(move.deployment, move.ordinal)
        copies.append(PodToCreate(move.ordinal, copy_name, move.placed, body, record))
        text = (
            f"moving {move.pod} to {move.placed.node} (GPUs {','.join(move.placed.gpu_ids)}) as "
            f"{copy_name} to make room for {namespace}/{name}; {move.pod} keeps serving until "
            f"{copy_name} is Ready"
        )
        plan.events.append(EventSpec(move.namespace, move.deployment, "Normal", Reason.MOVED, text))
        plan.details.append(text)
    plan.consolidation = Consolidation(
        found.moves,
        tuple(copies),
        pod_name,
        found.node,
        found.gpu_ids,
        found.reason,
        deadline + RESERVATION_TTL,
    )
    plan.blocker = Blocker(
        Reason.CONSOLIDATING, f"{pod_name} waits for a consolidation: {found.reason}"
    )
    plan.events.append(
        EventSpec(
            namespace,
            name,
            "Normal",
            Reason.CONSOLIDATING,
            f"consolidating for {pod_name}: {found.reason}",
        )
    )


def _add_create(
    plan: Plan,
    md: ModelDeployment,
    n: int,
    decision: Placed,
    defaults: PodDefaults,
    template_hash: str,
) -> None:
    namespace, name = md.metadata.namespace or "", md.metadata.name
    pod_name = instance_name(name, n)
    body = build_replica_pod(md, n, decision, defaults=defaults, template_hash=template_hash)
    record = build_replica_record(md, n, decision, template_hash=template_hash, defaults=defaults)
    plan.to_create.append(PodToCreate(n, pod_name, decision, body, record))
    gpus = ",".join(decision.gpu_ids)
    plan.events.append(
        EventSpec(
            namespace,
            name,
            "Normal",
            Reason.PLACED,
            f"{pod_name} on {decision.node} (GPUs {gpus}): {decision.reason}",
        )
    )
    plan.details.append(f"create {pod_name} on {decision.node} [{gpus}]")


# At most this many unseen nodes are named in a reason; the rest are counted.
UNSEEN_NAMED = 5


def compute_unseen_note(unseen_nodes: Sequence[str]) -> str:
    """What a blocked replica's reason adds about GPU nodes no agent reports ('' if none)."""
    if not unseen_nodes:
        return ""
    named = ", ".join(unseen_nodes[:UNSEEN_NAMED])
    more = len(unseen_nodes) - UNSEEN_NAMED
    if more > 0:
        named += f" and {more} more"
    count = len(unseen_nodes)
    return (
        f"; {count} GPU node{'s' if count > 1 else ''} without a node-stats agent, which "
        f"placement cannot use: {named} (check the agent DaemonSet's node affinity, "
        "tolerations and runtime class: docs/install.md)"
    )


def _blocked(
    plan: Plan,
    md: ModelDeployment,
    pod_name: str,
    decision: Unplaceable,
    unseen_nodes: Sequence[str],
) -> None:
    reason = decision.reason + compute_unseen_note(unseen_nodes)
    plan.blocker = Blocker(decision.code, reason)
    plan.events.append(
        EventSpec(
            md.metadata.namespace or "",
            md.metadata.name,
            "Warning",
            decision.code,
            f"cannot place {pod_name}: {reason}",
        )
    )


def _blocked_by_eviction(
    plan: Plan,
    md: ModelDeployment,
    pod_name: str,
    decision: Evict,
    deleting: Collection[tuple[str, str]],
    may_evict: bool,
    mark: EvictionMark | None,
    now: datetime,
) -> None:
    if all((v.namespace, v.pod) in deleting for v in decision.victims):
        plan.blocker = Blocker(
            Reason.EVICTING, f"{pod_name} waits for evicted replicas to terminate"
        )
    elif may_evict:
        _plan_eviction(plan, md, pod_name, decision, deleting, now + RESERVATION_TTL)
    else:
        plan.blocker = _waits_after_eviction(mark, decision.reason)


def compute_unused_reservation(
    reservation: Reservation | None, pods: Iterable[ObservedPod]
) -> Reservation | None:
    """`reservation` while none of `pods` (the deployment's own, not terminating) is on its
    GPUs yet; None once one is, or when there is none."""
    if reservation is None:
        return None
    gpus = set(reservation.gpu_ids)
    for pod in pods:
        if not pod.deleting and pod.node == reservation.node and gpus & set(pod.gpus):
            return None
    return reservation


def _reservation_unused(
    reserved: Reservation | None, creating: Sequence[PodToCreate]
) -> TypeGuard[Reservation]:
    """A reservation no replica of this pass is placed on either."""
    if reserved is None:
        return False
    gpus = set(reserved.gpu_ids)
    return not any(
        c.placed.node == reserved.node and gpus & set(c.placed.gpu_ids) for c in creating
    )


def _waits_for_reservation(pod_name: str, reserved: Reservation) -> Blocker:
    """The GPUs this deployment's eviction freed are not free yet: wait, evict no one else."""
    return Blocker(
        Reason.EVICTING,
        f"{pod_name} waits for the GPUs its eviction freed on {reserved.node} "
        f"({', '.join(reserved.gpu_ids)}): the node still reports them in use",
    )


def _waits_after_eviction(mark: EvictionMark | None, why: str) -> Blocker:
    """A victim waits for room; it says so instead of repeating the engine's NoCapacity."""
    by = mark.by if mark is not None else "another model"
    return Blocker(
        Reason.EVICTED,
        f"evicted by {by}; comes back when capacity frees up or a request arrives ({why})",
    )


def _waits_within_load(
    pod_name: str, need: LoadNeed, mark: EvictionMark | None, why: str
) -> Blocker:
    """An autoscaled model whose load does not need this replica takes no one's GPUs for it."""
    lost = f"evicted by {mark.by}; " if mark is not None else ""
    return Blocker(
        Reason.EVICTED if mark is not None else "NoCapacity",
        f"{lost}{pod_name} waits for free GPUs: its load needs {need.latest} "
        f"replica{'s' if need.latest != 1 else ''} now, and a model evicts others only for "
        f"replicas its load needs ({why})",
    )


def _plan_eviction(
    plan: Plan,
    md: ModelDeployment,
    pod_name: str,
    decision: Evict,
    deleting: Collection[tuple[str, str]],
    reserved_until: datetime,
) -> None:
    namespace = md.metadata.namespace or ""
    name = md.metadata.name
    fresh = tuple(v for v in decision.victims if (v.namespace, v.pod) not in deleting)
    plan.eviction = Eviction(
        fresh, pod_name, decision.node, decision.gpu_ids, decision.reason, reserved_until
    )
    plan.blocker = Blocker(Reason.EVICTING, f"{pod_name} waits for evictions: {decision.reason}")
    names = ", ".join(f"{v.namespace}/{v.pod}" for v in fresh)
    plan.events.append(
        EventSpec(
            namespace,
            name,
            "Normal",
            Reason.EVICTING,
            f"evicting {names} for {pod_name}: {decision.reason}",
        )
    )
    for victim in fresh:
        plan.events.append(
            EventSpec(
                victim.namespace,
                victim.deployment,
                "Warning",
                Reason.EVICTED,
                f"{victim.pod} evicted to make room for {namespace}/{name}: {decision.reason}",
            )
        )
        plan.details.append(f"evict {victim.namespace}/{victim.pod}")
