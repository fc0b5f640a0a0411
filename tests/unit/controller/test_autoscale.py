"""The autoscaler's decision as a pure function: named cases of the windows, bounds and zero."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from modelfleet.api.v1alpha1 import (
    DEFAULT_BATCH_CAPACITY,
    AutoscalingStatus,
    ModelDeployment,
    ModelDeploymentSpec,
)
from modelfleet.controller.autoscale import (
    Decision,
    Policy,
    Recommendation,
    Signal,
    Unplaced,
    batch_capacity,
    compute_autoscaling_status,
    compute_limited_event,
    compute_unplaced,
    decide,
)

POLICY = Policy(
    min_replicas=1, max_replicas=8, target=16, scale_up_window=0.0, scale_down_window=300.0
)


def _run(
    loads: Sequence[tuple[float, float]],
    current: int,
    policy: Policy = POLICY,
    *,
    reporting: int | None = None,
) -> list[Decision]:
    """Feed (time, waiting) rounds through decide, applying each decision as the operator does."""
    history: tuple[Recommendation, ...] = ()
    out = []
    for now, waiting in loads:
        signal = Signal(waiting=waiting, reporting=current if reporting is None else reporting)
        decision = decide(signal=signal, current=current, policy=policy, history=history, now=now)
        out.append(decision)
        history = decision.history
        current = decision.desired
    return out


def test_step_up_goes_at_once_to_what_the_target_implies() -> None:
    decision = decide(
        signal=Signal(waiting=41, running=32, reporting=2),
        current=2,
        policy=POLICY,
        history=(),
        now=0.0,
    )
    assert decision.desired == 5  # ceil(73 / 16)
    assert decision.reason == (
        "scaling up: 41 requests waiting and 32 requests running over 2 replicas, target 16"
    )


def test_stabilization_scale_up_window_takes_the_lowest_recent_recommendation() -> None:
    policy = Policy(1, 8, 16, scale_up_window=30.0, scale_down_window=300.0)
    # A one-round spike to 100 requests over 1 replica does not scale while the window still
    # holds the quiet rounds before it.
    decisions = _run([(0, 10), (10, 10), (20, 100)], current=1, policy=policy)
    assert [d.desired for d in decisions] == [1, 1, 1]
    assert decisions[-1].reason.startswith("holding at 1 for the scale-up window (30s)")
    # Load that stays high past the window does scale.
    decisions = _run([(0, 10), (20, 100), (35, 100)], current=1, policy=policy)
    assert [d.desired for d in decisions] == [1, 1, 7]


def test_scale_down_window_waits_for_the_highest_recent_recommendation_to_age_out() -> None:
    rounds = [(0, 64), (60, 0), (200, 0), (299, 0), (301, 0)]
    decisions = _run(rounds, current=4)
    assert [d.desired for d in decisions] == [4, 4, 4, 4, 1]
    assert decisions[1].reason.startswith("holding at 4 for the scale-down window (300s)")
    assert decisions[-1].reason.startswith("scaling down: no requests over 4 replicas")


def test_scale_down_goes_in_steps_as_the_window_allows() -> None:
    # Load falls from 8 replicas' worth to 2; each recommendation ages out in turn.
    rounds = [(0, 128), (100, 64), (200, 32), (401, 32)]
    decisions = _run(rounds, current=8)
    assert [d.desired for d in decisions] == [8, 8, 8, 2]


def test_bounds_hold_above_and_below() -> None:
    up = decide(
        signal=Signal(waiting=1000, reporting=8), current=8, policy=POLICY, history=(), now=0
    )
    assert up.desired == 8
    assert up.reason.startswith("at maxReplicas=8")
    policy = Policy(2, 8, 16, 0.0, 0.0)
    down = decide(signal=Signal(reporting=3), current=3, policy=policy, history=(), now=0)
    assert down.desired == 2
    # A count written outside the bounds is brought back, with or without figures.
    outside = decide(signal=Signal(), current=12, policy=POLICY, history=(), now=0)
    assert (outside.desired, outside.reason) == (8, "scaling to 8: outside the bounds 1..8")


def test_zero_replicas_wake_on_the_gateways_held_requests() -> None:
    decision = decide(signal=Signal(held=40), current=0, policy=POLICY, history=(), now=0)
    assert decision.desired == 3  # ceil(40 / 16)
    assert decision.reason == (
        "scaling up: 40 requests held by the gateway over 0 replicas, target 16"
    )


def test_no_fresh_figures_change_nothing() -> None:
    decision = decide(signal=Signal(), current=3, policy=POLICY, history=(), now=0)
    assert decision.desired == 3
    assert decision.reason == "keeping 3 replicas: no fresh engine figures"


def test_no_flapping_under_steady_load_on_a_boundary() -> None:
    # 48 requests over 3 replicas at target 16 sits exactly on the boundary; noise of a few
    # requests either way must not move the count, round after round.
    noise = [48, 50, 46, 52, 44, 49, 47, 51, 45, 48] * 10
    decisions = _run([(i * 5.0, load) for i, load in enumerate(noise)], current=3)
    assert {d.desired for d in decisions} == {3}
    assert all(d.reason.startswith("steady") for d in decisions)


def test_history_is_pruned_to_the_longer_window() -> None:
    decisions = _run([(t * 60.0, 16) for t in range(20)], current=1)
    assert all(now - r.at <= 300 for r in decisions[-1].history for now in [19 * 60.0])
    assert len(decisions[-1].history) == 6


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], DEFAULT_BATCH_CAPACITY),
        (["--max-num-seqs", "64"], 64),
        (["--enforce-eager", "--max-num-seqs=32"], 32),
        (["--max-num-seqs"], DEFAULT_BATCH_CAPACITY),
        (["--max-num-seqs", "many"], DEFAULT_BATCH_CAPACITY),
    ],
)
def test_target_defaults_to_the_engines_batch_capacity(args: list[str], expected: int) -> None:
    assert batch_capacity(args) == expected


def test_policy_from_spec_keeps_the_eviction_floor_and_defaults() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": "m",
            "replicas": 2,
            "minReplicas": 2,
            "engine": {"args": ["--max-num-seqs", "48"]},
            "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        }
    )
    policy = Policy.from_spec(spec)
    assert policy == Policy(2, 6, 48, scale_up_window=0.0, scale_down_window=300.0)


# --- a model that cannot grow ----------------------------------------------------------------

NO_ROOM = Unplaced(2, "NoCapacity", "no node has a free GPU; nothing lower may be evicted")


def test_limited_by_placement_the_count_does_not_climb() -> None:
    decision = decide(
        signal=Signal(waiting=60, running=32, reporting=2),
        current=4,
        policy=POLICY,
        history=(),
        now=0.0,
        unplaced=NO_ROOM,
    )
    assert decision.desired == 4
    assert decision.held_back
    assert decision.wanted == 6  # what it would ask for: recorded for the windows all the same
    assert decision.reason == (
        "limited at 4: 60 requests waiting and 32 requests running over 4 replicas, target 16; "
        "2 replicas already asked for not placed (placement says NoCapacity: no node has a free "
        "GPU; nothing lower may be evicted)"
    )


def test_a_count_not_yet_acted_on_holds_a_further_scale_up() -> None:
    decision = decide(
        signal=Signal(waiting=100, reporting=1),
        current=3,
        policy=POLICY,
        history=(),
        now=0.0,
        unplaced=Unplaced(2),
    )
    assert decision.desired == 3
    assert decision.reason.endswith("(the operator has not acted on the count yet)")


def test_limited_a_scale_down_still_goes_through() -> None:
    policy = Policy(1, 8, 16, scale_up_window=0.0, scale_down_window=0.0)
    decision = decide(
        signal=Signal(running=10, reporting=2),
        current=4,
        policy=policy,
        history=(),
        now=0.0,
        unplaced=NO_ROOM,
    )
    assert (decision.desired, decision.held_back) == (1, False)
    assert decision.reason.startswith("scaling down")


def _md(
    *,
    replicas: int,
    generation: int = 3,
    observed: int = 3,
    existing: int = 2,
    progressing: tuple[str, str, str] = ("False", "NoCapacity", "no room"),
    autoscaling: dict[str, Any] | None = None,
) -> ModelDeployment:
    status, reason, message = progressing
    return ModelDeployment.model_validate(
        {
            "metadata": {"name": "chat", "namespace": "ns", "generation": generation},
            "spec": {
                "model": "org/chat",
                "replicas": replicas,
                "autoscaling": {"enabled": True, "maxReplicas": 8},
            },
            "status": {
                "replicas": existing,
                "observedGeneration": observed,
                "conditions": [
                    {"type": "Progressing", "status": status, "reason": reason, "message": message}
                ],
                **({"autoscaling": autoscaling} if autoscaling else {}),
            },
        }
    )


@pytest.mark.parametrize(
    ("md", "expected"),
    [
        pytest.param(_md(replicas=4), Unplaced(2, "NoCapacity", "no room"), id="blocked"),
        pytest.param(_md(replicas=2), None, id="all-placed"),
        pytest.param(_md(replicas=4, generation=4), Unplaced(2), id="not-yet-acted-on"),
        pytest.param(
            _md(replicas=4, progressing=("True", "ScalingUp", "2/4 replicas exist")),
            None,
            id="placing",
        ),
        pytest.param(
            _md(replicas=4, existing=0, progressing=("False", "Complete", "0/0 replicas ready")),
            None,
            id="idle-at-zero",
        ),
    ],
)
def test_unplaced_is_read_from_the_reconciles_status(
    md: ModelDeployment, expected: Unplaced | None
) -> None:
    assert compute_unplaced(md) == expected


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _status(
    decision: Decision,
    signal: Signal,
    *,
    current: int,
    unplaced: Unplaced | None = None,
    previous: AutoscalingStatus | None = None,
    now: datetime = NOW,
    scaled: bool = False,
) -> AutoscalingStatus:
    return compute_autoscaling_status(
        decision=decision,
        signal=signal,
        policy=POLICY,
        current=current,
        unplaced=unplaced,
        previous=previous,
        now=now,
        scaled=scaled,
    )


def test_status_carries_the_decision_its_figures_and_the_last_scale() -> None:
    signal = Signal(waiting=41, running=32, reporting=2)
    decision = decide(signal=signal, current=2, policy=POLICY, history=(), now=0.0)
    status = _status(decision, signal, current=2, scaled=True)
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["desiredReplicas"] == 5
    assert dumped["signal"] == {
        "running": 32,
        "waiting": 41,
        "held": 0,
        "replicasMeasured": 2,
        "target": 16,
    }
    assert dumped["reason"] == (
        "scaling up: 41 requests waiting and 32 requests running over 2 replicas, target 16"
    )
    assert dumped["lastScaleTime"] == "2026-01-02T03:04:05Z"
    [cond] = dumped["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == (
        "ScalingLimited",
        "False",
        "DesiredWithinRange",
    )
    # A later round that does not scale keeps the last scale time and the transition time.
    later = _status(decision, signal, current=5, previous=status, now=NOW + timedelta(minutes=1))
    assert later.last_scale_time == status.last_scale_time
    assert later.conditions[0].last_transition_time == status.conditions[0].last_transition_time


def test_status_says_limited_by_placement_and_the_event_comes_once() -> None:
    signal = Signal(waiting=60, running=32, reporting=2)
    decision = decide(
        signal=signal, current=4, policy=POLICY, history=(), now=0.0, unplaced=NO_ROOM
    )
    md = _md(replicas=4)
    status = _status(decision, signal, current=4, unplaced=NO_ROOM)
    [cond] = status.conditions
    assert (cond.status, cond.reason) == ("True", "NoCapacity")
    assert cond.message == (
        "2 of 4 replicas cannot be placed: no node has a free GPU; nothing lower may be "
        "evicted; the autoscaler does not raise spec.replicas until they are"
    )
    event = compute_limited_event(md, status, None)
    assert event is not None
    assert (event.type, event.reason, event.message) == ("Warning", "ScalingLimited", cond.message)
    # The next round reads its own status back: same reason, no second Event.
    again = _status(decision, signal, current=4, unplaced=NO_ROOM, previous=status)
    assert compute_limited_event(md, again, status) is None
    assert again.conditions[0].last_transition_time == cond.last_transition_time


def test_status_says_limited_by_max_replicas_without_an_event() -> None:
    signal = Signal(waiting=1000, reporting=8)
    decision = decide(signal=signal, current=8, policy=POLICY, history=(), now=0.0)
    status = _status(decision, signal, current=8)
    [cond] = status.conditions
    assert (cond.status, cond.reason) == ("True", "TooManyReplicas")
    assert cond.message == ("the load asks for 63 replicas; spec.autoscaling.maxReplicas is 8")
    assert compute_limited_event(_md(replicas=8), status, None) is None


def test_held_requests_at_zero_are_shown_and_bounded_by_max() -> None:
    signal = Signal(held=400)
    decision = decide(signal=signal, current=1, policy=POLICY, history=(), now=0.0)
    assert decision.desired == 8  # ceil(400 / 16) = 25, within maxReplicas 8
    status = _status(decision, signal, current=1, scaled=True)
    assert status.signal.held == 400
    assert status.signal.replicas_measured == 0
