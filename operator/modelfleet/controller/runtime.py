"""The operator process's state between reconciles, each part with its own small interface.

- `ClusterState`: the kopf indices, live (what the watches show).
- `InFlight` (inflight.py): Pods created or deleted here that the watches do not show yet.
- `PlacementViews` (views.py): the cached placement view and the round-robin cursor.
- `Reservations` (reservations.py): GPUs an eviction freed, held for the evictor.
- eviction marks: deployments this process evicted from, before their annotation shows.

`Runtime` owns them and the shared clients; the reconcile, the handlers and the loops change
them only through its methods.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from modelfleet import placement as P
from modelfleet.api.ownership import ClaimKey, claim_key, served_name
from modelfleet.controller import inputs
from modelfleet.controller.admission import AdmissionBackoff
from modelfleet.controller.autoscale import Recommendation
from modelfleet.controller.builders import PodDefaults
from modelfleet.controller.execute import EventRecorder
from modelfleet.controller.inflight import InFlight, Key
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.nodeusage import NodeUsage
from modelfleet.controller.observed import (
    DeploymentEntry,
    NodeFacts,
    NodeHealth,
    ObservedPod,
    compute_ignored_pods,
    is_replica_of,
    with_assigned_gpus,
)
from modelfleet.controller.place import EvictionMark, LoadNeed, compute_load_need
from modelfleet.controller.plan import Plan
from modelfleet.controller.reservations import Reservation, Reservations
from modelfleet.controller.views import LazyPlacer, PlacementViews
from modelfleet.gpus.snapshot import PoolSnapshot
from modelfleet.kube.client import KubeClient
from modelfleet.settings import OperatorSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterState:
    """The operator's indices, live: a reconcile that waited for its lock reads fresh state.

    Each mapping is shaped like a kopf index: key -> the values indexed under it.
    """

    pods: Mapping[Key, Iterable[ObservedPod]]  # replica Pods by (namespace, deployment)
    nodes: Mapping[str, Iterable[NodeFacts]]  # Nodes by name
    deployments: Mapping[Key, Iterable[DeploymentEntry]]  # ModelDeployments by (ns, name)
    # Services the operator made, by (namespace, name); None: no index, read them instead.
    services: Mapping[Key, Iterable[Mapping[str, Any]]] | None = None
    # Claims on each served model name; None: no index, found from `deployments` instead.
    served: Mapping[str, Iterable[ClaimKey]] | None = None

    def node_facts(self) -> dict[str, NodeFacts]:
        return {name: fact for name, facts in self.nodes.items() for fact in facts}

    def last_used(self) -> dict[Key, float]:
        return {key: e.last_used for key, entries in self.deployments.items() for e in entries}

    def body(self, key: Key) -> Mapping[str, Any] | None:
        for entry in self.deployments.get(key, ()):
            return entry.body
        return None

    def deployment_uids(self) -> dict[Key, str]:
        """The UID of every ModelDeployment: a Pod is a replica only of the one it names."""
        return {
            key: str((e.body.get("metadata") or {}).get("uid") or "")
            for key, entries in self.deployments.items()
            for e in entries
        }

    def name_holder(self, body: Mapping[str, Any]) -> Key:
        """The ModelDeployment that holds `body`'s served name: the oldest that claims it."""
        name = served_name(body)
        if self.served is not None:
            claims = list(self.served.get(name, ()))
        else:
            claims = [
                claim_key(e.body)
                for entries in self.deployments.values()
                for e in entries
                if served_name(e.body) == name
            ]
        best = min([*claims, claim_key(body)])  # its own claim, in case the index lags
        return (best[1], best[2])

    def ignored_pods(self) -> dict[str, int]:
        """Pods with the replica labels that are no replica, by why (for the metric)."""
        return compute_ignored_pods(self.pods, self.deployment_uids())


# How long a deleted replica Pod is still known as ours when an agent reports it: several poll
# intervals, so a late sample never makes its GPUs look held by a foreign pod.
GONE_REMEMBERED = timedelta(seconds=60)


@dataclass
class Runtime:
    """Shared clients and state of the operator process (kept in kopf's operator memo)."""

    client: KubeClient
    settings: OperatorSettings
    events: EventRecorder
    metrics: OperatorMetrics
    snapshot: Callable[[], PoolSnapshot | None]
    agent_discovery: bool = False
    # The requests of every pod bound to a node (loops.watch_node_usage); None: not watched.
    usage: NodeUsage | None = None
    inflight: InFlight = field(default_factory=InFlight)
    views: PlacementViews = field(default_factory=PlacementViews)
    reservations: Reservations = field(default_factory=Reservations)
    admission: AdmissionBackoff = field(default_factory=AdmissionBackoff)
    placement_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    locks: defaultdict[Key, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    queued: defaultdict[Key, int] = field(default_factory=lambda: defaultdict(int))
    blocked: set[Key] = field(default_factory=set)  # last plan could not place a replica
    cluster: ClusterState | None = None  # the live indices, once a handler has seen them
    # The built-in autoscaler's per-round recommendations of each autoscaled model (its
    # `history`), read by placement so that eviction follows load (place.compute_load_floors).
    load_history: Callable[[], Mapping[Key, Sequence[Recommendation]]] | None = None
    _marks: dict[Key, EvictionMark] = field(default_factory=dict)
    _invalid: dict[Key, str] = field(default_factory=dict)  # the last invalid-spec message
    _details: dict[Key, tuple[str, ...]] = field(default_factory=dict)  # the last plan logged
    # GPU nodes no agent reports (allocatable nvidia.com/gpu, no endpoint names the node).
    gpu_nodes_without_agent: tuple[str, ...] = ()
    # Since when each node has had no agent endpoint (updated every poll round).
    _agent_missing_since: dict[str, datetime] = field(default_factory=dict)
    _backoff_nodes: frozenset[str] = frozenset()  # nodes in admission backoff the view knows
    _assigned: tuple[PoolSnapshot | None, dict[tuple[str, str], tuple[str, ...]]] | None = None
    _assignments_seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _gone: dict[tuple[str, str], datetime] = field(default_factory=dict)  # replica Pods, when

    def attach(self, cluster: ClusterState, now: datetime) -> None:
        """The first handler's indices: the loops read them from now on, and reservations
        written by an earlier operator are taken up."""
        if self.cluster is not None:
            return
        self.cluster = cluster
        self.reservations.seed(
            (
                (key, (entry.body.get("metadata") or {}).get("annotations") or {})
                for key, entries in cluster.deployments.items()
                for entry in entries
            ),
            now,
        )

    @property
    def pod_defaults(self) -> PodDefaults:
        s = self.settings
        return PodDefaults(
            image=s.default_image,
            run_as_user=s.replica_run_as_user,
            shared_runtime_class_name=s.shared_runtime_class_name,
            cpu_request=None if s.replica_cpu_request is None else str(s.replica_cpu_request),
            memory_request=(
                None if s.replica_memory_request is None else str(s.replica_memory_request)
            ),
        )

    @property
    def placement_settings(self) -> P.PlacementSettings:
        return P.PlacementSettings(
            default_strategy=self.settings.default_strategy,
            memory_margin_mib=self.settings.memory_margin_mib,
            fragmentation_aware=self.settings.fragmentation_aware,
        )

    def node_health(
        self, cluster: ClusterState, snapshot: PoolSnapshot | None, now: datetime
    ) -> dict[str, NodeHealth]:
        """Every node's health as the plan sees it, missing agents included."""
        grace = inputs.compute_missing_agent_grace_s(
            self.settings.agent_missing_grace_s, self.settings.poll_interval_s
        )
        # Only a discovered agent's absence says the node lost it: a static endpoint list
        # may simply not name the node.
        missing = self._agent_missing_since if self.agent_discovery else {}
        return inputs.compute_node_health(cluster.node_facts(), snapshot, missing, now, grace)

    def observe_agents(
        self, cluster: ClusterState, snapshot: PoolSnapshot | None, now: datetime
    ) -> tuple[str, ...] | None:
        """After a pool round: since when each node has had no agent, and the GPU nodes no
        agent reports; returns those when they changed since the last round, else None."""
        nodes = cluster.node_facts()
        self._agent_missing_since = inputs.compute_agent_missing_since(
            self._agent_missing_since, nodes, snapshot, now
        )
        grace = inputs.compute_missing_agent_grace_s(
            self.settings.agent_missing_grace_s, self.settings.poll_interval_s
        )
        unseen = inputs.compute_gpu_nodes_without_agent(
            nodes, self._agent_missing_since, now, grace
        )
        if unseen == self.gpu_nodes_without_agent:
            return None
        self.gpu_nodes_without_agent = unseen
        self.metrics.gpu_nodes_without_agent.set(len(unseen))
        return unseen

    def pods(self, cluster: ClusterState, key: Key) -> list[ObservedPod]:
        """One deployment's replica Pods: the index, with this process's writes in flight and
        the GPUs the nodes assigned them."""
        merged = self.inflight.merge(key[0], key[1], cluster.pods.get(key, ()))
        return with_assigned_gpus(merged, self.assigned_gpus())

    def all_pods(self, cluster: ClusterState) -> list[ObservedPod]:
        """Every replica Pod in the cluster, with this process's writes in flight and the GPUs
        the nodes assigned them. A Pod that only carries the labels is left out: placement
        counts it like any other foreign pod."""
        uids = cluster.deployment_uids()
        merged = [
            p
            for p in self.inflight.merge_all(cluster.pods)
            if is_replica_of(p, uids.get((p.namespace, p.deployment)))
        ]
        return with_assigned_gpus(merged, self.assigned_gpus())

    def assigned_gpus(self) -> Mapping[tuple[str, str], tuple[str, ...]]:
        """(namespace, pod) -> GPUs, as the agents last reported (computed once per snapshot)."""
        snapshot = self.snapshot()
        if self._assigned is None or self._assigned[0] is not snapshot:
            self._assigned = (snapshot, inputs.compute_assigned_gpus(snapshot))
        return self._assigned[1]

    def new_assignments(self, pods: Iterable[ObservedPod]) -> list[ObservedPod]:
        """Replicas whose node assigned other GPUs than planned, each reported once."""
        out = []
        for pod in pods:
            if pod.assignment_differs and pod.uid and pod.uid not in self._assignments_seen:
                self._assignments_seen[pod.uid] = None
                out.append(pod)
        while len(self._assignments_seen) > 4096:
            self._assignments_seen.popitem(last=False)
        return out

    def load_needs(self, now: float) -> dict[Key, LoadNeed]:
        """What each autoscaled model's own load asked for lately (`now`: monotonic clock)."""
        if self.load_history is None:
            return {}
        needs = {}
        for key, history in self.load_history().items():
            need = compute_load_need(history, now)
            if need is not None:
                needs[key] = need
        return needs

    def eviction_mark(self, key: Key) -> EvictionMark | None:
        """The eviction of `key` this process decided, if its annotation may not show yet."""
        return self._marks.get(key)

    def placer(
        self,
        cluster: ClusterState,
        snapshot: PoolSnapshot | None,
        key: Key,
        pods: list[ObservedPod],
        now: datetime,
    ) -> LazyPlacer:
        """A placer for deployment `key` over the placement view (built on first use from
        `pods`, every replica Pod as `all_pods` gave them)."""
        last_used = cluster.last_used()
        rejected = self.admission.blocked(now)
        if frozenset(rejected) != self._backoff_nodes:
            # A node entered or left admission backoff: the kept view still has it the old way.
            self._backoff_nodes = frozenset(rejected)
            self.views.invalidate()
        usage = self.usage if self.usage is not None and self.usage.synced else None
        if usage is not None:
            changed = usage.take_changed()
            gpu_nodes = {n.name for n in snapshot.nodes} if snapshot is not None else set()
            if changed is None or not changed.isdisjoint(gpu_nodes):
                # A pod came, went or changed on a GPU node: the kept view counts the old sums.
                self.views.invalidate()

        gone = frozenset(self._gone)

        def build(cursor: str | None) -> inputs.EnginePlacer:
            facts = cluster.node_facts()
            held = {k: (r.node, r.gpu_ids) for k, r in self.reservations.active(now).items()}
            return inputs.build_placer(
                facts,
                pods,
                last_used,
                snapshot,
                self.placement_settings,
                cursor,
                inputs.build_reservations(held, facts),
                rejected,
                gone,
                usage,
            )

        return self.views.placer(snapshot, key, last_used, build)

    def promise(self, key: Key, plan: Plan, pods: Iterable[ObservedPod], now: datetime) -> None:
        """Under the placement lock: record what `plan` will write before any API call, so the
        next decision (of any deployment) already sees it."""
        for create in plan.to_create:
            self.inflight.record_created(create.record)
        moving = plan.consolidation
        if moving is not None:
            for copy in moving.copies:
                self.inflight.record_created(copy.record)
            self.reservations.hold(
                key, Reservation(moving.node, moving.gpu_ids, moving.reserved_until)
            )
            self.views.invalidate()  # the copies hold their new GPUs, the freed ones are held
        eviction = plan.eviction
        if eviction is None:
            return
        uids = {p.key: p.uid for p in pods}  # delete only the incarnations that were seen
        for victim in eviction.victims:
            self.inflight.record_deleted(
                victim.namespace, victim.pod, uids.get((victim.namespace, victim.pod), "")
            )
            self._marks[(victim.namespace, victim.deployment)] = EvictionMark(
                now, f"{key[0]}/{key[1]}"
            )
        if eviction.gpu_ids:
            self.reservations.hold(
                key, Reservation(eviction.node, eviction.gpu_ids, eviction.reserved_until)
            )
        self.views.invalidate()  # the victims are terminating now, the GPUs reserved

    def settle(self, key: Key, plan: Plan, *, failed_creates: bool = False) -> None:
        """After a reconcile: remember whether `key` waits for room, drop what it no longer
        holds (a reservation it has used, an eviction mark once it is whole again)."""
        if failed_creates:
            self.views.invalidate()  # the kept view holds GPUs for Pods that do not exist
        if plan.blocker is not None:
            self.blocked.add(key)
            return
        self.blocked.discard(key)
        if plan.eviction is None and plan.consolidation is None and self.reservations.release(key):
            self.views.invalidate()
        if not plan.waiting_for:
            self._marks.pop(key, None)

    def spec_invalid(self, key: Key, message: str) -> bool:
        """Remember that `key`'s spec cannot be run; True when this is news."""
        changed = self._invalid.get(key) != message
        self._invalid[key] = message
        return changed

    def details_changed(self, key: Key, details: Iterable[str]) -> bool:
        """True when a plan's details differ from the last ones logged for `key` (a deployment
        that waits for room would otherwise log the same line after every pool round)."""
        now = tuple(details)
        before = self._details.get(key, ())
        if now == before:
            return False
        self._details[key] = now
        return True

    def spec_valid(self, key: Key) -> None:
        if self._invalid.pop(key, None) is not None:
            log.info("%s/%s: the spec is valid again", *key)

    def pods_deleted(self, pod: tuple[str, str], now: datetime) -> None:
        """A replica Pod is gone: the view must be rebuilt (its GPUs are free). The agents may
        still report it for a sample or two; until then it is a replica that went, not a
        foreign pod holding its GPUs."""
        self._gone[pod] = now
        cutoff = now - GONE_REMEMBERED
        for key in [k for k, at in self._gone.items() if at < cutoff]:
            del self._gone[key]
        self.views.invalidate()

    def nodes_changed(self) -> None:
        self.views.invalidate()

    def forget(self, key: Key) -> None:
        """Drop per-deployment state of a deleted ModelDeployment."""
        lock = self.locks.get(key)
        if lock is not None and not lock.locked():
            del self.locks[key]
        self.blocked.discard(key)
        self._marks.pop(key, None)
        self._invalid.pop(key, None)
        self._details.pop(key, None)
        self.reservations.release(key)
        self.views.invalidate()
        self.metrics.forget(key)

    def restore_order(self, keys: Iterable[Key]) -> list[Key]:
        """Deployments waiting for room, in the order they get it back: highest priority first,
        then the most recently used."""
        cluster = self.cluster
        if cluster is None:
            return sorted(keys)
        used = cluster.last_used()

        def order(key: Key) -> tuple[int, float, Key]:
            body = cluster.body(key) or {}
            spec: Any = body.get("spec") or {}
            priority = spec.get("priority", 0) if isinstance(spec, dict) else 0
            return (-int(priority or 0), -used.get(key, 0.0), key)

        return sorted(keys, key=order)


def pods_on_nodes(cluster_pods: Mapping[Key, Iterable[ObservedPod]], nodes: set[str]) -> set[Key]:
    """Deployments with a replica on any of `nodes` (to re-check when a node fails)."""
    return {key for key, pods in cluster_pods.items() for p in pods if p.node in nodes}


__all__ = ["ClusterState", "DeploymentEntry", "Key", "NodeFacts", "Runtime", "pods_on_nodes"]
