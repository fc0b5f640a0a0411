"""Per-endpoint health: the record the pool keeps, and the pure rules that turn it into a state.

States, in the order the rules test them:

- down: the breaker is open or half-open (`failure_threshold` consecutive failed rounds);
- stale: no good reply for `STALE_AFTER_INTERVALS` poll intervals (or none yet), or the agent
  keeps answering with the same sample (its `sampledAt` has not changed) for
  `STALE_AFTER_INTERVALS` x max(the agent's poll interval, the pool's): a stuck poll loop;
- degraded: the last round failed, or fewer than `DEGRADED_SUCCESS_RATE` of recent rounds
  succeeded, but the last good sample is still fresh and is used;
- healthy: otherwise.

Down and stale endpoints are excluded from the pool's totals and from placement.

Sample freshness is judged on the pool's own monotonic clock: the time since the agent's
`sampledAt` last changed, compared with that agent's earlier samples only. Its value is never
compared with the pool's wall clock, since nodes' clocks can be skewed; any change counts as a new
sample, so an agent whose clock steps back (or that restarts) is not taken for a stuck one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from modelfleet.api.times import format_time
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


def compute_sample_stale_after(
    poll_interval_s: float, agent_poll_interval_s: float | None
) -> float:
    """Seconds an unchanged sample stays fresh: 3 x the slower of the agent's and the pool's poll.

    An agent that samples less often than the pool polls legitimately repeats its sample.
    """
    return STALE_AFTER_INTERVALS * max(poll_interval_s, agent_poll_interval_s or 0.0)


def compute_state(
    *,
    breaker: BreakerState,
    consecutive_failures: int,
    last_success: float | None,
    success_rate: float | None,
    now: float,
    poll_interval_s: float,
    sample_changed: float | None = None,
    agent_poll_interval_s: float | None = None,
) -> EndpointState:
    """The endpoint state from its record.

    `now`, `last_success` (last good reply) and `sample_changed` (when the agent's `sampledAt`
    last changed) are on the same monotonic clock, the pool's.
    """
    if breaker != BreakerState.CLOSED:
        return EndpointState.DOWN
    if last_success is None or now - last_success >= STALE_AFTER_INTERVALS * poll_interval_s:
        return EndpointState.STALE
    if sample_changed is not None and now - sample_changed >= compute_sample_stale_after(
        poll_interval_s, agent_poll_interval_s
    ):
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
    sampled_at: datetime | None = None  # the agent's, as reported; compared only with itself
    sample_changed: float | None = None  # monotonic, when `sampled_at` last changed
    agent_poll_interval_s: float | None = None

    def record_success(self, now: float, wall: float, latency_s: float) -> None:
        self.last_success = now
        self.last_success_wall = wall
        self.last_attempt = now
        self.last_error = ""
        self.latency_ewma_s = compute_ewma(self.latency_ewma_s, latency_s)
        self.latencies.append(latency_s)
        self.outcomes.append(True)

    def record_sample(self, now: float, sampled_at: datetime, agent_poll_interval_s: float) -> None:
        """Note the `sampledAt` of an accepted reply; a different value is a new sample."""
        # != rather than >: a clock stepped back still gives new samples, and a naive and an
        # aware datetime compare unequal instead of raising.
        if sampled_at != self.sampled_at:
            self.sampled_at = sampled_at
            self.sample_changed = now
        self.agent_poll_interval_s = agent_poll_interval_s

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
            sample_changed=self.sample_changed,
            agent_poll_interval_s=self.agent_poll_interval_s,
        )

    def stale_sample_reason(self, now: float, poll_interval_s: float) -> str:
        """Why the sample counts as stale (its age on the pool's clock), or "" when it does not."""
        if self.sample_changed is None or self.sampled_at is None:
            return ""
        age = now - self.sample_changed
        limit = compute_sample_stale_after(poll_interval_s, self.agent_poll_interval_s)
        if age < limit:
            return ""
        interval = max(poll_interval_s, self.agent_poll_interval_s or 0.0)
        sampled_at = format_time(self.sampled_at)
        return (
            f"the agent's sample has not changed for {age:.0f} s (sampledAt {sampled_at}; "
            f"stale after {limit:g} s = {STALE_AFTER_INTERVALS} x "
            f"{interval:g} s poll interval): its poll loop may be stuck; check the agent's log "
            "and modelfleet_agent_poll_errors_total"
        )
