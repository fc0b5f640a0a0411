"""One reconcile of one ModelDeployment: observe, plan (pure), execute, write status.

Called by every kopf handler (create, resume, update, the timer, Pod and Node events) with the
cluster as the operator's indices show it. Placement is serialized across deployments: one
asyncio.Lock covers reading the view, deciding and creating the Pods, and Pods created or deleted
under it are remembered in the `Ledger` until the watch shows them, so two quick placements never
take the same GPUs and a replica is never planned twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from modelfleet import placement as P
from modelfleet.api import ModelDeployment
from modelfleet.api import labels as L
from modelfleet.controller import inputs
from modelfleet.controller.builders import (
    build_replica_pod,
    build_service,
    compute_template_hash,
)
from modelfleet.controller.decisions import Decision, Evict, Placed, PlacementRequest, Placer
from modelfleet.controller.execute import (
    EventRecorder,
    apply_annotations,
    apply_eviction,
    apply_status,
    create_pod,
    delete_pod,
    ensure_service,
)
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.observed import (
    DeploymentEntry,
    NodeFacts,
    NodeHealth,
    ObservedPod,
    parse_pod,
)
from modelfleet.controller.plan import EventSpec, Plan, PlanSettings, compute_plan
from modelfleet.controller.status import (
    compute_measured_footprint_mib,
    compute_status,
    status_changed,
)
from modelfleet.gpus.snapshot import PoolSnapshot
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.settings import OperatorSettings

log = logging.getLogger(__name__)

Key = tuple[str, str]
# How long GPUs freed by an eviction stay reserved for the evictor (its replica is normally
# created within a second of the victims being gone).
RESERVATION_TTL_S = 60.0


class Ledger:
    """Pods this process created or deleted that the watch (the index) does not show yet."""

    def __init__(self, ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        # (namespace, deployment) -> pod name -> (pod, when created)
        self._created: dict[Key, dict[str, tuple[ObservedPod, float]]] = {}
        # (namespace, pod name) -> (uid, when deleted); uid "" matches Pods created before then
        self._deleted: dict[Key, tuple[str, float]] = {}

    def record_created(self, pod: ObservedPod) -> None:
        self._created.setdefault((pod.namespace, pod.deployment), {})[pod.name] = (
            pod,
            self._clock(),
        )

    def forget_created(self, namespace: str, deployment: str, name: str) -> None:
        self._created.get((namespace, deployment), {}).pop(name, None)

    def record_deleted(self, namespace: str, name: str, uid: str) -> None:
        self._deleted[(namespace, name)] = (uid, self._clock())

    def merge(
        self, namespace: str, deployment: str, indexed: Iterable[ObservedPod]
    ) -> list[ObservedPod]:
        """The deployment's Pods: the index, plus Pods created here, with deletions applied."""
        now = self._clock()
        out: list[ObservedPod] = []
        position: dict[str, int] = {}
        deleted = self._deleted
        for pod in indexed:
            if deleted and not pod.deleting:
                gone = deleted.get(pod.key)
                if gone is not None and gone[0] == pod.uid and now - gone[1] < self._ttl:
                    pod = replace(pod, deleting=True)
            position[pod.name] = len(out)
            out.append(pod)
        created = self._created.get((namespace, deployment))
        if created:
            for name, (pod, created_at) in list(created.items()):
                at = position.get(name)
                # A Pod promised but not yet answered by the API has no UID: an indexed Pod of
                # that name that is not terminating is the same one.
                same = at is not None and (
                    out[at].uid == pod.uid or (not pod.uid and not out[at].deleting)
                )
                if same or now - created_at >= self._ttl:
                    del created[name]  # the index has it now (or it never came: forget it)
                    continue
                gone = deleted.get(pod.key)
                if gone is not None and gone[0] == pod.uid:
                    pod = replace(pod, deleting=True)
                if at is not None:
                    out[at] = pod  # the index still shows the incarnation this one replaced
                else:
                    out.append(pod)
            if not created:
                del self._created[(namespace, deployment)]
        return out

    def merge_all(self, indexed: Mapping[Key, Iterable[ObservedPod]]) -> list[ObservedPod]:
        """Every replica Pod in the cluster, with this process's creations and deletions."""
        out: list[ObservedPod] = []
        for (namespace, deployment), pods in indexed.items():
            out += self.merge(namespace, deployment, pods)
        for namespace, deployment in list(self._created):
            if (namespace, deployment) not in indexed:
                out += self.merge(namespace, deployment, ())
        return out

    def prune(self) -> None:
        """Forget entries older than the TTL (called by the timer)."""
        now = self._clock()
        self._deleted = {k: v for k, v in self._deleted.items() if now - v[1] < self._ttl}
        for key in list(self._created):
            alive = {n: v for n, v in self._created[key].items() if now - v[1] < self._ttl}
            if alive:
                self._created[key] = alive
            else:
                del self._created[key]


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

    def node_facts(self) -> dict[str, NodeFacts]:
        return {name: fact for name, facts in self.nodes.items() for fact in facts}

    def last_used(self) -> dict[Key, float]:
        return {key: e.last_used for key, entries in self.deployments.items() for e in entries}

    def body(self, key: Key) -> Mapping[str, Any] | None:
        for entry in self.deployments.get(key, ()):
            return entry.body
        return None


@dataclass
class Runtime:
    """Shared clients and state of the operator process (kept in kopf's operator memo)."""

    client: KubeClient
    settings: OperatorSettings
    events: EventRecorder
    metrics: OperatorMetrics
    snapshot: Callable[[], PoolSnapshot | None]
    ledger: Ledger = field(default_factory=Ledger)
    placement_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    locks: defaultdict[Key, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    cursor: str | None = None  # round-robin position, shared by every deployment
    queued: defaultdict[Key, int] = field(default_factory=lambda: defaultdict(int))
    blocked: set[Key] = field(default_factory=set)  # last plan could not place a replica
    # GPUs freed by an eviction, held for the evicting deployment: key -> (node, GPUs, expiry)
    reservations: dict[Key, tuple[str, tuple[str, ...], float]] = field(default_factory=dict)
    cluster: ClusterState | None = None  # the live indices, once a handler has seen them
    view_epoch: int = 0  # bumped when the cached placement view must be rebuilt
    view_cache: tuple[Any, int, P.ClusterView, Mapping[str, int]] | None = None
    # Discovery mode only: since when each node has had no agent pod (updated every poll round).
    agent_discovery: bool = False
    agent_missing_since: dict[str, datetime] = field(default_factory=dict)

    def node_health(
        self, cluster: ClusterState, snapshot: PoolSnapshot | None, now: datetime
    ) -> dict[str, NodeHealth]:
        """Every node's health as the plan sees it, missing agents included."""
        grace = inputs.compute_missing_agent_grace_s(
            self.settings.agent_missing_grace_s, self.settings.poll_interval_s
        )
        return inputs.compute_node_health(
            cluster.node_facts(), snapshot, self.agent_missing_since, now, grace
        )

    @property
    def placement_settings(self) -> P.PlacementSettings:
        return P.PlacementSettings(
            default_strategy=self.settings.default_strategy,
            memory_margin_mib=self.settings.memory_margin_mib,
        )


class _NeedsPlacement(Exception):
    """Raised by the lock-free first planning pass when the plan must place a replica."""


def _no_placement(request: PlacementRequest) -> Decision:
    raise _NeedsPlacement


async def _create(rt: Runtime, body: Mapping[str, Any]) -> None:
    """Create one promised Pod; the ledger then holds the real object (or forgets the promise)."""
    meta = body["metadata"]
    try:
        created = await create_pod(rt.client, body)
    except Exception:
        rt.ledger.forget_created(
            meta["namespace"], meta["labels"][L.LABEL_DEPLOYMENT], meta["name"]
        )
        raise
    observed = parse_pod(created)
    if observed is not None:
        rt.ledger.record_created(observed)


class _LazyPlacer:
    """Builds the placement view on the first request only: most reconciles place nothing.

    The view is cached between reconciles and rebuilt when the pool takes a new snapshot or
    `Runtime.view_epoch` moves (a replica Pod went away, a Node changed, a reservation changed);
    in between, this process's own placements are added to it as they are decided (the
    operator is the only one that creates replica Pods), so building it is not paid per
    placement.
    """

    def __init__(
        self, rt: Runtime, cluster: ClusterState, snapshot: PoolSnapshot | None, key: Key
    ) -> None:
        self._key = key
        self._rt = rt
        self._cluster = cluster
        self._snapshot = snapshot
        self._inner: inputs.EnginePlacer | None = None
        self.decisions: list[Decision] = []

    def _build(self) -> inputs.EnginePlacer:
        rt, cluster = self._rt, self._cluster
        cached = rt.view_cache
        if cached is not None and cached[0] is self._snapshot and cached[1] == rt.view_epoch:
            placer = inputs.EnginePlacer(
                view=cached[2],
                last_used=cluster.last_used(),
                gpu_memory=cached[3],
                cursor=rt.cursor,
            )
        else:
            facts = cluster.node_facts()
            now = time.monotonic()
            held = {k: (n, g) for k, (n, g, until) in rt.reservations.items() if until > now}
            built = inputs.build_placer(
                facts,
                rt.ledger.merge_all(cluster.pods),
                cluster.last_used(),
                self._snapshot,
                rt.placement_settings,
                rt.cursor,
                inputs.build_reservations(held, facts, ("", "")),
            )
            assert isinstance(built, inputs.EnginePlacer)
            placer = built
        own = [
            r
            for r in placer.view.replicas.values()
            if r.instance == f"{self._key[1]}-reserved" and r.deployment.namespace == self._key[0]
        ]
        if own:  # the GPUs this deployment's eviction freed are for it to take
            placer.view = placer.view.with_removed(own)
        return placer

    def __call__(self, request: PlacementRequest) -> Decision:
        if self._inner is None:
            self._inner = self._build()
        decision = self._inner(request)
        self._rt.cursor = self._inner.cursor
        self._rt.view_cache = (
            self._snapshot,
            self._rt.view_epoch,
            self._inner.view,
            self._inner.gpu_memory,
        )
        self.decisions.append(decision)
        return decision


async def reconcile(
    rt: Runtime,
    body: Mapping[str, Any],
    cluster: ClusterState,
    *,
    ensure_svc: bool = False,
) -> Plan | None:
    """Bring one ModelDeployment towards its spec; returns the applied plan.

    Calls for one deployment run one at a time. When one is already queued behind a running
    one, further calls return None at once: the queued one reads the indices when it starts,
    so it sees everything they would have seen.
    """
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
    if rt.queued[key] and not ensure_svc:
        return None
    rt.queued[key] += 1
    started = time.perf_counter()
    result = "error"
    try:
        async with rt.locks[key]:
            rt.queued[key] -= 1
            md = ModelDeployment.model_validate(cluster.body(key) or body)
            plan = await _reconcile_locked(rt, md, cluster, ensure_svc=ensure_svc)
        result = "ok"
        return plan
    finally:
        if rt.queued[key] <= 0:
            rt.queued.pop(key, None)
        rt.metrics.reconcile_duration.labels(result).observe(time.perf_counter() - started)


def _reserve_evicted_gpus(rt: Runtime, key: Key, decisions: list[Decision]) -> bool:
    """Hold the GPUs this deployment's evictions free for it; True when any were reserved."""
    reserved = False
    for decision in decisions:
        if isinstance(decision, Evict) and decision.gpu_ids:
            until = time.monotonic() + RESERVATION_TTL_S
            held = rt.reservations.get(key)
            if held is None or held[:2] != (decision.node, decision.gpu_ids):
                rt.view_epoch += 1
            rt.reservations[key] = (decision.node, decision.gpu_ids, until)
            reserved = True
    return reserved


def forget(rt: Runtime, key: Key) -> None:
    """Drop per-deployment state of a deleted ModelDeployment."""
    lock = rt.locks.get(key)
    if lock is not None and not lock.locked():
        del rt.locks[key]
    rt.blocked.discard(key)
    rt.reservations.pop(key, None)
    rt.view_epoch += 1
    rt.metrics.forget(key)


async def _reconcile_locked(
    rt: Runtime, md: ModelDeployment, cluster: ClusterState, *, ensure_svc: bool
) -> Plan:
    namespace, name = md.metadata.namespace or "", md.metadata.name
    key = (namespace, name)
    settings = rt.settings
    template_hash = compute_template_hash(md, settings.default_image)
    snapshot = rt.snapshot()
    now = datetime.now(UTC)
    health = rt.node_health(cluster, snapshot, now)
    plan_settings = PlanSettings(template_hash)
    # Most reconciles place nothing (a Pod turned ready, a re-check): plan without the
    # placement lock first, and take it only when a replica has to be placed.
    placer: _LazyPlacer | None = None
    reserved = False
    try:
        pods = rt.ledger.merge(namespace, name, cluster.pods.get(key, ()))
        deleting = frozenset(p.key for p in rt.ledger.merge_all(cluster.pods) if p.deleting)
        plan = compute_plan(md, pods, health, _no_placement, now, plan_settings, deleting)
    except _NeedsPlacement:
        async with rt.placement_lock:
            # Under the lock only: read the ledger, decide, and promise the GPUs in the ledger.
            # The API calls happen after it is released; the ledger already shows the Pods.
            now = datetime.now(UTC)
            pods = rt.ledger.merge(namespace, name, cluster.pods.get(key, ()))
            everything = rt.ledger.merge_all(cluster.pods)
            deleting = frozenset(p.key for p in everything if p.deleting)
            placer = _LazyPlacer(rt, cluster, snapshot, key)
            plan = compute_plan(md, pods, health, placer, now, plan_settings, deleting)
            bodies = [
                build_replica_pod(
                    md,
                    item.instance,
                    item.placed,
                    default_image=settings.default_image,
                    template_hash=template_hash,
                )
                for item in plan.to_create
            ]
            for body in bodies:
                promised = parse_pod(body)
                if promised is not None:
                    rt.ledger.record_created(promised)
            uids = {p.key: p.uid for p in everything}
            victims = [(v, uids.get((v.namespace, v.pod), "")) for v in plan.victims]
            for victim, uid in victims:
                rt.ledger.record_deleted(victim.namespace, victim.pod, uid)
            # Reserve the GPUs an eviction frees before the lock is released: the victims'
            # own reconciles (woken by their Pods' deletion) must not take them back.
            reserved = _reserve_evicted_gpus(rt, key, placer.decisions)
        _count_decisions(rt.metrics, placer.decisions)
        await asyncio.gather(*(_create(rt, body) for body in bodies))
        for victim, uid in victims:
            victim_md = await apply_eviction(rt.client, victim, f"{namespace}/{name}", now, uid)
            rt.metrics.evictions.inc()
            if victim_md is not None:
                victim_uid = str((victim_md.get("metadata") or {}).get("uid", ""))
                for event in plan.events:
                    if (event.namespace, event.deployment) == (victim.namespace, victim.deployment):
                        await rt.events.post(event, victim_uid, now)
    for gone in plan.to_delete:
        await delete_pod(rt.client, gone.namespace, gone.name, force=gone.force, uid=gone.uid)
        rt.ledger.record_deleted(gone.namespace, gone.name, gone.uid)
    rt.metrics.count_replacements(_reasons(plan))
    if plan.annotations:
        await apply_annotations(rt.client, md, plan.annotations)
    for event in plan.events:
        if (event.namespace, event.deployment) == key:
            await rt.events.post(event, md.metadata.uid, now)
    if ensure_svc:
        await _ensure_service(rt, md, cluster, now)
    measured = (
        compute_measured_footprint_mib(pods, inputs.compute_gpu_used_mib(snapshot))
        if md.status.footprint is None and md.spec.gpu.memory is None
        else None
    )
    if plan.blocker is not None:
        rt.blocked.add(key)
    else:
        rt.blocked.discard(key)
        if not reserved and rt.reservations.pop(key, None) is not None:
            rt.view_epoch += 1
    status = compute_status(md, pods, plan, now, measured)
    rt.metrics.set_pending(key, max(0, plan.target - status.ready_replicas))
    if status_changed(md.status, status):
        await apply_status(rt.client, md, status)
    if plan.details:
        log.info("%s/%s: %s", namespace, name, "; ".join(plan.details))
    return plan


async def _ensure_service(
    rt: Runtime, md: ModelDeployment, cluster: ClusterState, now: datetime
) -> None:
    """Keep the Service; a failure is reported but never holds up replicas or status."""
    key = (md.metadata.namespace or "", md.metadata.name)
    current = None
    if cluster.services is not None:
        current = next(iter(cluster.services.get(key, ())), None)
    try:
        await ensure_service(
            rt.client, build_service(md), current, indexed=cluster.services is not None
        )
    except ApiError as exc:
        log.warning("%s/%s: Service not in shape: %s", *key, exc)
        await rt.events.post(
            EventSpec(key[0], key[1], "Warning", "ServiceFailed", f"Service {key[1]}: {exc}"),
            md.metadata.uid,
            now,
        )


def _count_decisions(metrics: OperatorMetrics, decisions: Sequence[Decision]) -> None:
    for d in decisions:
        kind = (
            "placed"
            if isinstance(d, Placed)
            else "evict"
            if isinstance(d, Evict)
            else ("unplaceable")
        )
        metrics.placements.labels(kind).inc()


def _reasons(plan: Plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in plan.to_delete:
        out[d.reason] = out.get(d.reason, 0) + 1
    return out


def pods_on_nodes(cluster_pods: Mapping[Key, Iterable[ObservedPod]], nodes: set[str]) -> set[Key]:
    """Deployments with a replica on any of `nodes` (to re-check when a node fails)."""
    return {key for key, pods in cluster_pods.items() for p in pods if p.node in nodes}


__all__ = ["ClusterState", "Ledger", "Placer", "Runtime", "forget", "pods_on_nodes", "reconcile"]
