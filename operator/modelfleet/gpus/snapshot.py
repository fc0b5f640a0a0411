"""The pool snapshot: an immutable view of every usable GPU, keyed by global GPU ID.

`build_snapshot` is a pure function of the endpoints' last samples and health, so it is tested
with tables and properties; the pool calls it after every poll round, passing the previous
snapshot so that a node whose report object has not changed is reused rather than rebuilt.
Only usable endpoints (healthy or degraded, see `modelfleet.gpus.health`) contribute GPUs,
nodes and totals; every endpoint appears in `endpoints` with its state and the reason.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from modelfleet.api.gpustats import GpuReport, PodRef
from modelfleet.gpus.breaker import BreakerState
from modelfleet.gpus.health import EndpointState

#: A GPU with no pods and at most this much memory in use counts as free (the driver and
#: persistence mode keep a few MiB busy on an idle GPU).
IDLE_MEMORY_MIB = 512
WAITING = "waiting for GPU stats"


@dataclass(frozen=True, slots=True)
class EndpointSample:
    """What the pool knows about one endpoint at snapshot time: the input of `build_snapshot`."""

    url: str
    node: str | None
    state: EndpointState
    breaker: BreakerState = BreakerState.CLOSED
    report: GpuReport | None = None
    reason: str = ""
    last_success_at: datetime | None = None
    consecutive_failures: int = 0
    latency_ewma_s: float | None = None
    latency_p95_s: float | None = None
    success_rate: float | None = None
    next_probe_in_s: float | None = None


@dataclass(frozen=True, slots=True)
class PoolGpu:
    """One GPU as placement sees it."""

    gpu_id: str
    node: str
    index: int
    uuid: str
    product: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    utilization_percent: float | None  # None: the agent could not read it
    healthy: bool
    reason: str
    pods: tuple[PodRef, ...]
    endpoint: str
    #: The agent could not read this GPU's identity or memory (or NVML at all): the memory
    #: figures are not measurements, so nothing is placed on it; it is not unhealthy for that.
    stale: bool = False
    stale_reason: str = ""

    @property
    def free(self) -> bool:
        """Healthy, read, no pods, and no more than idle memory in use."""
        return (
            self.healthy
            and not self.stale
            and not self.pods
            and self.memory_used_mib <= IDLE_MEMORY_MIB
        )


@dataclass(frozen=True, slots=True)
class Figures:
    """Counts and memory of a set of GPUs."""

    gpus_total: int = 0
    gpus_healthy: int = 0
    gpus_free: int = 0
    memory_total_mib: int = 0
    memory_used_mib: int = 0
    memory_free_mib: int = 0


@dataclass(frozen=True, slots=True)
class PoolNode:
    """One node (one endpoint) with its GPUs in index order."""

    name: str
    endpoint: str
    state: EndpointState
    sampled_at: datetime
    gpus: tuple[PoolGpu, ...]
    figures: Figures
    #: Why the agent says it cannot read its GPUs (NVML down), or "": a node whose agent is not
    #: ready takes no new replicas, and loses none for it.
    not_ready: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSummary:
    """One endpoint's health and, when usable, its figures."""

    url: str
    node: str | None
    state: EndpointState
    breaker: BreakerState
    included: bool
    reason: str
    last_success_at: datetime | None
    sampled_at: datetime | None
    consecutive_failures: int
    latency_ewma_s: float | None
    latency_p95_s: float | None
    success_rate: float | None
    next_probe_in_s: float | None
    figures: Figures | None


@dataclass(frozen=True, slots=True)
class Totals:
    endpoints: int
    endpoints_usable: int
    endpoints_by_state: Mapping[EndpointState, int]
    nodes: int
    figures: Figures


@dataclass(frozen=True, slots=True)
class Balance:
    """How evenly work is spread over usable nodes (the "load balancing effectiveness").

    Memory: the fraction of each node's GPU memory in use, its coefficient of variation
    (population standard deviation / mean; 0 is perfectly even) and max - min spread.
    Replicas: when the caller supplies replica counts per node, each node's share and the same
    two figures over the counts.
    """

    memory_used_fraction_by_node: Mapping[str, float]
    memory_used_cv: float
    memory_used_spread: float
    replicas_by_node: Mapping[str, int] | None = None
    replica_share_by_node: Mapping[str, float] | None = None
    replica_cv: float | None = None
    replica_share_spread: float | None = None


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """Immutable; `gpus` maps global GPU ID to GPU, `nodes` are the usable nodes by name."""

    taken_at: datetime
    ready: bool
    reason: str
    gpus: Mapping[str, PoolGpu]
    nodes: tuple[PoolNode, ...]
    endpoints: tuple[EndpointSummary, ...]
    totals: Totals
    balance: Balance
    _by_node: Mapping[str, PoolNode] = field(default_factory=dict, repr=False, compare=False)
    #: url -> (the report, its node): what `build_snapshot(previous=...)` may reuse.
    _built: Mapping[str, tuple[GpuReport, PoolNode]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def node(self, name: str) -> PoolNode | None:
        return self._by_node.get(name)


def compute_figures(gpus: Iterable[PoolGpu]) -> Figures:
    total = healthy = free = mem_total = mem_used = mem_free = 0
    for gpu in gpus:
        total += 1
        healthy += gpu.healthy
        free += gpu.free
        mem_total += gpu.memory_total_mib
        mem_used += gpu.memory_used_mib
        mem_free += gpu.memory_free_mib
    return Figures(total, healthy, free, mem_total, mem_used, mem_free)


def _spread_and_cv(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    mean = statistics.fmean(values)
    cv = statistics.pstdev(values) / mean if mean > 0 else 0.0
    return max(values) - min(values), cv


def compute_replica_counts(nodes: Iterable[str | None]) -> dict[str, int]:
    """Replicas per node from each replica's node (None: not bound yet, not counted)."""
    counts: dict[str, int] = {}
    for node in nodes:
        if node:
            counts[node] = counts.get(node, 0) + 1
    return counts


def compute_balance(
    nodes: Sequence[PoolNode], replicas_by_node: Mapping[str, int] | None = None
) -> Balance:
    """Balance figures over `nodes`; replica figures only when counts are given."""
    used = {
        n.name: n.figures.memory_used_mib / n.figures.memory_total_mib
        for n in nodes
        if n.figures.memory_total_mib > 0
    }
    mem_spread, mem_cv = _spread_and_cv(list(used.values()))
    if replicas_by_node is None:
        return Balance(MappingProxyType(used), mem_cv, mem_spread)
    counts = {n.name: max(0, int(replicas_by_node.get(n.name, 0))) for n in nodes}
    total = sum(counts.values())
    share = {name: (c / total if total else 0.0) for name, c in counts.items()}
    _, replica_cv = _spread_and_cv([float(c) for c in counts.values()])
    share_spread, _ = _spread_and_cv(list(share.values()))
    return Balance(
        MappingProxyType(used),
        mem_cv,
        mem_spread,
        MappingProxyType(counts),
        MappingProxyType(share),
        replica_cv,
        share_spread,
    )


def compute_conflicts(
    reports: Mapping[str, GpuReport], owners: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Endpoints whose report clashes with another's: url -> reason. Pure and deterministic.

    Two endpoints that report the same node report the same global GPU IDs. The endpoint that
    holds the node (`owners`: node -> url) keeps it, whether or not it reports this round: an
    endpoint that is down does not lose its node to a newcomer. A node nobody holds goes to the
    smaller URL. A GPU UUID reported by two endpoints rejects the later one in URL order.
    """
    owners = owners or {}
    rejected: dict[str, str] = {}
    by_node: dict[str, list[str]] = {}
    for url in sorted(reports):
        by_node.setdefault(reports[url].node, []).append(url)
    for node, urls in by_node.items():
        holder = owners.get(node)
        if len(urls) < 2 and holder in (None, urls[0]):
            continue
        keeper = holder if holder is not None else urls[0]
        shown = reports[keeper].gpus if keeper in reports else ()
        ids = ", ".join(g.gpu_id for g in shown[:3]) + ("..." if len(shown) > 3 else "")
        for url in urls:
            if url != keeper:
                rejected[url] = (
                    f"duplicate GPU IDs: node {node!r}{f' ({ids})' if ids else ''} is already "
                    f"reported by {keeper}; each node must have exactly one agent endpoint"
                )
    seen: dict[str, tuple[str, str]] = {}
    for url in sorted(reports):
        if url in rejected:
            continue
        for gpu in reports[url].gpus:
            if gpu.uuid in seen and seen[gpu.uuid][0] != url:
                other_url, other_id = seen[gpu.uuid]
                rejected[url] = (
                    f"duplicate GPU UUID {gpu.uuid}: reported as {gpu.gpu_id} here and as "
                    f"{other_id} by {other_url}"
                )
                break
            seen.setdefault(gpu.uuid, (url, gpu.gpu_id))
    return rejected


def _pool_gpus(report: GpuReport, url: str) -> tuple[PoolGpu, ...]:
    return tuple(
        PoolGpu(
            gpu_id=g.gpu_id,
            node=report.node,
            index=g.index,
            uuid=g.uuid,
            product=g.product,
            memory_total_mib=g.memory_total_mib,
            memory_used_mib=g.memory_used_mib,
            memory_free_mib=g.memory_free_mib,
            utilization_percent=g.utilization_percent,
            healthy=g.health.healthy,
            reason=g.health.reason,
            pods=tuple(g.pods),
            endpoint=url,
            stale=g.stale,
            stale_reason=g.stale_reason,
        )
        for g in sorted(report.gpus, key=lambda g: g.index)
    )


def compute_reason(endpoints: Sequence[EndpointSummary]) -> str:
    """Empty when at least one endpoint is usable; else why the pool is empty."""
    if any(e.included for e in endpoints):
        return ""
    if not endpoints:
        return f"{WAITING}: no agent endpoint is configured or discovered"
    counts: dict[str, int] = {}
    for e in endpoints:
        counts[e.state.value] = counts.get(e.state.value, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{WAITING}: none of {len(endpoints)} agent endpoints is usable ({parts})"


def build_snapshot(
    samples: Sequence[EndpointSample],
    *,
    taken_at: datetime,
    replicas_by_node: Mapping[str, int] | None = None,
    previous: PoolSnapshot | None = None,
) -> PoolSnapshot:
    """Merge the endpoints' samples into one pool; see the module docstring for what counts.

    With `previous`, an endpoint whose report is the very object it had there keeps its node
    (GPUs and figures) instead of building it again: the result is the same either way.
    """
    gpus: dict[str, PoolGpu] = {}
    nodes: list[PoolNode] = []
    seen_nodes: set[str] = set()
    built: dict[str, tuple[GpuReport, PoolNode]] = {}
    reusable = previous._built if previous is not None else {}
    summaries: list[EndpointSummary] = []
    by_state = dict.fromkeys(EndpointState, 0)
    for s in sorted(samples, key=lambda s: s.url):
        by_state[s.state] += 1
        report = s.report
        included = s.state.usable and report is not None
        reason = s.reason
        if included and report is not None:
            # A report's GPU IDs are all `<its node>:<index>` (GpuReport checks), so only a
            # node seen before can clash; the scan runs only then.
            clash = (
                next((g.gpu_id for g in report.gpus if g.gpu_id in gpus), None)
                if report.node in seen_nodes
                else None
            )
            if clash is not None:
                # The pool rejects clashing replies before they get here; this keeps the
                # snapshot consistent even for callers that did not.
                included = False
                reason = f"duplicate GPU IDs: {clash} is already reported by {gpus[clash].endpoint}"
        figures: Figures | None = None
        if included and report is not None:
            kept = reusable.get(s.url)
            if kept is not None and kept[0] is report:
                node = kept[1] if kept[1].state == s.state else replace(kept[1], state=s.state)
            else:
                node_gpus = _pool_gpus(report, s.url)
                node = PoolNode(
                    report.node,
                    s.url,
                    s.state,
                    report.sampled_at,
                    node_gpus,
                    compute_figures(node_gpus),
                    not_ready="" if report.ready else report.reason or "the agent is not ready",
                )
            for gpu in node.gpus:
                gpus[gpu.gpu_id] = gpu
            figures = node.figures
            if node.not_ready and not reason:
                reason = f"agent not ready: {node.not_ready}"
            nodes.append(node)
            seen_nodes.add(report.node)
            built[s.url] = (report, node)
        summaries.append(
            EndpointSummary(
                url=s.url,
                node=report.node if report is not None else s.node,
                state=s.state,
                breaker=s.breaker,
                included=included,
                reason=reason,
                last_success_at=s.last_success_at,
                sampled_at=report.sampled_at if report is not None else None,
                consecutive_failures=s.consecutive_failures,
                latency_ewma_s=s.latency_ewma_s,
                latency_p95_s=s.latency_p95_s,
                success_rate=s.success_rate,
                next_probe_in_s=s.next_probe_in_s,
                figures=figures,
            )
        )
    nodes.sort(key=lambda n: n.name)
    totals = Totals(
        endpoints=len(summaries),
        endpoints_usable=sum(e.included for e in summaries),
        endpoints_by_state=MappingProxyType(by_state),
        nodes=len(nodes),
        figures=compute_figures(gpus.values()),
    )
    reason = compute_reason(summaries)
    return PoolSnapshot(
        taken_at=taken_at,
        ready=not reason,
        reason=reason,
        gpus=MappingProxyType(gpus),
        nodes=tuple(nodes),
        endpoints=tuple(summaries),
        totals=totals,
        balance=compute_balance(nodes, replicas_by_node),
        _by_node=MappingProxyType({n.name: n for n in nodes}),
        _built=built,
    )


def empty_snapshot(taken_at: datetime) -> PoolSnapshot:
    """The snapshot before the first round."""
    return build_snapshot((), taken_at=taken_at)
