"""One reconcile of one ModelDeployment: observe, plan, place, execute, settle.

Called by every kopf handler (create, resume, update, Pod and Node events) and by the loops
(the periodic re-check, the pool watcher), always with the cluster as the operator's indices
show it, plus what this process wrote and the watches do not show yet (`InFlight`).

1. **Observe**: the deployment's Pods, every node's health, the pool snapshot.
2. **Plan** (`plan.compute_plan`, pure): what to create, delete and report.
3. **Place** (`place.place`, pure), only when the plan wants replicas: under the placement lock,
   which covers deciding and recording the promise (`Runtime.promise`) and nothing else, so two
   quick placements never take the same GPUs and a replica is never planned twice. The API calls
   come after the lock is released; the in-flight book already shows them.
4. **Status** (`status.compute_status`, pure) of the plan as it will be once applied.
5. **Execute** (`execute.execute`): every write, in one documented order.
6. **Settle** (`Runtime.settle`): whether the deployment waits for room, what it no longer holds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from modelfleet.api import ModelDeployment, SharingMode
from modelfleet.controller import inputs
from modelfleet.controller.admission import build_assignment_event, build_rejection_event
from modelfleet.controller.builders import build_service, compute_template_hash
from modelfleet.controller.consolidate import (
    ConsolidationSettings,
    build_consolidator,
    compute_moves_under_way,
)
from modelfleet.controller.decisions import (
    Consolidate,
    Decision,
    Evict,
    Placed,
    PlacementRequest,
    Unplaceable,
)
from modelfleet.controller.execute import Executed, ServiceWanted, apply_invalid, execute
from modelfleet.controller.inflight import Key
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.observed import ObservedPod, compute_assignment_records, is_replica_of
from modelfleet.controller.place import (
    Consolidating,
    compute_eviction_mark,
    compute_load_floors,
    compute_unused_reservation,
    place,
)
from modelfleet.controller.plan import AssignmentRecord, EventSpec, Plan, Reason, compute_plan
from modelfleet.controller.runtime import ClusterState, Runtime
from modelfleet.controller.status import (
    compute_invalid_status,
    compute_measured_footprint_mib,
    compute_name_taken_event,
    compute_status,
    describe_invalid,
)
from modelfleet.controller.views import LazyPlacer

log = logging.getLogger(__name__)


class CreateFailed(RuntimeError):
    """Some replica Pods could not be created; the next pass plans them again."""


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
            current = cluster.body(key) or body
            try:
                md = ModelDeployment.model_validate(current)
            except ValidationError as exc:
                await _report_invalid(rt, key, current, describe_invalid(exc.errors()))
                result = "invalid"
                return None
            if md.spec.gpu.sharing == SharingMode.SHARED and not rt.settings.shared_mode:
                await _report_invalid(
                    rt, key, current, SHARED_MODE_OFF_MESSAGE, Reason.SHARED_MODE_OFF
                )
                result = "invalid"
                return None
            rt.spec_valid(key)
            holder = cluster.name_holder(current)
            plan = await _reconcile_locked(rt, md, cluster, holder, ensure_svc=ensure_svc)
        result = "ok"
        return plan
    finally:
        if rt.queued[key] <= 0:
            rt.queued.pop(key, None)
        rt.metrics.reconcile_duration.labels(result).observe(time.perf_counter() - started)


SHARED_MODE_OFF_MESSAGE = (
    "spec.gpu.sharing is Shared, which this operator does not allow: Shared replicas ask the "
    "kubelet for no GPU and rely on the container runtime honouring NVIDIA_VISIBLE_DEVICES, "
    "which GPU Operator 25.10 and later, GKE and Bottlerocket do not by default. Use "
    "sharing: Exclusive, or have the cluster admin allow it on dedicated GPU nodes "
    "(chart value operator.sharedMode, MODELFLEET_SHARED_MODE; docs/operator.md, Shared mode). "
    "Replicas already running are left as they are."
)


async def _report_invalid(
    rt: Runtime,
    key: Key,
    body: Mapping[str, Any],
    message: str,
    reason: Reason = Reason.INVALID_SPEC,
) -> None:
    """A spec the operator cannot run: one log line and one Event per change, and the status
    says why, instead of a traceback on every re-check."""
    now = datetime.now(UTC)
    event = None
    if rt.spec_invalid(key, message):
        log.warning("%s/%s: ModelDeployment not reconciled: %s", *key, message)
        event = EventSpec(key[0], key[1], "Warning", reason, message)
    status: dict[str, Any] | None = compute_invalid_status(body, message, now, reason)
    current = body.get("status") or {}
    if status is not None and all(current.get(k) == v for k, v in status.items()):
        status = None  # the API server holds it already
    if status is not None or event is not None:
        await apply_invalid(rt.client, rt.events, body, status, event, now)


async def _reconcile_locked(
    rt: Runtime, md: ModelDeployment, cluster: ClusterState, holder: Key, *, ensure_svc: bool
) -> Plan:
    key = (md.metadata.namespace or "", md.metadata.name)
    now = datetime.now(UTC)
    snapshot = rt.snapshot()
    # Every Pod with its labels: the plan needs their names; the rest reads only its replicas.
    labelled = rt.pods(cluster, key)
    pods = [p for p in labelled if is_replica_of(p, md.metadata.uid or None)]
    template_hash = compute_template_hash(md, rt.pod_defaults.image)
    health = rt.node_health(cluster, snapshot, now)
    rejections = rt.admission.observe(pods, now)
    rejections += rt.admission.observe_unhealthy_assignments(pods, health, now)
    plan = compute_plan(md, labelled, health, now, template_hash)
    taken = compute_name_taken_event(md, holder)
    if taken is not None:
        plan.events.append(taken)
    plan.events.extend(build_rejection_event(key, r) for r in rejections)
    plan.events.extend(build_assignment_event(key, p) for p in rt.new_assignments(pods))
    plan.assignments.extend(
        AssignmentRecord(p.namespace, p.name, p.uid, p.assigned_gpus)
        for p in compute_assignment_records(pods)
    )
    if plan.to_place:
        plan = await _place(rt, md, cluster, plan, key)
    measured = None
    if md.status.footprint is None and md.spec.gpu.memory is None:
        measured = compute_measured_footprint_mib(pods, inputs.compute_gpu_used_mib(snapshot))
    status = compute_status(md, pods, plan, now, measured, name_holder=holder)
    service = _service_wanted(md, cluster, key) if ensure_svc else None
    done = await execute(rt.client, rt.events, rt.inflight, md, plan, status, now, service=service)
    rt.settle(key, plan, failed_creates=bool(done.create_failures))
    _record(rt.metrics, key, plan, status.ready_replicas, done)
    if rt.details_changed(key, plan.details):  # one line per change, not per re-check
        log.info("%s/%s: %s", *key, "; ".join(plan.details) or "in shape")
    if done.create_failures:
        raise CreateFailed("; ".join(done.create_failures))
    return plan


async def _place(
    rt: Runtime, md: ModelDeployment, cluster: ClusterState, plan: Plan, key: Key
) -> Plan:
    """Step 3: decide under the placement lock, and promise what was decided before leaving it."""
    async with rt.placement_lock:
        now = datetime.now(UTC)
        snapshot = rt.snapshot()
        everything = rt.all_pods(cluster)
        placer = rt.placer(cluster, snapshot, key, everything, now)
        needs = rt.load_needs(time.monotonic())
        priorities = {(p.namespace, p.deployment): p.priority for p in everything}
        placed = place(
            plan,
            md,
            placer,
            defaults=rt.pod_defaults,
            now=now,
            deleting=frozenset(p.key for p in everything if p.deleting),
            mark=compute_eviction_mark(md, rt.eviction_mark(key)),
            unseen_nodes=rt.gpu_nodes_without_agent,
            consolidating=_consolidating(rt, cluster, key, everything, placer, now),
            need=needs.get(key),
            load_floors=compute_load_floors(needs, priorities, key, md.spec.priority),
            reserved=compute_unused_reservation(
                rt.reservations.active(now).get(key),
                [p for p in everything if (p.namespace, p.deployment) == key],
            ),
        )
        rt.promise(key, placed, everything, now)
        placer.keep()
    _count_decisions(rt.metrics, placer.decisions)
    return placed


def _consolidating(
    rt: Runtime,
    cluster: ClusterState,
    key: Key,
    everything: list[ObservedPod],
    placer: LazyPlacer,
    now: datetime,
) -> Consolidating:
    """What `place` needs to try a consolidation before an eviction (built lazily: the
    deployments are parsed only if a replica finds no room)."""
    s = rt.settings
    settings = ConsolidationSettings(
        enabled=s.consolidation,
        moves_per_interval=s.consolidation_moves_per_interval,
        interval=timedelta(seconds=s.consolidation_interval_s),
        max_moves=s.consolidation_max_moves,
        move_timeout=timedelta(seconds=s.consolidation_move_timeout_s),
    )
    deployments = _Deployments(cluster)

    def consolidate(request: PlacementRequest) -> Consolidate | Unplaceable:
        engine = placer.engine()  # `place` asks only after the placer has answered
        run = build_consolidator(engine, deployments, everything, settings, rt.pod_defaults, now)
        return run(request)

    mine = f"{key[0]}/{key[1]}"
    under_way = [p for p in compute_moves_under_way(everything) if p.move_for == mine]
    return Consolidating(consolidate, deployments, under_way, settings.move_timeout)


class _Deployments(Mapping[Key, ModelDeployment]):
    """Every valid ModelDeployment in the indices, parsed on first use."""

    def __init__(self, cluster: ClusterState) -> None:
        self._cluster = cluster
        self._parsed: dict[Key, ModelDeployment] | None = None

    def _all(self) -> dict[Key, ModelDeployment]:
        if self._parsed is None:
            self._parsed = {}
            for k, entries in self._cluster.deployments.items():
                for entry in entries:
                    with contextlib.suppress(ValidationError):
                        self._parsed[k] = ModelDeployment.model_validate(entry.body)
        return self._parsed

    def __getitem__(self, k: Key) -> ModelDeployment:
        return self._all()[k]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def _service_wanted(md: ModelDeployment, cluster: ClusterState, key: Key) -> ServiceWanted:
    current = None
    if cluster.services is not None:
        current = next(iter(cluster.services.get(key, ())), None)
    return ServiceWanted(build_service(md), current, indexed=cluster.services is not None)


def _record(metrics: OperatorMetrics, key: Key, plan: Plan, ready: int, done: Executed) -> None:
    metrics.set_pending(key, max(0, plan.target - ready))
    metrics.evictions.inc(len(done.evicted))
    if done.copies:
        metrics.consolidation_moves.labels("started").inc(len(done.copies))
    for d in plan.to_delete:
        if d.reason == Reason.MOVED:
            metrics.consolidation_moves.labels("completed").inc()
        elif d.reason == Reason.MOVE_ABANDONED:
            metrics.consolidation_moves.labels("abandoned").inc()
    metrics.count_replacements(d.reason for d in plan.to_delete)


def _count_decisions(metrics: OperatorMetrics, decisions: Sequence[Decision]) -> None:
    for d in decisions:
        kind = (
            "placed"
            if isinstance(d, Placed)
            else "evict"
            if isinstance(d, Evict)
            else "unplaceable"
        )
        metrics.placements.labels(kind).inc()


__all__ = ["CreateFailed", "reconcile"]
