"""Circuit breaker and backoff: pure transitions with an explicit clock and jitter."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelfleet.gpus.breaker import (
    Breaker,
    BreakerPolicy,
    BreakerState,
    breaker_before_request,
    breaker_due,
    breaker_on_failure,
    breaker_on_success,
    compute_backoff,
)

POLICY = BreakerPolicy(failure_threshold=3, backoff_base_s=1.0, backoff_cap_s=60.0)


@pytest.mark.parametrize(
    ("opens", "jitter", "expected"),
    [
        (0, 1.0, 1.0),
        (1, 1.0, 2.0),
        (5, 1.0, 32.0),
        (6, 1.0, 60.0),  # 64 capped at 60
        (10, 0.5, 30.0),
        (0, 0.0, 0.0),
        (3, 0.25, 2.0),
        (10_000, 1.0, 60.0),  # no overflow
    ],
)
def test_backoff_is_full_jitter_of_capped_exponential(
    opens: int, jitter: float, expected: float
) -> None:
    assert compute_backoff(opens, POLICY, jitter) == expected


@given(opens=st.integers(0, 500), jitter=st.floats(0.0, 1.0))
def test_backoff_never_exceeds_cap(opens: int, jitter: float) -> None:
    value = compute_backoff(opens, POLICY, jitter)
    assert 0.0 <= value <= POLICY.backoff_cap_s
    assert math.isfinite(value)


def test_backoff_rejects_a_jitter_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="jitter must be in"):
        compute_backoff(0, POLICY, 1.5)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerPolicy(failure_threshold=0)


def never() -> float:
    raise AssertionError("jitter must only be drawn when the breaker opens")


def test_stays_closed_below_threshold() -> None:
    b = Breaker()
    b = breaker_on_failure(b, 10.0, POLICY, never)
    b = breaker_on_failure(b, 11.0, POLICY, never)
    assert b.state == BreakerState.CLOSED
    assert b.consecutive_failures == 2
    assert breaker_due(b, 11.0)


def test_success_resets_the_count() -> None:
    b = breaker_on_failure(Breaker(), 10.0, POLICY, never)
    b = breaker_on_success(b)
    assert b == Breaker()


def test_full_cycle_closed_open_half_open_open_half_open_closed() -> None:
    draws = iter([0.5, 0.75])
    b = Breaker()
    for t in (1.0, 2.0, 3.0):
        b = breaker_on_failure(b, t, POLICY, lambda: next(draws))
    # Third failure opens, backoff 0.5 * min(60, 1 * 2**0) = 0.5.
    assert (b.state, b.opens, b.open_until, b.backoff_s) == (BreakerState.OPEN, 0, 3.5, 0.5)
    assert not breaker_due(b, 3.49)
    assert breaker_before_request(b, 3.49) == b
    assert breaker_due(b, 3.5)
    b = breaker_before_request(b, 3.5)
    assert b.state == BreakerState.HALF_OPEN
    # The probe fails: open again with the next exponent, 0.75 * 2 = 1.5.
    b = breaker_on_failure(b, 3.6, POLICY, lambda: next(draws))
    assert (b.state, b.opens, b.open_until, b.backoff_s) == (BreakerState.OPEN, 1, 5.1, 1.5)
    assert b.consecutive_failures == 4
    b = breaker_before_request(b, 6.0)
    assert b.state == BreakerState.HALF_OPEN
    assert breaker_on_success(b) == Breaker()
