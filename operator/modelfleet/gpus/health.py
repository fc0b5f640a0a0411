"""Per-endpoint health: the record the pool keeps, and the pure rules that turn it into a state.

States, in the order the rules test them:

- down: the breaker is open or half-open (`failure_threshold` consecutive failed rounds);
- stale: no good sample for `STALE_AFTER_INTERVALS` poll intervals (or none yet);
- degraded: the last round failed, or fewer than `DEGRADED_SUCCESS_RATE` of recent rounds
  succeeded, but the last good sample is still fresh and is used;
- healthy: otherwise.

Down and stale endpoints are excluded from the pool's totals and from placement.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from modelfleet.gpus.breaker import Breaker, BreakerState

STALE_AFTER_INTERVALS = 3
#: Rounds kept for the success rate and the latency p95.
WINDOW = 20
#: Weight of the newest sample in the latency moving average.
EWMA_ALPHA = 0.3
DEGRADED_SUCCESS_RATE = 0.9


class EndpointState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    STALE = "stale"

    @property
    def usable(self) -> bool:
        """Whether the endpoint's GPUs count in the pool and may take replicas."""
        return self in (EndpointState.HEALTHY, EndpointState.DEGRADED)


def compute_ewma(previous: float | None, sample: float, alpha: float = EWMA_ALPHA) -> float:
    return sample if previous is None else alpha * sample + (1.0 - alpha) * previous


def compute_p95(samples: Sequence[float]) -> float | None:
    """95th percentile by the nearest-rank method; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return ordered[rank - 1]


def compute_state(
    *,
    breaker: BreakerState,
    consecutive_failures: int,
    last_success: float | None,
    success_rate: float | None,
    now: float,
    poll_interval_s: float,
) -> EndpointState:
    """The endpoint state from its record; `now` and `last_success` on the same monotonic clock."""
    if breaker != BreakerState.CLOSED:
        return EndpointState.DOWN
    if last_success is None or now - last_success >= STALE_AFTER_INTERVALS * poll_interval_s:
        return EndpointState.STALE
    if consecutive_failures > 0 or (
        success_rate is not None and success_rate < DEGRADED_SUCCESS_RATE
    ):
        return EndpointState.DEGRADED
    return EndpointState.HEALTHY


@dataclass
class HealthRecord:
    """What the pool remembers about one endpoint between rounds (mutated only by the pool)."""

    breaker: Breaker = field(default_factory=Breaker)
    last_success: float | None = None  # monotonic
    last_success_wall: float | None = None  # epoch seconds, for people
    last_attempt: float | None = None
    last_error: str = ""
    latency_ewma_s: float | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=WINDOW))
    requests: int = 0

    def record_success(self, now: float, wall: float, latency_s: float) -> None:
        self.last_success = now
        self.last_success_wall = wall
        self.last_attempt = now
        self.last_error = ""
        self.latency_ewma_s = compute_ewma(self.latency_ewma_s, latency_s)
        self.latencies.append(latency_s)
        self.outcomes.append(True)

    def record_failure(self, now: float, reason: str) -> None:
        self.last_attempt = now
        self.last_error = reason
        self.outcomes.append(False)

    @property
    def success_rate(self) -> float | None:
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else None

    @property
    def latency_p95_s(self) -> float | None:
        return compute_p95(self.latencies)

    def state(self, now: float, poll_interval_s: float) -> EndpointState:
        return compute_state(
            breaker=self.breaker.state,
            consecutive_failures=self.breaker.consecutive_failures,
            last_success=self.last_success,
            success_rate=self.success_rate,
            now=now,
            poll_interval_s=poll_interval_s,
        )
