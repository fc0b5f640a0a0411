"""Admission backoff: a node whose kubelet rejected a replica is left alone for a while."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from modelfleet.controller.admission import (
    BASE_BACKOFF,
    MAX_BACKOFF,
    AdmissionBackoff,
    build_rejection_event,
)
from modelfleet.controller.observed import NodeHealth, ObservedPod, parse_pod

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
MESSAGE = (
    "Pod was rejected: Allocate failed due to requested number of devices unavailable for "
    "nvidia.com/gpu. Requested: 2, Available: 0, which is unexpected"
)


def pod(uid: str, node: str = "real-1", *, phase: str = "Failed", reason: str = "", **kw: object):
    base = ObservedPod(
        name=f"m-instance-{uid}",
        namespace="ns",
        deployment="m",
        ordinal=0,
        uid=uid,
        node=node,
        phase=phase,
        reason=reason,
        message=MESSAGE if reason else "",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def rejected(uid: str, node: str = "real-1") -> ObservedPod:
    return pod(uid, node, reason="UnexpectedAdmissionError")


def test_a_rejection_starts_a_30s_backoff_that_expires() -> None:
    book = AdmissionBackoff()
    (new,) = book.observe([rejected("a")], T0)
    assert (new.node, new.delay, new.reason) == ("real-1", BASE_BACKOFF, "UnexpectedAdmissionError")
    why = book.blocked(T0 + timedelta(seconds=10))["real-1"]
    assert why.startswith("rejected a replica at admission (UnexpectedAdmissionError: Pod was")
    assert why.endswith("no replica goes there for 20s")
    assert book.blocked(T0 + BASE_BACKOFF) == {}


def test_each_rejected_pod_counts_once() -> None:
    book = AdmissionBackoff()
    assert len(book.observe([rejected("a")], T0)) == 1
    assert book.observe([rejected("a")], T0 + timedelta(seconds=5)) == []
    assert book.blocked(T0 + timedelta(seconds=29))  # not pushed further by seeing it again


def test_further_rejections_double_the_backoff_up_to_ten_minutes() -> None:
    book = AdmissionBackoff()
    delays = []
    for i in range(8):
        (r,) = book.observe([rejected(str(i))], T0 + timedelta(minutes=20 * i))
        delays.append(r.delay.total_seconds())
    assert delays == [30, 60, 120, 240, 480, 600, 600, 600]
    assert MAX_BACKOFF.total_seconds() == 600


def test_a_replica_admitted_after_the_rejection_resets_the_node() -> None:
    book = AdmissionBackoff()
    book.observe([rejected("a")], T0)
    # A replica that ran there before the rejection says nothing about the node now.
    old = pod("old", phase="Running", created_at=T0 - timedelta(minutes=5))
    book.observe([old], T0 + timedelta(seconds=40))
    (again,) = book.observe([rejected("b")], T0 + timedelta(seconds=50))
    assert again.delay == 2 * BASE_BACKOFF
    fresh = pod("new", phase="Running", created_at=T0 + timedelta(minutes=5))
    book.observe([fresh], T0 + timedelta(minutes=6))
    (after_reset,) = book.observe([rejected("c")], T0 + timedelta(minutes=7))
    assert after_reset.delay == BASE_BACKOFF


@pytest.mark.parametrize(
    ("reason", "counts"),
    [
        ("UnexpectedAdmissionError", True),
        ("OutOfcpu", True),
        ("OutOfmemory", True),
        ("OutOfnvidia.com/gpu", True),
        ("NodeAffinity", True),
        ("Evicted", False),  # ran, then the kubelet evicted it: not an admission rejection
        ("", False),  # the container failed
    ],
)
def test_which_failures_are_admission_rejections(reason: str, counts: bool) -> None:
    book = AdmissionBackoff()
    assert bool(book.observe([pod("a", reason=reason)], T0)) is counts


def test_pods_read_their_status_reason_and_message() -> None:
    body = {
        "metadata": {
            "name": "m-instance-1",
            "namespace": "ns",
            "uid": "u1",
            "labels": {"app.kubernetes.io/component": "replica", "modelfleet.io/deployment": "m"},
        },
        "spec": {"nodeName": "real-1"},
        "status": {"phase": "Failed", "reason": "UnexpectedAdmissionError", "message": MESSAGE},
    }
    parsed = parse_pod(body)
    assert parsed is not None
    assert parsed.rejected_at_admission
    assert parsed.message == MESSAGE


def test_the_event_names_the_node_the_reason_and_what_happens_next() -> None:
    book = AdmissionBackoff()
    (r,) = book.observe([rejected("a")], T0)
    event = build_rejection_event(("ns", "m"), r)
    assert (event.type, event.reason) == ("Warning", "AdmissionRejected")
    assert event.message.startswith(
        "node real-1 rejected ns/m-instance-a at admission (UnexpectedAdmissionError: Pod was"
    )
    assert "no replica goes there for 30s" in event.message


def test_a_node_that_hands_out_an_unhealthy_gpu_backs_off() -> None:
    # Placement planned real-1:1 (real-1:0 is unhealthy by its agent), but the device plugin
    # still advertises GPU 0 and the device manager gave it: placed there again, the
    # replacement would get it again, in a loop.
    health = {"real-1": NodeHealth(agent_known=True, unhealthy_gpus=frozenset({"real-1:0"}))}
    book = AdmissionBackoff()
    handed = pod("b", phase="Running", gpu_ids=("real-1:1",), assigned_gpus=("real-1:0",))
    (r,) = book.observe_unhealthy_assignments([handed], health, T0)
    assert (r.node, r.reason, r.delay) == ("real-1", "AssignedUnhealthyGpu", BASE_BACKOFF)
    why = book.blocked(T0)["real-1"]
    assert why.startswith("gave a replica an unhealthy GPU (AssignedUnhealthyGpu: its device")
    assert "assigned real-1:0, which the agent reports unhealthy, instead of the planned" in why
    event = build_rejection_event(("ns", "m"), r)
    assert event.message.startswith("node real-1 gave ns/m-instance-b an unhealthy GPU (")
    # Once per Pod.
    assert book.observe_unhealthy_assignments([handed], health, T0) == []


@pytest.mark.parametrize(
    ("case", "planned", "assigned"),
    [
        # The GPU failed under a replica placed on it: placement chose it while it was healthy.
        ("planned there, failed later", ("real-1:0",), ("real-1:0",)),
        ("assigned a healthy GPU", ("real-1:1",), ("real-1:2",)),
        ("assignment not known yet", ("real-1:1",), ()),
    ],
)
def test_other_replicas_on_a_node_with_an_unhealthy_gpu_start_no_backoff(
    case: str, planned: tuple[str, ...], assigned: tuple[str, ...]
) -> None:
    health = {"real-1": NodeHealth(agent_known=True, unhealthy_gpus=frozenset({"real-1:0"}))}
    one = pod("c", phase="Running", gpu_ids=planned, assigned_gpus=assigned)
    assert AdmissionBackoff().observe_unhealthy_assignments([one], health, T0) == [], case
