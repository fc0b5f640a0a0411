"""The pod plan: what to create and delete to bring one ModelDeployment to its spec. Pure.

`compute_plan` reads the deployment, its observed replica Pods, the health of the nodes and a
placement function, and returns a `Plan`; `execute.py` applies it. Like KubeAI's
calculatePodPlan, the plan is recomputed from scratch on every reconcile (levels, not edges), so
running it twice, or after a restart, converges on the same Pods and never creates a replica
whose name is already taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from modelfleet.api import ModelDeployment, parse_duration, quantity_to_mib
from modelfleet.api import labels as L
from modelfleet.controller.decisions import (
    Evict,
    Placed,
    PlacementRequest,
    Placer,
    Unplaceable,
    Victim,
)
from modelfleet.controller.observed import (
    NodeHealth,
    ObservedPod,
    compute_last_use_time,
    instance_name,
    parse_time,
)

# A Pod still terminating this long after its deletion is not waited for: its name is skipped.
STUCK_TERMINATING = timedelta(minutes=2)

# Why a replica is deleted; each is also a condition reason.
NODE_LOST = "NodeLost"
ENDPOINTS_DOWN = "EndpointsDown"
GPU_UNHEALTHY = "GpuUnhealthy"
REPLICA_FAILED = "ReplicaFailed"
SCALE_DOWN = "ScaleDown"
IDLE = "Idle"
ROLLING_UPDATE = "RollingUpdate"
EVICTED = "Evicted"
EVICTING = "Evicting"

# Container waiting reasons of a replica that is broken rather than starting.
BROKEN_WAITING = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError"}
)


@dataclass(frozen=True, slots=True)
class PodToCreate:
    instance: int
    name: str
    placed: Placed


@dataclass(frozen=True, slots=True)
class PodToDelete:
    namespace: str
    name: str
    deployment: str
    reason: str  # one of the constants above
    message: str
    force: bool = False  # grace period 0: the node's kubelet will never confirm a graceful delete
    uid: str = ""  # delete only this incarnation (a replacement may already use the name)


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

    reason: str  # NoCapacity, Evicted, Evicting, WaitingForGpuStats, ...
    message: str


@dataclass
class Plan:
    """What one reconcile will do, and what the status needs to explain it."""

    target: int
    target_reason: str  # "Spec", IDLE
    to_create: list[PodToCreate] = field(default_factory=list)
    to_delete: list[PodToDelete] = field(default_factory=list)
    victims: list[Victim] = field(default_factory=list)
    events: list[EventSpec] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    blocker: Blocker | None = None
    waiting_for: int = 0  # replicas waiting for a terminating Pod to free their name
    rolling: bool = False
    # Annotations to set (str) or remove (None) on this ModelDeployment.
    annotations: dict[str, str | None] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.to_create or self.to_delete or self.victims or self.annotations)


@dataclass(frozen=True, slots=True)
class PlanSettings:
    template_hash: str


def compute_last_use(md: ModelDeployment) -> datetime | None:
    """Last request, or the latest demand, or creation time: the start of the idle clock."""
    extra = md.metadata.model_extra or {}
    return compute_last_use_time(md.metadata.annotations, extra.get("creationTimestamp"))


def compute_target(
    md: ModelDeployment, now: datetime, pods: Sequence[ObservedPod] = ()
) -> tuple[int, str]:
    """How many replicas should run now: spec.replicas, or minReplicas once idle.

    Idle means no request for idleTimeout while the model could serve: the clock starts at the
    last request or demand (else creation), but never before the current replicas became ready,
    and it does not run while the only replicas are still starting. Otherwise a model whose
    start takes longer than its idleTimeout (a cold start from a request, or its first start)
    would be scaled away before it ever served, stranding the requests held for it.
    """
    spec = md.spec
    if spec.idle_timeout is None or spec.replicas == spec.min_replicas:
        return spec.replicas, "Spec"
    live = [p for p in pods if not p.deleting and not p.failed]
    ready_since = [p.ready_since for p in live if p.ready and p.ready_since is not None]
    starting = [p for p in live if not p.ready and p.waiting_reason not in BROKEN_WAITING]
    if starting and not any(p.ready for p in live):
        return spec.replicas, "Spec"
    last = compute_last_use(md)
    if ready_since:
        serving_since = min(ready_since)
        last = serving_since if last is None else max(last, serving_since)
    if last is None:
        return spec.replicas, "Spec"
    if now - last >= timedelta(seconds=parse_duration(spec.idle_timeout)):
        return spec.min_replicas, IDLE
    return spec.replicas, "Spec"


def compute_failure(
    pod: ObservedPod, nodes: Mapping[str, NodeHealth], any_agent_up: bool
) -> tuple[str, str, bool] | None:
    """(reason, message, force) when this replica can no longer serve where it is, else None."""
    if pod.node is None:
        return None
    node = nodes.get(pod.node)
    if node is None or not node.exists:
        return NODE_LOST, f"node {pod.node} no longer exists", True
    if not node.ready:
        return NODE_LOST, f"node {pod.node} is NotReady", True
    # With no agent answering anywhere the pool itself is blind; replacing every replica
    # would turn a monitoring outage into a serving outage.
    if node.agent_known and not node.agent_up and any_agent_up:
        return ENDPOINTS_DOWN, f"the node-stats agent on {pod.node} is not answering", False
    if node.agent_missing and any_agent_up:
        # Same consequence as a silent agent: nothing tells whether the GPUs still work.
        return ENDPOINTS_DOWN, f"no node-stats agent pod runs on {pod.node} any more", False
    bad = [g for g in pod.gpu_ids if g in node.unhealthy_gpus]
    if bad:
        return GPU_UNHEALTHY, f"GPU {', '.join(bad)} is unhealthy", False
    if pod.failed:
        return REPLICA_FAILED, f"the Pod ended in phase {pod.phase}", False
    return None


def compute_footprint_mib(md: ModelDeployment) -> int | None:
    """Footprint per GPU in MiB: spec.gpu.memory, else the measured status.footprint."""
    if md.spec.gpu.memory is not None:
        return quantity_to_mib(md.spec.gpu.memory)
    if md.status.footprint is not None:
        return quantity_to_mib(md.status.footprint)
    return None


def _may_evict(md: ModelDeployment) -> bool:
    """An eviction victim does not evict back; a request that arrives after it may."""
    evicted_at = parse_time(md.metadata.annotations.get(L.ANN_EVICTED_AT))
    if evicted_at is None:
        return True
    demand = parse_time(md.metadata.annotations.get(L.ANN_DEMAND))
    return demand is not None and demand > evicted_at


def compute_plan(
    md: ModelDeployment,
    pods: Sequence[ObservedPod],
    nodes: Mapping[str, NodeHealth],
    place: Placer,
    now: datetime,
    settings: PlanSettings,
    deleting: frozenset[tuple[str, str]] = frozenset(),
) -> Plan:
    """The create/delete plan for one ModelDeployment. See the module docstring.

    `deleting` holds (namespace, name) of every replica Pod in the cluster that is already
    terminating, so an eviction that is under way is waited for instead of repeated.
    """
    namespace = md.metadata.namespace or ""
    name = md.metadata.name
    any_agent_up = any(n.agent_known and n.agent_up for n in nodes.values())

    # Pods of an older object with the same name (being garbage collected) only hold names.
    ours = [p for p in pods if not p.owner_uid or p.owner_uid == md.metadata.uid]
    target, target_reason = compute_target(md, now, ours)
    plan = Plan(target=target, target_reason=target_reason)
    taken = {p.instance for p in pods}
    terminating = sorted(p.instance for p in ours if p.deleting and not _stuck(p, now))
    healthy: list[ObservedPod] = []
    for pod in sorted(ours, key=lambda p: p.instance):
        failure = compute_failure(pod, nodes, any_agent_up)
        if pod.deleting:
            if failure and failure[2]:
                # A graceful delete on a lost node never completes; make it final.
                plan.to_delete.append(
                    PodToDelete(namespace, pod.name, name, failure[0], failure[1], True, pod.uid)
                )
            continue
        if failure:
            reason, message, force = failure
            plan.to_delete.append(
                PodToDelete(namespace, pod.name, name, reason, message, force, pod.uid)
            )
            plan.events.append(
                EventSpec(namespace, name, "Warning", reason, f"replacing {pod.name}: {message}")
            )
            plan.details.append(f"replace {pod.name}: {message}")
            terminating.append(pod.instance)
            continue
        healthy.append(pod)

    # Scale down: unready replicas first, then the highest instance numbers.
    excess = len(healthy) - target
    if excess > 0:
        why = IDLE if target_reason == IDLE else SCALE_DOWN
        text = (
            f"idle for longer than {md.spec.idle_timeout}, scaling to minReplicas={target}"
            if why == IDLE
            else f"scaling down to {target} replicas"
        )
        for pod in sorted(healthy, key=lambda p: (p.ready, -p.instance))[:excess]:
            plan.to_delete.append(PodToDelete(namespace, pod.name, name, why, text, uid=pod.uid))
            plan.details.append(f"delete {pod.name}: {text}")
            healthy.remove(pod)
        plan.events.append(EventSpec(namespace, name, "Normal", why, text))

    # Scale up: fill the lowest instance numbers. A name whose Pod is still terminating is
    # waited for, so a replacement takes the same name (and never exists twice).
    missing = target - len(healthy)
    creates: list[int] = []
    n = 0
    while missing > 0:
        n += 1
        if n in terminating:
            plan.waiting_for += 1
            missing -= 1
        elif n not in taken:
            creates.append(n)
            missing -= 1
    if plan.waiting_for:
        plan.details.append(f"{plan.waiting_for} replica(s) wait for a terminating Pod")

    footprint = compute_footprint_mib(md)
    may_evict = _may_evict(md)
    placed: list[Placed] = []
    released = tuple(d.name for d in plan.to_delete)
    for n in creates:
        pod_name = instance_name(name, n)
        request = PlacementRequest(
            namespace=namespace,
            deployment=name,
            instance=n,
            spec=md.spec,
            footprint_mib=footprint,
            planned=tuple(placed),
            released=released,
            may_evict=may_evict,
        )
        decision = place(request)
        if isinstance(decision, Placed):
            placed.append(decision)
            plan.to_create.append(PodToCreate(n, pod_name, decision))
            gpus = ",".join(decision.gpu_ids)
            plan.events.append(
                EventSpec(
                    namespace,
                    name,
                    "Normal",
                    "Placed",
                    f"{pod_name} on {decision.node} (GPUs {gpus}): {decision.reason}",
                )
            )
            plan.details.append(f"create {pod_name} on {decision.node} [{gpus}]")
            continue
        if isinstance(decision, Evict) and all(
            (v.namespace, v.pod) in deleting for v in decision.victims
        ):
            plan.blocker = Blocker(EVICTING, f"{pod_name} waits for evicted replicas to terminate")
        elif isinstance(decision, Evict) and may_evict:
            _plan_eviction(plan, md, pod_name, decision, deleting)
        elif isinstance(decision, Evict):
            plan.blocker = Blocker(
                EVICTED,
                f"evicted by {md.metadata.annotations.get(L.ANN_EVICTED_BY, 'another model')}; "
                f"comes back when capacity frees up or a request arrives ({decision.reason})",
            )
        else:
            assert isinstance(decision, Unplaceable)
            plan.blocker = Blocker(decision.code, decision.reason)
            plan.events.append(
                EventSpec(
                    namespace,
                    name,
                    "Warning",
                    decision.code,
                    f"cannot place {pod_name}: {decision.reason}",
                )
            )
        plan.details.append(f"blocked at {pod_name}: {plan.blocker.reason if plan.blocker else ''}")
        break

    if not creates and not plan.waiting_for:
        _plan_rollout(plan, md, healthy, settings)

    evicted = L.ANN_EVICTED_AT in md.metadata.annotations
    if evicted and len(healthy) + len(plan.to_create) >= target:
        plan.annotations = {L.ANN_EVICTED_AT: None, L.ANN_EVICTED_BY: None}
    return plan


def _stuck(pod: ObservedPod, now: datetime) -> bool:
    return pod.deleting_since is not None and now - pod.deleting_since > STUCK_TERMINATING


def _plan_eviction(
    plan: Plan,
    md: ModelDeployment,
    pod_name: str,
    decision: Evict,
    deleting: frozenset[tuple[str, str]],
) -> None:
    namespace = md.metadata.namespace or ""
    name = md.metadata.name
    fresh = [v for v in decision.victims if (v.namespace, v.pod) not in deleting]
    plan.victims.extend(fresh)
    plan.blocker = Blocker(EVICTING, f"{pod_name} waits for evictions: {decision.reason}")
    names = ", ".join(f"{v.namespace}/{v.pod}" for v in fresh)
    plan.events.append(
        EventSpec(
            namespace,
            name,
            "Normal",
            EVICTING,
            f"evicting {names} for {pod_name}: {decision.reason}",
        )
    )
    for victim in fresh:
        plan.events.append(
            EventSpec(
                victim.namespace,
                victim.deployment,
                "Warning",
                EVICTED,
                f"{victim.pod} evicted to make room for {namespace}/{name}: {decision.reason}",
            )
        )
        plan.details.append(f"evict {victim.namespace}/{victim.pod}")


def _plan_rollout(
    plan: Plan, md: ModelDeployment, healthy: list[ObservedPod], settings: PlanSettings
) -> None:
    """Replace one outdated replica at a time, and only while every other one is ready."""
    namespace = md.metadata.namespace or ""
    name = md.metadata.name
    outdated = [p for p in healthy if p.template_hash != settings.template_hash]
    if not outdated:
        return
    plan.rolling = True
    # An outdated replica that is not ready serves nothing: replace it right away.
    unready = [p for p in outdated if not p.ready]
    if unready:
        chosen = unready
    elif all(p.ready for p in healthy) and not plan.to_delete:
        chosen = [max(outdated, key=lambda p: p.instance)]
    else:
        plan.details.append("rollout waits for every replica to be ready")
        return
    for pod in chosen:
        text = f"replacing {pod.name}: the spec changed ({len(outdated)} outdated)"
        plan.to_delete.append(
            PodToDelete(namespace, pod.name, name, ROLLING_UPDATE, text, uid=pod.uid)
        )
        plan.events.append(EventSpec(namespace, name, "Normal", ROLLING_UPDATE, text))
        plan.details.append(text)
