"""Endpoint health rules: state table, p95, moving average, the record."""

from __future__ import annotations

import pytest

from modelfleet.gpus.breaker import BreakerState
from modelfleet.gpus.health import (
    EndpointState,
    HealthRecord,
    compute_ewma,
    compute_p95,
    compute_state,
)

C, OP, HO = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@pytest.mark.parametrize(
    ("name", "breaker", "failures", "last_success", "rate", "now", "expected"),
    [
        ("fresh and clean", C, 0, 100.0, 1.0, 104.0, EndpointState.HEALTHY),
        ("last round failed", C, 1, 100.0, 0.95, 105.0, EndpointState.DEGRADED),
        ("low success rate", C, 0, 100.0, 0.5, 101.0, EndpointState.DEGRADED),
        ("no sample yet", C, 0, None, None, 100.0, EndpointState.STALE),
        ("three intervals old", C, 2, 100.0, 0.9, 115.0, EndpointState.STALE),
        ("just under three intervals", C, 2, 100.0, 0.9, 114.9, EndpointState.DEGRADED),
        ("breaker open", OP, 3, 100.0, 0.8, 101.0, EndpointState.DOWN),
        ("probing", HO, 3, None, 0.0, 101.0, EndpointState.DOWN),
    ],
)
def test_state_table(
    name: str,
    breaker: BreakerState,
    failures: int,
    last_success: float | None,
    rate: float | None,
    now: float,
    expected: EndpointState,
) -> None:
    got = compute_state(
        breaker=breaker,
        consecutive_failures=failures,
        last_success=last_success,
        success_rate=rate,
        now=now,
        poll_interval_s=5.0,
    )
    assert got == expected, name


def test_only_healthy_and_degraded_are_usable() -> None:
    assert {s for s in EndpointState if s.usable} == {
        EndpointState.HEALTHY,
        EndpointState.DEGRADED,
    }


def test_p95_nearest_rank() -> None:
    assert compute_p95([]) is None
    assert compute_p95([3.0]) == 3.0
    assert compute_p95([float(i) for i in range(1, 21)]) == 19.0
    assert compute_p95([float(i) for i in range(1, 101)]) == 95.0


def test_ewma() -> None:
    assert compute_ewma(None, 2.0) == 2.0
    assert compute_ewma(1.0, 2.0, alpha=0.5) == 1.5


def test_record_windows() -> None:
    r = HealthRecord()
    for i in range(25):
        r.record_success(float(i), 1.7e9 + i, 0.010 if i % 10 else 0.100)
    r.record_failure(30.0, "timeout")
    assert len(r.outcomes) == 20
    assert r.success_rate == 19 / 20
    assert r.last_error == "timeout"
    assert r.last_success == 24.0
    assert r.latency_p95_s == 0.100
