"""Every Prometheus metric of the operator, in one place (the pool registers its own).

Names carry the `modelfleet_` prefix and base units; labels have a small fixed set of values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import aiohttp
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from modelfleet.api.ownership import IGNORED_REASONS
from modelfleet.controller.plan import FailureKind

RESULTS = ("ok", "invalid", "error")
PLACEMENT_RESULTS = ("placed", "evict", "unplaceable")


class OperatorMetrics:
    """The operator's metrics, registered once on `registry`."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.reconcile_duration = Histogram(
            "modelfleet_reconcile_duration_seconds",
            "Time of one reconcile of one ModelDeployment, from reading state to writing status.",
            ["result"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.placements = Counter(
            "modelfleet_placements_total",
            "Placement decisions, by result: placed, evict (victims chosen) or unplaceable.",
            ["result"],
            registry=registry,
        )
        self.evictions = Counter(
            "modelfleet_evictions_total",
            "Replica Pods deleted to make room for another ModelDeployment.",
            registry=registry,
        )
        self.consolidation_moves = Counter(
            "modelfleet_consolidation_moves_total",
            "Consolidation moves, by result: started (copy created), completed (old Pod deleted "
            "once the copy was Ready) or abandoned (the copy was not Ready in time).",
            ["result"],
            registry=registry,
        )
        self.replacements = Counter(
            "modelfleet_replica_replacements_total",
            "Replica Pods deleted because they could no longer serve where they ran.",
            ["reason"],
            registry=registry,
        )
        self.pending_replicas = Gauge(
            "modelfleet_pending_replicas",
            "Replicas wanted but not ready, summed over every ModelDeployment.",
            registry=registry,
        )
        self.deployments = Gauge(
            "modelfleet_modeldeployments",
            "ModelDeployments the operator reconciles.",
            registry=registry,
        )
        self.ignored_pods = Gauge(
            "modelfleet_ignored_pods",
            "Pods with the replica labels that no existing ModelDeployment controls, by reason "
            "(not_controlled, owner_mismatch): never counted or deleted as replicas.",
            ["reason"],
            registry=registry,
        )
        self.gpu_nodes_without_agent = Gauge(
            "modelfleet_gpu_nodes_without_agent",
            "Nodes with allocatable nvidia.com/gpu that no node-stats agent reports: placement "
            "cannot use their GPUs (the operator's /status and log name them).",
            registry=registry,
        )
        self.leader = Gauge(
            "modelfleet_operator_leader",
            "1 while this operator instance holds the leader Lease and acts, else 0.",
            registry=registry,
        )
        self.api_requests = Counter(
            "modelfleet_operator_api_requests_total",
            "Kubernetes API requests of the reconciler and the leader Lease (kopf's watches and "
            "handler bookkeeping not included).",
            ["method"],
            registry=registry,
        )
        # The built-in autoscaler, per autoscaled ModelDeployment (labels removed when it goes).
        self.autoscaler_desired = Gauge(
            "modelfleet_autoscaler_desired_replicas",
            "Replicas the built-in autoscaler decided on in its last round.",
            ["namespace", "deployment"],
            registry=registry,
        )
        self.autoscaler_load = Gauge(
            "modelfleet_autoscaler_load_requests",
            "The load the autoscaler saw: engine running plus waiting requests over the replicas "
            "with fresh figures, plus requests the gateway holds.",
            ["namespace", "deployment"],
            registry=registry,
        )
        self.autoscaler_scales = Counter(
            "modelfleet_autoscaler_scale_writes_total",
            "spec.replicas written through the scale subresource by the autoscaler, by direction.",
            ["direction"],
            registry=registry,
        )
        self.autoscaler_limited = Gauge(
            "modelfleet_autoscaler_limited",
            "1 while the autoscaler cannot raise a model's count (status.autoscaling's "
            "ScalingLimited condition is True: maxReplicas, or replicas placement cannot place).",
            ["namespace", "deployment"],
            registry=registry,
        )
        self.autoscaler_rounds = Counter(
            "modelfleet_autoscaler_rounds_total",
            "Rounds the autoscaler completed (scrape, decide, write) over every autoscaled model.",
            registry=registry,
        )
        for direction in ("up", "down"):
            self.autoscaler_scales.labels(direction)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            self.api_requests.labels(method)
        for result in RESULTS:
            self.reconcile_duration.labels(result)
        for result in PLACEMENT_RESULTS:
            self.placements.labels(result)
        for kind in FailureKind:
            self.replacements.labels(kind.value)
        for reason in IGNORED_REASONS:
            self.ignored_pods.labels(reason)
        self._pending: dict[tuple[str, str], int] = {}

    def api_trace(self) -> aiohttp.TraceConfig:
        """An aiohttp trace that counts every request of the session it is attached to."""
        trace = aiohttp.TraceConfig()

        async def on_start(_: Any, __: SimpleNamespace, params: Any) -> None:
            self.api_requests.labels(str(params.method)).inc()

        trace.on_request_start.append(on_start)
        return trace

    def set_pending(self, key: tuple[str, str], pending: int) -> None:
        """Record one deployment's pending replicas; the gauge shows the sum."""
        if pending > 0:
            self._pending[key] = pending
        else:
            self._pending.pop(key, None)
        self.pending_replicas.set(sum(self._pending.values()))

    def set_ignored(self, counts: Mapping[str, int]) -> None:
        """Record the look-alike Pods of the last count, by reason."""
        for reason in IGNORED_REASONS:
            self.ignored_pods.labels(reason).set(counts.get(reason, 0))

    def forget(self, key: tuple[str, str]) -> None:
        self.set_pending(key, 0)

    def count_replacements(self, reasons: Iterable[str]) -> None:
        """Count replica deletions whose reason is a failure (not scale-down or rollout)."""
        for reason in reasons:
            if isinstance(reason, FailureKind):
                self.replacements.labels(reason.value).inc()
