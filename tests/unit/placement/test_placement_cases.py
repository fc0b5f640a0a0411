"""Placement engine: named table cases, each a small cluster, a request and the expected outcome."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modelfleet.placement import (
    PRODUCT_LABEL,
    DeploymentRef,
    Evict,
    GpuInfo,
    NodeInfo,
    Placed,
    PlacedReplica,
    PlacementInputError,
    PlacementSettings,
    PlacementStrategy,
    ReplicaRequest,
    ReplicaState,
    Requests,
    SharingMode,
    Taint,
    Toleration,
    Unplaceable,
    UnplaceableCode,
    build_view,
    compute_fragmentation_penalty,
    compute_ledger,
    decide,
)

H100 = "NVIDIA-H100-80GB-HBM3"
L4 = "NVIDIA-L4"
MIB = 81920
SETTINGS = PlacementSettings(memory_margin_mib=1024)
# The strategies on their own, without fragmentation-aware ranking: the cases that pin down
# what each strategy's score means.
PLAIN = PlacementSettings(memory_margin_mib=1024, fragmentation_aware=False)


def node(
    name: str,
    gpus: int = 8,
    *,
    product: str = H100,
    memory: int = MIB,
    used: dict[int, int] | None = None,
    bad_gpus: tuple[int, ...] = (),
    **kw: object,
) -> NodeInfo:
    used = used or {}
    infos = tuple(
        GpuInfo(
            index=i,
            gpu_id=f"{name}:{i}",
            uuid=f"GPU-{name}-{i}",
            product=product,
            memory_total_mib=memory,
            memory_used_mib=used.get(i, 0),
            memory_free_mib=memory - used.get(i, 0),
            healthy=i not in bad_gpus,
            reason="XID 79" if i in bad_gpus else "",
        )
        for i in range(gpus)
    )
    labels = {PRODUCT_LABEL: product, **kw.pop("labels", {})}  # type: ignore[dict-item]
    return NodeInfo(name=name, gpus=infos, labels=labels, **kw)  # type: ignore[arg-type]


def dep(name: str) -> DeploymentRef:
    return DeploymentRef("ml", name)


def rep(
    deployment: str,
    n: int,
    node_name: str,
    gpus: tuple[int, ...],
    *,
    footprint: int | None = None,
    sharing: SharingMode = SharingMode.EXCLUSIVE,
    priority: int = 0,
    last_used: float = 0.0,
    min_replicas: int = 0,
    state: ReplicaState = ReplicaState.READY,
    measured: bool = True,
) -> PlacedReplica:
    return PlacedReplica(
        deployment=dep(deployment),
        pod=f"{deployment}-instance-{n}",
        node=node_name,
        gpu_ids=tuple(f"{node_name}:{i}" for i in gpus),
        sharing=sharing,
        footprint_mib=footprint,
        priority=priority,
        last_used=last_used,
        min_replicas=min_replicas,
        state=state,
        measured=measured,
    )


def req(deployment: str = "new", **kw: object) -> ReplicaRequest:
    return ReplicaRequest(deployment=dep(deployment), pod=f"{deployment}-instance-9", **kw)  # type: ignore[arg-type]


def shared_req(deployment: str = "new", memory: int = 20480, **kw: object) -> ReplicaRequest:
    return req(deployment, sharing=SharingMode.SHARED, memory_mib=memory, **kw)


def placed(decision: object) -> Placed:
    assert isinstance(decision, Placed), decision
    return decision


def unplaceable(decision: object, code: UnplaceableCode) -> Unplaceable:
    assert isinstance(decision, Unplaceable), decision
    assert decision.code == code, decision
    return decision


def evict(decision: object) -> Evict:
    assert isinstance(decision, Evict), decision
    return decision


# --- simple choices -------------------------------------------------------------------------


def test_empty_cluster_waits_for_stats() -> None:
    d = unplaceable(decide(build_view([], [], SETTINGS), req()), UnplaceableCode.WAITING_FOR_STATS)
    assert "no node-stats agent has reported" in d.reason


def test_single_node_best_fit_gpus() -> None:
    # a:0 is taken: two GPUs come from the free aligned pair a:2,a:3 (not a:1,a:2, which would
    # leave two single GPUs).
    view = build_view([node("a", 4)], [rep("x", 1, "a", (0,))], SETTINGS)
    d = placed(decide(view, req(gpu_count=2)))
    assert (d.node, d.gpu_ids, d.uuids) == ("a", ("a:2", "a:3"), ("GPU-a-2", "GPU-a-3"))
    assert "by best fit (the smallest free block that holds them)" in d.reason
    assert d.replica.state == ReplicaState.STARTING
    assert not d.replica.measured


def test_best_fit_gpus_take_single_free_gpus_before_breaking_a_pair() -> None:
    # 8 GPUs, 0, 2, 5 and 6 taken: 1, 3, 4 and 7 are free, no aligned pair among them. A 2-GPU
    # replica takes the free GPUs in the smallest free blocks (all of size 1), lowest first.
    taken = [rep("x", 1, "a", (0, 2, 5, 6))]
    d = placed(decide(build_view([node("a")], taken, SETTINGS), req(gpu_count=2)))
    assert d.gpu_ids == ("a:1", "a:3")
    # 0 and 4 taken: one GPU is a:1, whose pair 0-1 is broken already (so is a:5's), keeping
    # 2-3 and 6-7 free as pairs; two GPUs take the first free aligned pair.
    taken = [rep("x", 1, "a", (0, 4))]
    d = placed(decide(build_view([node("a")], taken, SETTINGS), req()))
    assert d.gpu_ids == ("a:1",)
    d = placed(decide(build_view([node("a")], taken, SETTINGS), req(gpu_count=2)))
    assert d.gpu_ids == ("a:2", "a:3")


def test_availability_prefers_share_over_count_on_heterogeneous_nodes() -> None:
    # big: 4 of 8 free (50%); small: 3 of 4 free (75%): the share wins although 4 > 3.
    view = build_view(
        [node("big", 8), node("small", 4)],
        [rep("x", 1, "big", (0, 1, 2, 3)), rep("y", 1, "small", (0,))],
        SETTINGS,
    )
    d = placed(decide(view, req()))
    assert d.node == "small"
    assert d.score == 0.75
    assert "3 of 4 GPUs free (75%)" in d.reason


def test_availability_count_breaks_equal_shares() -> None:
    # 4 of 8 and 2 of 4 are both 50%: the absolute count decides.
    view = build_view(
        [node("a-small", 4), node("b-big", 8)],
        [rep("x", 1, "a-small", (0, 1)), rep("y", 1, "b-big", (0, 1, 2, 3))],
        PLAIN,
    )
    assert placed(decide(view, req())).node == "b-big"


def test_ties_go_to_the_lowest_node_name() -> None:
    view = build_view([node("c"), node("b"), node("a")], [], SETTINGS)
    for strategy in PlacementStrategy:
        assert placed(decide(view, req(strategy=strategy))).node == "a"


def test_weighted_spreads_in_proportion_to_capacity() -> None:
    # 8x80 GiB with 2 replicas: 640/3 = 213 GiB per replica; 4x80 GiB with 1: 320/2 = 160.
    view = build_view(
        [node("big", 8), node("small", 4)],
        [rep("x", 1, "big", (0,)), rep("x", 2, "big", (1,)), rep("y", 1, "small", (0,))],
        PLAIN,
    )
    d = placed(decide(view, req(strategy=PlacementStrategy.WEIGHTED)))
    assert d.node == "big"
    assert d.score == pytest.approx(640 / 3, abs=0.01)
    # Over a stream, the big node gets twice the replicas of the small one.
    view = build_view([node("big", 8), node("small", 4)], [], PLAIN)
    counts = {"big": 0, "small": 0}
    for i in range(9):
        r = replace(
            req(f"m{i}", strategy=PlacementStrategy.WEIGHTED, spread=False),
            pod=f"m{i}-instance-1",
        )
        d = placed(decide(view, r))
        counts[d.node] += 1
        view = view.with_placed(d)
    assert counts == {"big": 6, "small": 3}


def test_default_strategy_comes_from_settings() -> None:
    view = build_view(
        [node("a"), node("b")],
        [rep("x", 1, "a", (0,))],
        PlacementSettings(
            default_strategy=PlacementStrategy.ROUND_ROBIN, fragmentation_aware=False
        ),
        cursor="a",
    )
    d = placed(decide(view, req()))
    assert d.strategy == PlacementStrategy.ROUND_ROBIN
    assert d.node == "b"
    assert d.cursor == "b"


# --- round-robin ----------------------------------------------------------------------------


def test_round_robin_cycles_in_name_order_and_skips_unhealthy() -> None:
    nodes = [
        node("n1"),
        node("n2", healthy=False, reason="agent unreachable"),
        node("n3"),
        node("n4", stale=True, reason="last sample 40s old"),
        node("n5"),
    ]
    view = build_view(nodes, [], PLAIN)
    seen = []
    for i in range(6):
        d = placed(decide(view, req(f"m{i}", strategy=PlacementStrategy.ROUND_ROBIN)))
        seen.append(d.node)
        view = view.with_placed(d)
        assert view.cursor == d.node == d.cursor
    assert seen == ["n1", "n3", "n5", "n1", "n3", "n5"]


def test_round_robin_cursor_is_input_state() -> None:
    view = build_view([node("a"), node("b"), node("c")], [], SETTINGS, cursor="b")
    d = placed(decide(view, req(strategy=PlacementStrategy.ROUND_ROBIN)))
    assert d.node == "c"
    assert "next node after b" in d.reason
    # A cursor naming a node that is gone still works: the next name after it.
    view = build_view([node("a"), node("c")], [], SETTINGS, cursor="b")
    assert placed(decide(view, req(strategy=PlacementStrategy.ROUND_ROBIN))).node == "c"
    view = build_view([node("a"), node("c")], [], SETTINGS, cursor="z")
    assert placed(decide(view, req(strategy=PlacementStrategy.ROUND_ROBIN))).node == "a"


def test_other_strategies_leave_the_cursor_alone() -> None:
    view = build_view([node("a"), node("b")], [], SETTINGS, cursor="b")
    d = placed(decide(view, req()))
    assert d.cursor == "b"


# --- exclusions -----------------------------------------------------------------------------


def test_unhealthy_node_and_gpu_are_excluded() -> None:
    view = build_view(
        [node("a", 2, bad_gpus=(0,)), node("b", 8, healthy=False, reason="NotReady")],
        [],
        SETTINGS,
    )
    d = placed(decide(view, req()))
    assert (d.node, d.gpu_ids) == ("a", ("a:1",))
    d2 = unplaceable(decide(view, req(gpu_count=2)), UnplaceableCode.NO_CAPACITY)
    assert "largest matching node, a, has 1 healthy" in d2.reason


def test_only_unhealthy_nodes_say_why() -> None:
    view = build_view([node("a", healthy=False, reason="agent unreachable")], [], SETTINGS)
    d = unplaceable(decide(view, req()), UnplaceableCode.NO_MATCHING_NODE)
    assert "a: agent unreachable" in d.reason


def test_stale_node_waits_for_stats() -> None:
    view = build_view([node("a", stale=True, reason="last sample 45s old")], [], SETTINGS)
    d = unplaceable(decide(view, req()), UnplaceableCode.WAITING_FOR_STATS)
    assert "stale" in d.reason
    assert "45s old" in d.reason


def _unreachable(name: str = "b", gpus: int = 8, **kw: object) -> NodeInfo:
    """A Ready node whose agent does not answer: no GPU figures, the Node's allocatable."""
    return NodeInfo(
        name=name,
        stale=True,
        reason="agent down: connection refused",
        gpu_allocatable=gpus,
        labels={PRODUCT_LABEL: H100},
        **kw,  # type: ignore[arg-type]
    )


def test_stale_node_that_could_take_it_waits_rather_than_evicting() -> None:
    # a is fresh and full with a replica eviction may take; b's agent does not answer, and by
    # what is known (8 GPUs allocatable, nothing placed there) b would take the replica.
    full = rep("old", 1, "a", (0, 1))
    view = build_view([node("a", 2), _unreachable()], [full], SETTINGS)
    d = unplaceable(decide(view, req()), UnplaceableCode.WAITING_FOR_STATS)
    assert (
        "no node with fresh GPU stats has room; 1 node whose agent is stale or unreachable "
        "could take it by what is known (b (agent down: connection refused)): waiting for its "
        "stats rather than evicting"
    ) in d.reason
    # The same cluster without b evicts.
    evict(decide(build_view([node("a", 2)], [full], SETTINGS), req()))
    # A stale node whose last figures show room (NVML not ready) counts the same.
    stale = node("b", 2, stale=True, reason="agent not ready: NVML does not answer")
    view = build_view([node("a", 2), stale], [full], SETTINGS)
    d = unplaceable(decide(view, req(gpu_count=2)), UnplaceableCode.WAITING_FOR_STATS)
    assert "b (agent not ready: NVML does not answer)" in d.reason


def test_stale_node_with_no_room_by_what_is_known_does_not_block_eviction() -> None:
    full = rep("old", 1, "a", (0, 1))
    on_b = rep("busy", 1, "b", tuple(range(8)), priority=5)
    view = build_view([node("a", 2), _unreachable()], [full, on_b], SETTINGS)
    d = evict(decide(view, req()))
    assert d.node == "a"
    # Other pods' GPU requests there count too.
    crowded = _unreachable(others=Requests(gpus=8, pods=1))
    evict(decide(build_view([node("a", 2), crowded], [full], SETTINGS), req()))
    # A request the stale node could never match (nodeSelector) does not wait for it either.
    evict(
        decide(
            build_view([node("a", 2, labels={"pool": "x"}), _unreachable()], [full], SETTINGS),
            req(node_selector={"pool": "x"}),
        )
    )
    # Replicas terminating there are going: the replica waits for them and the agent.
    going = replace(on_b, state=ReplicaState.TERMINATING)
    view = build_view([node("a", 2), _unreachable()], [full, going], SETTINGS)
    unplaceable(decide(view, req()), UnplaceableCode.WAITING_FOR_STATS)


def test_lost_node_is_not_waited_for() -> None:
    # NotReady (or gone) is lost, not stale: the node-lost rules replace its replicas, and a
    # replica that needs room evicts rather than waiting for it.
    full = rep("old", 1, "a", (0, 1))
    lost = replace(_unreachable(), stale=False, healthy=False, reason="node is NotReady")
    evict(decide(build_view([node("a", 2), lost], [full], SETTINGS), req()))


def test_stale_node_shared_replica_waits_only_where_memory_was_free() -> None:
    full = rep("old", 1, "a", (0,))
    promised = rep("s", 1, "b", (0,), footprint=60000, sharing=SharingMode.SHARED, measured=False)
    stale = node("b", 1, stale=True, reason="last sample 40s old")
    view = build_view([node("a", 1), stale], [full, promised], SETTINGS)
    # 81920 - 60000 - 1024 = 20896 MiB would be left on b:0 by what is known.
    unplaceable(decide(view, shared_req(memory=20480)), UnplaceableCode.WAITING_FOR_STATS)
    evict(decide(view, shared_req(memory=30720)))


def test_cordoned_node_is_excluded() -> None:
    view = build_view([node("a", schedulable=False), node("b")], [], SETTINGS)
    assert placed(decide(view, req())).node == "b"
    view = build_view([node("a", schedulable=False)], [], SETTINGS)
    d = unplaceable(decide(view, req()), UnplaceableCode.NO_MATCHING_NODE)
    assert "cordoned" in d.reason


def test_node_in_admission_backoff_is_excluded_and_named() -> None:
    why = "rejected a replica at admission (UnexpectedAdmissionError: ...); no replica goes there"
    view = build_view([node("a", rejected=why), node("b", gpus=2)], [], SETTINGS)
    assert placed(decide(view, req())).node == "b"  # a has more free GPUs, but is backing off
    view = build_view([node("a", rejected=why)], [], SETTINGS)
    d = unplaceable(decide(view, req()), UnplaceableCode.ADMISSION_BACKOFF)
    assert "1 node rejected a replica at admission (a: rejected a replica" in d.reason


def test_gpus_a_foreign_pod_holds_are_not_free() -> None:
    # The agent says another team's pod holds a:0 and a:1 (pod-resources): they are its.
    a = node("a", 4)
    held = tuple(replace(g, foreign_pods=("other/train",)) if g.index < 2 else g for g in a.gpus)
    view = build_view([replace(a, gpus=held), node("b", 2)], [], SETTINGS)
    # a is the only node with 3 GPUs, but 2 of them are taken.
    d = unplaceable(decide(view, req(gpu_count=3)), UnplaceableCode.NO_CAPACITY)
    assert "2 in use outside modelfleet (a:0 held by other/train, a:1 held by other/train)" in (
        d.reason
    )
    # Two fit on b (2 of 2 free) rather than on a's other two (2 of 4 free).
    assert placed(decide(view, req(gpu_count=2))).gpu_ids == ("b:0", "b:1")


def test_memory_in_use_with_no_replica_keeps_an_exclusive_replica_away() -> None:
    # 70,000 MiB used on a:0 by something modelfleet does not run: not a free GPU.
    view = build_view([node("a", 2, used={0: 70000})], [], SETTINGS)
    assert placed(decide(view, req())).gpu_ids == ("a:1",)
    assert "1 of 2 GPUs free" in placed(decide(view, req())).reason
    view = build_view([node("a", 1, used={0: 400})], [], SETTINGS)  # an idle GPU's driver use
    assert placed(decide(view, req())).gpu_ids == ("a:0",)


def test_a_node_allocates_no_more_gpus_than_its_device_plugin_advertises() -> None:
    # The agent sees 4 healthy GPUs, but the kubelet allocates 2 (say, right after a restart
    # only 2 devices are back, or the plugin marks 2 unhealthy): a 3-GPU replica does not fit.
    view = build_view([node("a", 4, gpu_allocatable=2)], [], SETTINGS)
    d = unplaceable(decide(view, req(gpu_count=3)), UnplaceableCode.NO_CAPACITY)
    assert "the largest free block is 2, on a" in d.reason
    assert "the device plugin advertises fewer GPUs (a allocates 2)" in d.reason
    assert placed(decide(view, req(gpu_count=2))).node == "a"
    # What our replicas already hold comes off the allocatable count too: two more GPUs take
    # evicting the one replica there, although three GPUs look free.
    held = rep("old", 1, "a", (0,))
    view = build_view([node("a", 4, gpu_allocatable=2)], [held], SETTINGS)
    assert [v.pod for v in evict(decide(view, req(gpu_count=2))).victims] == ["old-instance-1"]


GI = 2**30
ALLOC = Requests(cpu_m=8000, memory_bytes=64 * GI, pods=110)


def test_a_node_without_the_cpu_or_memory_the_replica_requests_is_not_chosen() -> None:
    # a has the most free GPUs, but other pods there request 7 of its 8 CPUs: the kubelet
    # would refuse a replica asking for 2 (OutOfcpu), so b takes it.
    busy = node("a", 8, allocatable=ALLOC, others=Requests(cpu_m=7000, pods=3))
    view = build_view([busy, node("b", 4, allocatable=ALLOC)], [], SETTINGS)
    wants = Requests(cpu_m=2000, memory_bytes=16 * GI, gpus=1, pods=1)
    assert placed(decide(view, req(requests=wants))).node == "b"
    # Alone, a says what it lacks, and that eviction is not the way.
    view = build_view([busy], [], SETTINGS)
    d = unplaceable(decide(view, req(requests=wants)), UnplaceableCode.NO_CAPACITY)
    assert "1 node with the GPUs free lacks what the replica requests besides" in d.reason
    assert "a (cpu 2000m requested, 1000m of 8000m free)" in d.reason
    assert "lower spec.engine.resources.requests" in d.reason
    # Memory and pod slots count the same way; replicas already there count too.
    full = node("a", 8, allocatable=ALLOC, others=Requests(memory_bytes=60 * GI, pods=109))
    there = replace(rep("old", 1, "a", (0,)), requests=Requests(memory_bytes=GI, pods=1))
    d = unplaceable(decide(build_view([full], [there], SETTINGS), req(requests=wants)),
                    UnplaceableCode.NO_CAPACITY)  # fmt: skip
    assert "memory 16384Mi requested, 3072Mi of 65536Mi free, pods: all 110 taken" in d.reason
    # A placed replica's requests count for the next decision of the burst.
    view = build_view([node("a", 8, allocatable=Requests(3000, 64 * GI, 0, 110))], [], SETTINGS)
    first = placed(decide(view, req(requests=wants)))
    assert first.replica.requests == wants
    view = view.with_placed(first)
    d = unplaceable(decide(view, req("other", requests=wants)), UnplaceableCode.NO_CAPACITY)
    assert "cpu 2000m requested, 1000m of 3000m free" in d.reason


def test_gpus_other_pods_request_count_before_the_agent_sees_them() -> None:
    # A pod bound to a (not admitted yet, so no agent attributes a GPU to it) asks for 3 of
    # the 4 devices the plugin advertises: one is left for modelfleet.
    view = build_view(
        [node("a", 4, gpu_allocatable=4, others=Requests(gpus=3, pods=1))], [], SETTINGS
    )
    d = unplaceable(decide(view, req(gpu_count=2)), UnplaceableCode.NO_CAPACITY)
    assert "the largest free block is 1, on a" in d.reason
    assert placed(decide(view, req(gpu_count=1))).gpu_ids == ("a:0",)


def test_eviction_skips_a_node_whose_victims_would_not_free_enough_cpu() -> None:
    # Both nodes are full of replicas of `old`; on a other pods hold nearly all the CPU, so
    # evicting there frees the GPU but not the CPU: the victim is chosen on b.
    small = Requests(cpu_m=100, pods=1)
    a = node("a", 1, allocatable=ALLOC, others=Requests(cpu_m=7800, pods=1))
    b = node("b", 1, allocatable=ALLOC)
    on_a = replace(rep("old", 1, "a", (0,), last_used=1.0), requests=small)
    on_b = replace(rep("old", 2, "b", (0,), last_used=2.0), requests=small)
    view = build_view([a, b], [on_a, on_b], SETTINGS)
    wants = Requests(cpu_m=1000, gpus=1, pods=1)
    d = evict(decide(view, req(requests=wants)))
    assert d.node == "b"
    assert [v.pod for v in d.victims] == ["old-instance-2"]


def test_nodes_that_hand_out_shared_gpus_take_no_exclusive_replica() -> None:
    # Time-slicing: GFD labels the node, the plugin advertises each GPU 4 times. MIG single
    # strategy: 7 instances per GPU as nvidia.com/gpu. Either way a device is not a whole GPU,
    # and two Exclusive replicas could land on one.
    sliced = node("a", 2, gpu_allocatable=8, labels={"nvidia.com/gpu.replicas": "4"})
    mig = node("b", 1, gpu_allocatable=7)
    view = build_view([sliced, mig], [], SETTINGS)
    d = unplaceable(decide(view, req()), UnplaceableCode.NO_MATCHING_NODE)
    assert "2 nodes hand out shared GPUs, which an Exclusive replica does not take" in d.reason
    assert "a: nvidia.com/gpu.replicas=4: each GPU is shared (time-slicing or MPS)" in d.reason
    assert "b: allocates 7 nvidia.com/gpu for the 1 GPUs its agent sees" in d.reason
    # A Shared replica works in GPU memory, and asks the kubelet for no device: it may go
    # (to b, whose one GPU it fits exactly, rather than breaking up a's two).
    assert placed(decide(view, shared_req())).node == "b"
    assert placed(decide(build_view([sliced], [], SETTINGS), shared_req())).node == "a"
    # Whole GPUs: as many devices as GPUs (or fewer, unhealthy ones) is fine.
    whole = build_view(
        [node("c", 2, gpu_allocatable=2), node("d", 2, gpu_allocatable=1)], [], SETTINGS
    )
    # (d allocates 1 of its 2: one GPU fits there exactly, and c's two stay together.)
    assert placed(decide(whole, req())).node == "d"


def test_memory_of_a_replica_that_just_went_makes_it_wait_not_evict() -> None:
    # a:0 still shows the memory of a replica whose Pod is gone (the agent samples every few
    # seconds); a:1 holds another model's replica, an eviction candidate. Waiting one sample is
    # right; evicting would turn a monitoring lag into a disruption.
    other = rep("other", 1, "a", (1,))
    view = build_view([node("a", 2, used={0: 70000})], [other], SETTINGS)
    d = unplaceable(decide(view, req(gpu_count=1, priority=10)), UnplaceableCode.WAITING_FOR_STATS)
    assert "waiting for the next sample rather than evicting" in d.reason
    assert "a:0 (70000 MiB in use with no replica on it)" in d.reason


def test_node_selector() -> None:
    view = build_view(
        [node("a", labels={"gpu": "h100"}), node("b", labels={"gpu": "a100"})], [], SETTINGS
    )
    assert placed(decide(view, req(node_selector={"gpu": "a100"}))).node == "b"
    d = unplaceable(
        decide(view, req(node_selector={"gpu": "l4"})), UnplaceableCode.NO_MATCHING_NODE
    )
    assert "2 of 2 nodes do not match nodeSelector gpu=l4" in d.reason


def test_product_selector() -> None:
    view = build_view([node("a", product=H100), node("b", product=L4, memory=23034)], [], SETTINGS)
    assert placed(decide(view, req(product=L4))).node == "b"
    d = unplaceable(decide(view, req(product="NVIDIA-A100")), UnplaceableCode.NO_MATCHING_NODE)
    assert "no NVIDIA-A100 GPU" in d.reason


def test_product_selector_on_a_node_with_mixed_gpus() -> None:
    gpus = (
        GpuInfo(0, "m:0", "u0", H100, MIB, 0, MIB),
        GpuInfo(1, "m:1", "u1", L4, 23034, 0, 23034),
    )
    view = build_view([NodeInfo("m", gpus)], [], SETTINGS)
    assert placed(decide(view, req(product=L4))).gpu_ids == ("m:1",)
    d = unplaceable(decide(view, req(product=L4, gpu_count=2)), UnplaceableCode.NO_CAPACITY)
    assert "NVIDIA-L4 GPUs on one node" in d.reason


def test_taints_and_tolerations() -> None:
    tainted = node("a", taints=(Taint("dedicated", "infer", "NoSchedule"),))
    view = build_view([tainted], [], SETTINGS)
    d = unplaceable(decide(view, req()), UnplaceableCode.NO_MATCHING_NODE)
    assert "dedicated=infer:NoSchedule" in d.reason
    for tol in (
        Toleration("dedicated", "Equal", "infer", "NoSchedule"),
        Toleration("dedicated", "Exists"),
        Toleration(None, "Exists"),
        Toleration("dedicated", "Equal", "infer"),
    ):
        assert placed(decide(view, req(tolerations=(tol,)))).node == "a", tol
    for tol in (
        Toleration("dedicated", "Equal", "batch"),
        Toleration("dedicated", "Exists", effect="NoExecute"),
        Toleration("other", "Exists"),
    ):
        unplaceable(decide(view, req(tolerations=(tol,))), UnplaceableCode.NO_MATCHING_NODE)
    no_exec = build_view([node("a", taints=(Taint("gpu", "bad", "NoExecute"),))], [], SETTINGS)
    unplaceable(decide(no_exec, req()), UnplaceableCode.NO_MATCHING_NODE)


def test_prefer_no_schedule_lowers_the_choice() -> None:
    soft = node("a", taints=(Taint("spot", "yes", "PreferNoSchedule"),))
    view = build_view([soft, node("b")], [rep("x", 1, "b", (0, 1, 2, 3, 4, 5))], PLAIN)
    # b has 2 of 8 free, a has 8 of 8, but a's taint is not tolerated: b still wins.
    assert placed(decide(view, req())).node == "b"
    tolerated = req(tolerations=(Toleration("spot", "Exists"),))
    assert placed(decide(view, tolerated)).node == "a"
    full_b = build_view([soft, node("b", 1)], [rep("x", 1, "b", (0,))], PLAIN)
    d = placed(decide(full_b, req()))
    assert d.node == "a"
    assert "PreferNoSchedule" in d.reason


# --- fragmentation-aware ranking -----------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "healthy", "count", "partial", "penalty"),
    [
        (8, 8, 1, False, 17),  # a whole 8-GPU node broken up
        (4, 4, 1, False, 9),  # a whole 4-GPU node: less bad
        (4, 8, 1, False, 8),  # the block of 4 is lost (3 remain)
        (5, 8, 1, False, 0),  # 4 stay free together
        (2, 8, 1, False, 4),
        (1, 8, 1, False, 0),  # an exact fit
        (4, 4, 4, False, 0),  # an exact fit of a whole node
        (5, 8, 4, False, 0),  # the block of 4 is what it needs
        (7, 8, 3, False, 0),  # 4 stay free together
        (5, 8, 3, False, 8),
        (8, 8, 1, True, 0),  # Shared, on a GPU already shared: no free GPU broken
    ],
)
def test_fragmentation_penalty(
    free: int, healthy: int, count: int, partial: bool, penalty: int
) -> None:
    assert compute_fragmentation_penalty(free, healthy, count, partial) == penalty


def _doc_example_nodes() -> tuple[list[NodeInfo], list[PlacedReplica]]:
    # docs/placement.md: a (8 GPUs, all free), b (8 GPUs, 5 free), c (4 GPUs, all free).
    return [node("a"), node("b"), node("c", 4)], [rep("x", 1, "b", (0, 1, 2))]


def test_small_replica_fills_a_partly_used_node_and_keeps_whole_nodes_whole() -> None:
    nodes, reps = _doc_example_nodes()
    d = placed(decide(build_view(nodes, reps, SETTINGS), req()))
    assert d.node == "b"
    assert d.gpu_ids == ("b:3",)  # the single free GPU of the block 3 (the quad 4-7 stays)
    assert (
        "fragmentation: a, the strategy's own pick, would break up a whole free node (8 GPUs); "
        "b breaks no larger free block"
    ) in d.reason
    # The strategy alone takes the emptiest node.
    plain = placed(decide(build_view(nodes, reps, PLAIN), req()))
    assert plain.node == "a"
    assert "fragmentation" not in plain.reason


def test_four_gpus_fit_exactly_and_the_eight_gpu_node_stays_whole() -> None:
    nodes, reps = _doc_example_nodes()
    view = build_view(nodes, reps, SETTINGS)
    d = placed(decide(view, req(gpu_count=4)))
    # b (5 of 8) and c (4 of 4) both break nothing larger; Availability then takes c.
    assert d.node == "c"
    assert "the highest share among 2 nodes that fit without breaking up more free GPUs" in (
        d.reason
    )
    # Availability alone would take a (8 of 8 free beats 4 of 4 on the count).
    assert "a, the strategy's own pick, would break up a whole free node (8 GPUs); c breaks " in (
        d.reason
    )
    view = view.with_placed(d)
    assert placed(decide(view, req("big", gpu_count=8))).node == "a"


def test_an_empty_small_node_is_broken_up_before_an_empty_large_one() -> None:
    view = build_view([node("a"), node("b", 4)], [], SETTINGS)
    d = placed(decide(view, req()))
    assert d.node == "b"
    assert "a, the strategy's own pick, would break up a whole free node (8 GPUs)" in d.reason
    assert "b breaks up a smaller whole node (4 GPUs)" in d.reason


def test_the_lowest_class_with_a_penalty_still_places() -> None:
    # Every node that fits runs a replica of m already and carries an untolerated
    # PreferNoSchedule taint (the lowest class), and placing there breaks a free block.
    soft = (Taint("spot", "yes", "PreferNoSchedule"),)
    view = build_view([node("a", taints=soft)], [rep("m", 1, "a", (0, 1, 2, 3))], SETTINGS)
    d = placed(decide(view, req("m")))
    assert d.node == "a"
    assert "spread not possible" in d.reason
    assert "PreferNoSchedule" in d.reason


def test_fragmentation_ranks_every_strategy() -> None:
    nodes, reps = _doc_example_nodes()
    for strategy in PlacementStrategy:
        d = placed(decide(build_view(nodes, reps, SETTINGS), req(strategy=strategy)))
        assert d.node == "b", strategy


def test_shared_replica_joins_a_shared_gpu_before_breaking_a_free_one() -> None:
    # a: one GPU carries a Shared replica with room; b: entirely free (and emptier).
    shared = rep("s", 1, "a", (0,), footprint=20480, sharing=SharingMode.SHARED)
    view = build_view([node("a", 2, used={0: 20480}), node("b", 2)], [shared], SETTINGS)
    d = placed(decide(view, shared_req()))
    assert (d.node, d.gpu_ids) == ("a", ("a:0",))
    plain = placed(decide(build_view(view_nodes(view), [shared], PLAIN), shared_req()))
    assert plain.node == "b"


def view_nodes(view: object) -> list[NodeInfo]:
    return [n.info for n in view.nodes.values()]  # type: ignore[attr-defined]


# --- BinPack -------------------------------------------------------------------------------

BINPACK = PlacementStrategy.BIN_PACK


def test_binpack_takes_the_fullest_node_that_fits() -> None:
    # docs/placement.md: a 6 of 8 in use, b 2 of 4, c empty. Two GPUs fill a or b exactly.
    nodes = [node("a"), node("b", 4), node("c")]
    reps = [rep("x", 1, "a", (0, 1, 2, 3, 4, 5)), rep("y", 1, "b", (0, 1))]
    for settings in (SETTINGS, PLAIN):
        d = placed(decide(build_view(nodes, reps, settings), req(gpu_count=2, strategy=BINPACK)))
        assert d.node == "a"
        assert d.strategy == BINPACK
        assert d.score == 1.0
        assert "bin-packing: 8 of 8 GPUs in use once placed (100%)" in d.reason


def test_binpack_is_most_allocated_then_best_fit() -> None:
    # One GPU: a would be 7 of 8 (88%), b 3 of 4 (75%): a, the fuller share.
    nodes = [node("a"), node("b", 4)]
    reps = [rep("x", 1, "a", (0, 1, 2, 3, 4, 5)), rep("y", 1, "b", (0, 1))]
    d = placed(decide(build_view(nodes, reps, PLAIN), req(strategy=BINPACK)))
    assert d.node == "a"
    # Availability, for contrast, takes the larger free share (b: 2 of 4 against 2 of 8).
    assert placed(decide(build_view(nodes, reps, PLAIN), req())).node == "b"
    # Equal shares once placed (a 6 of 8, b 3 of 4): best fit, the one with fewer GPUs left.
    reps = [rep("x", 1, "a", (0, 1, 2, 3, 4)), rep("y", 1, "b", (0, 1))]
    d = placed(decide(build_view(nodes, reps, PLAIN), req(strategy=BINPACK)))
    assert d.node == "b"


def test_binpack_fills_a_node_before_opening_another() -> None:
    view = build_view([node("a", 4), node("b", 4)], [], SETTINGS)
    seen = []
    for i in range(8):
        d = placed(decide(view, req(f"m{i}", strategy=BINPACK)))
        seen.append(d.node)
        view = view.with_placed(d)
    assert seen == ["a"] * 4 + ["b"] * 4


def test_binpack_still_spreads_replicas_of_one_deployment() -> None:
    view = build_view([node("a", 4), node("b", 4)], [rep("m", 1, "a", (0,))], SETTINGS)
    d = placed(decide(view, req("m", strategy=BINPACK)))
    assert d.node == "b"
    assert "spread: no other replica of ml/m there" in d.reason


def test_binpack_shared_replica_goes_to_the_fullest_gpu_memory() -> None:
    shared = rep("s", 1, "a", (0,), footprint=40960, sharing=SharingMode.SHARED)
    view = build_view([node("a", 2, used={0: 40960}), node("b", 1)], [shared], PLAIN)
    d = placed(decide(view, shared_req(strategy=BINPACK)))
    assert (d.node, d.gpu_ids) == ("a", ("a:0",))
    assert "bin-packing:" in d.reason
    assert "GPUs' memory in use" in d.reason


# --- spread ---------------------------------------------------------------------------------


def test_spread_prefers_nodes_without_the_deployment() -> None:
    view = build_view(
        [node("a"), node("b")],
        [rep("m", 1, "a", (0,)), rep("other", 1, "b", (0, 1, 2, 3))],
        SETTINGS,
    )
    d = placed(decide(view, req("m")))
    assert d.node == "b"
    assert "spread" in d.reason
    assert placed(decide(view, req("m", spread=False))).node == "a"


def test_spread_is_a_preference_not_a_rule() -> None:
    view = build_view([node("a", 2)], [rep("m", 1, "a", (0,))], SETTINGS)
    d = placed(decide(view, req("m")))
    assert d.node == "a"
    assert "spread not possible: every node that fits already runs a replica of ml/m" in d.reason


def test_spread_comes_before_fragmentation_for_every_strategy() -> None:
    # a is partly used by m's first replica: fragmentation alone would put the second there too,
    # but a node without a replica of m fits (b, empty), so the replicas stay apart.
    for strategy in PlacementStrategy:
        view = build_view([node("a"), node("b")], [rep("m", 1, "a", (0,))], SETTINGS)
        d = placed(decide(view, req("m", strategy=strategy)))
        assert d.node == "b", strategy
        assert "spread: no other replica of ml/m there" in d.reason
        # Once every node runs one, the third goes where fragmentation says, and says why.
        view = view.with_placed(d)
        third = placed(decide(view, replace(req("m", strategy=strategy), pod="m-instance-3")))
        assert "spread not possible" in third.reason


def test_spread_over_a_stream_of_replicas() -> None:
    # Three deployments of three replicas each on four 8-GPU nodes, default settings: no two
    # replicas of one deployment share a node, however the packing goes.
    view = build_view([node(f"n{i}") for i in range(4)], [], SETTINGS)
    for name in ("m1", "m2", "m3"):
        for n in range(1, 4):
            d = placed(decide(view, replace(req(name, gpu_count=2), pod=f"{name}-instance-{n}")))
            view = view.with_placed(d)
    for name in ("m1", "m2", "m3"):
        nodes = [r.node for r in view.replicas.values() if r.deployment == dep(name)]
        assert len(set(nodes)) == 3, (name, nodes)


# --- capacity, fragmentation ----------------------------------------------------------------


def test_fragmentation_says_the_largest_free_block() -> None:
    view = build_view(
        [node("gpu-node-1", 2), node("gpu-node-3", 2)],
        [
            rep("x", 1, "gpu-node-1", (0,), priority=5),
            rep("x", 2, "gpu-node-3", (1,), priority=5),
        ],
        SETTINGS,
    )
    d = unplaceable(decide(view, req(gpu_count=2)), UnplaceableCode.NO_CAPACITY)
    assert "needs 2 free GPUs on one node; the largest free block is 1, on gpu-node-1" in d.reason
    assert "2 have a higher priority than 0" in d.reason


def test_request_larger_than_any_node() -> None:
    view = build_view([node("a", 8)], [], SETTINGS)
    d = unplaceable(decide(view, req(gpu_count=16)), UnplaceableCode.NO_CAPACITY)
    assert "needs 16 GPUs on one node" in d.reason
    assert "has 8 healthy" in d.reason


# --- shared mode, ledger, start serialization -----------------------------------------------


def test_shared_best_fit_picks_the_fullest_gpu_that_fits() -> None:
    view = build_view(
        [node("a", 3, used={0: 70000, 1: 40000, 2: 10000})],
        [
            rep("x", 1, "a", (0,), footprint=70000, sharing=SharingMode.SHARED),
            rep("y", 1, "a", (1,), footprint=40000, sharing=SharingMode.SHARED),
            rep("z", 1, "a", (2,), footprint=10000, sharing=SharingMode.SHARED),
        ],
        SETTINGS,
    )
    d = placed(decide(view, shared_req(memory=20480)))
    # 81920-40000-1024 = 40896 available on a:1 is the least that fits (a:0 has 10896).
    assert d.gpu_ids == ("a:1",)
    assert "best fit (40896 MiB available for 20480 MiB)" in d.reason


def test_shared_ledger_keeps_two_quick_placements_apart() -> None:
    view = build_view([node("a", 1, memory=49152)], [], SETTINGS)
    first = placed(decide(view, shared_req("m1", memory=20000, priority=5)))
    # The agent has not measured first yet: free memory still reads 49152 MiB. Rebuilt from the
    # replicas alone (as after an operator restart), the ledger still holds its 20000 MiB.
    replicas = [first.replica]
    assert compute_ledger(replicas)["a:0"].promised_mib == 20000
    again = build_view([node("a", 1, memory=49152)], replicas, SETTINGS)
    # While it starts, no other Shared replica starts on a:0.
    unplaceable(decide(again, shared_req("m2", memory=20000)), UnplaceableCode.START_SERIALIZED)
    # Ready but not measured: the ledger decides: 49152 - 20000 - 1024 = 28128 MiB available.
    ready = [replace(first.replica, state=ReplicaState.READY)]
    view = build_view([node("a", 1, memory=49152)], ready, SETTINGS)
    assert placed(decide(view, shared_req("m2", memory=28128))).gpu_ids == ("a:0",)
    d = unplaceable(decide(view, shared_req("m2", memory=28129)), UnplaceableCode.NO_CAPACITY)
    assert "most: 28128 MiB on a:0" in d.reason


def test_starting_replicas_are_never_evicted() -> None:
    starting = rep("x", 1, "a", (0,), state=ReplicaState.STARTING, measured=False)
    view = build_view([node("a", 1)], [starting], SETTINGS)
    d = unplaceable(decide(view, req()), UnplaceableCode.NO_CAPACITY)
    assert "1 are still starting" in d.reason


def test_measured_replicas_are_not_counted_twice() -> None:
    # Measured: its 30000 MiB are in memory_used; the ledger holds nothing for it.
    r = rep("x", 1, "a", (0,), footprint=30000, sharing=SharingMode.SHARED, measured=True)
    view = build_view([node("a", 1, used={0: 30000})], [r], SETTINGS)
    assert compute_ledger([r]) == {}
    d = placed(decide(view, shared_req(memory=81920 - 30000 - 1024)))
    assert d.gpu_ids == ("a:0",)


def test_start_serialization_on_shared_gpus() -> None:
    starting = rep(
        "x", 1, "a", (0,), footprint=10000, sharing=SharingMode.SHARED,
        state=ReplicaState.STARTING, measured=False,
    )  # fmt: skip
    view = build_view([node("a", 1)], [starting], SETTINGS)
    d = unplaceable(decide(view, shared_req()), UnplaceableCode.START_SERIALIZED)
    assert "ml/x-instance-1 is still starting there" in d.reason
    assert "one at a time" in d.reason
    # Another GPU without a starting replica is used instead.
    view = build_view([node("a", 2)], [starting], SETTINGS)
    assert placed(decide(view, shared_req())).gpu_ids == ("a:1",)


def test_shared_and_exclusive_do_not_mix_on_a_gpu() -> None:
    view = build_view(
        [node("a", 2)],
        [
            rep("x", 1, "a", (0,)),
            rep("y", 1, "a", (1,), footprint=1000, sharing=SharingMode.SHARED),
        ],
        SETTINGS,
    )
    assert placed(decide(view, shared_req())).gpu_ids == ("a:1",)
    unplaceable(decide(view, req(priority=-1)), UnplaceableCode.NO_CAPACITY)


def test_shared_no_room_names_the_most_free_gpu() -> None:
    view = build_view(
        [node("node-x", 2, product=L4, memory=23034, used={0: 20000, 1: 4000})],
        [
            rep("y", 1, "node-x", (0,), footprint=20000, sharing=SharingMode.SHARED, priority=9),
            rep("y", 2, "node-x", (1,), footprint=4000, sharing=SharingMode.SHARED, priority=9),
        ],
        SETTINGS,
    )
    d = unplaceable(decide(view, shared_req(memory=20480, product=L4)), UnplaceableCode.NO_CAPACITY)
    assert "no NVIDIA-L4 GPU has 20480 MiB available (most: 18010 MiB on node-x:1" in d.reason


# --- footprint discovery --------------------------------------------------------------------


def test_discovery_run_takes_whole_gpus_in_shared_mode() -> None:
    view = build_view([node("a", 2, used={0: 1000})], [
        rep("x", 1, "a", (0,), footprint=1000, sharing=SharingMode.SHARED)
    ], SETTINGS)  # fmt: skip
    r = req("m", sharing=SharingMode.SHARED, memory_mib=None)
    d = placed(decide(view, r))
    assert d.discovery
    assert d.gpu_ids == ("a:1",)
    assert "discovery run" in d.reason
    assert d.replica.footprint_mib is None
    assert d.replica.whole_gpus
    view = view.with_placed(d)
    # Nothing else may share a:1 until it is measured.
    assert placed(decide(view, shared_req("other", memory=1000))).gpu_ids == ("a:0",)
    big = evict(decide(view, shared_req("other", memory=80000)))
    assert big.gpu_ids == ("a:0",)
    assert big.victims[0].pod == "x-instance-1"
    # A second replica of m waits for the measurement.
    w = unplaceable(decide(view, replace(r, pod="m-instance-2")), UnplaceableCode.WAITING_FOR_STATS)
    assert "discovery run (ml/m-instance-9)" in w.reason
    # With the footprint measured, it places by memory.
    measured = replace(r, pod="m-instance-2", measured_footprint_mib=5000)
    assert placed(decide(view, measured)).gpu_ids == ("a:0",)


def test_declared_memory_wins_over_measured() -> None:
    r = req("m", memory_mib=1000, measured_footprint_mib=5000)
    assert r.footprint_mib == 1000


# --- eviction -------------------------------------------------------------------------------


def test_eviction_takes_lower_priority_first_then_lru() -> None:
    view = build_view(
        [node("a", 1), node("b", 1), node("c", 1)],
        [
            rep("old", 1, "a", (0,), priority=0, last_used=100.0),
            rep("recent", 1, "b", (0,), priority=0, last_used=900.0),
            rep("low", 1, "c", (0,), priority=-5, last_used=1000.0),
        ],
        SETTINGS,
    )
    d = evict(decide(view, req()))
    assert [v.pod for v in d.victims] == ["low-instance-1"]
    assert (d.node, d.gpu_ids) == ("c", ("c:0",))
    assert "lowest priority, then least recently used" in d.reason
    # Without the low one, the least recently used of equal priority goes.
    view2 = view.with_removed([view.replicas[("ml", "low-instance-1")]])
    view2 = build_view([node("a", 1), node("b", 1)], list(view2.replicas.values()), SETTINGS)
    assert [v.pod for v in evict(decide(view2, req())).victims] == ["old-instance-1"]


def test_eviction_prefers_fewer_victims() -> None:
    # Two small LRU replicas on a, or one more recent on b: one victim wins.
    view = build_view(
        [node("a", 2), node("b", 2)],
        [
            rep("s1", 1, "a", (0,), last_used=1.0),
            rep("s2", 1, "a", (1,), last_used=2.0),
            rep("big", 1, "b", (0, 1), last_used=50.0),
        ],
        SETTINGS,
    )
    d = evict(decide(view, req(gpu_count=2)))
    assert [v.pod for v in d.victims] == ["big-instance-1"]
    assert d.gpu_ids == ("b:0", "b:1")


def test_eviction_of_several_replicas_on_one_node() -> None:
    view = build_view(
        [node("a", 2)],
        [rep("s1", 1, "a", (0,), last_used=1.0), rep("s2", 1, "a", (1,), last_used=2.0)],
        SETTINGS,
    )
    d = evict(decide(view, req(gpu_count=2)))
    assert [v.pod for v in d.victims] == ["s1-instance-1", "s2-instance-1"]
    after = view.with_evicted(d)
    p = placed(decide(after, req(gpu_count=2)))
    assert (p.node, p.gpu_ids) == (d.node, d.gpu_ids)


def test_eviction_respects_min_replicas() -> None:
    view = build_view(
        [node("a", 1), node("b", 1)],
        [
            rep("floor", 1, "a", (0,), last_used=1.0, min_replicas=1),
            rep("spare", 1, "b", (0,), last_used=99.0, min_replicas=0),
        ],
        SETTINGS,
    )
    assert [v.pod for v in evict(decide(view, req())).victims] == ["spare-instance-1"]
    only_floor = build_view([node("a", 1)], [rep("floor", 1, "a", (0,), min_replicas=1)], SETTINGS)
    d = unplaceable(decide(only_floor, req()), UnplaceableCode.NO_CAPACITY)
    assert "1 are at their deployment's minReplicas" in d.reason


def test_eviction_never_takes_a_higher_priority_and_allows_equal() -> None:
    view = build_view([node("a", 1)], [rep("high", 1, "a", (0,), priority=10)], SETTINGS)
    unplaceable(decide(view, req(priority=5)), UnplaceableCode.NO_CAPACITY)
    assert evict(decide(view, req(priority=10))).victims[0].pod == "high-instance-1"


def test_eviction_never_takes_the_requesters_own_replicas() -> None:
    view = build_view([node("a", 1)], [rep("m", 1, "a", (0,))], SETTINGS)
    d = unplaceable(decide(view, req("m")), UnplaceableCode.NO_CAPACITY)
    assert "belong to ml/m itself" in d.reason


def test_shared_eviction_frees_just_enough_memory() -> None:
    reps = [
        rep("a1", 1, "a", (0,), footprint=30000, sharing=SharingMode.SHARED, last_used=5.0),
        rep("a2", 1, "a", (0,), footprint=10000, sharing=SharingMode.SHARED, last_used=1.0),
        rep("a3", 1, "a", (0,), footprint=30000, sharing=SharingMode.SHARED, last_used=9.0),
    ]
    view = build_view([node("a", 1, used={0: 70000})], reps, SETTINGS)
    # available 81920-70000-1024 = 10896; needs 30000: one 30000 MiB victim is enough, and of
    # the two the least recently used goes.
    d = evict(decide(view, shared_req(memory=30000)))
    assert [v.pod for v in d.victims] == ["a1-instance-1"]


def test_evict_then_place_round_trip_on_shared() -> None:
    reps = [rep("x", 1, "a", (0,)), rep("y", 1, "a", (1,), last_used=9.0)]
    view = build_view([node("a", 2, used={0: 73000, 1: 73000})], reps, SETTINGS)
    d = evict(decide(view, shared_req(memory=20000)))
    assert [v.pod for v in d.victims] == ["x-instance-1"]
    assert d.gpu_ids == ("a:0",)


# --- inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "replicas", "words"),
    [
        ([node("a"), node("a")], [], "node 'a' appears twice"),
        (
            [NodeInfo("a", (GpuInfo(0, "b:0", "u", H100, 1, 0, 1),))],
            [],
            "it must be a:0",
        ),
        ([node("a")], [rep("x", 1, "a", (0,)), rep("x", 1, "a", (1,))], "appears twice"),
        ([node("a")], [replace(rep("x", 1, "a", (0,)), gpu_ids=("b:0",))], "must be a:<index>"),
        (
            [node("a")],
            [rep("x", 1, "a", (0,), footprint=0, sharing=SharingMode.SHARED)],
            "positive number of MiB",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(
    nodes: list[NodeInfo], replicas: list[PlacedReplica], words: str
) -> None:
    with pytest.raises(PlacementInputError, match=words):
        build_view(nodes, replicas, SETTINGS)


def test_bad_request_is_refused() -> None:
    view = build_view([node("a")], [], SETTINGS)
    with pytest.raises(PlacementInputError, match="gpu count is 0"):
        decide(view, req(gpu_count=0))
    with pytest.raises(PlacementInputError, match=r"spec\.gpu\.memory is -1 MiB"):
        decide(view, shared_req(memory=-1))


def test_with_placed_refuses_a_duplicate() -> None:
    view = build_view([node("a")], [], SETTINGS)
    d = placed(decide(view, req()))
    view = view.with_placed(d)
    with pytest.raises(PlacementInputError, match="already placed"):
        view.with_placed(d)


def test_replicas_on_unknown_nodes_count_for_floors_only() -> None:
    view = build_view([node("a", 1)], [rep("x", 1, "gone", (0,)), rep("x", 2, "a", (0,))], SETTINGS)
    assert view.counts[dep("x")] == 2
    assert evict(decide(view, req())).victims[0].pod == "x-instance-2"


# --- the promises of eviction and size (issue: eviction within floors, no cascades) -----------


def test_the_floor_counts_ready_replicas_only() -> None:
    # `floor` has two replicas and minReplicas 1, but one is already terminating (an eviction
    # under way): the other one is its last Ready replica and may not go.
    view = build_view(
        [node("a", 2)],
        [
            rep("floor", 1, "a", (0,), min_replicas=1, state=ReplicaState.TERMINATING),
            rep("floor", 2, "a", (1,), min_replicas=1),
            rep("mine", 1, "a", (0,), state=ReplicaState.RESERVED, priority=1000),
        ],
        SETTINGS,
    )
    d = unplaceable(decide(view, req(priority=10)), UnplaceableCode.NO_CAPACITY)
    assert "at their deployment's minReplicas" in d.reason


def test_a_terminating_replica_is_the_cheapest_victim_and_costs_no_floor() -> None:
    view = build_view(
        [node("a", 2)],
        [
            rep("floor", 1, "a", (0,), min_replicas=2, state=ReplicaState.TERMINATING),
            rep("floor", 2, "a", (1,), min_replicas=2, last_used=0.0),
        ],
        SETTINGS,
    )
    assert [v.pod for v in evict(decide(view, req())).victims] == ["floor-instance-1"]


def test_a_reservation_is_never_a_victim() -> None:
    view = build_view(
        [node("a", 1)],
        [rep("evictor", 1, "a", (0,), state=ReplicaState.RESERVED, priority=0)],
        SETTINGS,
    )
    unplaceable(decide(view, req(priority=100)), UnplaceableCode.NO_CAPACITY)


@pytest.mark.parametrize("sharing", [SharingMode.EXCLUSIVE, SharingMode.SHARED])
def test_a_footprint_larger_than_every_gpu_is_refused(sharing: SharingMode) -> None:
    view = build_view([node("a", 8), node("b", 2, product=L4, memory=23034)], [], SETTINGS)
    d = unplaceable(
        decide(view, req(memory_mib=204800, sharing=sharing)), UnplaceableCode.FOOTPRINT_TOO_LARGE
    )
    assert "204800 MiB per GPU" in d.reason
    assert f"the largest: {MIB} MiB" in d.reason
    assert "lower spec.gpu.memory" in d.reason
    # Restricted to L4s, the bar is the L4's memory.
    d = unplaceable(
        decide(view, req(memory_mib=40960, product=L4)), UnplaceableCode.FOOTPRINT_TOO_LARGE
    )
    assert "NVIDIA-L4 GPU has (the largest: 23034 MiB)" in d.reason
    placed(decide(view, req(memory_mib=40960)))
