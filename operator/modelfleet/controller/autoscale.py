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

A count the autoscaler already raised but that is not placed yet (the reconcile's status says
placement is blocked, or it has not acted on the new count) holds any further scale-up: a model
that cannot grow says so (`compute_autoscaling_status`, condition ScalingLimited) instead of
asking for ever more replicas that cannot run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from modelfleet.api.units import parse_duration
from modelfleet.api.v1alpha1 import (
    DEFAULT_BATCH_CAPACITY,
    AutoscalingSignal,
    AutoscalingStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    ModelDeployment,
    ModelDeploymentSpec,
)
from modelfleet.controller.plan import EventSpec

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
class Unplaced:
    """Replicas spec.replicas asks for that do not exist yet, and why, from the reconcile's status.

    `reason` is the placement's CamelCase reason (NoCapacity, NoMatchingNode, Evicted, ...), or
    empty while the reconcile has not yet acted on the count (the status describes an older
    generation).
    """

    count: int
    reason: str = ""
    message: str = ""

    @property
    def blocked(self) -> bool:
        return bool(self.reason)


# The Progressing reason of a reconcile that has nothing left to do.
_COMPLETE = "Complete"


def compute_unplaced(md: ModelDeployment) -> Unplaced | None:
    """What of spec.replicas is still unplaced, read from the status the reconcile wrote."""
    status, want = md.status, md.spec.replicas
    missing = want - status.replicas
    if missing <= 0:
        return None
    if status.observed_generation != md.metadata.generation:
        return Unplaced(missing)
    for cond in status.conditions:
        if (
            cond.type == ConditionType.PROGRESSING
            and cond.status == ConditionStatus.FALSE
            and cond.reason not in ("", _COMPLETE)
        ):
            return Unplaced(missing, cond.reason, cond.message)
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    wanted: int  # what the load implies this round, within the bounds, before the windows
    reason: str
    history: tuple[Recommendation, ...]
    held_back: bool = False  # a scale-up waits for replicas already asked for to be placed


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
    unplaced: Unplaced | None = None,
) -> Decision:
    """The replicas to run: what the load implies, held back by the windows and the bounds.

    `current` is spec.replicas; `history` the recommendations of earlier rounds (the returned
    decision carries the new one, pruned to the longer window). Without fresh figures nothing
    changes except a count outside the bounds, which is brought back within them. While
    `unplaced` replicas of the current count wait for placement, the count does not go up.
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
    held_back = False
    if unplaced is not None and desired > current:
        held_back, desired = True, current
        why = (
            f"placement says {unplaced.reason}: {unplaced.message}"
            if unplaced.blocked
            else "the operator has not acted on the count yet"
        )
        reason = (
            f"limited at {current}: {what}; {_plural(unplaced.count, 'replica')} already asked "
            f"for not placed ({why})"
        )
    clamped = min(policy.max_replicas, max(policy.min_replicas, desired))
    if clamped != desired:
        reason = (
            f"scaling to {clamped}: outside the bounds {policy.min_replicas}..{policy.max_replicas}"
        )
    elif wanted == policy.max_replicas and desired == current == policy.max_replicas:
        reason = f"at maxReplicas={policy.max_replicas}: {what}"
    return Decision(clamped, wanted, reason, history_out, held_back)


def compute_signal_status(signal: Signal, policy: Policy) -> AutoscalingSignal:
    return AutoscalingSignal(
        running=signal.running,
        waiting=signal.waiting,
        held=signal.held,
        replicas_measured=signal.reporting,
        target=policy.target,
    )


def _limited_condition(
    decision: Decision, signal: Signal, policy: Policy, unplaced: Unplaced | None, current: int
) -> Condition:
    kind = ConditionType.SCALING_LIMITED.value
    if unplaced is not None and unplaced.blocked:
        return Condition(
            type=kind,
            status=ConditionStatus.TRUE,
            reason=unplaced.reason,
            message=(
                f"{unplaced.count} of {current} replicas cannot be placed: {unplaced.message}; "
                "the autoscaler does not raise spec.replicas until they are"
            ),
        )
    asks = math.ceil(signal.load / policy.target) if signal.known and signal.load > 0 else 0
    if asks > policy.max_replicas and decision.desired == policy.max_replicas:
        return Condition(
            type=kind,
            status=ConditionStatus.TRUE,
            reason="TooManyReplicas",
            message=(
                f"the load asks for {asks} replicas; spec.autoscaling.maxReplicas is "
                f"{policy.max_replicas}"
            ),
        )
    return Condition(
        type=kind,
        status=ConditionStatus.FALSE,
        reason="DesiredWithinRange",
        message="the desired count is within the bounds and placed",
    )


def compute_autoscaling_status(
    *,
    decision: Decision,
    signal: Signal,
    policy: Policy,
    current: int,
    unplaced: Unplaced | None,
    previous: AutoscalingStatus | None,
    now: datetime,
    scaled: bool,
) -> AutoscalingStatus:
    """status.autoscaling after one round; `scaled`: spec.replicas was written this round.

    A condition keeps its lastTransitionTime while its status stays the same.
    """
    stamp = now.replace(microsecond=0)
    cond = _limited_condition(decision, signal, policy, unplaced, current)
    before = next(
        (c for c in (previous.conditions if previous else ()) if c.type == cond.type), None
    )
    since = (
        before.last_transition_time
        if before is not None and before.status == cond.status and before.last_transition_time
        else stamp
    )
    last_scale = stamp if scaled else (previous.last_scale_time if previous else None)
    return AutoscalingStatus(
        desired_replicas=decision.desired,
        signal=compute_signal_status(signal, policy),
        reason=decision.reason,
        last_scale_time=last_scale,
        conditions=[cond.model_copy(update={"last_transition_time": since})],
    )


def compute_limited_event(
    md: ModelDeployment, new: AutoscalingStatus, previous: AutoscalingStatus | None
) -> EventSpec | None:
    """A Warning when the count becomes limited by placement (once per change of reason, not per
    round: the status read back says whether it was already reported)."""
    cond = next((c for c in new.conditions if c.type == ConditionType.SCALING_LIMITED), None)
    if cond is None or cond.status != ConditionStatus.TRUE or cond.reason == "TooManyReplicas":
        return None
    for old in previous.conditions if previous else ():
        if old.type == cond.type and old.status == cond.status and old.reason == cond.reason:
            return None
    namespace, name = md.metadata.namespace or "", md.metadata.name
    return EventSpec(namespace, name, "Warning", ConditionType.SCALING_LIMITED.value, cond.message)
