"""The in-flight book (Pods created or deleted but not yet indexed) and the Lease rules."""

from __future__ import annotations

from dataclasses import replace

from controller_helpers import pod

from modelfleet.controller.inflight import InFlight
from modelfleet.controller.leader import Observation, compute_lease_action
from modelfleet.controller.loops import compute_health_changes
from modelfleet.controller.observed import NodeHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_created_pod_is_seen_until_the_index_has_it() -> None:
    clock = Clock()
    inflight = InFlight(ttl_s=60, clock=clock)
    created = pod(1)
    inflight.record_created(created)
    assert inflight.merge("ns", "gemma", []) == [created]
    assert inflight.merge("ns", "other", []) == []
    # Once indexed, the inflight entry is dropped and the indexed pod is used.
    indexed = replace(created, ready=True, phase="Running")
    assert inflight.merge("ns", "gemma", [indexed]) == [indexed]
    assert inflight.merge("ns", "gemma", []) == []


def test_created_pod_replaces_the_old_incarnation_still_indexed() -> None:
    inflight = InFlight(clock=Clock())
    old = replace(pod(1), uid="old", deleting=True)
    new = replace(pod(1), uid="new", ready=False)
    inflight.record_created(new)
    assert inflight.merge("ns", "gemma", [old]) == [new]


def test_deleted_pod_counts_as_terminating_only_for_its_uid() -> None:
    clock = Clock()
    inflight = InFlight(ttl_s=60, clock=clock)
    victim = pod(1)
    inflight.record_deleted("ns", victim.name, victim.uid)
    [seen] = inflight.merge("ns", "gemma", [victim])
    assert seen.deleting
    newer = replace(victim, uid="someone-else")
    [seen] = inflight.merge("ns", "gemma", [newer])
    assert not seen.deleting
    clock.now += 61
    [seen] = inflight.merge("ns", "gemma", [victim])
    assert not seen.deleting


def test_merge_all_includes_deployments_not_indexed_yet() -> None:
    inflight = InFlight(clock=Clock())
    first = pod(1, deployment="fresh")
    inflight.record_created(first)
    everything = inflight.merge_all({("ns", "gemma"): [pod(1)]})
    assert {p.name for p in everything} == {"gemma-instance-1", "fresh-instance-1"}


def lease(holder: str, renew: str = "t1", duration: int = 15) -> dict[str, object]:
    return {
        "spec": {"holderIdentity": holder, "renewTime": renew, "leaseDurationSeconds": duration}
    }


def test_lease_rules() -> None:
    seen = Observation()
    assert compute_lease_action(None, "me", seen, 0.0) == "create"
    assert compute_lease_action(lease("me"), "me", seen, 0.0) == "renew"
    assert compute_lease_action(lease(""), "me", seen, 0.0) == "take"
    # Another holder: wait a whole lease duration on our own clock before taking over.
    assert compute_lease_action(lease("other"), "me", seen, 10.0) == "wait"
    assert compute_lease_action(lease("other"), "me", seen, 24.0) == "wait"
    assert compute_lease_action(lease("other"), "me", seen, 25.0) == "take"


def test_lease_renewed_by_holder_restarts_the_wait() -> None:
    seen = Observation()
    assert compute_lease_action(lease("other", "t1"), "me", seen, 0.0) == "wait"
    assert compute_lease_action(lease("other", "t2"), "me", seen, 14.0) == "wait"
    assert compute_lease_action(lease("other", "t2"), "me", seen, 28.0) == "wait"
    assert compute_lease_action(lease("other", "t2"), "me", seen, 29.0) == "take"


def test_health_changes() -> None:
    up = NodeHealth(agent_known=True)
    down = NodeHealth(agent_known=True, agent_up=False)
    sick = NodeHealth(agent_known=True, unhealthy_gpus=frozenset({"a:1"}))
    assert compute_health_changes({"a": up, "b": up}, {"a": up, "b": up}) == set()
    assert compute_health_changes({"a": up}, {"a": down}) == {"a"}
    assert compute_health_changes({"a": up}, {"a": sick}) == {"a"}
    assert compute_health_changes({"a": up}, {"a": up, "b": up}) == {"b"}
    # The grace running out on a missing agent pod re-checks that node's deployments.
    assert compute_health_changes({"a": up}, {"a": replace(up, agent_missing=True)}) == {"a"}


def test_promised_pod_before_the_api_answered() -> None:
    inflight = InFlight(clock=Clock())
    promised = replace(pod(1), uid="", phase="Pending", ready=False)
    inflight.record_created(promised)
    # Placement sees the promise at once.
    assert inflight.merge("ns", "gemma", []) == [promised]
    # It replaces a terminating predecessor of the same name...
    old = replace(pod(1), uid="old", deleting=True)
    assert inflight.merge("ns", "gemma", [old]) == [promised]
    # ...and gives way to the real Pod once the index shows it.
    real = replace(pod(1), uid="real")
    assert inflight.merge("ns", "gemma", [real]) == [real]
    inflight.forget_created(promised)
    assert inflight.merge("ns", "gemma", []) == []
