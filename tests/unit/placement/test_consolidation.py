"""Consolidation planner: named cases, each a small cluster, a replica that does not fit, and the
moves (or the refusal) expected."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from test_placement_cases import SETTINGS, dep, node, rep, req, shared_req

from modelfleet.placement import (
    ClusterView,
    Consolidation,
    DeploymentRef,
    Evict,
    PlacedReplica,
    ReplicaRequest,
    ReplicaState,
    SharingMode,
    Unplaceable,
    UnplaceableCode,
    build_view,
    decide,
    plan_consolidation,
)


def templates(*names: str) -> dict[DeploymentRef, ReplicaRequest]:
    """The request that places one replica of each deployment (its spec), as the operator
    builds it."""
    return {dep(n): req(n) for n in names}


def plan(decision: object) -> Consolidation:
    assert isinstance(decision, Consolidation), decision
    return decision


def refused(decision: object) -> Unplaceable:
    assert isinstance(decision, Unplaceable), decision
    assert decision.code == UnplaceableCode.NO_CAPACITY
    return decision


def run_make_before_break(view: ClusterView, c: Consolidation) -> tuple[ClusterView, int]:
    """Run the plan as the operator must: each copy starts and is Ready, then its old replica
    goes. Returns the view after the moves and the fewest Ready replicas any moved deployment
    had at any step, minus its minReplicas (never negative if the plan is floor-safe)."""
    margin = 1 << 30
    for move in c.moves:
        old = move.replica
        copy = replace(
            old,
            pod=old.pod + "-moved",
            node=move.node,
            gpu_ids=move.gpu_ids,
            state=ReplicaState.READY,
        )
        view = build_view(
            [n.info for n in view.nodes.values()], [*view.replicas.values(), copy], SETTINGS
        )
        margin = min(margin, _floor_margin(view, [old]))
        view = view.with_removed([old])
        margin = min(margin, _floor_margin(view, [old]))
    return view, margin


def _floor_margin(view: ClusterView, reps: Iterable[PlacedReplica]) -> int:
    return min(
        view.serving.get(r.deployment, 0) - max(view.floors.get(r.deployment, 0), r.min_replicas)
        for r in reps
    )


def test_minimal_plan_moves_one_replica() -> None:
    # a: x holds a:0,a:1 (last used long ago), 2 free; b: y holds b:0,b:1, 2 free. Four GPUs
    # fit nowhere, but 4 are free in total: moving x to b (or y to a) frees a node. x is the
    # less valuable (used longer ago), so x moves.
    x = rep("x", 1, "a", (0, 1), last_used=100.0)
    y = rep("y", 1, "b", (0, 1), last_used=900.0)
    view = build_view([node("a", 4), node("b", 4)], [x, y], SETTINGS)
    request = req(gpu_count=4)
    assert isinstance(decide(view, request), Evict)  # eviction would delete one
    c = plan(plan_consolidation(view, request, templates("x", "y")))
    assert [(m.replica.pod, m.node, m.gpu_ids) for m in c.moves] == [
        ("x-instance-1", "b", ("b:2", "b:3"))
    ]
    assert (c.node, c.gpu_ids) == ("a", ("a:0", "a:1", "a:2", "a:3"))
    assert "moving 1 replica (make-before-break) frees a:0,a:1,a:2,a:3 on a" in c.reason
    assert "ml/x-instance-1 to b" in c.reason
    after, _ = run_make_before_break(view, c)
    assert decide(after, request).node == "a"  # type: ignore[union-attr]


def test_fewest_moves_win_over_the_node_name() -> None:
    # a needs two moves (two single-GPU replicas), b one (one 2-GPU replica); c has room for
    # the moved ones.
    reps = [
        rep("p", 1, "a", (0,)),
        rep("q", 1, "a", (1,)),
        rep("r", 1, "b", (0, 1)),
        rep("s", 1, "c", (0, 1)),
    ]
    view = build_view([node("a", 4), node("b", 4), node("c", 4)], reps, SETTINGS)
    c = plan(plan_consolidation(view, req(gpu_count=4), templates("p", "q", "r", "s")))
    assert c.node == "b"
    assert [m.replica.pod for m in c.moves] == ["r-instance-1"]


def test_floor_safe_make_before_break() -> None:
    # x (minReplicas 1, one Ready replica: at its floor) is moved make-before-break: its copy is
    # Ready before the old replica goes, so it never has fewer than one Ready replica.
    x = rep("x", 1, "a", (0, 1), min_replicas=1)
    view = build_view([node("a", 4), node("b", 4)], [x, rep("y", 1, "b", (0, 1))], SETTINGS)
    c = plan(plan_consolidation(view, req(gpu_count=4), templates("x")))
    assert [m.replica.pod for m in c.moves] == ["x-instance-1"]
    _, margin = run_make_before_break(view, c)
    assert margin >= 0
    # Every move lands on GPUs free now, never on GPUs another move of the plan frees: each
    # can run make-before-break on its own.
    freed = {g for m in c.moves for g in m.replica.gpu_ids}
    assert all(not set(m.gpu_ids) & freed for m in c.moves)


def test_a_deployment_below_its_floor_is_not_moved() -> None:
    # x wants 2 Ready replicas and has 1 (recovering): it is not moved; y is.
    x = rep("x", 1, "a", (0, 1), min_replicas=2)
    y = rep("y", 1, "b", (0, 1))
    view = build_view([node("a", 4), node("b", 4)], [x, y], SETTINGS)
    c = plan(plan_consolidation(view, req(gpu_count=4), templates("x", "y")))
    assert [m.replica.pod for m in c.moves] == ["y-instance-1"]
    assert c.node == "b"
    only_x = build_view([node("a", 4), node("b", 4, bad_gpus=(0, 1))], [x], SETTINGS)
    refused(plan_consolidation(only_x, req(gpu_count=4), templates("x")))


def test_move_budget_per_deployment() -> None:
    # Two single-GPU replicas of m block node a; b has room for both. Budget 1 for m: the plan
    # would need 2 moves of m, so it is refused; with budget 2 it moves both.
    reps = [rep("m", 1, "a", (0,)), rep("m", 2, "a", (1,)), rep("k", 1, "b", (0, 1))]
    view = build_view([node("a", 4), node("b", 4)], reps, SETTINGS)
    request = req(gpu_count=4)
    d = refused(plan_consolidation(view, request, {dep("m"): req("m")}, budgets={dep("m"): 1}))
    assert "within their move budgets" in d.reason
    c = plan(plan_consolidation(view, request, {dep("m"): req("m")}, budgets={dep("m"): 2}))
    assert sorted(m.replica.pod for m in c.moves) == ["m-instance-1", "m-instance-2"]
    # A spent budget (0 left) keeps the deployment where it is.
    refused(plan_consolidation(view, request, templates("m"), budgets={dep("m"): 0}))


def test_only_lower_or_equal_priority_replicas_move() -> None:
    high = rep("high", 1, "a", (0, 1), priority=10)
    low = rep("low", 1, "b", (0, 1), priority=-1)
    view = build_view([node("a", 4), node("b", 4)], [high, low], SETTINGS)
    c = plan(plan_consolidation(view, req(gpu_count=4), templates("high", "low")))
    assert [m.replica.pod for m in c.moves] == ["low-instance-1"]
    # Where emptying a node would take moving the higher-priority replica, that node is not
    # emptied: b is (z moves to a), and with z's budget spent nothing can be planned.
    others = [high, rep("z", 1, "b", (0, 1))]
    only_high = build_view([node("a", 4), node("b", 4)], others, SETTINGS)
    c = plan(plan_consolidation(only_high, req(gpu_count=4), templates("high", "z")))
    assert [(m.replica.pod, c.node) for m in c.moves] == [("z-instance-1", "b")]
    spent = {dep("z"): 0}
    request = req(gpu_count=4)
    refused(plan_consolidation(only_high, request, templates("high", "z"), budgets=spent))
    # A request of higher priority may move it.
    c = plan(plan_consolidation(only_high, req(gpu_count=4, priority=10), templates("high")))
    assert [m.replica.pod for m in c.moves] == ["high-instance-1"]


def test_starting_replicas_and_the_requester_itself_never_move() -> None:
    starting = rep("x", 1, "a", (0, 1), state=ReplicaState.STARTING)
    own = rep("new", 1, "b", (0, 1))
    view = build_view([node("a", 4), node("b", 4)], [starting, own], SETTINGS)
    refused(plan_consolidation(view, req(gpu_count=4), templates("x", "new")))


def test_not_enough_free_in_total_says_so() -> None:
    view = build_view(
        [node("a", 4), node("b", 4)],
        [rep("x", 1, "a", (0, 1, 2)), rep("y", 1, "b", (0, 1, 2))],
        SETTINGS,
    )
    d = refused(plan_consolidation(view, req(gpu_count=4), templates("x", "y")))
    assert "2 GPUs free in total on the nodes that may run it, 4 needed" in d.reason


def test_moved_replica_keeps_its_own_constraints() -> None:
    # x may only run on pool=a nodes: a and c. Emptying a needs x to go to c, which is full, and
    # b does not match x's selector: no plan.
    x = rep("x", 1, "a", (0, 1))
    nodes = [
        node("a", 4, labels={"pool": "a"}),
        node("b", 4),
        node("c", 2, labels={"pool": "a"}),
    ]
    view = build_view(nodes, [x, rep("y", 1, "b", (0, 1)), rep("z", 1, "c", (0, 1))], SETTINGS)
    spec = {dep("x"): req("x", node_selector={"pool": "a"})}
    d = plan_consolidation(view, req(gpu_count=4), spec)
    assert isinstance(d, Unplaceable)
    # Without the selector, x goes to b.
    c = plan(plan_consolidation(view, req(gpu_count=4), templates("x")))
    assert [(m.replica.pod, m.node) for m in c.moves] == [("x-instance-1", "b")]


def test_shared_requests_are_not_planned() -> None:
    view = build_view([node("a", 1)], [rep("x", 1, "a", (0,))], SETTINGS)
    d = refused(plan_consolidation(view, shared_req(), templates("x")))
    assert "Shared" in d.reason


def test_a_shared_replica_alone_on_a_gpu_moves_by_its_footprint() -> None:
    # a: s (Shared, 20 GiB) alone on a:0, a:1 free; b:0 carries another Shared replica with
    # room, b:1 is free (2 GPUs free in total). A 2-GPU replica needs all of a: s moves to b:0,
    # where it fits by memory (joining a shared GPU breaks no free one), and b:1 stays free.
    s = rep("s", 1, "a", (0,), footprint=20480, sharing=SharingMode.SHARED)
    t = rep("t", 1, "b", (0,), footprint=20480, sharing=SharingMode.SHARED)
    nodes = [node("a", 2, used={0: 20480}), node("b", 2, used={0: 20480})]
    view = build_view(nodes, [s, t], SETTINGS)
    spec = {dep("s"): shared_req("s", memory=20480)}
    c = plan(plan_consolidation(view, req(gpu_count=2), spec))
    assert [(m.replica.pod, m.node, m.gpu_ids) for m in c.moves] == [
        ("s-instance-1", "b", ("b:0",))
    ]
    assert c.gpu_ids == ("a:0", "a:1")
