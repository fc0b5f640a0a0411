"""Consolidation through the operator, against a fake API: plan, copy, old Pod deleted once the
copy is Ready, the freed GPUs reserved for the blocked replica; restarts, deadlines, budgets.

The cluster: nodes a and b with 2 GPUs each; `small` serves one replica on a:0 and one on b:0,
so 2 GPUs are free but no node has 2 together. `big` wants 2 GPUs on one node.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from controller_helpers import report, snapshot
from fake_api import serve_fake_api
from test_reconcile import CREATED, NS, World

from modelfleet.api import labels as L
from modelfleet.api.times import format_time
from modelfleet.kube.paths import pods_path


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with serve_fake_api() as (fake, client):
        yield World(fake, client, snapshot(report("a", 2), report("b", 2)))


def _fragmented(world: World, *, floor: int = 2, small_priority: int = 0) -> None:
    small = world.add_md("small", replicas=2, minReplicas=floor, priority=small_priority)
    world.add_ready_pod(small, 1, ["a:0"])
    world.add_ready_pod(small, 2, ["b:0"])
    world.add_md("big", replicas=1, priority=10, gpu={"count": 2}, last_used_h=6)


def _copies(world: World) -> dict[str, dict[str, Any]]:
    return {
        name: body
        for name, body in world.pods("small").items()
        if L.ANN_MOVE_OF in body["metadata"]["annotations"]
    }


def _make_ready(world: World, name: str) -> None:
    body = world.fake.objects[pods_path(NS, name)]
    body["status"] = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": format_time(CREATED)}
        ],
    }


def _events(world: World, deployment: str, reason: str) -> list[str]:
    return [
        body["message"]
        for path, body in world.fake.objects.items()
        if "/events/" in path
        and body["involvedObject"]["name"] == deployment
        and body["reason"] == reason
    ]


async def test_consolidation_makes_room_make_before_break(world: World) -> None:
    _fragmented(world)
    plan = await world.reconcile("big")
    # One copy of a `small` replica starts on the other node's free GPU; nothing is deleted.
    assert plan.consolidation is not None
    assert plan.blocker is not None
    assert plan.blocker.reason == "Consolidating"
    assert world.writes("DELETE") == []
    copies = _copies(world)
    assert list(copies) == ["small-instance-3"]  # a new instance number: both run for a while
    ann = copies["small-instance-3"]["metadata"]["annotations"]
    old = ann[L.ANN_MOVE_OF]
    assert old in ("small-instance-1", "small-instance-2")
    assert ann[L.ANN_MOVE_FOR] == f"{NS}/big"
    freed_node = "a" if old == "small-instance-1" else "b"
    other = "b" if freed_node == "a" else "a"
    assert ann[L.ANN_GPUS] == f"{other}:1"
    held = json.loads(world.annotations("big")[L.ANN_RESERVATION])
    assert held["gpus"] == [f"{freed_node}:0", f"{freed_node}:1"]
    assert _events(world, "small", "Moved")
    assert _events(world, "big", "Consolidating")
    status = world.fake.objects[
        f"/apis/modelfleet.io/v1alpha1/namespaces/{NS}/modeldeployments/big"
    ]
    assert "consolidation" in json.dumps(status["status"]["conditions"])

    # The copy is starting: `small` keeps both old replicas, scales nothing down.
    waiting = await world.reconcile("small")
    assert waiting.to_delete == []
    assert waiting.to_create == []
    # `big` waits for the move; it neither evicts nor starts another move.
    again = await world.reconcile("big")
    assert again.blocker is not None
    assert again.blocker.reason == "Consolidating"
    assert again.consolidation is None
    assert again.victims == []
    assert len(world.writes("POST", "pods")) == 1

    # The copy is Ready: only now does the old replica go.
    _make_ready(world, "small-instance-3")
    done = await world.reconcile("small")
    assert [(d.name, d.reason) for d in done.to_delete] == [(old, "Moved")]
    assert world.writes("DELETE") == [pods_path(NS, old)]
    assert sorted(world.pods("small")) == sorted(
        {"small-instance-1", "small-instance-2"} - {old} | {"small-instance-3"}
    )

    # The blocked replica takes exactly the GPUs reserved for it, and lets the reservation go.
    placed = await world.reconcile("big")
    assert placed.blocker is None
    assert world.gpus("big") == [f"{freed_node}:0", f"{freed_node}:1"]
    assert L.ANN_RESERVATION not in world.annotations("big")
    # `small` is whole again and stays so.
    settled = await world.reconcile("small")
    assert settled.to_delete == []
    assert settled.to_place == []


async def test_a_restarted_operator_finishes_a_move_half_done(world: World) -> None:
    _fragmented(world)
    await world.reconcile("big")
    old = _copies(world)["small-instance-3"]["metadata"]["annotations"][L.ANN_MOVE_OF]
    world.rt = world.new_runtime()  # only the API remembers the move
    again = await world.reconcile("big")
    assert again.blocker is not None
    assert again.blocker.reason == "Consolidating"
    assert len(world.writes("POST", "pods")) == 1
    _make_ready(world, "small-instance-3")
    world.rt = world.new_runtime()
    await world.reconcile("small")
    assert world.writes("DELETE") == [pods_path(NS, old)]
    await world.reconcile("big")
    assert len(world.gpus("big")) == 2


async def test_a_copy_not_ready_by_its_deadline_is_deleted_and_the_old_one_kept(
    world: World,
) -> None:
    _fragmented(world)
    await world.reconcile("big")
    copy = world.fake.objects[pods_path(NS, "small-instance-3")]
    old = copy["metadata"]["annotations"][L.ANN_MOVE_OF]
    copy["metadata"]["annotations"][L.ANN_MOVE_DEADLINE] = format_time(
        datetime.now(UTC) - timedelta(seconds=1)
    )
    plan = await world.reconcile("small")
    assert [(d.name, d.reason) for d in plan.to_delete] == [("small-instance-3", "MoveAbandoned")]
    assert old in world.pods("small")
    assert _events(world, "small", "MoveAbandoned")
    # The move budget (1 per interval) is spent: `big` cannot move `small` again, and may not
    # evict below the floor, so it waits.
    blocked = await world.reconcile("big")
    assert blocked.consolidation is None
    assert blocked.victims == []
    assert blocked.blocker is not None
    assert blocked.blocker.reason == "NoCapacity"


async def test_consolidation_is_chosen_over_eviction(world: World) -> None:
    # `small` is below `big` and above its floor, so one of its replicas could be evicted; a
    # move makes the same room without taking anything away.
    _fragmented(world, floor=1)
    plan = await world.reconcile("big")
    assert plan.consolidation is not None
    assert plan.victims == []
    assert world.writes("DELETE") == []


async def test_with_no_move_budget_eviction_is_the_fallback(world: World) -> None:
    world.settings = world.settings.model_copy(update={"consolidation_moves_per_interval": 0})
    world.rt = world.new_runtime()
    _fragmented(world, floor=1)
    plan = await world.reconcile("big")
    assert plan.consolidation is None
    assert len(plan.victims) == 1
    assert _copies(world) == {}
