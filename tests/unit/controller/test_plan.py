"""The pod plan, one named case per behaviour, with no cluster (KubeAI's calculatePodPlan style)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from controller_helpers import HASH, NOW, FreeGpus, make_md, nodes, plan_and_place, pod

from modelfleet.api import labels as L
from modelfleet.controller.decisions import Evict, PlacementRequest, Unplaceable, Victim
from modelfleet.controller.observed import NodeHealth
from modelfleet.controller.plan import compute_plan, compute_target
from modelfleet.controller.reservations import Reservation


def names(items: list[object]) -> list[str]:
    return [i.name for i in items]  # type: ignore[attr-defined]


def test_scale_up_from_nothing_places_each_replica_on_distinct_gpus() -> None:
    placer = FreeGpus(["node-a:0", "node-b:0", "node-c:0"])
    plan = plan_and_place(make_md(replicas=2), [], nodes("node-a", "node-b"), placer, NOW)
    assert names(plan.to_create) == ["gemma-instance-1", "gemma-instance-2"]
    assert [c.placed.gpu_ids for c in plan.to_create] == [("node-a:0",), ("node-b:0",)]
    # The second request saw the first decision, so the placer never hands out a GPU twice.
    assert placer.requests[1].planned == (plan.to_create[0].placed,)
    assert not plan.to_delete
    assert [e.reason for e in plan.events] == ["Placed", "Placed"]
    assert "node-a:0" in plan.events[0].message


def test_scale_up_fills_lowest_free_instance_numbers() -> None:
    observed = [pod(2, node="node-a"), pod(4, node="node-a")]
    plan = plan_and_place(
        make_md(replicas=4),
        observed,
        nodes("node-a"),
        FreeGpus(["node-b:0", "node-b:1"]),
        NOW,
    )
    assert names(plan.to_create) == ["gemma-instance-1", "gemma-instance-3"]


def test_steady_state_is_an_empty_plan() -> None:
    observed = [pod(1), pod(2, node="node-b")]
    plan = plan_and_place(
        make_md(replicas=2), observed, nodes("node-a", "node-b"), FreeGpus([]), NOW
    )
    assert plan.empty
    assert not plan.events


def test_scale_down_deletes_unready_first_then_highest_instance() -> None:
    observed = [pod(1), pod(2, ready=False), pod(3), pod(4)]
    plan = plan_and_place(make_md(replicas=2), observed, nodes("node-a"), FreeGpus([]), NOW)
    assert names(plan.to_delete) == ["gemma-instance-2", "gemma-instance-4"]
    assert {d.reason for d in plan.to_delete} == {"ScaleDown"}
    assert not plan.to_create


def test_scale_to_zero() -> None:
    plan = plan_and_place(make_md(replicas=0), [pod(1)], nodes("node-a"), FreeGpus([]), NOW)
    assert names(plan.to_delete) == ["gemma-instance-1"]


@pytest.mark.parametrize(
    ("case", "node_state", "reason", "force"),
    [
        ("node lost", None, "NodeLost", True),
        ("node NotReady", NodeHealth(ready=False, agent_known=True), "NodeLost", True),
        ("agent down", NodeHealth(agent_known=True, agent_up=False), "EndpointsDown", False),
        ("agent pod gone", NodeHealth(agent_missing=True), "EndpointsDown", False),
        (
            "GPU unhealthy",
            NodeHealth(agent_known=True, unhealthy_gpus=frozenset({"node-a:0"})),
            "GpuUnhealthy",
            False,
        ),
    ],
)
def test_failed_replica_is_replaced_under_the_same_name(
    case: str, node_state: NodeHealth | None, reason: str, force: bool
) -> None:
    state = nodes("node-b")
    if node_state is not None:
        state["node-a"] = node_state
    observed = [pod(1, node="node-a"), pod(2, node="node-b")]
    plan = plan_and_place(make_md(replicas=2), observed, state, FreeGpus(["node-b:5"]), NOW)
    assert [(d.name, d.reason, d.force) for d in plan.to_delete] == [
        ("gemma-instance-1", reason, force)
    ], case
    # The replacement waits for the name to be free, then takes it (next reconcile).
    assert not plan.to_create
    assert plan.waiting_for == 1
    assert plan.events[0].type == "Warning"


def test_replacement_after_the_lost_pod_is_gone_takes_its_name() -> None:
    placer = FreeGpus(["node-b:5"])
    plan = plan_and_place(
        make_md(replicas=2), [pod(2, node="node-b")], nodes("node-b"), placer, NOW
    )
    assert [(c.name, c.placed.node) for c in plan.to_create] == [("gemma-instance-1", "node-b")]


def test_agent_down_everywhere_replaces_nothing() -> None:
    blind = NodeHealth(agent_known=True, agent_up=False)
    plan = plan_and_place(
        make_md(replicas=1),
        [pod(1)],
        {"node-a": blind, "node-b": blind},
        FreeGpus([]),
        NOW,
    )
    assert plan.empty


def test_agent_not_polled_yet_is_not_down() -> None:
    fresh = NodeHealth(agent_known=False, agent_up=False)
    plan = plan_and_place(
        make_md(replicas=1),
        [pod(1)],
        {"node-a": fresh, "node-b": NodeHealth(agent_known=True)},
        FreeGpus([]),
        NOW,
    )
    assert plan.empty


def test_terminating_pod_on_lost_node_is_force_deleted_again() -> None:
    observed = [pod(1, node="gone", deleting=True)]
    plan = plan_and_place(make_md(replicas=1), observed, nodes("node-a"), FreeGpus([]), NOW)
    assert [(d.name, d.force) for d in plan.to_delete] == [("gemma-instance-1", True)]
    assert plan.waiting_for == 1
    assert not plan.to_create


def test_never_a_duplicate_instance_name() -> None:
    # Terminating instance 1, a foreign pod holding instance 3 (an older object of the same name).
    observed = [pod(1, deleting=True), pod(2), pod(3, owner_uid="old-uid")]
    plan = plan_and_place(
        make_md(replicas=4),
        observed,
        nodes("node-a"),
        FreeGpus(["node-b:0", "node-b:1", "node-b:2"]),
        NOW,
    )
    created = names(plan.to_create)
    existing = {p.name for p in observed}
    assert not existing & set(created)
    assert len(created) == len(set(created))
    assert created == ["gemma-instance-4", "gemma-instance-5"]
    assert plan.waiting_for == 1


def test_no_gpu_fits_evict_lru() -> None:
    victims = (Victim("other", "old-instance-1", "old"),)
    placer = FreeGpus([], otherwise=lambda r: Evict(victims, "old is least recently used"))
    plan = plan_and_place(make_md(replicas=1), [], nodes("node-a"), placer, NOW)
    assert plan.victims == list(victims)
    assert not plan.to_create
    assert plan.blocker is not None
    assert plan.blocker.reason == "Evicting"
    victim_events = [e for e in plan.events if e.deployment == "old"]
    assert [(e.namespace, e.reason, e.type) for e in victim_events] == [
        ("other", "Evicted", "Warning")
    ]
    assert "least recently used" in victim_events[0].message


def test_eviction_under_way_is_waited_for_not_repeated() -> None:
    victims = (Victim("other", "old-instance-1", "old"),)
    placer = FreeGpus([], otherwise=lambda r: Evict(victims, "lru"))
    plan = plan_and_place(
        make_md(replicas=1),
        [],
        nodes("node-a"),
        placer,
        NOW,
        deleting=frozenset({("other", "old-instance-1")}),
    )
    assert not plan.victims
    assert not plan.events
    assert plan.blocker is not None
    assert plan.blocker.reason == "Evicting"


def test_an_evictor_waits_for_the_gpus_its_eviction_freed_and_evicts_no_one_else() -> None:
    # The victim's Pod is gone, but the node still reports its memory on the reserved GPU: the
    # engine sees no room and names another victim. The replica waits for its reservation.
    reserved = Reservation("node-a", ("node-a:1",), NOW + timedelta(seconds=60))
    victims = (Victim("ns", "busy-instance-1", "busy"),)
    placer = FreeGpus([], otherwise=lambda r: Evict(victims, "busy is least recently used"))
    plan = plan_and_place(make_md(replicas=1), [], nodes("node-a"), placer, NOW, reserved=reserved)
    assert not plan.victims
    assert not plan.events
    assert plan.blocker is not None
    assert plan.blocker.reason == "Evicting"
    assert "node-a:1" in plan.blocker.message
    assert "still reports them in use" in plan.blocker.message


def test_a_used_reservation_does_not_hold_back_the_next_eviction() -> None:
    # Replica 1 runs on the reserved GPU: replica 2 may evict for itself.
    reserved = Reservation("node-a", ("node-a:1",), NOW + timedelta(seconds=60))
    victims = (Victim("ns", "busy-instance-1", "busy"),)
    placer = FreeGpus([], otherwise=lambda r: Evict(victims, "busy is least recently used"))
    running = [pod(1, gpus=("node-a:1",))]
    plan = plan_and_place(
        make_md(replicas=2), running, nodes("node-a"), placer, NOW, reserved=reserved
    )
    assert plan.victims == list(victims)
    # The same within one pass: replica 1 is placed on the reserved GPU, replica 2 evicts.
    placer = FreeGpus(["node-a:1"], otherwise=lambda r: Evict(victims, "lru"))
    plan = plan_and_place(make_md(replicas=2), [], nodes("node-a"), placer, NOW, reserved=reserved)
    assert [c.placed.gpu_ids for c in plan.to_create] == [("node-a:1",)]
    assert plan.victims == list(victims)


def test_evicted_deployment_does_not_evict_back() -> None:
    md = make_md(
        replicas=1,
        annotations={L.ANN_EVICTED_AT: "2026-11-22T11:59:00Z", L.ANN_EVICTED_BY: "ns/big"},
    )
    placer = FreeGpus([], otherwise=lambda r: Evict((Victim("ns", "big-instance-1", "big"),), "x"))
    plan = plan_and_place(md, [], nodes("node-a"), placer, NOW)
    assert placer.requests[0].may_evict is False
    assert not plan.victims
    assert plan.blocker is not None
    assert plan.blocker.reason == "Evicted"
    assert "ns/big" in plan.blocker.message


def test_evicted_deployment_comes_back_when_capacity_frees() -> None:
    md = make_md(
        replicas=1,
        annotations={L.ANN_EVICTED_AT: "2026-11-22T11:59:00Z", L.ANN_EVICTED_BY: "ns/big"},
    )
    plan = plan_and_place(md, [], nodes("node-a"), FreeGpus(["node-a:1"]), NOW)
    assert names(plan.to_create) == ["gemma-instance-1"]
    assert plan.annotations == {L.ANN_EVICTED_AT: None, L.ANN_EVICTED_BY: None}


def test_demand_after_eviction_may_evict_again() -> None:
    md = make_md(
        replicas=1,
        annotations={
            L.ANN_EVICTED_AT: "2026-11-22T11:59:00Z",
            L.ANN_DEMAND: "2026-11-22T11:59:30Z",
        },
    )
    placer = FreeGpus([], otherwise=lambda r: Unplaceable("full", "NoCapacity"))
    plan_and_place(md, [], nodes("node-a"), placer, NOW)
    assert placer.requests[0].may_evict is True


def test_no_capacity_is_a_blocker_with_a_warning_event() -> None:
    placer = FreeGpus(
        [], otherwise=lambda r: Unplaceable("no node has 2 free GPUs of NVIDIA-L4", "NoCapacity")
    )
    plan = plan_and_place(make_md(replicas=2), [], nodes("node-a"), placer, NOW)
    assert plan.blocker is not None
    assert plan.blocker.reason == "NoCapacity"
    assert len(placer.requests) == 1  # stops at the first replica that cannot be placed
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "NoCapacity")]


def test_rollout_replaces_one_at_a_time() -> None:
    observed = [pod(1, template_hash="old"), pod(2, template_hash="old", node="node-b")]
    plan = plan_and_place(
        make_md(replicas=2), observed, nodes("node-a", "node-b"), FreeGpus([]), NOW
    )
    assert [(d.name, d.reason) for d in plan.to_delete] == [("gemma-instance-2", "RollingUpdate")]
    assert plan.rolling


def test_rollout_waits_for_ready() -> None:
    observed = [pod(1, template_hash="old"), pod(2, ready=False, node="node-b")]
    plan = plan_and_place(
        make_md(replicas=2), observed, nodes("node-a", "node-b"), FreeGpus([]), NOW
    )
    assert not plan.to_delete
    assert plan.rolling
    assert "waits" in " ".join(plan.details)


def test_rollout_waits_while_a_replacement_is_terminating() -> None:
    observed = [pod(1, template_hash="old"), pod(2, deleting=True)]
    plan = plan_and_place(make_md(replicas=2), observed, nodes("node-a"), FreeGpus([]), NOW)
    assert not plan.to_delete
    assert plan.waiting_for == 1


def test_rollout_replaces_unready_outdated_at_once() -> None:
    observed = [pod(1, template_hash="old", ready=False), pod(2, template_hash="old", ready=False)]
    plan = plan_and_place(make_md(replicas=2), observed, nodes("node-a"), FreeGpus([]), NOW)
    assert names(plan.to_delete) == ["gemma-instance-1", "gemma-instance-2"]


def test_idle_scale_down_to_min_replicas() -> None:
    md = make_md(
        replicas=3,
        minReplicas=1,
        idleTimeout="30m",
        annotations={L.ANN_LAST_REQUEST: "2026-11-22T11:00:00Z"},
    )
    serving = [pod(n, ready_since=NOW - timedelta(hours=2)) for n in (1, 2, 3)]
    plan = plan_and_place(md, serving, nodes("node-a"), FreeGpus([]), NOW)
    assert plan.target == 1
    assert [(d.name, d.reason) for d in plan.to_delete] == [
        ("gemma-instance-3", "Idle"),
        ("gemma-instance-2", "Idle"),
    ]


def test_idle_clock_starts_at_creation_without_requests() -> None:
    young = make_md(replicas=2, idleTimeout="30m", created=NOW - timedelta(minutes=10))
    old = make_md(replicas=2, idleTimeout="30m", created=NOW - timedelta(hours=2))
    assert compute_target(young, NOW) == (2, "Spec")
    assert compute_target(old, NOW) == (0, "Idle")


def test_idle_clock_waits_for_a_replica_still_starting() -> None:
    # Created (or asked for) longer ago than idleTimeout, but its replica has not finished
    # starting: scaling it away now would strand the requests the gateway holds for it.
    md = make_md(
        replicas=1,
        idleTimeout="5s",
        created=NOW - timedelta(minutes=10),
        annotations={L.ANN_DEMAND: "2026-11-22T11:55:00Z"},
    )
    starting = [pod(1, ready=False)]
    assert compute_target(md, NOW, starting) == (1, "Spec")
    plan = plan_and_place(md, starting, nodes("node-a"), FreeGpus([]), NOW)
    assert plan.empty
    # A broken replica does not hold the clock.
    broken = [pod(1, ready=False, waiting_reason="CrashLoopBackOff")]
    assert compute_target(md, NOW, broken) == (0, "Idle")
    assert compute_target(md, NOW) == (0, "Idle")


def test_idle_clock_starts_when_the_replicas_became_ready() -> None:
    md = make_md(
        replicas=1,
        idleTimeout="5m",
        annotations={L.ANN_DEMAND: "2026-11-22T11:50:00Z"},
    )
    just_ready = [pod(1, ready_since=NOW - timedelta(minutes=1))]
    assert compute_target(md, NOW, just_ready) == (1, "Spec")
    long_ready = [pod(1, ready_since=NOW - timedelta(minutes=6))]
    assert compute_target(md, NOW, long_ready) == (0, "Idle")
    # The longest-serving replica counts: one replaced a minute ago does not restart the clock.
    mixed = [pod(1, ready_since=NOW - timedelta(minutes=6)), pod(2, ready=False)]
    two = make_md(replicas=2, idleTimeout="5m", annotations={L.ANN_DEMAND: "2026-11-22T11:50:00Z"})
    assert compute_target(two, NOW, mixed) == (0, "Idle")


def test_demand_wakes() -> None:
    md = make_md(
        replicas=2,
        idleTimeout="30m",
        annotations={
            L.ANN_LAST_REQUEST: "2026-11-22T10:00:00Z",
            L.ANN_DEMAND: "2026-11-22T11:59:50Z",
        },
    )
    plan = plan_and_place(md, [], nodes("node-a"), FreeGpus(["node-a:0", "node-a:1"]), NOW)
    assert plan.target == 2
    assert len(plan.to_create) == 2


def test_footprint_passed_to_placement() -> None:
    placer = FreeGpus(["node-a:0"])
    plan_and_place(make_md(gpu={"memory": "20Gi"}), [], nodes("node-a"), placer, NOW)
    assert placer.requests[0].footprint_mib == 20480
    placer2 = FreeGpus(["node-a:0"])
    plan_and_place(make_md(), [], nodes("node-a"), placer2, NOW)
    assert placer2.requests[0].footprint_mib is None  # the discovery run
    placer3 = FreeGpus(["node-a:0"])
    md = make_md(status={"footprint": "16000Mi"})
    plan_and_place(md, [], nodes("node-a"), placer3, NOW)
    assert placer3.requests[0].footprint_mib == 16000


def test_placement_request_carries_the_spec() -> None:
    placer = FreeGpus(["node-a:0"])
    plan_and_place(make_md(priority=7), [], nodes("node-a"), placer, NOW)
    request: PlacementRequest = placer.requests[0]
    assert (request.namespace, request.deployment, request.ordinal) == ("ns", "gemma", 1)
    assert request.spec.priority == 7


def test_plan_is_idempotent_once_applied() -> None:
    """Applying a plan and planning again yields nothing more to do."""
    md = make_md(replicas=3)
    placer = FreeGpus(["node-a:0", "node-a:1", "node-a:2"])
    first = plan_and_place(md, [], nodes("node-a"), placer, NOW)
    applied = [pod(c.ordinal) for c in first.to_create]
    second = plan_and_place(md, applied, nodes("node-a"), placer, NOW)
    assert second.empty


def test_last_request_wins_over_a_recent_creation() -> None:
    # LRU order and idle clock follow use, not age: an object recreated a minute ago whose
    # model was last asked for two hours ago is idle.
    md = make_md(
        replicas=2,
        idleTimeout="30m",
        created=NOW - timedelta(minutes=1),
        annotations={L.ANN_LAST_REQUEST: "2026-11-22T10:00:00Z"},
    )
    assert compute_target(md, NOW) == (0, "Idle")


@pytest.mark.parametrize(
    ("case", "node_a", "others_up", "replaced"),
    [
        ("gone past the grace", NodeHealth(agent_missing=True), True, True),
        ("gone within the grace (rollout)", NodeHealth(agent_missing=False), True, False),
        ("gone, but no agent answers anywhere", NodeHealth(agent_missing=True), False, False),
        (
            "gone and the node NotReady: NodeLost wins",
            NodeHealth(ready=False, agent_missing=True),
            True,
            True,
        ),
    ],
)
def test_missing_agent_pod(case: str, node_a: NodeHealth, others_up: bool, replaced: bool) -> None:
    other = NodeHealth(agent_known=True, agent_up=others_up)
    plan = plan_and_place(
        make_md(replicas=1),
        [pod(1, node="node-a")],
        {"node-a": node_a, "node-b": other},
        FreeGpus(["node-b:0"]),
        NOW,
    )
    assert bool(plan.to_delete) == replaced, case
    if replaced:
        expected = "NodeLost" if not node_a.ready else "EndpointsDown"
        assert plan.to_delete[0].reason == expected, case


def test_plan_never_counts_or_deletes_a_pod_without_an_owner() -> None:
    md = make_md(replicas=1)
    look_alike = pod(2, node="node-b", owner_uid="")
    plan = compute_plan(md, [pod(1), look_alike], nodes("node-a", "node-b"), NOW, HASH)
    assert plan.to_delete == []
    assert plan.to_place == []
    alone = compute_plan(md, [look_alike], nodes("node-a", "node-b"), NOW, HASH)
    assert alone.to_place == [1]
