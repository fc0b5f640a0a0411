"""Every gateway metric, in one place. Labels are bounded: `model` takes only served names the
gateway knows (anything else is counted as "unknown"), `code` only HTTP status codes."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modelfleet.api.ownership import IGNORED_REASONS

UNKNOWN_MODEL = "unknown"
# Proxy overhead is sub-millisecond; model latency runs to minutes.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip


class GatewayMetrics:
    """The gateway's metrics in their own registry, with label children cached per model."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "modelfleet_gateway_requests",
            "Requests answered, by served model and HTTP status code.",
            ["model", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "modelfleet_gateway_request_duration_seconds",
            "Time from request to the end of the answer (streams included), by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "modelfleet_gateway_upstream_errors",
            "Failed tries against a replica, by model and reason (connect, status, timeout).",
            ["model", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "modelfleet_gateway_retries",
            "Requests sent again to another replica before the first byte, by model.",
            ["model"],
            registry=r,
        )
        self.ejections = Counter(
            "modelfleet_gateway_ejections",
            "Replicas skipped for a while after consecutive failures, by model.",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "modelfleet_gateway_queue_depth",
            "Requests waiting for a model to get a ready replica, by model.",
            ["model"],
            registry=r,
        )
        self.queue_rejections = Counter(
            "modelfleet_gateway_queue_rejections",
            "Requests refused because a model's queue was full or its wait timed out.",
            ["model", "reason"],
            registry=r,
        )
        self.ready_replicas = Gauge(
            "modelfleet_gateway_ready_replicas",
            "Ready replicas the gateway routes to, by model.",
            ["model"],
            registry=r,
        )
        self.ignored_pods = Gauge(
            "modelfleet_gateway_ignored_pods",
            "Ready Pods with the replica labels that no existing ModelDeployment controls, by "
            "reason (not_controlled, owner_mismatch): never routed to.",
            ["reason"],
            registry=r,
        )
        for reason in IGNORED_REASONS:
            self.ignored_pods.labels(reason)
        self.annotation_writes = Counter(
            "modelfleet_gateway_annotation_writes",
            "Writes of last-use and demand annotations, by kind and result.",
            ["kind", "result"],
            registry=r,
        )
        self.client_connections = Gauge(
            "modelfleet_gateway_client_connections",
            "Client connections open (accepted, not refused at the cap).",
            registry=r,
        )
        self.client_refusals = Counter(
            "modelfleet_gateway_client_refusals",
            "Clients refused with 503 at a limit: connections (max_client_connections open) or "
            "bodies (max_buffered_body_bytes reserved).",
            ["reason"],
            registry=r,
        )
        self.client_timeouts = Counter(
            "modelfleet_gateway_client_timeouts",
            "Client requests cut off because their head or body did not arrive in time, by phase.",
            ["phase"],
            registry=r,
        )
        self._children: dict[tuple[str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def observe(self, model: str, code: int, seconds: float) -> None:
        """Count one answered request; the hot path, so label children are cached."""
        child = self._children.get((model, code))
        if child is None:
            child = self._children[(model, code)] = self.requests.labels(model, str(code))
        child.inc()
        hist = self._latency_children.get(model)
        if hist is None:
            hist = self._latency_children[model] = self.latency.labels(model)
        hist.observe(seconds)
