"""Per-endpoint circuit breaker: pure state transitions, clock and jitter passed in.

closed -> open after `failure_threshold` consecutive failures; open -> half-open once the backoff
has passed (the next poll round sends one probe); half-open -> closed on success, or open again
with the next, longer backoff on failure. The backoff is "full jitter" (AWS Architecture Blog,
"Exponential Backoff And Jitter"): uniform in [0, min(cap, base * 2**n)), n counting the opens
since the breaker was last closed, which spreads the probes of many failed endpoints apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

# 2**64 s is far beyond any cap; bounding the exponent keeps the float finite.
_MAX_EXPONENT = 64


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and how long it stays open."""

    failure_threshold: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.backoff_base_s <= 0 or self.backoff_cap_s <= 0:
            raise ValueError("backoff_base_s and backoff_cap_s must be positive")


@dataclass(frozen=True, slots=True)
class Breaker:
    """One endpoint's breaker. `opens` counts opens since the last close (the backoff exponent)."""

    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    opens: int = 0
    open_until: float = 0.0
    backoff_s: float = 0.0


def compute_backoff(opens: int, policy: BreakerPolicy, jitter: float) -> float:
    """Backoff after the `opens`-th open (0-based): jitter * min(cap, base * 2**opens).

    `jitter` is a draw from [0, 1); the caller owns the random source so tests are exact.
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * 2.0 ** min(opens, _MAX_EXPONENT))
    return jitter * ceiling


def breaker_due(breaker: Breaker, now: float) -> bool:
    """Whether a request may be sent now: closed, half-open, or open with the backoff passed."""
    return breaker.state != BreakerState.OPEN or now >= breaker.open_until


def breaker_before_request(breaker: Breaker, now: float) -> Breaker:
    """An open breaker whose backoff has passed lets one probe through: it turns half-open."""
    if breaker.state == BreakerState.OPEN and now >= breaker.open_until:
        return replace(breaker, state=BreakerState.HALF_OPEN)
    return breaker


def breaker_on_success(breaker: Breaker) -> Breaker:
    """Any success closes the breaker and resets the failure count and the backoff."""
    return Breaker()


def breaker_on_failure(
    breaker: Breaker, now: float, policy: BreakerPolicy, jitter: Callable[[], float]
) -> Breaker:
    """Count a failure; open (or re-open, with the next backoff) when the rule says so.

    `jitter` is called once, only when the breaker opens, so a test's sequence of draws maps
    one to one onto the opens.
    """
    failures = breaker.consecutive_failures + 1
    if breaker.state == BreakerState.HALF_OPEN:
        opens = breaker.opens + 1
    elif breaker.state == BreakerState.CLOSED and failures >= policy.failure_threshold:
        opens = 0
    else:
        return replace(breaker, consecutive_failures=failures)
    backoff = compute_backoff(opens, policy, jitter())
    return Breaker(
        state=BreakerState.OPEN,
        consecutive_failures=failures,
        opens=opens,
        open_until=now + backoff,
        backoff_s=backoff,
    )
