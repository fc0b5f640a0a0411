"""The autoscaler's decision: how many replicas the load asks for, smoothed by the windows.

Pure: the load figures, the current count, the bounds and the recent recommendations in; the
desired count, the reason and the new history out. The loop that scrapes the replicas and writes
spec.replicas through the scale subresource lives elsewhere (docs/operator.md, Autoscaling).

The load of a model is the engines' running plus waiting requests summed over the replicas that
answered with fresh figures, plus the requests the gateway holds for a model that has no replica
to send them to. What the target implies is ceil(load / target); the windows then smooth it the
way the Horizontal Pod Autoscaler's stabilization does: a scale-up goes only as far as the lowest
recommendation within the scale-up window, a scale-down only as far as the highest within the
scale-down window, so a short dip or spike changes nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from modelfleet.api.units import parse_duration
from modelfleet.api.v1alpha1 import DEFAULT_BATCH_CAPACITY, ModelDeploymentSpec

DEFAULT_SCALE_UP_WINDOW = "0s"
DEFAULT_SCALE_DOWN_WINDOW = "5m"
# Load within this fraction of what the current replicas should carry changes nothing: a count
# that sits on a boundary (41 requests at target 16 over 3 replicas) must not flap.
TOLERANCE = 0.1

_MAX_NUM_SEQS = re.compile(r"^--max-num-seqs(?:=(\d+))?$")


@dataclass(frozen=True, slots=True)
class Policy:
    """The bounds and windows of one model, resolved from its spec."""

    min_replicas: int
    max_replicas: int
    target: int
    scale_up_window: float
    scale_down_window: float

    @classmethod
    def from_spec(cls, spec: ModelDeploymentSpec) -> Policy:
        auto = spec.autoscaling
        low = max(auto.min_replicas, spec.min_replicas)
        high = auto.max_replicas if auto.max_replicas is not None else max(low, spec.replicas)
        return cls(
            min_replicas=low,
            max_replicas=max(low, high),
            target=auto.target_per_replica or batch_capacity(spec.engine.args),
            scale_up_window=parse_duration(auto.scale_up_window or DEFAULT_SCALE_UP_WINDOW),
            scale_down_window=parse_duration(auto.scale_down_window or DEFAULT_SCALE_DOWN_WINDOW),
        )


def batch_capacity(args: Sequence[str]) -> int:
    """The engine's --max-num-seqs from its arguments, else vLLM's default."""
    for i, arg in enumerate(args):
        match = _MAX_NUM_SEQS.match(arg)
        if not match:
            continue
        value = match.group(1) or (args[i + 1] if i + 1 < len(args) else "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return DEFAULT_BATCH_CAPACITY


@dataclass(frozen=True, slots=True)
class Signal:
    """One round's load figures of one model."""

    running: float = 0.0  # summed over the replicas that reported fresh figures
    waiting: float = 0.0
    reporting: int = 0  # replicas whose figures are fresh
    held: int = 0  # requests the gateway holds for the model (it has no replica to take them)

    @property
    def load(self) -> float:
        return self.running + self.waiting + self.held

    @property
    def known(self) -> bool:
        return self.reporting > 0 or self.held > 0


@dataclass(frozen=True, slots=True)
class Recommendation:
    at: float  # seconds on a monotonic clock
    replicas: int


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    wanted: int  # what the load implies this round, within the bounds, before the windows
    reason: str
    history: tuple[Recommendation, ...]


def _plural(n: float, word: str) -> str:
    count = f"{n:g}"
    return f"{count} {word}" if n == 1 else f"{count} {word}s"


def _describe(signal: Signal, current: int, target: int) -> str:
    parts = []
    if signal.waiting:
        parts.append(f"{_plural(signal.waiting, 'request')} waiting")
    if signal.running:
        parts.append(f"{_plural(signal.running, 'request')} running")
    if signal.held:
        parts.append(f"{_plural(signal.held, 'request')} held by the gateway")
    load = " and ".join(parts) if parts else "no requests"
    return f"{load} over {_plural(current, 'replica')}, target {target}"


def implied(signal: Signal, current: int, policy: Policy) -> int:
    """The count the load implies, within the bounds, before the windows."""
    load = signal.load
    if current > 0 and signal.reporting > 0:
        per_replica = load / (current * policy.target)
        if abs(per_replica - 1.0) <= TOLERANCE:
            return min(policy.max_replicas, max(policy.min_replicas, current))
    want = math.ceil(load / policy.target) if load > 0 else 0
    return min(policy.max_replicas, max(policy.min_replicas, want))


def decide(
    *,
    signal: Signal,
    current: int,
    policy: Policy,
    history: Sequence[Recommendation],
    now: float,
) -> Decision:
    """The replicas to run: what the load implies, held back by the windows and the bounds.

    `current` is spec.replicas; `history` the recommendations of earlier rounds (the returned
    decision carries the new one, pruned to the longer window). Without fresh figures nothing
    changes except a count outside the bounds, which is brought back within them.
    """
    keep = max(policy.scale_up_window, policy.scale_down_window)
    past = tuple(r for r in history if now - r.at <= keep)
    bounded = min(policy.max_replicas, max(policy.min_replicas, current))
    if not signal.known:
        reason = (
            f"keeping {_plural(bounded, 'replica')}: no fresh engine figures"
            if bounded == current
            else f"scaling to {bounded}: outside the bounds "
            f"{policy.min_replicas}..{policy.max_replicas}"
        )
        return Decision(bounded, bounded, reason, past)
    wanted = implied(signal, current, policy)
    history_out = (*past, Recommendation(now, wanted))
    what = _describe(signal, current, policy.target)
    if wanted > current:
        recent = [r.replicas for r in history_out if now - r.at <= policy.scale_up_window]
        desired = max(current, min(recent))
        if desired > current:
            reason = f"scaling up: {what}"
        else:
            reason = (
                f"holding at {current} for the scale-up window "
                f"({policy.scale_up_window:g}s): {what}"
            )
    elif wanted < current:
        recent = [r.replicas for r in history_out if now - r.at <= policy.scale_down_window]
        desired = min(current, max(recent))
        if desired < current:
            reason = f"scaling down: {what}"
        else:
            reason = (
                f"holding at {current} for the scale-down window "
                f"({policy.scale_down_window:g}s): {what}"
            )
    else:
        desired = current
        reason = f"steady: {what}"
    clamped = min(policy.max_replicas, max(policy.min_replicas, desired))
    if clamped != desired:
        reason = (
            f"scaling to {clamped}: outside the bounds {policy.min_replicas}..{policy.max_replicas}"
        )
    elif wanted == policy.max_replicas and desired == current == policy.max_replicas:
        reason = f"at maxReplicas={policy.max_replicas}: {what}"
    return Decision(clamped, wanted, reason, history_out)
