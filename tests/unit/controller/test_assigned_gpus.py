"""The node's word on a replica's GPUs: what the kubelet assigned outranks what was planned."""

from __future__ import annotations

from dataclasses import replace

from controller_helpers import NOW, make_md, nodes, pod, report, snapshot

from modelfleet.api.gpustats import PodRef
from modelfleet.controller import inputs
from modelfleet.controller.admission import build_assignment_event
from modelfleet.controller.observed import (
    NodeHealth,
    compute_assignment_records,
    with_assigned_gpus,
)
from modelfleet.controller.plan import FailureKind, Plan, Reason, compute_failure
from modelfleet.controller.status import compute_status


def ref(n: int) -> PodRef:
    return PodRef(namespace="ns", name=f"gemma-instance-{n}", container="engine")


def test_the_agents_attribution_gives_each_pod_its_gpus_in_index_order() -> None:
    snap = snapshot(report("node-a", 4, {3: (20000, [ref(1)]), 0: (20000, [ref(1)])}))
    assert inputs.compute_assigned_gpus(snap) == {
        ("ns", "gemma-instance-1"): ("node-a:0", "node-a:3")
    }
    assert inputs.compute_assigned_gpus(None) == {}


def test_assigned_gpus_win_over_the_plan_and_a_difference_is_visible() -> None:
    planned = pod(1, gpus=("node-a:1",))
    (same,) = with_assigned_gpus([planned], {planned.key: ("node-a:1",)})
    assert (same.gpus, same.assignment_differs) == (("node-a:1",), False)
    (moved,) = with_assigned_gpus([planned], {planned.key: ("node-a:0",)})
    assert (moved.gpus, moved.assignment_differs) == (("node-a:0",), True)
    (unknown,) = with_assigned_gpus([planned], {})
    assert (unknown.gpus, unknown.assignment_differs) == (("node-a:1",), False)


def test_status_shows_the_assigned_gpus_and_what_was_planned() -> None:
    (moved,) = with_assigned_gpus(
        [pod(1, gpus=("node-a:1",))], {("ns", "gemma-instance-1"): ("node-a:0",)}
    )
    md = make_md(replicas=1)
    status = compute_status(md, [moved], Plan(target=1, target_reason=Reason.SPEC), NOW, None)
    (instance,) = status.instances
    assert (instance.gpus, instance.planned_gpus) == (["node-a:0"], ["node-a:1"])


def test_an_unhealthy_gpu_replaces_the_replica_that_really_uses_it() -> None:
    health = nodes(
        "node-a", **{"node-a": NodeHealth(agent_known=True, unhealthy_gpus=frozenset({"node-a:0"}))}
    )
    annotated = pod(1, gpus=("node-a:0",))  # planned on the failing GPU, but the node gave it 2
    really = pod(2, gpus=("node-a:2",))  # planned elsewhere, but holds the failing GPU
    a, b = with_assigned_gpus(
        [annotated, really],
        {annotated.key: ("node-a:2",), really.key: ("node-a:0",)},
    )
    assert compute_failure(a, health, True) is None
    failure = compute_failure(b, health, True)
    assert failure is not None
    assert failure.kind == FailureKind.GPU_UNHEALTHY


def test_the_placement_ledger_follows_the_node() -> None:
    (moved,) = with_assigned_gpus(
        [pod(1, gpus=("node-a:1",))], {("ns", "gemma-instance-1"): ("node-a:0",)}
    )
    (replica,) = inputs.build_placed_replicas([moved], {}, None)
    assert replica.gpu_ids == ("node-a:0",)


def test_the_event_says_what_the_node_gave_and_what_was_planned() -> None:
    (moved,) = with_assigned_gpus(
        [replace(pod(1, gpus=("node-a:1",)))], {("ns", "gemma-instance-1"): ("node-a:0",)}
    )
    event = build_assignment_event(("ns", "gemma"), moved)
    assert (event.type, event.reason) == ("Normal", "GpusAssigned")
    assert event.message.startswith(
        "node node-a gave gemma-instance-1 GPUs node-a:0 (placement planned node-a:1)"
    )


def test_what_the_node_assigned_is_recorded_once_and_survives_an_agent_outage() -> None:
    planned = pod(1, gpus=("node-a:1",))
    (live,) = with_assigned_gpus([planned], {planned.key: ("node-a:0",)})
    assert compute_assignment_records([live]) == [live]  # not recorded yet
    recorded = replace(live, recorded_assigned=("node-a:0",))
    assert compute_assignment_records([recorded]) == []
    # The agent is silent (restart, outage): the recorded word stands.
    (silent,) = with_assigned_gpus([replace(planned, recorded_assigned=("node-a:0",))], {})
    assert silent.gpus == ("node-a:0",)
    assert compute_assignment_records([silent]) == []
