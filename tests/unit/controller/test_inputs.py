"""The adapter from pool snapshot, Nodes and replica Pods to the real placement engine."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from controller_helpers import T0, FreeGpus, facts, make_md, pod, report, snapshot

from modelfleet import placement as P
from modelfleet.api.gpustats import GpuReport, PodRef
from modelfleet.controller.decisions import Evict, Placed, PlacementRequest, Unplaceable
from modelfleet.controller.inputs import (
    build_placer,
    compute_agent_missing_since,
    compute_gpu_nodes_without_agent,
    compute_gpu_used_mib,
    compute_missing_agent_grace_s,
    compute_node_health,
)
from modelfleet.controller.observed import NodeFacts
from modelfleet.controller.plan import compute_failure


def request(md_name: str = "gemma", n: int = 1, **spec: object) -> PlacementRequest:
    md = make_md(name=md_name, **spec)
    return PlacementRequest("ns", md_name, n, md.spec, 20480)


def test_node_health_from_nodes_and_pool() -> None:
    snap = snapshot(report("a", 2), report("b", 2), down=("b",))
    health = compute_node_health({**facts("a", "b"), **facts("c", ready=False)}, snap)
    assert health["a"].agent_known
    assert health["a"].agent_up
    assert health["b"].agent_known
    assert not health["b"].agent_up
    assert not health["c"].ready
    assert not health["c"].agent_known


def test_two_decisions_of_one_placer_never_share_a_gpu() -> None:
    placer = build_placer(facts("a"), [], {}, snapshot(report("a", 2)), P.PlacementSettings())
    first = placer(request(n=1))
    second = placer(request(n=2))
    assert isinstance(first, Placed)
    assert isinstance(second, Placed)
    assert set(first.gpu_ids).isdisjoint(second.gpu_ids)
    assert first.gpu_memory_mib == 81559
    assert first.gpu_uuids == ("GPU-a-0",)
    assert isinstance(placer(request(n=3)), Unplaceable)


def test_existing_replicas_hold_their_gpus() -> None:
    existing = [pod(1, deployment="other", node="a", gpus=("a:0",))]
    placer = build_placer(facts("a"), existing, {}, snapshot(report("a", 2)), P.PlacementSettings())
    decision = placer(request())
    assert isinstance(decision, Placed)
    assert decision.gpu_ids == ("a:1",)


def test_full_cluster_evicts_the_least_recently_used() -> None:
    old = replace(pod(1, deployment="old", node="a", gpus=("a:0",)), priority=0)
    new = replace(pod(1, deployment="new", node="a", gpus=("a:1",)), priority=0)
    last_used = {("ns", "old"): 1000.0, ("ns", "new"): 9000.0}
    placer = build_placer(
        facts("a"), [old, new], last_used, snapshot(report("a", 2)), P.PlacementSettings()
    )
    decision = placer(request(md_name="gemma"))
    assert isinstance(decision, Evict), decision
    assert [(v.namespace, v.pod, v.deployment) for v in decision.victims] == [
        ("ns", "old-instance-1", "old")
    ]


def test_terminating_replica_is_the_first_victim() -> None:
    going = replace(pod(1, deployment="new", node="a", gpus=("a:1",)), deleting=True)
    keep = pod(1, deployment="old", node="a", gpus=("a:0",))
    last_used = {("ns", "old"): 1000.0, ("ns", "new"): 9000.0}
    placer = build_placer(
        facts("a"), [keep, going], last_used, snapshot(report("a", 2)), P.PlacementSettings()
    )
    decision = placer(request())
    assert isinstance(decision, Evict)
    assert [v.pod for v in decision.victims] == ["new-instance-1"]


def test_no_stats_yet_waits() -> None:
    placer = build_placer(facts("a"), [], {}, None, P.PlacementSettings())
    decision = placer(request())
    assert isinstance(decision, Unplaceable)
    assert decision.code == "WaitingForStats"


def test_measured_pods_are_not_double_counted() -> None:
    # The agent already reports the replica's memory: the ledger must not add it again.
    ref = PodRef(namespace="ns", name="other-instance-1", memory_used_mib=40000)
    snap = snapshot(report("a", 1, {0: (40000, [ref])}))
    existing = [
        replace(
            pod(1, deployment="other", node="a", gpus=("a:0",)),
            sharing="Shared",
            footprint_mib=40000,
        )
    ]
    placer = build_placer(facts("a"), existing, {}, snap, P.PlacementSettings())
    decision = placer(
        PlacementRequest(
            "ns",
            "small",
            1,
            make_md(name="small", gpu={"memory": "20Gi", "sharing": "Shared"}).spec,
            20480,
        )
    )
    assert isinstance(decision, Placed), decision
    assert decision.gpu_ids == ("a:0",)


def test_fake_placer_matches_interface() -> None:
    # The plan tests' stand-in and the engine adapter answer the same request type.
    assert isinstance(FreeGpus(["a:0"])(request()), Placed)


@pytest.mark.parametrize(
    ("case", "previous", "endpoints", "expected"),
    [
        ("first round: every node without an endpoint counts from now", {}, ("a",), {"b": 0}),
        ("still missing: keeps the first time", {"b": -30}, ("a",), {"b": -30}),
        ("came back: forgotten", {"b": -30}, ("a", "b"), {}),
        ("a silent endpoint is present (EndpointsDown's job)", {}, ("a", "b:down"), {}),
        ("a node that left the cluster is forgotten", {"c": -5}, ("a", "b"), {}),
    ],
)
def test_agent_missing_since(
    case: str, previous: dict[str, int], endpoints: tuple[str, ...], expected: dict[str, int]
) -> None:
    names = [e.split(":")[0] for e in endpoints]
    down = tuple(e.split(":")[0] for e in endpoints if e.endswith(":down"))
    snap = snapshot(*(report(n, 1) for n in names), down=down)
    before = {n: T0 + timedelta(seconds=s) for n, s in previous.items()}
    got = compute_agent_missing_since(before, facts("a", "b"), snap, T0)
    assert got == {n: T0 + timedelta(seconds=s) for n, s in expected.items()}, case


@pytest.mark.parametrize(
    ("case", "missing_for_s", "missing"),
    [
        ("within the grace", 29.9, False),
        ("at the grace", 30.0, True),
        ("never missing", None, False),
    ],
)
def test_node_health_agent_missing_after_the_grace(
    case: str, missing_for_s: float | None, missing: bool
) -> None:
    since = {} if missing_for_s is None else {"b": T0 - timedelta(seconds=missing_for_s)}
    health = compute_node_health(facts("a", "b"), snapshot(report("a", 1)), since, T0, 30.0)
    assert health["b"].agent_missing == missing, case
    assert not health["a"].agent_missing


def test_missing_agent_grace_is_at_least_three_poll_intervals() -> None:
    assert compute_missing_agent_grace_s(60.0, 5.0) == 60.0
    assert compute_missing_agent_grace_s(2.0, 5.0) == 15.0


def _with_gpus(r: GpuReport, **update: object) -> GpuReport:
    return r.model_copy(update=update)


def test_stale_gpu_takes_no_replica_and_loses_none() -> None:
    # The agent could not read a:0's memory: not a measurement, not a fault.
    r = report("a", 2)
    stale = r.gpus[0].model_copy(update={"stale": True, "stale_reason": "NVML: Unknown Error"})
    snap = snapshot(_with_gpus(r, gpus=[stale, r.gpus[1]]))
    placer = build_placer(facts("a"), [], {}, snap, P.PlacementSettings())
    decision = placer(request())
    assert isinstance(decision, Placed)
    assert decision.gpu_ids == ("a:1",)
    assert isinstance(placer(request(n=2)), Unplaceable)
    health = compute_node_health(facts("a"), snap)
    assert health["a"].unhealthy_gpus == frozenset()
    on_stale = pod(1, deployment="other", node="a", gpus=("a:0",))
    assert compute_failure(on_stale, health, any_agent_up=True) is None
    assert compute_gpu_used_mib(snap) == {"a:1": 0}  # no footprint from a stale GPU


def test_agent_whose_nvml_never_started_is_stale_not_unhealthy() -> None:
    # The agent on node a runs without the NVIDIA runtime: NVML never started, so it knows no
    # GPU. Its node is stale, its replicas (if any) stay, and nothing is placed there.
    why = (
        "NVML could not start (NVML Shared Library Not Found (NVML_ERROR_LIBRARY_NOT_FOUND)): "
        "set agent.runtimeClassName; re-initialising NVML every 5 s to 300 s"
    )
    snap = snapshot(_with_gpus(report("a", 2), ready=False, reason=why, gpus=[]), report("b", 1))
    endpoint = next(e for e in snap.endpoints if e.node == "a")
    assert endpoint.included
    assert endpoint.reason == f"agent not ready: {why}"
    health = compute_node_health(facts("a", "b"), snap)
    assert health["a"].agent_up
    assert health["a"].unhealthy_gpus == frozenset()
    on_a = pod(1, deployment="other", node="a", gpus=("a:0",))
    assert compute_failure(on_a, health, any_agent_up=True) is None
    assert compute_agent_missing_since({}, ["a", "b"], snap, T0) == {}
    placer = build_placer(facts("a", "b"), [], {}, snap, P.PlacementSettings())
    decision = placer(request())
    assert isinstance(decision, Placed)
    assert decision.gpu_ids == ("b:0",)
    assert isinstance(placer(request(n=2)), Unplaceable)


def test_agent_not_ready_node_takes_no_replica_and_loses_none() -> None:
    # NVML down on node a (e.g. after a daemon-reload): the agent answers, says so, and marks
    # every GPU stale; node b is fine.
    r = report("a", 2)
    why = "NVML does not answer (Unknown Error (NVML_ERROR_UNKNOWN))"
    gpus = [g.model_copy(update={"stale": True, "stale_reason": why}) for g in r.gpus]
    snap = snapshot(_with_gpus(r, ready=False, reason=why, gpus=gpus), report("b", 1))
    endpoint = next(e for e in snap.endpoints if e.node == "a")
    assert endpoint.reason == f"agent not ready: {why}"
    assert snap.node("a") is not None
    assert snap.node("a").not_ready == why  # type: ignore[union-attr]
    health = compute_node_health(facts("a", "b"), snap)
    assert health["a"].agent_up
    assert health["a"].unhealthy_gpus == frozenset()
    on_a = pod(1, deployment="other", node="a", gpus=("a:0",))
    assert compute_failure(on_a, health, any_agent_up=True) is None
    placer = build_placer(facts("a", "b"), [], {}, snap, P.PlacementSettings())
    first = placer(request())
    assert isinstance(first, Placed)
    assert first.gpu_ids == ("b:0",)
    second = placer(request(n=2))
    assert isinstance(second, Unplaceable)


def test_gpu_nodes_without_an_agent_are_named_after_the_grace() -> None:
    def node(name: str, gpus: int | None) -> NodeFacts:
        return NodeFacts(name=name, ready=True, gpu_allocatable=gpus)

    nodes = {
        "gke-gpu-1": node("gke-gpu-1", 8),  # the device plugin runs, no agent: named
        "gke-gpu-2": node("gke-gpu-2", 8),  # missing for less than the grace
        "cpu-1": node("cpu-1", None),  # no GPUs: an agent is not expected
        "drained": node("drained", 0),  # every device unhealthy: nothing to place on anyway
        "gpu-ok": node("gpu-ok", 4),  # has an agent: not in missing_since
    }
    since = {
        "gke-gpu-1": T0 - timedelta(seconds=60),
        "gke-gpu-2": T0 - timedelta(seconds=10),
        "cpu-1": T0 - timedelta(seconds=600),
        "drained": T0 - timedelta(seconds=600),
    }
    assert compute_gpu_nodes_without_agent(nodes, since, T0, 30.0) == ("gke-gpu-1",)
    assert compute_gpu_nodes_without_agent(nodes, since, T0, 5.0) == ("gke-gpu-1", "gke-gpu-2")


def test_node_whose_agent_is_down_is_waited_for_not_evicted_around() -> None:
    # Node a is full with a replica eviction may take; node b's agent stopped answering while
    # b is Ready. Placement knows b as stale and waits for it rather than evicting on a.
    old = pod(1, deployment="old", node="a", gpus=("a:0",))
    snap = snapshot(report("a", 1), report("b", 2), down=("b",))
    nodes = {
        "a": facts("a")["a"],
        "b": replace(facts("b")["b"], gpu_allocatable=2),
    }
    placer = build_placer(nodes, [old], {("ns", "old"): 1.0}, snap, P.PlacementSettings())
    stale = placer.view.nodes["b"].info
    assert stale.stale
    assert stale.reason.startswith("agent down")
    decision = placer(request())
    assert isinstance(decision, Unplaceable), decision
    assert "waiting for its stats rather than evicting" in decision.reason
    # Once b is NotReady it is lost, not stale: nothing waits for it.
    nodes["b"] = replace(nodes["b"], ready=False)
    placer = build_placer(nodes, [old], {("ns", "old"): 1.0}, snap, P.PlacementSettings())
    assert "b" not in placer.view.nodes
    assert isinstance(placer(request()), Evict)
