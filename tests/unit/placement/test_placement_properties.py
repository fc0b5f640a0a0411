"""Placement engine properties on random clusters and request streams (Hypothesis)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfleet.placement import (
    ClusterView,
    DeploymentRef,
    Evict,
    GpuInfo,
    NodeInfo,
    Placed,
    PlacedReplica,
    PlacementSettings,
    PlacementStrategy,
    ReplicaRequest,
    ReplicaState,
    SharingMode,
    build_view,
    compute_fragmentation_penalty,
    decide,
)
from modelfleet.placement.engine import compute_static_key
from modelfleet.placement.view import IDLE_MEMORY_MIB

MARGIN = 512
SETTINGS = PlacementSettings(memory_margin_mib=MARGIN)
DEPLOYMENTS = [DeploymentRef("ns", f"d{i}") for i in range(4)]


@st.composite
def clusters(draw: st.DrawFn, max_nodes: int = 5) -> list[NodeInfo]:
    count = draw(st.integers(1, max_nodes))
    nodes = []
    for i in range(count):
        name = f"n{i}"
        size = draw(st.integers(1, 4))
        memory = draw(st.sampled_from([24000, 48000]))
        gpus = []
        for j in range(size):
            foreign = draw(st.sampled_from([0, 0, 0, 3000]))  # memory used outside modelfleet
            gpus.append(
                GpuInfo(
                    index=j,
                    gpu_id=f"{name}:{j}",
                    uuid=f"u-{name}-{j}",
                    product="H100" if memory == 48000 else "L4",
                    memory_total_mib=memory,
                    memory_used_mib=foreign,
                    memory_free_mib=memory - foreign,
                    healthy=draw(st.booleans()) or draw(st.booleans()),
                )
            )
        nodes.append(
            NodeInfo(
                name=name,
                gpus=tuple(gpus),
                schedulable=draw(st.integers(0, 5)) > 0,
                healthy=draw(st.integers(0, 5)) > 0,
                stale=draw(st.integers(0, 6)) == 0,
            )
        )
    return nodes


@st.composite
def requests(draw: st.DrawFn, serial: int) -> ReplicaRequest:
    shared = draw(st.booleans())
    return ReplicaRequest(
        deployment=draw(st.sampled_from(DEPLOYMENTS)),
        pod=f"r-{serial}",
        gpu_count=draw(st.integers(1, 3)) if not shared else draw(st.sampled_from([1, 1, 2])),
        memory_mib=draw(st.sampled_from([4000, 10000, 20000, 30000])) if shared else None,
        sharing=SharingMode.SHARED if shared else SharingMode.EXCLUSIVE,
        strategy=draw(st.sampled_from([None, *PlacementStrategy])),
        spread=draw(st.booleans()),
        priority=draw(st.integers(-1, 1)),
        min_replicas=draw(st.integers(0, 2)),
        last_used=float(draw(st.integers(0, 100))),
    )


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[NodeInfo], list[ReplicaRequest]]:
    nodes = draw(clusters())
    reqs = [draw(requests(i)) for i in range(draw(st.integers(1, 14)))]
    return nodes, reqs


def check_no_overcommit(view: ClusterView) -> None:
    for node in view.nodes.values():
        for gpu in node.gpus:
            if gpu.replicas():
                assert gpu.info.healthy, f"{gpu.info.gpu_id} is unhealthy but holds replicas"
                assert node.info.healthy
                assert not node.info.stale
                assert node.info.schedulable
            if gpu.holders:
                assert len(gpu.holders) == 1, f"{gpu.info.gpu_id} held twice"
                assert not gpu.shared, f"{gpu.info.gpu_id} both held whole and shared"
            if gpu.shared:
                assert gpu.available_mib >= 0, f"{gpu.info.gpu_id} memory over-committed"
                assert len(gpu.starting) <= 1, f"{gpu.info.gpu_id} starts two replicas at once"


def forget_memory_of(nodes: list[NodeInfo], decision: Evict) -> list[NodeInfo]:
    """The nodes as the agents measure them once the victims of `decision` have gone."""
    gone = {g for v in decision.victims for g in v.gpu_ids}
    return [
        replace(
            info,
            gpus=tuple(
                replace(g, memory_used_mib=0, memory_free_mib=g.memory_total_mib)
                if g.gpu_id in gone
                else g
                for g in info.gpus
            ),
        )
        for info in nodes
    ]


def run_stream(
    nodes: list[NodeInfo], reqs: list[ReplicaRequest], seed_replicas: list[PlacedReplica]
) -> ClusterView:
    view = build_view(nodes, seed_replicas, SETTINGS)
    for r in reqs:
        decision = decide(view, r)
        if isinstance(decision, Evict):
            # The victims are gone, and once the agent measures again their memory is free:
            # then a whole-GPU replica fits (a Shared one may still wait for its memory).
            nodes = forget_memory_of(nodes, decision)
            view = build_view(nodes, list(view.with_evicted(decision).replicas.values()), SETTINGS)
            decision = decide(view, r)
            if r.sharing == SharingMode.EXCLUSIVE:
                assert isinstance(decision, Placed), decision
        if isinstance(decision, Placed):
            view = view.with_placed(decision)
        check_no_overcommit(view)
        # The ledger rebuilt from the replicas alone (an operator restart) agrees.
        check_no_overcommit(build_view(nodes, list(view.replicas.values()), SETTINGS))
    return view


def measured(
    nodes: list[NodeInfo], view: ClusterView
) -> tuple[list[NodeInfo], list[PlacedReplica]]:
    """The same cluster once every replica is ready and its agent measures its memory."""
    used: dict[str, int] = {}
    reps = []
    for rep in view.replicas.values():
        reps.append(replace(rep, state=ReplicaState.READY, measured=True))
        for gpu_id in rep.gpu_ids:
            used[gpu_id] = used.get(gpu_id, 0) + (
                rep.footprint_mib or 0 if not rep.whole_gpus else 20000
            )
    out = []
    for info in nodes:
        gpus = tuple(
            replace(
                g,
                memory_used_mib=g.memory_used_mib + min(used.get(g.gpu_id, 0), g.memory_free_mib),
                memory_free_mib=max(g.memory_free_mib - used.get(g.gpu_id, 0), 0),
            )
            for g in info.gpus
        )
        out.append(replace(info, gpus=gpus))
    return out, reps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_never_overcommits_gpus_or_memory(
    stream: tuple[list[NodeInfo], list[ReplicaRequest]],
) -> None:
    nodes, reqs = stream
    view = run_stream(nodes, reqs[: len(reqs) // 2], [])
    # Half the stream later the first replicas are ready and measured; the rest follows.
    nodes2, reps = measured(nodes, view)
    run_stream(nodes2, reqs[len(reqs) // 2 :], reps)


@settings(max_examples=60, deadline=None)
@given(streams(), st.data())
def test_same_input_same_answer(
    stream: tuple[list[NodeInfo], list[ReplicaRequest]], data: st.DataObject
) -> None:
    nodes, reqs = stream
    view = run_stream(nodes, reqs, [])
    nodes2, reps = measured(nodes, view)
    probe = data.draw(requests(999))
    a = decide(build_view(nodes2, reps, SETTINGS), probe)
    b = decide(build_view(list(reversed(nodes2)), list(reversed(reps)), SETTINGS), probe)
    assert a == b
    assert decide(build_view(nodes2, reps, SETTINGS), probe) == a


@settings(max_examples=60, deadline=None)
@given(
    healthy=st.integers(1, 6),
    excluded=st.lists(st.sampled_from(["unhealthy", "stale", "cordoned", "no-gpu"]), max_size=3),
    cursor=st.one_of(st.none(), st.sampled_from(["a", "n0", "n3", "n9", "zz"])),
)
def test_round_robin_visits_every_eligible_node_before_repeating(
    healthy: int, excluded: list[str], cursor: str | None
) -> None:
    nodes = [
        NodeInfo(
            f"n{i}",
            tuple(GpuInfo(j, f"n{i}:{j}", f"u{i}{j}", "H100", 8000, 0, 8000) for j in range(4)),
        )
        for i in range(healthy)
    ]
    for k, why in enumerate(excluded):
        name = f"x{k}"
        gpus = (GpuInfo(0, f"{name}:0", f"ux{k}", "H100", 8000, 0, 8000, healthy=why != "no-gpu"),)
        nodes.append(
            NodeInfo(
                name,
                gpus,
                healthy=why != "unhealthy",
                stale=why == "stale",
                schedulable=why != "cordoned",
            )
        )
    # Plain round-robin: with fragmentation-aware ranking, partly used nodes come first.
    plain = replace(SETTINGS, fragmentation_aware=False)
    view = build_view(nodes, [], plain, cursor=cursor)
    seen = []
    for i in range(2 * healthy):
        r = ReplicaRequest(
            DeploymentRef("ns", f"m{i}"), f"m{i}-1", strategy=PlacementStrategy.ROUND_ROBIN
        )
        d = decide(view, r)
        assert isinstance(d, Placed)
        seen.append(d.node)
        view = view.with_placed(d)
    assert sorted(seen[:healthy]) == sorted(f"n{i}" for i in range(healthy))
    assert seen[healthy:] == seen[:healthy]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_eviction_never_breaks_a_floor_or_a_priority(
    stream: tuple[list[NodeInfo], list[ReplicaRequest]], data: st.DataObject
) -> None:
    nodes, reqs = stream
    view = run_stream(nodes, reqs, [])
    nodes2, reps = measured(nodes, view)
    view = build_view(nodes2, reps, SETTINGS)
    probe = data.draw(requests(999))
    decision = decide(view, probe)
    if not isinstance(decision, Evict):
        return
    removed: dict[DeploymentRef, int] = {}
    for victim in decision.victims:
        assert victim.deployment != probe.deployment
        assert victim.priority <= probe.priority
        assert victim.state == ReplicaState.READY
        assert victim.node == decision.node
        removed[victim.deployment] = removed.get(victim.deployment, 0) + 1
    for d, n in removed.items():
        assert view.counts[d] - n >= view.floors[d], f"{d} taken below minReplicas"
    # After the victims are gone and the agents measured again, it fits on the target node.
    # (For Shared, the memory a victim frees is estimated by its footprint; the test cluster's
    # memory is exactly the footprints plus foreign use, which a victim does not free. For
    # Exclusive, foreign use beyond an idle GPU's keeps the GPU taken once the victim is gone.)
    nodes3, reps3 = measured(nodes, view.with_evicted(decision))
    after = decide(build_view(nodes3, reps3, SETTINGS), probe)
    foreign = [g.memory_used_mib for n in nodes for g in n.gpus]
    if (
        probe.sharing == SharingMode.EXCLUSIVE and max(foreign, default=0) <= IDLE_MEMORY_MIB
    ) or not any(foreign):
        assert isinstance(after, Placed), after
        assert after.node == decision.node


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_fragmentation_ranking_picks_the_least_penalty_and_never_loses_a_fit(
    stream: tuple[list[NodeInfo], list[ReplicaRequest]], data: st.DataObject
) -> None:
    # Whatever the cluster and strategy, a whole-GPU placement goes to a node whose penalty
    # (compute_fragmentation_penalty, which decide inlines) is the least among the nodes of its
    # spread class that fit; and the ranking never turns a fit into a wait.
    nodes, reqs = stream
    view = run_stream(nodes, reqs, [])
    probe = replace(data.draw(requests(999)), sharing=SharingMode.EXCLUSIVE, memory_mib=None)
    decision = decide(view, probe)
    plain = decide(replace(view, settings=replace(view.settings, fragmentation_aware=False)), probe)
    assert isinstance(decision, Placed) == isinstance(plain, Placed)
    if not isinstance(decision, Placed):
        return
    count = probe.gpu_count

    def spread_ok(name: str) -> bool:
        return not probe.spread or probe.deployment not in view.nodes[name].deployments

    def penalty(name: str) -> int:
        n = view.nodes[name]
        return compute_fragmentation_penalty(n.whole_free, n.healthy_gpus, count)

    fitting = [
        name
        for name, _ in view.eligibility(compute_static_key(probe)).nodes
        if view.nodes[name].whole_free >= count
    ]
    same_class = [n for n in fitting if spread_ok(n) == spread_ok(decision.node)]
    assert any(spread_ok(n) for n in fitting) == spread_ok(decision.node)
    assert penalty(decision.node) == min(penalty(n) for n in same_class)
    if "fragmentation:" in decision.reason:
        assert isinstance(plain, Placed)
        assert plain.node != decision.node
        assert penalty(plain.node) > penalty(decision.node)
