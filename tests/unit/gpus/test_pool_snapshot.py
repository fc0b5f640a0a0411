"""Snapshot building: named table cases, balance figures, and totals as a property."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pool_fakes import make_report
from prometheus_client import CollectorRegistry

from modelfleet.gpus.breaker import BreakerState
from modelfleet.gpus.health import EndpointState
from modelfleet.gpus.metrics import PoolMetrics
from modelfleet.gpus.snapshot import (
    EndpointSample,
    PoolSnapshot,
    build_snapshot,
    compute_conflicts,
    compute_replica_counts,
)

T = datetime(2025, 1, 1, 12, tzinfo=UTC)
H, D, DOWN, S = (
    EndpointState.HEALTHY,
    EndpointState.DEGRADED,
    EndpointState.DOWN,
    EndpointState.STALE,
)


def sample(url: str, node: str, state: EndpointState = H, **kw: object) -> EndpointSample:
    report = kw.pop("report", make_report(node, 2, 1000, [0, 400]))
    breaker = BreakerState.OPEN if state == DOWN else BreakerState.CLOSED
    return EndpointSample(url=url, node=node, state=state, breaker=breaker, report=report, **kw)  # type: ignore[arg-type]


def test_keyed_by_global_gpu_id() -> None:
    snap = build_snapshot(
        [sample("http://a:1", "node-a"), sample("http://b:1", "node-b")], taken_at=T
    )
    assert sorted(snap.gpus) == ["node-a:0", "node-a:1", "node-b:0", "node-b:1"]
    gpu = snap.gpus["node-b:1"]
    assert (gpu.node, gpu.index, gpu.endpoint, gpu.memory_used_mib) == (
        "node-b",
        1,
        "http://b:1",
        400,
    )
    assert gpu.free is True  # 400 MiB is idle memory
    assert snap.ready
    assert snap.reason == ""
    node = snap.node("node-a")
    assert node is not None
    assert node.endpoint == "http://a:1"
    assert [g.index for g in node.gpus] == [0, 1]


def test_snapshot_is_immutable() -> None:
    snap = build_snapshot([sample("http://a:1", "node-a")], taken_at=T)
    with pytest.raises(TypeError):
        snap.gpus["x:0"] = snap.gpus["node-a:0"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.ready = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "samples", "gpus_total", "nodes", "usable"),
    [
        ("all healthy", [sample("http://a:1", "node-a"), sample("http://b:1", "node-b")], 4, 2, 2),
        ("degraded still counts", [sample("http://a:1", "node-a", D)], 2, 1, 1),
        (
            "down is excluded",
            [sample("http://a:1", "node-a"), sample("http://b:1", "node-b", DOWN)],
            2,
            1,
            1,
        ),
        (
            "stale is excluded",
            [sample("http://a:1", "node-a", S), sample("http://b:1", "node-b")],
            2,
            1,
            1,
        ),
        ("usable but no report yet", [sample("http://a:1", "node-a", H, report=None)], 0, 0, 0),
        (
            "duplicate node keeps the first URL",
            [sample("http://b:1", "node-a"), sample("http://a:1", "node-a")],
            2,
            1,
            1,
        ),
    ],
)
def test_totals_table(
    name: str, samples: list[EndpointSample], gpus_total: int, nodes: int, usable: int
) -> None:
    snap = build_snapshot(samples, taken_at=T)
    assert snap.totals.figures.gpus_total == gpus_total, name
    assert snap.totals.nodes == nodes, name
    assert snap.totals.endpoints_usable == usable, name
    assert snap.totals.endpoints == len(samples), name


def test_all_down_is_empty_with_a_reason() -> None:
    snap = build_snapshot(
        [sample("http://a:1", "node-a", DOWN), sample("http://b:1", "node-b", S)], taken_at=T
    )
    assert not snap.ready
    assert snap.gpus == {}
    assert snap.reason == (
        "waiting for GPU stats: none of 2 agent endpoints is usable (1 down, 1 stale)"
    )
    assert [e.included for e in snap.endpoints] == [False, False]
    assert snap.endpoints[0].figures is None


def test_no_endpoints_reason() -> None:
    snap = build_snapshot([], taken_at=T)
    assert snap.reason == "waiting for GPU stats: no agent endpoint is configured or discovered"


def test_gpu_health_and_pods() -> None:
    report = make_report(
        "node-a", 3, 1000, [0, 900, 10], unhealthy=[2], pods={1: ["ml/llama-instance-1"]}
    )
    snap = build_snapshot([sample("http://a:1", "node-a", report=report)], taken_at=T)
    f = snap.totals.figures
    assert (f.gpus_total, f.gpus_healthy, f.gpus_free) == (3, 2, 1)
    assert (f.memory_total_mib, f.memory_used_mib, f.memory_free_mib) == (3000, 910, 2090)
    assert snap.gpus["node-a:2"].reason == "XID 79"
    assert snap.gpus["node-a:1"].pods[0].name == "llama-instance-1"


def test_balance_memory_and_replicas() -> None:
    samples = [
        sample("http://a:1", "node-a", report=make_report("node-a", 2, 1000, [500, 500])),
        sample("http://b:1", "node-b", report=make_report("node-b", 2, 1000, [0, 0])),
    ]
    snap = build_snapshot(
        samples, taken_at=T, replicas_by_node={"node-a": 3, "node-b": 1, "gone": 7}
    )
    b = snap.balance
    assert dict(b.memory_used_fraction_by_node) == {"node-a": 0.5, "node-b": 0.0}
    assert b.memory_used_spread == 0.5
    assert b.memory_used_cv == pytest.approx(1.0)  # mean 0.25, pstdev 0.25
    assert dict(b.replicas_by_node or {}) == {"node-a": 3, "node-b": 1}
    assert dict(b.replica_share_by_node or {}) == {"node-a": 0.75, "node-b": 0.25}
    assert b.replica_share_spread == 0.5
    assert b.replica_cv == pytest.approx(0.5)  # mean 2, pstdev 1
    even = build_snapshot(samples[:1], taken_at=T)
    assert even.balance.memory_used_cv == 0.0
    assert even.balance.replica_share_by_node is None


def test_balance_figures_are_metrics_and_nodes_that_left_lose_theirs() -> None:
    samples = [
        sample("http://a:1", "node-a", report=make_report("node-a", 2, 1000, [500, 500])),
        sample("http://b:1", "node-b", report=make_report("node-b", 2, 1000, [0, 0])),
    ]
    counts = compute_replica_counts(["node-a", "node-a", None, "node-b", "node-a"])
    assert counts == {"node-a": 3, "node-b": 1}  # an unbound replica counts nowhere
    registry = CollectorRegistry()
    metrics = PoolMetrics(registry)
    metrics.observe_snapshot(build_snapshot(samples, taken_at=T, replicas_by_node=counts))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("modelfleet_pool_node_replicas", node="node-a") == 3
    assert value("modelfleet_pool_node_replica_share", node="node-b") == 0.25
    assert value("modelfleet_pool_balance_replicas_cv") == pytest.approx(0.5)
    assert value("modelfleet_pool_balance_replica_share_spread") == 0.5
    assert value("modelfleet_pool_node_memory_used_ratio", node="node-a") == 0.5
    assert value("modelfleet_pool_balance_memory_used_cv") == pytest.approx(1.0)
    assert value("modelfleet_pool_balance_memory_used_spread") == 0.5
    metrics.observe_snapshot(build_snapshot(samples[:1], taken_at=T, replicas_by_node=counts))
    assert value("modelfleet_pool_node_replicas", node="node-b") is None
    assert value("modelfleet_pool_node_memory_used_ratio", node="node-b") is None
    assert value("modelfleet_pool_node_replica_share", node="node-a") == 1.0


def test_conflicts_keep_the_owner_then_the_smaller_url() -> None:
    a, b = make_report("node-a", 2), make_report("node-a", 2, uuid_prefix="other")
    assert set(compute_conflicts({"http://b:1": a, "http://a:1": b})) == {"http://b:1"}
    kept = compute_conflicts({"http://b:1": a, "http://a:1": b}, {"node-a": "http://b:1"})
    assert list(kept) == ["http://a:1"]
    assert "duplicate GPU IDs: node 'node-a'" in kept["http://a:1"]
    assert "already reported by http://b:1" in kept["http://a:1"]


def test_conflicts_keep_a_holder_that_does_not_report_this_round() -> None:
    newcomer = make_report("node-a", 2, uuid_prefix="other")
    reasons = compute_conflicts({"http://b:1": newcomer}, {"node-a": "http://a:1"})
    assert reasons == {
        "http://b:1": "duplicate GPU IDs: node 'node-a' is already reported by http://a:1; "
        "each node must have exactly one agent endpoint"
    }
    assert compute_conflicts({"http://a:1": newcomer}, {"node-a": "http://a:1"}) == {}


def test_conflicts_catch_a_uuid_on_two_nodes() -> None:
    a = make_report("node-a", 2, uuid_prefix="same")
    b = make_report("node-b", 2, uuid_prefix="same")
    reasons = compute_conflicts({"http://a:1": a, "http://b:1": b})
    assert list(reasons) == ["http://b:1"]
    assert reasons["http://b:1"].startswith("duplicate GPU UUID GPU-same-0")


endpoint_states = st.sampled_from(list(EndpointState))


@st.composite
def pools(draw: st.DrawFn) -> list[EndpointSample]:
    n = draw(st.integers(0, 8))
    out = []
    for i in range(n):
        gpus = draw(st.integers(0, 8))
        total = draw(st.integers(1, 100_000))
        used = draw(st.lists(st.integers(0, total), min_size=gpus, max_size=gpus))
        report = make_report(
            f"node-{i}", gpus, total, used, unhealthy=draw(st.sets(st.integers(0, 7)))
        )
        state = draw(endpoint_states)
        has_report = draw(st.booleans()) or state.usable
        out.append(
            sample(
                f"http://10.0.0.{i}:9400", f"node-{i}", state, report=report if has_report else None
            )
        )
    return out


@given(
    samples=pools(),
    replicas=st.dictionaries(st.sampled_from([f"node-{i}" for i in range(8)]), st.integers(0, 20)),
)
def test_totals_equal_the_sum_over_usable_endpoints(
    samples: list[EndpointSample], replicas: dict[str, int]
) -> None:
    snap: PoolSnapshot = build_snapshot(samples, taken_at=T, replicas_by_node=replicas)
    usable = [s for s in samples if s.state.usable and s.report is not None]
    gpus = [g for s in usable for g in s.report.gpus]  # type: ignore[union-attr]
    f = snap.totals.figures
    assert f.gpus_total == len(gpus) == len(snap.gpus)
    assert f.gpus_healthy == sum(g.health.healthy for g in gpus)
    assert f.memory_total_mib == sum(g.memory_total_mib for g in gpus)
    assert f.memory_used_mib == sum(g.memory_used_mib for g in gpus)
    assert f.memory_free_mib == sum(g.memory_free_mib for g in gpus)
    assert snap.totals.nodes == len(usable)
    # The per-endpoint breakdown adds up to the totals.
    parts = [e.figures for e in snap.endpoints if e.figures is not None]
    assert sum(p.gpus_total for p in parts) == f.gpus_total
    assert sum(p.gpus_free for p in parts) == f.gpus_free
    assert sum(p.memory_free_mib for p in parts) == f.memory_free_mib
    assert sum(snap.totals.endpoints_by_state.values()) == len(samples)
    assert snap.ready == bool(usable)
    share = snap.balance.replica_share_by_node or {}
    assert set(share) == {s.report.node for s in usable}  # type: ignore[union-attr]
    total_share = sum(share.values())
    assert math.isclose(total_share, 1.0) or total_share == 0.0


@given(first=pools(), states=st.lists(endpoint_states, min_size=8, max_size=8))
def test_reusing_the_previous_snapshot_gives_the_same_snapshot(
    first: list[EndpointSample], states: list[EndpointState]
) -> None:
    """Same report objects, states drawn again: reuse changes nothing but the work done."""
    before = build_snapshot(first, taken_at=T)
    second = [
        EndpointSample(url=s.url, node=s.node, state=state, breaker=s.breaker, report=s.report)
        for s, state in zip(first, states, strict=False)
    ]
    reused = build_snapshot(second, taken_at=T, previous=before)
    assert reused == build_snapshot(second, taken_at=T)
    for node in reused.nodes:
        old = before.node(node.name)
        if old is not None and old.state == node.state:
            assert node is old  # not rebuilt


def test_a_new_report_object_is_rebuilt() -> None:
    before = build_snapshot([sample("http://a:1", "node-a")], taken_at=T)
    changed = make_report("node-a", 2, 1000, [0, 900])
    after = build_snapshot(
        [sample("http://a:1", "node-a", report=changed)], taken_at=T, previous=before
    )
    assert after.gpus["node-a:1"].memory_used_mib == 900
    assert after.totals.figures.memory_used_mib == 900


def test_stale_gpu_is_not_free_and_not_unhealthy() -> None:
    report = make_report("node-a", 2, 1000, [0, 0])
    stale = report.gpus[0].model_copy(update={"stale": True, "stale_reason": "Unknown Error"})
    report = report.model_copy(update={"gpus": [stale, report.gpus[1]]})
    snap = build_snapshot([sample("http://a:1", "node-a", report=report)], taken_at=T)
    f = snap.totals.figures
    assert (f.gpus_total, f.gpus_healthy, f.gpus_free) == (2, 2, 1)
    gpu = snap.gpus["node-a:0"]
    assert gpu.stale
    assert gpu.stale_reason == "Unknown Error"
    assert gpu.utilization_percent is None  # unread, not zero


def test_agent_not_ready_is_said_on_its_node_and_endpoint() -> None:
    report = make_report("node-a", 1, 1000, [0]).model_copy(
        update={"ready": False, "reason": "NVML does not answer"}
    )
    snap = build_snapshot([sample("http://a:1", "node-a", report=report)], taken_at=T)
    node = snap.node("node-a")
    assert node is not None
    assert node.not_ready == "NVML does not answer"
    assert snap.endpoints[0].reason == "agent not ready: NVML does not answer"
    assert snap.endpoints[0].included  # still heard from: its replicas stay where they are
