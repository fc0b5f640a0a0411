"""Named pure cases for consolidation in the operator's plan.

`place`: when a replica finds no room, a consolidation is tried before an eviction; with no
moves possible (budget spent, floors, nothing fits elsewhere) eviction stays the fallback, or
the replica waits. `compute_plan` of a moved deployment: the old replica goes only once its copy
is Ready; a copy that misses its deadline goes instead. The planner's own rules (fewest moves,
floors, budgets) are in tests/unit/placement/test_consolidation.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from controller_helpers import IMAGE, NOW, FreeGpus, make_md, nodes, pod

from modelfleet.api import ModelDeployment
from modelfleet.api import labels as L
from modelfleet.controller.builders import PodDefaults
from modelfleet.controller.consolidate import (
    compute_free_ordinals,
    compute_move_budgets,
    compute_moves_under_way,
)
from modelfleet.controller.decisions import (
    Consolidate,
    Evict,
    Move,
    Placed,
    PlacementRequest,
    Unplaceable,
    Victim,
)
from modelfleet.controller.observed import ObservedPod
from modelfleet.controller.place import Consolidating, compute_eviction_mark, place
from modelfleet.controller.plan import Plan, compute_plan
from modelfleet.placement import DeploymentRef

BIG = make_md("big", uid="uid-big", replicas=1, gpu={"count": 2}, priority=10)
SMALL = make_md("small", uid="uid-small", replicas=2, minReplicas=1)
DEPLOYMENTS = {("ns", "big"): BIG, ("ns", "small"): SMALL}
VICTIM = Victim("ns", "small-instance-1", "small")
MOVE = Move(
    "ns",
    "small",
    "uid-small",
    "small-instance-1",
    "pod-uid-small-1",
    3,
    Placed("node-b", ("node-b:1",), ("GPU-b1",), 81559, None, "node-b:1 is free"),
)
FOUND = Consolidate((MOVE,), "node-a", ("node-a:0", "node-a:1"), "moving 1 replica frees a")


class Scripted:
    """A consolidator that answers one thing and counts its calls."""

    def __init__(self, answer: Consolidate | Unplaceable) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self, request: PlacementRequest) -> Consolidate | Unplaceable:
        self.calls += 1
        return self.answer


def _place(
    decision: Evict | Unplaceable,
    consolidator: Scripted,
    *,
    md: ModelDeployment = BIG,
    under_way: tuple[ObservedPod, ...] = (),
    deleting: frozenset[tuple[str, str]] = frozenset(),
) -> Plan:
    plan = compute_plan(md, [], nodes("node-a", "node-b"), NOW, "h")
    return place(
        plan,
        md,
        FreeGpus([], otherwise=lambda r: decision),
        defaults=PodDefaults(image=IMAGE),
        now=NOW,
        deleting=deleting,
        mark=compute_eviction_mark(md),
        consolidating=Consolidating(consolidator, DEPLOYMENTS, under_way),
    )


NO_MOVES = Unplaceable("consolidation cannot help: no move budget left")


@pytest.mark.parametrize(
    ("case", "decision", "answer", "blocker", "victims", "copies"),
    [
        (
            "consolidation chosen over eviction",
            Evict((VICTIM,), "lru"),
            FOUND,
            "Consolidating",
            0,
            1,
        ),
        (
            "consolidation where nothing may be evicted",
            Unplaceable("full"),
            FOUND,
            "Consolidating",
            0,
            1,
        ),
        (
            "budget exhausted: eviction is the fallback",
            Evict((VICTIM,), "lru"),
            NO_MOVES,
            "Evicting",
            1,
            0,
        ),
        (
            "budget exhausted, nothing to evict: waits",
            Unplaceable("full"),
            NO_MOVES,
            "NoCapacity",
            0,
            0,
        ),
        (
            "floors leave no move and no eviction: waits",
            Unplaceable("every candidate is at its minReplicas"),
            Unplaceable("consolidation cannot help: every deployment at its floor"),
            "NoCapacity",
            0,
            0,
        ),
    ],
)
def test_place_tries_consolidation_before_eviction(
    case: str,
    decision: Evict | Unplaceable,
    answer: Consolidate | Unplaceable,
    blocker: str,
    victims: int,
    copies: int,
) -> None:
    consolidator = Scripted(answer)
    plan = _place(decision, consolidator)
    assert consolidator.calls == 1, case
    assert plan.blocker is not None, case
    assert plan.blocker.reason == blocker, case
    assert len(plan.victims) == victims, case
    got = plan.consolidation.copies if plan.consolidation is not None else ()
    assert len(got) == copies, case
    assert not plan.to_create, case


def test_a_copy_is_a_new_instance_that_names_the_replica_it_replaces() -> None:
    plan = _place(Evict((VICTIM,), "lru"), Scripted(FOUND))
    assert plan.consolidation is not None
    (copy,) = plan.consolidation.copies
    meta = copy.body["metadata"]
    assert meta["name"] == "small-instance-3"
    assert meta["namespace"] == "ns"
    assert meta["ownerReferences"][0]["uid"] == "uid-small"  # the moved deployment's replica
    ann = meta["annotations"]
    assert ann[L.ANN_MOVE_OF] == "small-instance-1"
    assert ann[L.ANN_MOVE_OF_UID] == "pod-uid-small-1"
    assert ann[L.ANN_MOVE_FOR] == "ns/big"
    assert ann[L.ANN_GPUS] == "node-b:1"
    assert copy.body["spec"]["nodeName"] == "node-b"
    assert copy.record.move_of == "small-instance-1"
    assert copy.record.move_deadline == NOW + timedelta(minutes=15)
    assert plan.consolidation.gpu_ids == ("node-a:0", "node-a:1")
    assert plan.consolidation.reserved_until > NOW + timedelta(minutes=15)
    # Events on both deployments: what moves, where, and for whom.
    by = {(e.deployment, e.reason): e.message for e in plan.events}
    assert "small-instance-1 to node-b" in by[("small", "Moved")]
    assert "ns/big" in by[("small", "Moved")]
    assert "consolidating for big-instance-1" in by[("big", "Consolidating")]
    assert not plan.to_delete  # the old replica is its own deployment's to delete, later


@pytest.mark.parametrize(
    ("case", "md", "decision", "under_way", "deleting", "blocker"),
    [
        (
            "moves under way are waited for, never repeated or evicted over",
            BIG,
            Evict((VICTIM,), "lru"),
            (
                replace(
                    pod(3, deployment="small", node="node-b"),
                    move_of="small-instance-1",
                    move_for="ns/big",
                ),
            ),
            frozenset(),
            "Consolidating",
        ),
        (
            "an eviction under way is waited for",
            BIG,
            Evict((VICTIM,), "lru"),
            (),
            frozenset({("ns", "small-instance-1")}),
            "Evicting",
        ),
        (
            "a Shared replica is never consolidated for",
            make_md("big", uid="uid-big", replicas=1, gpu={"sharing": "Shared", "memory": "20Gi"}),
            Unplaceable("full"),
            (),
            frozenset(),
            "NoCapacity",
        ),
        (
            "a replica waiting for stats is not consolidated for",
            BIG,
            Unplaceable("node-c is stale", "WaitingForStats"),
            (),
            frozenset(),
            "WaitingForStats",
        ),
    ],
)
def test_place_does_not_consolidate(
    case: str,
    md: ModelDeployment,
    decision: Evict | Unplaceable,
    under_way: tuple[ObservedPod, ...],
    deleting: frozenset[tuple[str, str]],
    blocker: str,
) -> None:
    consolidator = Scripted(FOUND)
    plan = _place(decision, consolidator, md=md, under_way=under_way, deleting=deleting)
    assert consolidator.calls == 0, case
    assert plan.consolidation is None, case
    assert plan.victims == [], case
    assert plan.blocker is not None, case
    assert plan.blocker.reason == blocker, case


def _copy(n: int = 3, *, ready: bool = False, **kw: Any) -> ObservedPod:
    base = pod(
        n, deployment="small", node="node-b", ready=ready, gpus=("node-b:1",), owner_uid="uid-small"
    )
    fields: dict[str, Any] = {
        "move_of": "small-instance-1",
        "move_of_uid": "pod-uid-small-1",
        "move_for": "ns/big",
        "moved_at": NOW - timedelta(minutes=1),
        "move_deadline": NOW + timedelta(minutes=14),
    }
    fields.update(kw)
    return replace(base, **fields)


OLD = pod(1, deployment="small", node="node-a", gpus=("node-a:0",), owner_uid="uid-small")
OTHER = pod(2, deployment="small", node="node-b", gpus=("node-b:0",), owner_uid="uid-small")


@pytest.mark.parametrize(
    ("case", "pods", "deleted", "to_place", "abandoned"),
    [
        (
            "a copy starting: the old one keeps serving, nothing is scaled down",
            [OLD, OTHER, _copy()],
            [],
            [],
            False,
        ),
        (
            "a copy Ready: the old one goes",
            [OLD, OTHER, _copy(ready=True)],
            [("small-instance-1", "Moved")],
            [],
            False,
        ),
        (
            "a copy past its deadline goes, the old one stays",
            [OLD, OTHER, _copy(move_deadline=NOW - timedelta(seconds=1))],
            [("small-instance-3", "MoveAbandoned")],
            [],
            True,
        ),
        (
            "a copy that crash-loops goes, the old one stays",
            [OLD, OTHER, _copy(waiting_reason="CrashLoopBackOff")],
            [("small-instance-3", "MoveAbandoned")],
            [],
            True,
        ),
        (
            "the old one gone: the copy is an ordinary replica",
            [OTHER, _copy(ready=True)],
            [],
            [],
            False,
        ),
        (
            "the old one's name taken by another incarnation: the copy is an ordinary replica",
            [replace(OLD, uid="someone-else"), OTHER, _copy(ready=True)],
            [("small-instance-3", "ScaleDown")],  # three replicas for two: the highest goes
            [],
            False,
        ),
    ],
)
def test_compute_plan_runs_a_move_make_before_break(
    case: str,
    pods: list[ObservedPod],
    deleted: list[tuple[str, str]],
    to_place: list[int],
    abandoned: bool,
) -> None:
    md = make_md("small", uid="uid-small", replicas=2, minReplicas=2)
    plan = compute_plan(md, pods, nodes("node-a", "node-b"), NOW, "current-hash")
    assert [(d.name, str(d.reason)) for d in plan.to_delete] == deleted, case
    assert plan.to_place == to_place, case
    assert (L.ANN_MOVE_ABANDONED_AT in plan.annotations) == abandoned, case
    if deleted and deleted[0][1] == "Moved":
        assert plan.to_delete[0].uid == "pod-uid-small-1"  # only the incarnation that was seen


def test_moves_under_way_are_copies_whose_old_replica_still_exists() -> None:
    copy = _copy()
    done = replace(_copy(4), move_of="small-instance-9")
    assert compute_moves_under_way([OLD, OTHER, copy, done]) == [copy]
    assert compute_moves_under_way([replace(OLD, deleting=True), copy]) == [copy]
    assert compute_moves_under_way([OTHER, copy]) == []


def test_move_budget_counts_copies_and_abandoned_moves_within_the_interval() -> None:
    hour = timedelta(hours=1)
    recent = _copy()
    old = replace(_copy(4), moved_at=NOW - 2 * hour)
    budgets = compute_move_budgets([OLD, recent, old], NOW, 2, hour)
    assert budgets == {DeploymentRef("ns", "small"): 1}
    abandoned = {("ns", "small"): NOW - timedelta(minutes=5), ("ns", "x"): NOW - 2 * hour}
    budgets = compute_move_budgets([recent], NOW, 2, hour, abandoned)
    assert budgets == {DeploymentRef("ns", "small"): 0}


def test_a_copy_takes_the_lowest_free_instance_number() -> None:
    assert compute_free_ordinals([OLD, OTHER], 2) == [3, 4]
    assert compute_free_ordinals([OTHER], 1) == [1]
