"""Every Prometheus metric of the GPU pool, in one place. Base units, bounded labels."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from modelfleet.gpus.health import EndpointState
from modelfleet.gpus.snapshot import PoolSnapshot

_ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PoolMetrics:
    """The pool's metrics on one registry (the process default unless a test passes its own)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.endpoints = Gauge(
            "modelfleet_pool_endpoints",
            "Agent endpoints by health state.",
            ["state"],
            registry=registry,
        )
        self.gpus = Gauge(
            "modelfleet_pool_gpus",
            "GPUs on usable endpoints (healthy or degraded).",
            registry=registry,
        )
        self.gpus_free = Gauge(
            "modelfleet_pool_gpus_free",
            "Healthy GPUs on usable endpoints with no pods and idle memory.",
            registry=registry,
        )
        self.memory = Gauge(
            "modelfleet_pool_memory_bytes",
            "GPU memory on usable endpoints, in bytes.",
            registry=registry,
        )
        self.memory_free = Gauge(
            "modelfleet_pool_memory_free_bytes",
            "Free GPU memory on usable endpoints, in bytes.",
            registry=registry,
        )
        self.round_duration = Histogram(
            "modelfleet_pool_poll_round_duration_seconds",
            "Wall time of one poll round over all endpoints.",
            buckets=_ROUND_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "modelfleet_pool_endpoint_request_duration_seconds",
            "Duration of one request to one agent, by outcome (ok or a failure kind).",
            ["outcome"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.breaker_transitions = Counter(
            "modelfleet_pool_breaker_transitions",
            "Circuit breaker state changes, by from and to state.",
            ["from_state", "to_state"],
            registry=registry,
        )
        self.node_memory_used = Gauge(
            "modelfleet_pool_node_memory_used_ratio",
            "Fraction of each usable node's GPU memory in use.",
            ["node"],
            registry=registry,
        )
        self.balance_memory_cv = Gauge(
            "modelfleet_pool_balance_memory_used_cv",
            "Coefficient of variation (population std dev / mean) of the nodes' memory-used "
            "fractions: 0 is perfectly even.",
            registry=registry,
        )
        self.balance_memory_spread = Gauge(
            "modelfleet_pool_balance_memory_used_spread",
            "Largest minus smallest memory-used fraction over the usable nodes.",
            registry=registry,
        )
        self.node_replicas = Gauge(
            "modelfleet_pool_node_replicas",
            "Replica Pods on each usable node, as the operator last counted them.",
            ["node"],
            registry=registry,
        )
        self.node_replica_share = Gauge(
            "modelfleet_pool_node_replica_share",
            "Each usable node's share (0..1) of all replicas.",
            ["node"],
            registry=registry,
        )
        self.balance_replica_cv = Gauge(
            "modelfleet_pool_balance_replicas_cv",
            "Coefficient of variation of the replica counts over the usable nodes.",
            registry=registry,
        )
        self.balance_replica_spread = Gauge(
            "modelfleet_pool_balance_replica_share_spread",
            "Largest minus smallest replica share over the usable nodes.",
            registry=registry,
        )
        self.failures = Counter(
            "modelfleet_pool_endpoint_failures",
            "Failed poll rounds of one endpoint (after retries), by failure kind.",
            ["kind"],
            registry=registry,
        )

    def observe_snapshot(self, snapshot: PoolSnapshot) -> None:
        for state in EndpointState:
            self.endpoints.labels(state=state.value).set(
                snapshot.totals.endpoints_by_state.get(state, 0)
            )
        f = snapshot.totals.figures
        self.gpus.set(f.gpus_total)
        self.gpus_free.set(f.gpus_free)
        self.memory.set(f.memory_total_mib * 1024 * 1024)
        self.memory_free.set(f.memory_free_mib * 1024 * 1024)
        self.observe_balance(snapshot)

    def observe_balance(self, snapshot: PoolSnapshot) -> None:
        """The snapshot's balance figures; nodes that left lose their series."""
        b = snapshot.balance
        self.node_memory_used.clear()
        for node, used in b.memory_used_fraction_by_node.items():
            self.node_memory_used.labels(node=node).set(used)
        self.balance_memory_cv.set(b.memory_used_cv)
        self.balance_memory_spread.set(b.memory_used_spread)
        self.node_replicas.clear()
        self.node_replica_share.clear()
        if b.replicas_by_node is None or b.replica_share_by_node is None:
            return
        for node, count in b.replicas_by_node.items():
            self.node_replicas.labels(node=node).set(count)
        for node, share in b.replica_share_by_node.items():
            self.node_replica_share.labels(node=node).set(share)
        self.balance_replica_cv.set(b.replica_cv or 0.0)
        self.balance_replica_spread.set(b.replica_share_spread or 0.0)


_default: PoolMetrics | None = None


def default_metrics() -> PoolMetrics:
    """The metrics on the process registry, created once (a metric can be registered only once)."""
    global _default
    if _default is None:
        _default = PoolMetrics()
    return _default
