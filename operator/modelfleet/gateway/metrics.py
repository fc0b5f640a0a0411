"""Every gateway metric, in one place. Labels are bounded: `model` takes only served names the
gateway knows (anything else is counted as "unknown"), `code` only HTTP status codes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from modelfleet.api.ownership import IGNORED_REASONS
from modelfleet.gateway.balancer import Route

UNKNOWN_MODEL = "unknown"
# Proxy overhead is sub-millisecond; model latency runs to minutes.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip


class ReplicaCollector(Collector):
    """Per-replica figures read from the routes at scrape time, so the request path pays
    nothing for them and a replica's series go when it leaves. `replica` is the Pod name (the
    upstream address for static upstreams): as bounded as the replicas themselves."""

    def __init__(self, routes: Callable[[], Mapping[str, Route]], fresh_s: float) -> None:
        self.routes = routes
        self.fresh_s = fresh_s

    def collect(self) -> Iterator[Any]:
        labels = ["model", "replica"]
        requests = CounterMetricFamily(
            "modelfleet_gateway_replica_requests",
            "Requests sent to each replica (tries included), since it joined the route.",
            labels=labels,
        )
        tokens = CounterMetricFamily(
            "modelfleet_gateway_replica_tokens",
            "Tokens of the answers from each replica, by kind (prompt, completion), from the "
            "answers' usage (streams only when they carry it: stream_options.include_usage).",
            labels=[*labels, "kind"],
        )
        in_flight = GaugeMetricFamily(
            "modelfleet_gateway_replica_in_flight",
            "Requests in flight to each replica from this gateway.",
            labels=labels,
        )
        engine_waiting = GaugeMetricFamily(
            "modelfleet_gateway_replica_engine_waiting",
            "Requests waiting in each replica's engine, as last scraped (fresh figures only; "
            "only models that route by engine load are scraped).",
            labels=labels,
        )
        engine_kv = GaugeMetricFamily(
            "modelfleet_gateway_replica_engine_kv_cache_usage",
            "KV-cache usage (0..1) of each replica's engine, as last scraped (fresh only).",
            labels=labels,
        )
        now = time.monotonic()
        for model, route in self.routes().items():
            for replica in route.replicas:
                values = [model, replica.name]
                requests.add_metric(values, replica.requests)
                tokens.add_metric([*values, "prompt"], replica.prompt_tokens)
                tokens.add_metric([*values, "completion"], replica.completion_tokens)
                in_flight.add_metric(values, replica.outstanding)
                if now - replica.engine_at <= self.fresh_s:
                    engine_waiting.add_metric(values, replica.engine_waiting)
                    engine_kv.add_metric(values, replica.engine_kv_cache)
        yield from (requests, tokens, in_flight, engine_waiting, engine_kv)


class GatewayMetrics:
    """The gateway's metrics in their own registry, with label children cached per model."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.affinity = Counter(
            "modelfleet_gateway_affinity_requests",
            "Requests routed by a hashed policy (PrefixHash, SessionAffinity), by result: hit "
            "(the replica its key went to last, where its prefix is probably cached), moved "
            "(another one: bounded load, or the replica left) or new (a key not seen lately); "
            "and by choice: owner (the key's replica on the ring), spill (a later one on the "
            "ring: a bound, an ejection or a retry) or least (the fewest requests in flight, "
            "for a new key of a model whose keys rarely come back). "
            "hit / all is the router-side prefix hit ratio.",
            ["model", "result", "choice"],
            registry=r,
        )
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
            "Writes of last-use, demand and held-request annotations, by kind and result.",
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
        self._affinity_children: dict[tuple[str, str, str], Any] = {}
        self._replicas: ReplicaCollector | None = None

    def watch_replicas(self, routes: Callable[[], Mapping[str, Route]], fresh_s: float) -> None:
        """Export per-replica figures from these routes (once per registry)."""
        if self._replicas is None:
            self._replicas = ReplicaCollector(routes, fresh_s)
            self.registry.register(self._replicas)

    def observe_affinity(self, model: str, result: str, choice: str) -> None:
        labels = (model, result, choice)
        child = self._affinity_children.get(labels)
        if child is None:
            child = self._affinity_children[labels] = self.affinity.labels(*labels)
        child.inc()

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
