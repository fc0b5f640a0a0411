"""Adapters from what the operator observes to the placement engine's inputs, and back. Pure.

The pool snapshot (GPU stats per node), Node objects and replica Pods become placement's
NodeInfo and PlacedReplica; the planner's PlacementRequest becomes a ReplicaRequest; the
engine's decision becomes the planner's Placed, Evict or Unplaceable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from modelfleet import placement as P
from modelfleet.api import ModelDeploymentSpec, SharingMode
from modelfleet.controller.builders import compute_tolerations
from modelfleet.controller.decisions import (
    Decision,
    Evict,
    Placed,
    PlacementRequest,
    Unplaceable,
    Victim,
)
from modelfleet.controller.nodeusage import NodeUsage
from modelfleet.controller.observed import NodeFacts, NodeHealth, ObservedPod, instance_name
from modelfleet.gpus.snapshot import PoolSnapshot

#: A node's agent pod must be missing for at least this many pool poll intervals before its
#: replicas are replaced: a DaemonSet rollout deletes the old agent pod before the new one runs.
MISSING_AGENT_MIN_INTERVALS = 3


def compute_missing_agent_grace_s(grace_s: float, poll_interval_s: float) -> float:
    """The configured grace, never shorter than a few poll intervals."""
    return max(grace_s, MISSING_AGENT_MIN_INTERVALS * poll_interval_s)


def compute_agent_missing_since(
    previous: Mapping[str, datetime],
    nodes: Iterable[str],
    snapshot: PoolSnapshot | None,
    now: datetime,
) -> dict[str, datetime]:
    """Since when each node has had no agent endpoint in the pool (discovery only).

    A node with any endpoint, answering or not, is not missing (a silent agent is the pool's
    EndpointsDown); a node that is missing keeps the time it was first seen missing. The first
    call after start counts from `now`, so a restarted operator waits the full grace too.
    """
    present = set()
    if snapshot is not None:
        present = {ep.node for ep in snapshot.endpoints if ep.node is not None}
    return {node: previous.get(node, now) for node in nodes if node not in present}


def compute_node_health(
    nodes: Mapping[str, NodeFacts],
    snapshot: PoolSnapshot | None,
    missing_since: Mapping[str, datetime] | None = None,
    now: datetime | None = None,
    missing_grace_s: float = 0.0,
) -> dict[str, NodeHealth]:
    """Per node: exists and Ready (Node object), agent answering and unhealthy GPUs (pool),
    and whether its agent pod has been gone for longer than `missing_grace_s`."""
    missing_since = missing_since or {}
    grace = timedelta(seconds=missing_grace_s)
    agents: dict[str, tuple[bool, bool]] = {}  # node -> (ever answered, usable now)
    unhealthy: dict[str, set[str]] = {}
    if snapshot is not None:
        for ep in snapshot.endpoints:
            if ep.node is None:
                continue
            known = ep.last_success_at is not None
            agents[ep.node] = (known, ep.state.usable)
        for gpu in snapshot.gpus.values():
            if not gpu.healthy:
                unhealthy.setdefault(gpu.node, set()).add(gpu.gpu_id)
    out: dict[str, NodeHealth] = {}
    for name, facts in nodes.items():
        known, up = agents.get(name, (False, False))
        out[name] = NodeHealth(
            exists=True,
            ready=facts.ready,
            agent_known=known,
            agent_up=up,
            unhealthy_gpus=frozenset(unhealthy.get(name, ())),
            agent_missing=_missing_longer_than(missing_since.get(name), now, grace),
        )
    return out


def compute_gpu_nodes_without_agent(
    nodes: Mapping[str, NodeFacts],
    missing_since: Mapping[str, datetime],
    now: datetime,
    grace_s: float,
) -> tuple[str, ...]:
    """GPU nodes (allocatable nvidia.com/gpu above zero) that no agent has reported for longer
    than `grace_s`, sorted: placement cannot see their GPUs. A node whose agent exists but does
    not answer is the pool's (EndpointsDown), not listed here."""
    grace = timedelta(seconds=grace_s)
    return tuple(
        sorted(
            name
            for name, facts in nodes.items()
            if (facts.gpu_allocatable or 0) > 0
            and _missing_longer_than(missing_since.get(name), now, grace)
        )
    )


def _missing_longer_than(since: datetime | None, now: datetime | None, grace: timedelta) -> bool:
    return since is not None and now is not None and now - since >= grace


def compute_gpu_used_mib(snapshot: PoolSnapshot | None) -> dict[str, int]:
    """Memory in use per global GPU ID, for the discovery-run footprint (measured GPUs only)."""
    if snapshot is None:
        return {}
    return {
        gpu_id: g.memory_used_mib
        for gpu_id, g in snapshot.gpus.items()
        if g.healthy and not g.stale  # a lost GPU counts "full", a stale one its last figures
    }


def build_node_infos(
    nodes: Mapping[str, NodeFacts],
    snapshot: PoolSnapshot | None,
    rejected: Mapping[str, str] | None = None,
    replicas: AbstractSet[tuple[str, str]] = frozenset(),
    usage: NodeUsage | None = None,
) -> list[P.NodeInfo]:
    """Placement's nodes: every node the pool can see, with its Node object's facts and, for
    nodes in admission backoff, why (`rejected`, see controller/admission.py).

    A pod the agent attributes to a GPU that is not one of `replicas` (namespace, name) is
    foreign: another team's workload, or a replica of another operator. The GPU is its. So are
    the CPU, memory and GPUs that the pods bound to the node request (`usage`, from the pod
    watch; None: not watched, only the replicas' own requests are counted).
    """
    rejected = rejected or {}
    if snapshot is None:
        return []
    out = []
    for pnode in snapshot.nodes:
        facts = nodes.get(pnode.name)
        if facts is None:
            continue  # an agent reports a node the API does not know (yet): never place there
        gpus = tuple(
            P.GpuInfo(
                index=g.index,
                gpu_id=g.gpu_id,
                uuid=g.uuid,
                product=g.product,
                memory_total_mib=g.memory_total_mib,
                memory_used_mib=g.memory_used_mib,
                memory_free_mib=g.memory_free_mib,
                # A stale GPU is not placed on (placement's "healthy"), but it is not unhealthy
                # for the replicas on it: compute_node_health reads the pool's `healthy`.
                healthy=g.healthy and not g.stale,
                reason=g.reason or (f"GPU stats unknown: {g.stale_reason}" if g.stale else ""),
                foreign_pods=tuple(
                    f"{p.namespace}/{p.name}"
                    for p in g.pods
                    if (p.namespace, p.name) not in replicas
                ),
            )
            for g in pnode.gpus
        )
        healthy = facts.ready and pnode.state.usable
        reason = "" if healthy else ("node is NotReady" if not facts.ready else "agent is down")
        if healthy and pnode.not_ready:
            reason = f"agent not ready: {pnode.not_ready}"
        out.append(
            P.NodeInfo(
                name=pnode.name,
                gpus=gpus,
                schedulable=facts.schedulable,
                labels=dict(facts.labels),
                taints=tuple(P.Taint(k, v, e) for k, v, e in facts.taints),
                healthy=healthy,
                stale=pnode.state == "stale" or bool(pnode.not_ready),
                reason=reason,
                rejected=rejected.get(pnode.name, ""),
                gpu_allocatable=facts.gpu_allocatable,
                allocatable=facts.allocatable,
                others=usage.others(pnode.name, replicas) if usage is not None else P.Requests(),
            )
        )
    out.extend(
        _unreachable_node_infos(nodes, snapshot, {n.name for n in out}, rejected, replicas, usage)
    )
    return out


def _unreachable_node_infos(
    nodes: Mapping[str, NodeFacts],
    snapshot: PoolSnapshot,
    seen: AbstractSet[str],
    rejected: Mapping[str, str],
    replicas: AbstractSet[tuple[str, str]],
    usage: NodeUsage | None,
) -> list[P.NodeInfo]:
    """Ready nodes whose agent is stale or does not answer: not in the pool, but placement must
    know them as stale (never placed on), so that a replica that could go there waits for the
    agent rather than evicting elsewhere. A NotReady or deleted node is lost instead (its
    replicas are replaced), and nothing waits for it."""
    out = []
    for ep in snapshot.endpoints:
        if ep.included or ep.node is None or ep.node in seen:
            continue
        facts = nodes.get(ep.node)
        if facts is None or not facts.ready:
            continue
        seen = seen | {ep.node}
        out.append(
            P.NodeInfo(
                name=ep.node,
                schedulable=facts.schedulable,
                labels=dict(facts.labels),
                taints=tuple(P.Taint(k, v, e) for k, v, e in facts.taints),
                stale=True,
                reason=f"agent {ep.state.value}" + (f": {ep.reason}" if ep.reason else ""),
                rejected=rejected.get(ep.node, ""),
                gpu_allocatable=facts.gpu_allocatable,
                allocatable=facts.allocatable,
                others=usage.others(ep.node, replicas) if usage is not None else P.Requests(),
            )
        )
    return out


def compute_assigned_gpus(snapshot: PoolSnapshot | None) -> dict[tuple[str, str], tuple[str, ...]]:
    """(namespace, pod) -> the global IDs of the GPUs the nodes say it holds, in index order."""
    if snapshot is None:
        return {}
    out: dict[tuple[str, str], list[str]] = {}
    for gpu_id in sorted(
        snapshot.gpus, key=lambda g: (snapshot.gpus[g].node, snapshot.gpus[g].index)
    ):
        for pod in snapshot.gpus[gpu_id].pods:
            out.setdefault((pod.namespace, pod.name), []).append(gpu_id)
    return {k: tuple(v) for k, v in out.items()}


def _measured_pods(snapshot: PoolSnapshot | None) -> set[tuple[str, str]]:
    """Pods the agents already attribute memory to."""
    if snapshot is None:
        return set()
    return {(p.namespace, p.name) for g in snapshot.gpus.values() for p in g.pods}


def build_placed_replicas(
    pods: Iterable[ObservedPod],
    last_used: Mapping[tuple[str, str], float],
    snapshot: PoolSnapshot | None,
) -> list[P.PlacedReplica]:
    """Placement's replicas from the replica Pods (annotations carry everything needed).

    Terminating Pods still hold their GPUs until they are gone, and are the cheapest victims:
    an eviction already under way is then chosen again instead of a new one. They no longer
    count towards their deployment's floor.
    """
    measured = _measured_pods(snapshot)
    out = []
    for pod in pods:
        if pod.node is None or not pod.gpus:
            continue
        sharing = SharingMode.SHARED if pod.sharing == "Shared" else SharingMode.EXCLUSIVE
        out.append(
            P.PlacedReplica(
                deployment=P.DeploymentRef(pod.namespace, pod.deployment),
                pod=pod.name,
                node=pod.node,
                gpu_ids=pod.gpus,  # the node's word where an agent reported it
                sharing=sharing,
                footprint_mib=pod.footprint_mib,
                priority=pod.priority,
                last_used=last_used.get((pod.namespace, pod.deployment), 0.0),
                min_replicas=pod.min_replicas,
                state=_replica_state(pod),
                measured=(pod.namespace, pod.name) in measured,
                requests=pod.requests,
            )
        )
    return out


def _replica_state(pod: ObservedPod) -> P.ReplicaState:
    if pod.deleting:
        return P.ReplicaState.TERMINATING
    return P.ReplicaState.READY if pod.ready else P.ReplicaState.STARTING


def build_replica_request(
    request: PlacementRequest, footprint_measured: int | None, last_used: float
) -> P.ReplicaRequest:
    """Placement's request for one replica of a deployment."""
    spec: ModelDeploymentSpec = request.spec
    memory = request.footprint_mib if spec.gpu.memory is not None else None
    return P.ReplicaRequest(
        deployment=P.DeploymentRef(request.namespace, request.deployment),
        pod=instance_name(request.deployment, request.ordinal),
        gpu_count=spec.gpu.count,
        memory_mib=memory,
        measured_footprint_mib=footprint_measured,
        sharing=SharingMode(spec.gpu.sharing),
        product=spec.gpu.product,
        node_selector=dict(spec.placement.node_selector),
        tolerations=tuple(
            P.Toleration(
                key=t.get("key"),
                operator=t.get("operator") or "Equal",
                value=t.get("value"),
                effect=t.get("effect"),
            )
            for t in compute_tolerations(spec)  # the Pod's: the GPU taint's included
        ),
        strategy=spec.placement.strategy,
        spread=spec.placement.spread,
        priority=spec.priority,
        min_replicas=spec.min_replicas,
        last_used=last_used,
        load_floors={P.DeploymentRef(ns, name): n for (ns, name), n in request.load_floors.items()},
        requests=request.requests,
    )


def convert_decision(decision: P.Decision) -> Decision:
    """The engine's decision as the planner's."""
    if isinstance(decision, P.Placed):
        total = 0
        return Placed(
            node=decision.node,
            gpu_ids=decision.gpu_ids,
            gpu_uuids=decision.uuids,
            gpu_memory_mib=total,
            footprint_mib=decision.replica.footprint_mib,
            reason=decision.reason,
        )
    if isinstance(decision, P.Evict):
        return Evict(
            victims=tuple(
                Victim(v.deployment.namespace, v.pod, v.deployment.name) for v in decision.victims
            ),
            reason=decision.reason,
            node=decision.node,
            gpu_ids=decision.gpu_ids,
        )
    return Unplaceable(reason=decision.reason, code=str(decision.code))


@dataclass
class EnginePlacer:
    """A Placer over one placement view; every Placed decision is added to the view at once.

    Built lazily by the reconcile (only when a replica is to be placed) and used under the
    operator's placement lock, so the decisions of one plan, and of plans that follow each other,
    never take the same GPUs.
    """

    view: P.ClusterView
    last_used: Mapping[tuple[str, str], float]
    gpu_memory: Mapping[str, int] = field(default_factory=dict)  # total MiB per global GPU ID
    cursor: str | None = None

    def __call__(self, request: PlacementRequest) -> Decision:
        measured = request.footprint_mib if request.spec.gpu.memory is None else None
        engine_request = build_replica_request(
            request, measured, self.last_used.get((request.namespace, request.deployment), 0.0)
        )
        decision = P.decide(self.view, engine_request)
        if isinstance(decision, P.Placed):
            self.view = self.view.with_placed(decision)
            self.cursor = decision.cursor
            out = convert_decision(decision)
            assert isinstance(out, Placed)
            total = self.gpu_memory.get(decision.gpu_ids[0], 0) if decision.gpu_ids else 0
            return Placed(
                out.node, out.gpu_ids, out.gpu_uuids, total, out.footprint_mib, out.reason
            )
        return convert_decision(decision)

    def consolidate(
        self,
        request: PlacementRequest,
        templates: Mapping[P.DeploymentRef, P.ReplicaRequest],
        budgets: Mapping[P.DeploymentRef, int],
        default_budget: int,
        max_moves: int,
    ) -> P.Consolidation | P.Unplaceable:
        """The fewest moves that make room for `request` (placement.plan_consolidation)."""
        engine_request = build_replica_request(
            request,
            request.footprint_mib if request.spec.gpu.memory is None else None,
            self.last_used.get((request.namespace, request.deployment), 0.0),
        )
        return P.plan_consolidation(
            self.view, engine_request, templates, budgets, default_budget, max_moves
        )


def build_reservations(
    reservations: Mapping[tuple[str, str], tuple[str, tuple[str, ...]]],
    nodes: Iterable[str],
) -> list[P.PlacedReplica]:
    """GPUs freed by an eviction, held for the deployment that evicted, as Reserved replicas.

    Without them the victim (or anyone else) could take the freed GPUs before the evictor does.
    The evictor's own are taken out of its view with `without_own_reservations`.
    """
    known = set(nodes)
    out = []
    for (namespace, name), (node, gpu_ids) in sorted(reservations.items()):
        if node not in known or not gpu_ids:
            continue
        out.append(
            P.PlacedReplica(
                deployment=P.DeploymentRef(namespace, name),
                pod=f"{name} (reservation)",  # unique: not a valid Pod name
                node=node,
                gpu_ids=gpu_ids,
                footprint_mib=None,
                priority=1000,
                state=P.ReplicaState.RESERVED,
            )
        )
    return out


def without_own_reservations(view: P.ClusterView, key: tuple[str, str]) -> P.ClusterView:
    """`view` for deployment `key`: the GPUs reserved for it are its own to take."""
    ref = P.DeploymentRef(*key)
    own = [
        r
        for r in view.replicas.values()
        if r.state == P.ReplicaState.RESERVED and r.deployment == ref
    ]
    return view.with_removed(own) if own else view


def build_placer(
    nodes: Mapping[str, NodeFacts],
    pods: Iterable[ObservedPod],
    last_used: Mapping[tuple[str, str], float],
    snapshot: PoolSnapshot | None,
    settings: P.PlacementSettings,
    cursor: str | None = None,
    reserved: Iterable[P.PlacedReplica] = (),
    rejected: Mapping[str, str] | None = None,
    gone: AbstractSet[tuple[str, str]] = frozenset(),
    usage: NodeUsage | None = None,
) -> EnginePlacer:
    """A Placer over the current cluster: pool snapshot, Node objects, every replica Pod
    (`gone`: replica Pods deleted lately, which an agent may still report) and what the other
    pods on the nodes request (`usage`)."""
    pods = list(pods)
    known = {(p.namespace, p.name) for p in pods} | gone
    infos = build_node_infos(nodes, snapshot, rejected, known, usage)
    replicas = build_placed_replicas(pods, last_used, snapshot) + list(reserved)
    view = P.build_view(infos, replicas, settings, cursor)
    memory = {g.gpu_id: g.memory_total_mib for info in infos for g in info.gpus}
    return EnginePlacer(view=view, last_used=last_used, gpu_memory=memory, cursor=cursor)
