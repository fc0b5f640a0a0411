"""The pod plan: what to create and delete to bring one ModelDeployment to its spec. Pure.

`compute_plan` reads the deployment, its observed replica Pods and the health of the nodes, and
returns a `Plan` with the ordinals it wants placed; `place.place` turns those into complete Pods
(or an eviction, or a blocker) and `execute.execute` applies the result. Like KubeAI's
calculatePodPlan, the plan is recomputed from scratch on every reconcile (levels, not edges), so
running it twice, or after a restart, converges on the same Pods and never creates a replica
whose name is already taken.

Every reason the controller writes (conditions, Events, metrics) is spelled here once, in
`FailureKind` and `Reason`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from modelfleet.api import ModelDeployment, parse_duration, quantity_to_mib
from modelfleet.api import labels as L
from modelfleet.api.times import format_time
from modelfleet.controller.decisions import Move, Placed, Victim
from modelfleet.controller.observed import (
    NodeHealth,
    ObservedPod,
    compute_last_use_time,
    is_replica_of,
)

# A Pod still terminating this long after its deletion is not waited for: its name is skipped.
STUCK_TERMINATING = timedelta(minutes=2)
# How long GPUs freed by an eviction stay reserved for the evictor (its replica is normally
# created within a second of the victims being gone).
RESERVATION_TTL = timedelta(seconds=60)


class FailureKind(StrEnum):
    """Why a replica can no longer serve where it runs; each is also a condition reason."""

    NODE_LOST = "NodeLost"
    ENDPOINTS_DOWN = "EndpointsDown"
    GPU_UNHEALTHY = "GpuUnhealthy"
    REPLICA_FAILED = "ReplicaFailed"


class Reason(StrEnum):
    """Every other reason the plan gives: for a deletion, a target, a blocker or an Event."""

    SPEC = "Spec"  # the target is spec.replicas
    IDLE = "Idle"  # the target is minReplicas: no request for idleTimeout
    SCALE_DOWN = "ScaleDown"
    ROLLING_UPDATE = "RollingUpdate"
    PLACED = "Placed"
    EVICTING = "Evicting"  # this deployment waits for replicas it evicted to go
    EVICTED = "Evicted"  # this deployment lost replicas to another and waits for room
    CONSOLIDATING = "Consolidating"  # this deployment waits for other replicas to move
    MOVED = "Moved"  # a replica was moved to make room for another deployment (its old Pod goes)
    MOVE_ABANDONED = "MoveAbandoned"  # a move's copy was not Ready in time: the copy goes
    INVALID_SPEC = "InvalidSpec"  # the operator cannot run the spec the API server let in
    SHARED_MODE_OFF = "SharedModeDisabled"  # spec.gpu.sharing Shared, and the operator forbids it
    CREATE_FAILED = "CreateFailed"  # the API refused a replica Pod; the next pass tries again
    SERVICE_FAILED = "ServiceFailed"  # the model's Service could not be put in shape
    ADMISSION_REJECTED = "AdmissionRejected"  # a node's kubelet refused a replica; it backs off
    GPUS_ASSIGNED = "GpusAssigned"  # the node gave a replica other GPUs than placement planned
    SERVED_NAME_HELD = "ServedNameHeld"  # the gateway routes the served name to this deployment
    SERVED_NAME_TAKEN = "ServedNameTaken"  # an older deployment holds the served name


# Container waiting reasons of a replica that is broken rather than starting.
BROKEN_WAITING = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError"}
)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one replica must be replaced, and whether its delete must skip the grace period."""

    kind: FailureKind
    message: str
    force: bool = False  # the node's kubelet will never confirm a graceful delete


@dataclass(frozen=True, slots=True)
class PodToCreate:
    """A replica Pod to create: the complete body, and the record the in-flight book keeps."""

    ordinal: int
    name: str
    placed: Placed
    body: Mapping[str, Any]
    record: ObservedPod  # what the watch will show once the Pod exists (built, not parsed)


@dataclass(frozen=True, slots=True)
class PodToDelete:
    namespace: str
    name: str
    deployment: str
    reason: FailureKind | Reason
    message: str
    force: bool = False  # grace period 0: the node's kubelet will never confirm a graceful delete
    uid: str = ""  # delete only this incarnation (a replacement may already use the name)


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    """Write on a replica Pod the GPUs its node assigned (the node's word, kept across agent
    outages and operator restarts)."""

    namespace: str
    name: str
    uid: str
    gpus: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EventSpec:
    """A core/v1 Event about a ModelDeployment (this one, or an eviction victim)."""

    namespace: str
    deployment: str
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Blocker:
    """Why a replica that should exist could not be created in this plan."""

    reason: str  # a Reason, or the placement engine's code (NoCapacity, WaitingForStats, ...)
    message: str


@dataclass(frozen=True, slots=True)
class Eviction:
    """Replicas of other deployments to delete so that `for_pod` fits on `node`, on `gpu_ids`.

    The GPUs are reserved for this deployment from the moment the eviction is decided until
    `reserved_until` (or until it places its replica).
    """

    victims: tuple[Victim, ...]
    for_pod: str
    node: str
    gpu_ids: tuple[str, ...]
    reason: str
    reserved_until: datetime


@dataclass(frozen=True, slots=True)
class Consolidation:
    """Copies of other deployments' replicas to start (make-before-break) so that `for_pod` fits
    on `node`, on `gpu_ids`, which are reserved for this deployment until `reserved_until`.

    The old replicas are deleted by their own deployments' plans once the copies are Ready
    (`compute_plan`); `copies[i]` is the Pod of `moves[i]`.
    """

    moves: tuple[Move, ...]
    copies: tuple[PodToCreate, ...]
    for_pod: str
    node: str
    gpu_ids: tuple[str, ...]
    reason: str
    reserved_until: datetime


@dataclass
class Plan:
    """What one reconcile will do, and what the status needs to explain it.

    `compute_plan` fills everything but placement: the ordinals it wants created are in
    `to_place`; `place` turns them into `to_create` (or an eviction, or a blocker).
    """

    target: int
    target_reason: Reason  # SPEC or IDLE
    to_place: list[int] = field(default_factory=list)
    to_create: list[PodToCreate] = field(default_factory=list)
    to_delete: list[PodToDelete] = field(default_factory=list)
    eviction: Eviction | None = None
    consolidation: Consolidation | None = None
    events: list[EventSpec] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    blocker: Blocker | None = None
    waiting_for: int = 0  # replicas waiting for a terminating Pod to free their name
    rolling: bool = False
    # Annotations to set (str) or remove (None) on this ModelDeployment.
    annotations: dict[str, str | None] = field(default_factory=dict)
    # Replica Pods to record the GPUs their node assigned on (ANN_ASSIGNED_GPUS).
    assignments: list[AssignmentRecord] = field(default_factory=list)

    @property
    def victims(self) -> list[Victim]:
        """Replica Pods of other deployments this plan deletes."""
        return list(self.eviction.victims) if self.eviction is not None else []

    @property
    def empty(self) -> bool:
        return not (
            self.to_create
            or self.to_delete
            or self.victims
            or self.annotations
            or self.assignments
            or self.consolidation
        )


def compute_last_use(md: ModelDeployment) -> datetime | None:
    """Last request, or the latest demand, or creation time: the start of the idle clock."""
    extra = md.metadata.model_extra or {}
    return compute_last_use_time(md.metadata.annotations, extra.get("creationTimestamp"))


def compute_target(
    md: ModelDeployment, now: datetime, pods: Sequence[ObservedPod] = ()
) -> tuple[int, Reason]:
    """How many replicas should run now: spec.replicas, or minReplicas once idle.

    Idle means no request for idleTimeout while the model could serve: the clock starts at the
    last request or demand (else creation), but never before the current replicas became ready,
    and it does not run while the only replicas are still starting. Otherwise a model whose
    start takes longer than its idleTimeout (a cold start from a request, or its first start)
    would be scaled away before it ever served, stranding the requests held for it.
    """
    spec = md.spec
    if spec.idle_timeout is None or spec.replicas == spec.min_replicas:
        return spec.replicas, Reason.SPEC
    live = [p for p in pods if not p.deleting and not p.failed]
    ready_since = [p.ready_since for p in live if p.ready and p.ready_since is not None]
    starting = [p for p in live if not p.ready and p.waiting_reason not in BROKEN_WAITING]
    if starting and not any(p.ready for p in live):
        return spec.replicas, Reason.SPEC
    last = compute_last_use(md)
    if ready_since:
        serving_since = min(ready_since)
        last = serving_since if last is None else max(last, serving_since)
    if last is None:
        return spec.replicas, Reason.SPEC
    if now - last >= timedelta(seconds=parse_duration(spec.idle_timeout)):
        return spec.min_replicas, Reason.IDLE
    return spec.replicas, Reason.SPEC


def compute_failure(
    pod: ObservedPod, nodes: Mapping[str, NodeHealth], any_agent_up: bool
) -> Failure | None:
    """Why this replica can no longer serve where it is, or None."""
    if pod.node is None:
        return None
    node = nodes.get(pod.node)
    if node is None or not node.exists:
        return Failure(FailureKind.NODE_LOST, f"node {pod.node} no longer exists", force=True)
    if not node.ready:
        return Failure(FailureKind.NODE_LOST, f"node {pod.node} is NotReady", force=True)
    # With no agent answering anywhere the pool itself is blind; replacing every replica
    # would turn a monitoring outage into a serving outage.
    if node.agent_known and not node.agent_up and any_agent_up:
        return Failure(
            FailureKind.ENDPOINTS_DOWN, f"the node-stats agent on {pod.node} is not answering"
        )
    if node.agent_missing and any_agent_up:
        # Same consequence as a silent agent: nothing tells whether the GPUs still work.
        return Failure(
            FailureKind.ENDPOINTS_DOWN, f"no node-stats agent pod runs on {pod.node} any more"
        )
    bad = [g for g in pod.gpus if g in node.unhealthy_gpus]
    if bad:
        return Failure(FailureKind.GPU_UNHEALTHY, f"GPU {', '.join(bad)} is unhealthy")
    if pod.failed:
        return Failure(FailureKind.REPLICA_FAILED, f"the Pod ended in phase {pod.phase}")
    return None


def compute_footprint_mib(md: ModelDeployment) -> int | None:
    """Footprint per GPU in MiB: spec.gpu.memory, else the measured status.footprint."""
    if md.spec.gpu.memory is not None:
        return quantity_to_mib(md.spec.gpu.memory)
    if md.status.footprint is not None:
        return quantity_to_mib(md.status.footprint)
    return None


def compute_plan(
    md: ModelDeployment,
    pods: Sequence[ObservedPod],
    nodes: Mapping[str, NodeHealth],
    now: datetime,
    template_hash: str,
) -> Plan:
    """The create/delete plan for one ModelDeployment, placement left to `place`.

    `template_hash` is the hash of the Pod template the spec asks for now; replicas built from
    another are rolled one at a time.
    """
    # Only Pods this deployment controls are its replicas. The others with its labels (an older
    # object's of the same name being garbage collected, a look-alike someone else made) are
    # never counted, replaced or deleted: they only hold their names.
    ours = [p for p in pods if is_replica_of(p, md.metadata.uid or None)]
    target, target_reason = compute_target(md, now, ours)
    plan = Plan(target=target, target_reason=target_reason)
    healthy, terminating = _plan_replacements(plan, md, ours, nodes, now)
    moving = _plan_moves(plan, md, ours, healthy, terminating, now)
    _plan_scale_down(plan, md, healthy)
    _plan_scale_up(plan, {p.ordinal for p in pods}, terminating, len(healthy))
    if not plan.to_place and not plan.waiting_for and not moving:
        _plan_rollout(plan, md, healthy, template_hash)
        plan.annotations.update(compute_settled_annotations(md))
    return plan


def compute_settled_annotations(md: ModelDeployment) -> dict[str, str | None]:
    """Marks to remove once a deployment has every replica it wants: it was evicted, or it held
    GPUs for a replica it has now placed."""
    ann = md.metadata.annotations
    out: dict[str, str | None] = {}
    if L.ANN_EVICTED_AT in ann:
        out.update({L.ANN_EVICTED_AT: None, L.ANN_EVICTED_BY: None})
    if L.ANN_RESERVATION in ann:
        out[L.ANN_RESERVATION] = None
    return out


def _plan_replacements(
    plan: Plan,
    md: ModelDeployment,
    ours: Sequence[ObservedPod],
    nodes: Mapping[str, NodeHealth],
    now: datetime,
) -> tuple[list[ObservedPod], set[int]]:
    """Delete replicas that can no longer serve; returns the healthy ones and the ordinals
    whose Pods are still terminating (their names are waited for)."""
    namespace, name = md.metadata.namespace or "", md.metadata.name
    any_agent_up = any(n.agent_known and n.agent_up for n in nodes.values())
    terminating = {p.ordinal for p in ours if p.deleting and not _stuck(p, now)}
    healthy: list[ObservedPod] = []
    for pod in sorted(ours, key=lambda p: p.ordinal):
        failure = compute_failure(pod, nodes, any_agent_up)
        if pod.deleting:
            if failure and failure.force:
                # A graceful delete on a lost node never completes; make it final.
                plan.to_delete.append(
                    PodToDelete(
                        namespace, pod.name, name, failure.kind, failure.message, True, pod.uid
                    )
                )
            continue
        if failure is None:
            healthy.append(pod)
            continue
        plan.to_delete.append(
            PodToDelete(
                namespace, pod.name, name, failure.kind, failure.message, failure.force, pod.uid
            )
        )
        plan.events.append(
            EventSpec(
                namespace,
                name,
                "Warning",
                failure.kind,
                f"replacing {pod.name}: {failure.message}",
            )
        )
        plan.details.append(f"replace {pod.name}: {failure.message}")
        terminating.add(pod.ordinal)
    return healthy, terminating


def compute_move_state(copy: ObservedPod, ours: Sequence[ObservedPod]) -> ObservedPod | None:
    """The Pod a consolidation copy replaces, while it still exists; None once it is gone (the
    copy is then an ordinary replica) or for any other replica."""
    if not copy.move_of:
        return None
    for pod in ours:
        if pod.name == copy.move_of and (not copy.move_of_uid or pod.uid == copy.move_of_uid):
            return pod
    return None


def _plan_moves(
    plan: Plan,
    md: ModelDeployment,
    ours: Sequence[ObservedPod],
    healthy: list[ObservedPod],
    terminating: set[int],
    now: datetime,
) -> int:
    """Consolidation moves of this deployment's replicas, make-before-break: once a copy is
    Ready its old Pod is deleted; a copy not Ready by its deadline (or broken) is deleted and
    the old Pod kept. A move under way counts once (the old Pod): its copy is neither scaled
    down nor rolled. Returns the moves still under way."""
    under_way = 0
    for copy in [p for p in healthy if p.move_of]:
        old = compute_move_state(copy, ours)
        if old is None or old.deleting:
            continue
        if copy.ready:
            text = (
                f"moved {old.name} from {old.node} to {copy.node} as {copy.name} to make room "
                f"for {copy.move_for}; {old.name} goes now that {copy.name} is Ready"
            )
            _delete_for_move(plan, old, "Normal", Reason.MOVED, text)
            if old in healthy:
                healthy.remove(old)
            terminating.add(old.ordinal)
            continue
        late = copy.move_deadline is not None and now >= copy.move_deadline
        if late or copy.waiting_reason in BROKEN_WAITING:
            why = "was not Ready by its deadline" if late else f"is {copy.waiting_reason}"
            text = (
                f"abandoning the move of {old.name} (for {copy.move_for}): its copy {copy.name} "
                f"on {copy.node} {why}; {old.name} keeps serving"
            )
            _delete_for_move(plan, copy, "Warning", Reason.MOVE_ABANDONED, text)
            plan.annotations[L.ANN_MOVE_ABANDONED_AT] = format_time(now)
            healthy.remove(copy)
            continue
        under_way += 1
        healthy.remove(copy)
        plan.details.append(f"{copy.name} starts on {copy.node} to replace {old.name}")
    return under_way


def _plan_scale_down(plan: Plan, md: ModelDeployment, healthy: list[ObservedPod]) -> None:
    """Unready replicas go first, then the highest ordinals."""
    excess = len(healthy) - plan.target
    if excess <= 0:
        return
    namespace, name = md.metadata.namespace or "", md.metadata.name
    why = Reason.IDLE if plan.target_reason == Reason.IDLE else Reason.SCALE_DOWN
    text = (
        f"idle for longer than {md.spec.idle_timeout}, scaling to minReplicas={plan.target}"
        if why == Reason.IDLE
        else f"scaling down to {plan.target} replicas"
    )
    for pod in sorted(healthy, key=lambda p: (p.ready, -p.ordinal))[:excess]:
        plan.to_delete.append(PodToDelete(namespace, pod.name, name, why, text, uid=pod.uid))
        plan.details.append(f"delete {pod.name}: {text}")
        healthy.remove(pod)
    plan.events.append(EventSpec(namespace, name, "Normal", why, text))


def _plan_scale_up(plan: Plan, taken: set[int], terminating: set[int], healthy: int) -> None:
    """Fill the lowest free ordinals. A name whose Pod is still terminating is waited for, so a
    replacement takes the same name (and never exists twice)."""
    missing = plan.target - healthy
    n = 0
    while missing > 0:
        n += 1
        if n in terminating:
            plan.waiting_for += 1
            missing -= 1
        elif n not in taken:
            plan.to_place.append(n)
            missing -= 1
    if plan.waiting_for:
        plan.details.append(f"{plan.waiting_for} replica(s) wait for a terminating Pod")


def _stuck(pod: ObservedPod, now: datetime) -> bool:
    return pod.deleting_since is not None and now - pod.deleting_since > STUCK_TERMINATING


def _plan_rollout(
    plan: Plan, md: ModelDeployment, healthy: list[ObservedPod], template_hash: str
) -> None:
    """Replace one outdated replica at a time, and only while every other one is ready."""
    namespace = md.metadata.namespace or ""
    name = md.metadata.name
    outdated = [p for p in healthy if p.template_hash != template_hash]
    if not outdated:
        return
    plan.rolling = True
    # An outdated replica that is not ready serves nothing: replace it right away.
    unready = [p for p in outdated if not p.ready]
    if unready:
        chosen = unready
    elif all(p.ready for p in healthy) and not plan.to_delete:
        chosen = [max(outdated, key=lambda p: p.ordinal)]
    else:
        plan.details.append("rollout waits for every replica to be ready")
        return
    for pod in chosen:
        text = f"replacing {pod.name}: the spec changed ({len(outdated)} outdated)"
        plan.to_delete.append(
            PodToDelete(namespace, pod.name, name, Reason.ROLLING_UPDATE, text, uid=pod.uid)
        )
        plan.events.append(EventSpec(namespace, name, "Normal", Reason.ROLLING_UPDATE, text))
        plan.details.append(text)


def _delete_for_move(plan: Plan, pod: ObservedPod, kind: str, reason: Reason, text: str) -> None:
    """One step of a move: delete `pod` (by UID), with an Event and a detail saying why."""
    plan.to_delete.append(
        PodToDelete(pod.namespace, pod.name, pod.deployment, reason, text, uid=pod.uid)
    )
    plan.events.append(EventSpec(pod.namespace, pod.deployment, kind, reason, text))
    plan.details.append(text)
