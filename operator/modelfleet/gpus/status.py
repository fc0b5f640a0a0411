"""The pool status document (`GET /status` and `modelfleet status --json`) and its table.

One set of pydantic models defines the JSON for both, so the operator's endpoint and the CLI
print the same shape. Field names are camelCase; memory is in MiB, times in seconds. The shape
is documented in docs/endpoints.md; `schemaVersion` changes only when a field is removed or
changes meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modelfleet.gpus.snapshot import EndpointSummary, Figures, PoolNode, PoolSnapshot

STATUS_SCHEMA_VERSION = "v1"


class _Doc(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class FiguresStatus(_Doc):
    gpus_total: int = Field(..., description="GPUs.")
    gpus_healthy: int = Field(..., description="GPUs their agent reports healthy.")
    gpus_free: int = Field(..., description="Healthy GPUs with no pods and idle memory.")
    memory_total_mib: int = Field(..., alias="memoryTotalMiB", description="GPU memory, MiB.")
    memory_used_mib: int = Field(..., alias="memoryUsedMiB", description="Memory in use, MiB.")
    memory_free_mib: int = Field(..., alias="memoryFreeMiB", description="Memory free, MiB.")


class TotalsStatus(FiguresStatus):
    endpoints: int = Field(..., description="Endpoints configured or discovered.")
    endpoints_usable: int = Field(
        ..., description="Endpoints whose GPUs count (healthy, degraded)."
    )
    endpoints_by_state: dict[str, int] = Field(..., description="Endpoints per health state.")
    nodes: int = Field(..., description="Nodes with a usable endpoint.")


class EndpointStatus(_Doc):
    url: str
    node: str | None = Field(None, description="Node the endpoint reports (or must report).")
    state: Literal["healthy", "degraded", "down", "stale"]
    breaker: Literal["closed", "open", "half_open"]
    included: bool = Field(..., description="Whether its GPUs count in the totals.")
    reason: str = Field("", description="Last error, empty when the last round succeeded.")
    last_success_at: datetime | None = None
    sampled_at: datetime | None = Field(None, description="When the agent sampled its GPUs.")
    consecutive_failures: int = 0
    latency_seconds: float | None = Field(None, description="Moving average of reply time.")
    latency_p95_seconds: float | None = Field(None, description="p95 over the last rounds.")
    success_rate: float | None = Field(None, description="Successful rounds, last 20.")
    next_probe_in_seconds: float | None = Field(None, description="Open breaker: probe due in.")
    # The endpoint's figures; null when it is excluded (down, stale or rejected).
    gpus_total: int | None = None
    gpus_healthy: int | None = None
    gpus_free: int | None = None
    memory_total_mib: int | None = Field(None, alias="memoryTotalMiB")
    memory_used_mib: int | None = Field(None, alias="memoryUsedMiB")
    memory_free_mib: int | None = Field(None, alias="memoryFreeMiB")


class GpuStatus(_Doc):
    gpu_id: str
    index: int
    uuid: str
    product: str
    memory_total_mib: int = Field(..., alias="memoryTotalMiB")
    memory_used_mib: int = Field(..., alias="memoryUsedMiB")
    memory_free_mib: int = Field(..., alias="memoryFreeMiB")
    utilization_percent: float | None = Field(None, description="Null when unreadable.")
    healthy: bool
    reason: str = ""
    stale: bool = Field(
        False, description="Its agent could not read it: not placed on, not unhealthy."
    )
    stale_reason: str = ""
    free: bool
    pods: list[str] = Field(default_factory=list, description="namespace/name of its pods.")


class NodeStatus(FiguresStatus):
    name: str
    endpoint: str
    state: Literal["healthy", "degraded"]
    sampled_at: datetime
    not_ready: str = Field(
        "", description="Why its agent cannot read the GPUs (NVML down); empty when it can."
    )
    gpus: list[GpuStatus]


class BalanceStatus(_Doc):
    memory_used_fraction_by_node: dict[str, float]
    memory_used_cv: float = Field(..., description="Coefficient of variation across nodes.")
    memory_used_spread: float = Field(..., description="Max - min used fraction across nodes.")
    replicas_by_node: dict[str, int] | None = None
    replica_share_by_node: dict[str, float] | None = None
    replica_cv: float | None = None
    replica_share_spread: float | None = None


class PoolStatus(_Doc):
    """The whole document."""

    schema_version: str = STATUS_SCHEMA_VERSION
    source: Literal["operator", "endpoints"]
    taken_at: datetime
    ready: bool = Field(..., description="At least one endpoint is usable.")
    reason: str = Field("", description="Why the pool is empty, when it is.")
    totals: TotalsStatus
    endpoints: list[EndpointStatus]
    nodes: list[NodeStatus] = Field(default_factory=list)
    balance: BalanceStatus
    gpu_nodes_without_agent: list[str] = Field(
        default_factory=list,
        description=(
            "Nodes with allocatable nvidia.com/gpu that no agent reports (operator only): "
            "placement cannot use their GPUs."
        ),
    )


def _figures(f: Figures) -> FiguresStatus:
    return FiguresStatus(
        gpus_total=f.gpus_total,
        gpus_healthy=f.gpus_healthy,
        gpus_free=f.gpus_free,
        memory_total_mib=f.memory_total_mib,
        memory_used_mib=f.memory_used_mib,
        memory_free_mib=f.memory_free_mib,
    )


def _figure_fields(f: Figures | None) -> dict[str, int]:
    return _figures(f).model_dump() if f is not None else {}


def _endpoint(e: EndpointSummary) -> EndpointStatus:
    return EndpointStatus(
        **_figure_fields(e.figures),
        url=e.url,
        node=e.node,
        state=e.state.value,
        breaker=e.breaker.value,
        included=e.included,
        reason=e.reason,
        last_success_at=e.last_success_at,
        sampled_at=e.sampled_at,
        consecutive_failures=e.consecutive_failures,
        latency_seconds=e.latency_ewma_s,
        latency_p95_seconds=e.latency_p95_s,
        success_rate=e.success_rate,
        next_probe_in_seconds=e.next_probe_in_s,
    )


def _node(n: PoolNode) -> NodeStatus:
    return NodeStatus(
        **_figure_fields(n.figures),
        name=n.name,
        endpoint=n.endpoint,
        state=n.state.value,
        sampled_at=n.sampled_at,
        not_ready=n.not_ready,
        gpus=[
            GpuStatus(
                gpu_id=g.gpu_id,
                index=g.index,
                uuid=g.uuid,
                product=g.product,
                memory_total_mib=g.memory_total_mib,
                memory_used_mib=g.memory_used_mib,
                memory_free_mib=g.memory_free_mib,
                utilization_percent=g.utilization_percent,
                healthy=g.healthy,
                reason=g.reason,
                stale=g.stale,
                stale_reason=g.stale_reason,
                free=g.free,
                pods=[f"{p.namespace}/{p.name}" for p in g.pods],
            )
            for g in n.gpus
        ],
    )


def build_status(
    snapshot: PoolSnapshot,
    source: Literal["operator", "endpoints"],
    *,
    with_gpus: bool = True,
    gpu_nodes_without_agent: Sequence[str] = (),
) -> PoolStatus:
    """The status document of a snapshot; `with_gpus=False` leaves out the per-GPU lists."""
    t = snapshot.totals
    f = t.figures
    b = snapshot.balance
    return PoolStatus(
        source=source,
        taken_at=snapshot.taken_at,
        ready=snapshot.ready,
        reason=snapshot.reason,
        totals=TotalsStatus(
            endpoints=t.endpoints,
            endpoints_usable=t.endpoints_usable,
            endpoints_by_state={s.value: n for s, n in t.endpoints_by_state.items()},
            nodes=t.nodes,
            gpus_total=f.gpus_total,
            gpus_healthy=f.gpus_healthy,
            gpus_free=f.gpus_free,
            memory_total_mib=f.memory_total_mib,
            memory_used_mib=f.memory_used_mib,
            memory_free_mib=f.memory_free_mib,
        ),
        endpoints=[_endpoint(e) for e in snapshot.endpoints],
        nodes=[_node(n) for n in snapshot.nodes] if with_gpus else [],
        balance=BalanceStatus(
            memory_used_fraction_by_node=dict(b.memory_used_fraction_by_node),
            memory_used_cv=b.memory_used_cv,
            memory_used_spread=b.memory_used_spread,
            replicas_by_node=dict(b.replicas_by_node) if b.replicas_by_node is not None else None,
            replica_share_by_node=(
                dict(b.replica_share_by_node) if b.replica_share_by_node is not None else None
            ),
            replica_cv=b.replica_cv,
            replica_share_spread=b.replica_share_spread,
        ),
        gpu_nodes_without_agent=list(gpu_nodes_without_agent),
    )


def printable(text: str) -> str:
    """`text` safe for a terminal: line breaks and tabs become spaces, every other control or
    format character (ESC, NUL, DEL, C1, bidi overrides) its escape, e.g. `\\x1b`.

    Node names, reasons and URLs come from agents and from the operator's reply; a terminal
    escape among them must not reach the screen.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in "\t\n\r":
            out.append(" ")
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out)


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f}"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else "<1 ms"


def render_table(status: PoolStatus) -> str:
    """A table a person reads: one row per endpoint, then the totals."""
    header = ("ENDPOINT", "NODE", "STATE", "GPUS FREE/TOTAL", "MEMORY FREE/TOTAL GiB", "LATENCY")
    rows: list[tuple[str, ...]] = [header]
    reasons: list[str] = []
    for e in status.endpoints:
        state = e.state if e.breaker == "closed" else f"{e.state} ({e.breaker.replace('_', '-')})"
        rows.append(
            (
                printable(e.url),
                printable(e.node or "-"),
                state,
                f"{e.gpus_free}/{e.gpus_total}" if e.gpus_total is not None else "-",
                (
                    f"{_gib(e.memory_free_mib)}/{_gib(e.memory_total_mib)}"
                    if e.memory_total_mib is not None and e.memory_free_mib is not None
                    else "-"
                ),
                _latency(e.latency_seconds),
            )
        )
        if e.reason:
            reasons.append(f"  {printable(e.url)}: {printable(e.reason)}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    t = status.totals
    states = printable(", ".join(f"{n} {s}" for s, n in t.endpoints_by_state.items() if n))
    lines.append("")
    lines.append(
        f"TOTAL  endpoints {t.endpoints_usable}/{t.endpoints} usable ({states or 'none'})  "
        f"nodes {t.nodes}  GPUs free {t.gpus_free}/{t.gpus_total}  "
        f"memory free {_gib(t.memory_free_mib)}/{_gib(t.memory_total_mib)} GiB"
    )
    if not status.ready:
        lines.append(f"NOT READY  {printable(status.reason)}")
    if status.gpu_nodes_without_agent:
        names = printable(", ".join(status.gpu_nodes_without_agent))
        lines.append(
            f"NO AGENT  {len(status.gpu_nodes_without_agent)} GPU node(s) that placement cannot "
            f"use: {names} (check the agent DaemonSet's node affinity, tolerations and runtime "
            "class)"
        )
    if reasons:
        lines.append("")
        lines.append("Reasons:")
        lines.extend(reasons)
    return "\n".join(lines) + "\n"
