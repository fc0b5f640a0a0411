"""Eviction follows load: the rule that keeps two autoscaled models from evicting each other
back and forth, as pure cases (docs/placement.md, "Eviction follows load")."""

from __future__ import annotations

from dataclasses import replace

from controller_helpers import IMAGE, NOW, FreeGpus, facts, make_md, nodes, pod, report, snapshot

from modelfleet import placement as P
from modelfleet.api import labels as L
from modelfleet.controller.autoscale import Recommendation
from modelfleet.controller.builders import PodDefaults
from modelfleet.controller.decisions import Evict, PlacementRequest, Unplaceable, Victim
from modelfleet.controller.inputs import build_placer
from modelfleet.controller.observed import ObservedPod
from modelfleet.controller.place import (
    LOAD_HOLD_S,
    LoadNeed,
    compute_eviction_mark,
    compute_load_floors,
    compute_load_need,
    compute_may_evict,
    place,
)
from modelfleet.controller.plan import compute_plan

AUTO = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetPerReplica": 2}


def history(*points: tuple[float, int]) -> tuple[Recommendation, ...]:
    return tuple(Recommendation(at, n) for at, n in points)


# --- what the load needs ------------------------------------------------------------------------


def test_no_round_within_the_hold_means_no_known_need() -> None:
    assert compute_load_need((), now=100.0) is None
    assert compute_load_need(history((10.0, 3)), now=10.0 + LOAD_HOLD_S + 1) is None


def test_need_is_the_latest_round_and_the_most_within_the_hold() -> None:
    rounds = history((0.0, 5), (80.0, 3), (90.0, 1), (100.0, 1))
    # The 5 is older than the hold and forgotten; the 3 of 20 s ago still holds.
    assert compute_load_need(rounds, now=100.0) == LoadNeed(latest=1, held=3)


def test_a_lull_shorter_than_the_hold_keeps_the_replicas_held() -> None:
    rounds = history((100.0, 3), (105.0, 1), (110.0, 1), (125.0, 1))
    assert compute_load_need(rounds, now=125.0).held == 3  # type: ignore[union-attr]
    assert compute_load_need(rounds, now=100.0 + LOAD_HOLD_S + 0.1).held == 1  # type: ignore[union-attr]


# --- whose replicas are protected from whom ------------------------------------------------------


def test_load_protects_replicas_from_the_same_priority_and_lower_not_from_higher() -> None:
    needs = {
        ("ns", "alpha"): LoadNeed(3, 3),
        ("ns", "beta"): LoadNeed(1, 2),
        ("ns", "vip"): LoadNeed(2, 2),
    }
    priorities = {("ns", "alpha"): 0, ("ns", "beta"): 0, ("ns", "vip"): 10}
    # beta (priority 0) asks: alpha's load protects 3 of its replicas, vip's 2.
    assert compute_load_floors(needs, priorities, ("ns", "beta"), 0) == {
        ("ns", "alpha"): 3,
        ("ns", "vip"): 2,
    }
    # vip (priority 10) asks: only minReplicas protect the lower ones.
    assert compute_load_floors(needs, priorities, ("ns", "vip"), 10) == {}


def test_a_model_without_replicas_protects_nothing() -> None:
    needs = {("ns", "alpha"): LoadNeed(3, 3)}
    assert compute_load_floors(needs, {}, ("ns", "beta"), 0) == {}


# --- who may evict --------------------------------------------------------------------------------


def test_an_autoscaled_model_evicts_only_for_replicas_its_load_needs() -> None:
    md = make_md(replicas=3, autoscaling=AUTO)
    need = LoadNeed(latest=2, held=3)
    assert compute_may_evict(md, None, need, rank=2)
    assert not compute_may_evict(md, None, need, rank=3)


def test_a_loaded_model_evicts_even_after_it_lost_replicas() -> None:
    md = make_md(
        replicas=3,
        autoscaling=AUTO,
        annotations={L.ANN_EVICTED_AT: "2026-11-22T11:59:00Z", L.ANN_EVICTED_BY: "ns/alpha"},
    )
    mark = compute_eviction_mark(md)
    assert compute_may_evict(md, mark, LoadNeed(latest=3, held=3), rank=2)
    # Without figures the older rule holds: a victim does not evict back.
    assert not compute_may_evict(md, mark, None, rank=2)


def test_a_model_without_autoscaling_keeps_the_older_rule() -> None:
    md = make_md(replicas=3)
    assert compute_may_evict(md, None, LoadNeed(latest=0, held=0), rank=3)


def plan_with_need(md_replicas: int, existing: int, need: LoadNeed, placer: FreeGpus) -> object:
    md = make_md(replicas=md_replicas, autoscaling=AUTO)
    observed = [pod(n) for n in range(1, existing + 1)]
    plan = compute_plan(md, observed, nodes("node-a"), NOW, "current-hash")
    return place(
        plan,
        md,
        placer,
        defaults=PodDefaults(image=IMAGE),
        now=NOW,
        need=need,
        load_floors={("ns", "alpha"): 3},
    )


def test_a_count_left_from_a_past_burst_takes_no_ones_gpus() -> None:
    """The evicted model's spec still says 3 (its scale-down window has not passed); its load
    needs 1, which it has: it does not evict back, it waits for free GPUs."""
    victims = (Victim("ns", "alpha-instance-3", "alpha"),)
    placer = FreeGpus([], otherwise=lambda r: Evict(victims, "alpha is least recently used"))
    plan = plan_with_need(3, 1, LoadNeed(latest=1, held=1), placer)
    assert not plan.victims  # type: ignore[attr-defined]
    blocker = plan.blocker  # type: ignore[attr-defined]
    assert blocker.reason == "NoCapacity"
    assert "its load needs 1 replica now" in blocker.message
    # The request carried the other models' load floors to the engine.
    assert placer.requests[0].load_floors == {("ns", "alpha"): 3}


def test_a_loaded_model_evicts_for_the_replicas_its_load_needs() -> None:
    victims = (Victim("ns", "alpha-instance-3", "alpha"),)
    placer = FreeGpus([], otherwise=lambda r: Evict(victims, "alpha is least recently used"))
    plan = plan_with_need(3, 1, LoadNeed(latest=3, held=3), placer)
    assert plan.victims == list(victims)  # type: ignore[attr-defined]


# --- the engine: load floors in the eviction search ----------------------------------------------


def request(name: str, n: int, load_floors: dict[tuple[str, str], int]) -> PlacementRequest:
    md = make_md(name=name, autoscaling=AUTO, minReplicas=1)
    return PlacementRequest("ns", name, n, md.spec, 20480, load_floors=load_floors)


def full_node() -> tuple[list[ObservedPod], dict[tuple[str, str], float]]:
    """One 4-GPU node: alpha has 1 replica, beta 3 (both minReplicas 1, priority 0)."""
    pods = [replace(pod(1, deployment="alpha", node="a", gpus=("a:0",)), min_replicas=1)]
    pods += [
        replace(pod(n, deployment="beta", node="a", gpus=(f"a:{n}",)), min_replicas=1)
        for n in (1, 2, 3)
    ]
    return pods, {("ns", "alpha"): 9000.0, ("ns", "beta"): 1000.0}


def test_replicas_the_peers_load_needs_are_not_evicted() -> None:
    pods, last_used = full_node()
    placer = build_placer(
        facts("a"), pods, last_used, snapshot(report("a", 4)), P.PlacementSettings()
    )
    decision = placer(request("alpha", 2, {("ns", "beta"): 3}))
    assert isinstance(decision, Unplaceable), decision
    assert "3 are needed by their own deployment's load" in decision.reason


def test_replicas_beyond_the_peers_load_are_evicted_by_lru() -> None:
    pods, last_used = full_node()
    placer = build_placer(
        facts("a"), pods, last_used, snapshot(report("a", 4)), P.PlacementSettings()
    )
    decision = placer(request("alpha", 2, {("ns", "beta"): 2}))
    assert isinstance(decision, Evict), decision
    assert [v.deployment for v in decision.victims] == ["beta"]


def test_minreplicas_still_bounds_a_peer_with_no_load() -> None:
    alpha, beta = P.DeploymentRef("ns", "alpha"), P.DeploymentRef("ns", "beta")
    idle = P.ReplicaRequest(deployment=alpha, pod="alpha-instance-2", load_floors={beta: 0})
    assert P.compute_eviction_floors({beta: 1}, idle) == {beta: 1}
    loaded = P.ReplicaRequest(deployment=alpha, pod="alpha-instance-2", load_floors={beta: 3})
    assert P.compute_eviction_floors({beta: 1}, loaded) == {beta: 3}
    # A model's own load floor never stands in its own way.
    own = P.ReplicaRequest(deployment=alpha, pod="alpha-instance-2", load_floors={alpha: 3})
    assert P.compute_eviction_floors({}, own) == {}


# --- alternating waves, round by round, on the real engine ----------------------------------------


def test_alternating_waves_never_evict_back_and_forth() -> None:
    """Four one-GPU nodes, two autoscaled models of one priority (1..3, floor 1) whose counts
    only go up (a long scale-down window), load moving from one to the other every 100 s.
    Every 5 s each model's autoscaler round records what its load implies and each reconciles
    (plan, place on the real engine, apply). Evictions only ever go towards the loaded model,
    floors hold, and the loaded model has its 3 replicas by the end of each wave."""
    names = ("alpha", "beta")
    uids = {"alpha": "uid-alpha", "beta": "uid-beta"}
    spec = {"alpha": 1, "beta": 1}
    pods = [
        replace(
            pod(1, deployment=n, node=f"n{i}", gpus=(f"n{i}:0",), owner_uid=uids[n]),
            min_replicas=1,
        )
        for i, n in enumerate(names)
    ]
    history: dict[tuple[str, str], list[Recommendation]] = {("ns", n): [] for n in names}
    evictions: list[tuple[float, str, str]] = []  # (when, evictor, victim deployment)
    at_wave_end: list[tuple[str, int]] = []
    defaults = PodDefaults(image=IMAGE)
    snap = snapshot(*(report(f"n{i}", 1) for i in range(4)))
    for step in range(60):
        t = step * 5.0
        loaded = names[int(t // 100) % 2]
        for n in names:
            wanted = 3 if n == loaded else 1
            history[("ns", n)].append(Recommendation(t, wanted))
            spec[n] = max(spec[n], wanted)
        needs = {k: need for k, h in history.items() if (need := compute_load_need(h, t))}
        for n in names:
            # The GPUs an eviction frees are reserved for the evictor (operator: Reserved
            # placeholders): here it places again at once, before the other model's turn.
            for _ in range(4):
                md = make_md(name=n, uid=uids[n], replicas=spec[n], minReplicas=1, autoscaling=AUTO)
                ours = [p for p in pods if p.deployment == n]
                plan = compute_plan(md, ours, nodes(*(f"n{i}" for i in range(4))), NOW, "h")
                if not plan.to_place:
                    break
                last_used = {("ns", m): (1000.0 if m == loaded else 10.0) for m in names}
                placer = build_placer(
                    facts(*(f"n{i}" for i in range(4))),
                    pods,
                    last_used,
                    snap,
                    P.PlacementSettings(),
                )
                out = place(
                    plan,
                    md,
                    placer,
                    defaults=defaults,
                    now=NOW,
                    need=needs.get(("ns", n)),
                    load_floors=compute_load_floors(
                        needs, {("ns", m): 0 for m in names}, ("ns", n), 0
                    ),
                )
                gone = {v.pod for v in out.victims}
                evictions += [(t, n, v.deployment) for v in out.victims]
                pods = [p for p in pods if p.name not in gone]
                pods += [
                    replace(c.record, ready=True, owner_uid=uids[n], min_replicas=1)
                    for c in out.to_create
                ]
                if not gone:
                    break
        for n in names:
            ready = sum(1 for p in pods if p.deployment == n and p.ready)
            assert ready >= 1, f"{n} below its floor at t={t}"
        if t % 100 == 95:
            at_wave_end.append((loaded, sum(1 for p in pods if p.deployment == loaded)))
    assert evictions, "the waves made no eviction at all"
    for when, evictor, victim in evictions:
        assert evictor == names[int(when // 100) % 2], f"{evictor} evicted {victim} at t={when}"
    # Wave 1: alpha grows into free GPUs; then each loaded model gets its 3 replicas.
    assert at_wave_end == [("alpha", 3), ("beta", 3), ("alpha", 3)], at_wave_end
    # Per wave after the first, exactly the idle model's two spare replicas changed hands.
    per_wave = [sum(1 for w, *_ in evictions if int(w // 100) == i) for i in range(3)]
    assert per_wave == [0, 2, 2], per_wave
