"""Endpoint health rules: state table, p95, moving average, the record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from modelfleet.gpus.breaker import BreakerState
from modelfleet.gpus.health import (
    EndpointState,
    HealthRecord,
    compute_ewma,
    compute_p95,
    compute_sample_stale_after,
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


@pytest.mark.parametrize(
    ("name", "changed", "agent_interval", "now", "expected"),
    [
        ("sample changed this round", 114.0, 5.0, 114.0, EndpointState.HEALTHY),
        ("unchanged just under 3 intervals", 100.0, 5.0, 114.9, EndpointState.HEALTHY),
        ("unchanged for 3 intervals", 100.0, 5.0, 115.0, EndpointState.STALE),
        ("faster agent: the pool's interval counts", 100.0, 1.0, 114.9, EndpointState.HEALTHY),
        ("slower agent: its interval counts", 100.0, 10.0, 129.9, EndpointState.HEALTHY),
        ("slower agent, 3 of its intervals", 100.0, 10.0, 130.0, EndpointState.STALE),
        ("no sample time known", None, None, 500.0, EndpointState.HEALTHY),
    ],
)
def test_unchanged_sample_goes_stale(
    name: str,
    changed: float | None,
    agent_interval: float | None,
    now: float,
    expected: EndpointState,
) -> None:
    """Replies keep arriving (last success is now) but the agent's sample may not change."""
    got = compute_state(
        breaker=C,
        consecutive_failures=0,
        last_success=now,
        success_rate=1.0,
        now=now,
        poll_interval_s=5.0,
        sample_changed=changed,
        agent_poll_interval_s=agent_interval,
    )
    assert got == expected, name


def test_stale_after_is_three_of_the_slower_interval() -> None:
    assert compute_sample_stale_after(5.0, None) == 15.0
    assert compute_sample_stale_after(5.0, 2.0) == 15.0
    assert compute_sample_stale_after(5.0, 20.0) == 60.0


def test_sample_changes_are_judged_against_the_same_agent_only() -> None:
    """The pool's clock decides the age; the agent's times are only compared with each other,
    so a skewed or stepped-back node clock is never mistaken for a stuck agent."""
    r = HealthRecord()
    skewed = datetime(1999, 1, 1, tzinfo=UTC)  # the node's clock is decades off
    r.record_sample(100.0, skewed, 5.0)
    r.record_sample(105.0, skewed + timedelta(seconds=5), 5.0)
    assert r.sample_changed == 105.0
    r.record_sample(110.0, skewed - timedelta(hours=1), 5.0)  # stepped back: still a new sample
    assert r.sample_changed == 110.0
    r.record_sample(115.0, datetime(1999, 1, 1), 5.0)  # naive: compares unequal, never raises
    assert r.sample_changed == 115.0
    r.record_sample(120.0, datetime(1999, 1, 1), 5.0)
    r.record_sample(129.9, datetime(1999, 1, 1), 5.0)
    assert r.sample_changed == 115.0
    assert r.stale_sample_reason(129.9, 5.0) == ""
    r.record_success(130.0, 1.7e9, 0.01)
    assert r.state(130.0, 5.0) == EndpointState.STALE
    assert r.stale_sample_reason(130.0, 5.0) == (
        "the agent's sample has not changed for 15 s (sampledAt 1999-01-01T00:00:00Z; "
        "stale after 15 s = 3 x 5 s poll interval): its poll loop may be stuck; check the "
        "agent's log and modelfleet_agent_poll_errors_total"
    )
