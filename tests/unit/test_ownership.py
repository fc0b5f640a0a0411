"""Which Pods are replicas and which deployment holds a served name (api/ownership.py)."""

from __future__ import annotations

from typing import Any

from modelfleet.api.ownership import (
    NOT_CONTROLLED,
    OWNER_MISMATCH,
    compute_ignored_reason,
    compute_name_holders,
    controller_uid,
)

REF = {"apiVersion": "modelfleet.io/v1alpha1", "kind": "ModelDeployment", "uid": "u1"}


def md(name: str, created: str, served: str | None = None, ns: str = "ns") -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "org/m"}
    if served:
        spec["servedModelName"] = served
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created}, "spec": spec}


def test_only_a_controlling_modeldeployment_reference_counts() -> None:
    assert controller_uid({"ownerReferences": [{**REF, "controller": True}]}) == "u1"
    assert controller_uid({"ownerReferences": [REF]}) == ""  # not the controller
    assert controller_uid({"ownerReferences": [{**REF, "controller": True, "kind": "Job"}]}) == ""
    other_group = {**REF, "controller": True, "apiVersion": "example.com/v1alpha1"}
    assert controller_uid({"ownerReferences": [other_group]}) == ""
    assert controller_uid({}) == ""


def test_a_pod_is_a_replica_only_of_the_deployment_with_its_owners_uid() -> None:
    assert compute_ignored_reason("u1", "u1") is None
    assert compute_ignored_reason("", "u1") == NOT_CONTROLLED
    assert compute_ignored_reason("u0", "u1") == OWNER_MISMATCH  # an older object's Pod
    assert compute_ignored_reason("u1", None) == OWNER_MISMATCH  # no such deployment here


def test_the_oldest_claim_holds_a_name_then_namespace_and_name_decide() -> None:
    holders = compute_name_holders(
        [
            md("b", "2026-01-01T00:00:00Z", served="m"),
            md("c", "2025-12-31T23:59:59Z", served="m", ns="z"),
            md("a", "2026-01-01T00:00:00Z", served="m"),
            md("solo", "2026-01-01T00:00:00Z"),
        ]
    )
    assert holders == {"m": ("z", "c"), "solo": ("ns", "solo")}
    tie = compute_name_holders(
        [md("b", "2026-01-01T00:00:00Z", "m"), md("a", "2026-01-01T00:00:00Z", "m")]
    )
    assert tie == {"m": ("ns", "a")}
