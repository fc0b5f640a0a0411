"""Status and conditions from observed Pods and the plan: named cases, no cluster."""

from __future__ import annotations

from datetime import timedelta

from controller_helpers import NOW, FreeGpus, make_md, nodes, plan_and_place, pod

from modelfleet.api import labels as L
from modelfleet.controller.decisions import Evict, Unplaceable, Victim
from modelfleet.controller.observed import NodeHealth
from modelfleet.controller.status import (
    compute_measured_footprint_mib,
    compute_status,
    status_changed,
)


def conds(status: object) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}  # type: ignore[attr-defined]


def status_for(md, observed, state=None, placer=None, **kw):  # type: ignore[no-untyped-def]
    state = state if state is not None else nodes("node-a", "node-b")
    plan = plan_and_place(md, observed, state, placer or FreeGpus(["node-b:7"]), NOW)
    return compute_status(md, observed, plan, NOW, **kw)


def test_all_ready() -> None:
    md = make_md(replicas=2)
    st = status_for(md, [pod(1), pod(2, node="node-b")])
    assert (st.replicas, st.ready_replicas) == (2, 2)
    assert conds(st) == {
        "Available": ("True", "ReplicasReady"),
        "Progressing": ("False", "Complete"),
        "Degraded": ("False", "AsExpected"),
        "Routed": ("True", "ServedNameHeld"),
    }
    assert (st.phase, st.reason) == ("Ready", "")
    assert st.observed_generation == 3
    assert st.selector == (
        "app.kubernetes.io/component=replica,app.kubernetes.io/name=modelfleet,"
        "modelfleet.io/deployment=gemma"
    )
    assert [(i.name, i.node, i.gpus, i.phase) for i in st.instances] == [
        ("gemma-instance-1", "node-a", ["node-a:0"], "Ready"),
        ("gemma-instance-2", "node-b", ["node-b:1"], "Ready"),
    ]
    assert st.instances[0].started_at == NOW - timedelta(minutes=5)


def test_created_replicas_show_as_pending_and_scaling_up() -> None:
    st = status_for(make_md(replicas=2), [pod(1)], placer=FreeGpus(["node-b:0"]))
    assert [(i.name, i.phase, i.reason) for i in st.instances] == [
        ("gemma-instance-1", "Ready", ""),
        ("gemma-instance-2", "Pending", "Created"),
    ]
    assert conds(st)["Progressing"] == ("True", "ScalingUp")
    assert st.phase == "Progressing"


def test_starting_replica() -> None:
    st = status_for(make_md(replicas=1), [pod(1, ready=False)])
    assert st.instances[0].phase == "Starting"
    assert conds(st)["Available"] == ("False", "NoReplicaReady")
    assert conds(st)["Progressing"] == ("True", "Starting")
    assert conds(st)["Degraded"] == ("False", "AsExpected")


def test_no_capacity_is_actionable() -> None:
    placer = FreeGpus([], otherwise=lambda r: Unplaceable("no node has a free H100", "NoCapacity"))
    st = status_for(make_md(replicas=1), [], placer=placer)
    assert conds(st)["Available"] == ("False", "NoCapacity")
    assert conds(st)["Progressing"] == ("False", "NoCapacity")
    assert conds(st)["Degraded"] == ("True", "NoCapacity")
    assert (st.phase, st.reason) == ("Pending", "NoCapacity")
    assert any("free H100" in c.message for c in st.conditions)


def test_no_capacity_names_the_gpu_nodes_placement_cannot_see() -> None:
    placer = FreeGpus([], otherwise=lambda r: Unplaceable("no node has a free GPU", "NoCapacity"))
    md = make_md(replicas=1)
    unseen = ("gke-gpu-1", "gke-gpu-2")
    plan = plan_and_place(md, [], nodes("node-a"), placer, NOW, unseen_nodes=unseen)
    st = compute_status(md, [], plan, NOW)
    (message,) = {c.message for c in st.conditions if c.reason == "NoCapacity"}
    assert message.startswith("no node has a free GPU; 2 GPU nodes without a node-stats agent")
    assert "placement cannot use: gke-gpu-1, gke-gpu-2 (check the agent DaemonSet" in message
    (event,) = [e for e in plan.events if e.reason == "NoCapacity"]
    assert "gke-gpu-2" in event.message
    many = tuple(f"n{i}" for i in range(8))
    plan = plan_and_place(md, [], nodes("node-a"), placer, NOW, unseen_nodes=many)
    assert plan.blocker is not None
    assert "8 GPU nodes" in plan.blocker.message
    assert "n0, n1, n2, n3, n4 and 3 more" in plan.blocker.message


def test_node_lost() -> None:
    st = status_for(
        make_md(replicas=2),
        [pod(1, node="gone"), pod(2, node="node-b")],
        placer=FreeGpus(["node-b:3"]),
    )
    assert conds(st)["Degraded"] == ("True", "NodeLost")
    assert conds(st)["Progressing"] == ("True", "Replacing")
    assert conds(st)["Available"] == ("True", "ReplicasReady")
    assert st.instances[0].phase == "Terminating"
    assert st.instances[0].reason == "NodeLost"
    assert (st.phase, st.reason) == ("Degraded", "NodeLost")


def test_endpoints_down() -> None:
    state = {"node-a": NodeHealth(agent_known=True, agent_up=False), "node-b": NodeHealth(True)}
    state["node-b"] = NodeHealth(agent_known=True)
    st = status_for(make_md(replicas=1), [pod(1)], state=state)
    assert conds(st)["Degraded"] == ("True", "EndpointsDown")


def test_evicted_victim() -> None:
    md = make_md(
        replicas=1, annotations={L.ANN_EVICTED_AT: "2026-11-22T11:00:00Z", L.ANN_EVICTED_BY: "ns/x"}
    )
    placer = FreeGpus([], otherwise=lambda r: Evict((Victim("ns", "x-instance-1", "x"),), "lru"))
    st = status_for(md, [], placer=placer)
    assert conds(st)["Available"] == ("False", "Evicted")
    assert conds(st)["Degraded"] == ("True", "Evicted")
    assert st.reason == "Evicted"


def test_rolling_update() -> None:
    st = status_for(make_md(replicas=2), [pod(1, template_hash="old"), pod(2, node="node-b")])
    assert conds(st)["Progressing"] == ("True", "RollingUpdate")


def test_scaled_to_zero_when_idle() -> None:
    md = make_md(replicas=1, idleTimeout="10m", created=NOW - timedelta(hours=1))
    st = status_for(md, [])
    assert conds(st)["Available"][1] == "ScaledToZero"
    assert (st.phase, st.replicas) == ("ScaledToZero", 0)
    assert "request" in st.conditions[0].message


def test_crash_loop_is_degraded() -> None:
    st = status_for(make_md(replicas=1), [pod(1, ready=False, waiting_reason="CrashLoopBackOff")])
    assert conds(st)["Degraded"] == ("True", "CrashLoopBackOff")


def test_transition_time_kept_when_unchanged_and_nothing_to_write() -> None:
    md = make_md(replicas=1)
    first = status_for(md, [pod(1)])
    later = make_md(replicas=1, status=first.model_dump(mode="json", by_alias=True))
    plan = plan_and_place(later, [pod(1)], nodes("node-a"), FreeGpus([]), NOW)
    second = compute_status(later, [pod(1)], plan, NOW + timedelta(minutes=5))
    assert not status_changed(later.status, second)
    assert second.conditions[0].last_transition_time == first.conditions[0].last_transition_time


def test_transition_time_moves_when_status_flips() -> None:
    md = make_md(replicas=1)
    first = status_for(md, [pod(1, ready=False)])
    later = make_md(replicas=1, status=first.model_dump(mode="json", by_alias=True))
    plan = plan_and_place(later, [pod(1)], nodes("node-a"), FreeGpus([]), NOW)
    second = compute_status(later, [pod(1)], plan, NOW + timedelta(minutes=5))
    assert status_changed(later.status, second)
    assert second.conditions[0].last_transition_time == NOW + timedelta(minutes=5)


def test_measured_footprint_from_the_discovery_run() -> None:
    discovery = pod(1, footprint_mib=None, gpus=("node-a:0",))
    assert compute_measured_footprint_mib([discovery], {"node-a:0": 17000}) == 17000
    assert compute_measured_footprint_mib([pod(1)], {"node-a:0": 17000}) is None
    starting = pod(1, footprint_mib=None, ready=False)
    assert compute_measured_footprint_mib([starting], {"node-a:0": 17000}) is None
    st = status_for(make_md(replicas=1), [discovery], measured_footprint_mib=17000)
    assert st.footprint == "17000Mi"


def test_switched_off_by_spec_says_how_to_start_it() -> None:
    md = make_md(replicas=0)
    plan = plan_and_place(md, [], nodes("node-a"), FreeGpus([]), NOW)
    status = compute_status(md, [], plan, NOW)
    available = next(c for c in status.conditions if c.type == "Available")
    assert available.reason == "ScaledToZero"
    assert "kubectl scale modeldeployment/gemma --replicas=1" in available.message
