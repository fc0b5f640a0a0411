"""The gateway routes only to Pods the operator owns, and each served name to one deployment."""

from __future__ import annotations

from typing import Any

from gwharness import FleetFactory, md_obj, md_uid, owner_ref, pod_obj

from modelfleet.api.ownership import NOT_CONTROLLED, OWNER_MISMATCH
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.registry import Registry


def routed(registry: Registry, model: str) -> list[str]:
    route = registry.routes.get(model)
    return [r.name for r in route.replicas] if route else []


def fleet(deployments: list[dict[str, Any]], pods: list[dict[str, Any]]) -> Registry:
    registry = Registry()
    registry.replace_deployments(deployments)
    registry.replace_pods(pods)
    return registry


def test_a_pod_with_the_labels_but_no_owner_is_never_routed() -> None:
    registry = fleet(
        [md_obj("g", served="gemma")],
        [
            pod_obj("g-instance-1", "g", 8001),
            pod_obj("g-instance-9", "g", 6666, served="gemma", ip="127.0.0.9", owners=[]),
        ],
    )
    assert routed(registry, "gemma") == ["g-instance-1"]
    assert registry.ignored_pods() == {NOT_CONTROLLED: 1}


def test_a_look_alike_added_by_a_watch_event_is_never_routed() -> None:
    registry = fleet([md_obj("g", served="gemma")], [pod_obj("g-instance-1", "g", 8001)])
    registry.apply_pod("ADDED", pod_obj("trap", "g", 6666, served="gemma", owners=[]))
    assert routed(registry, "gemma") == ["g-instance-1"]


def test_a_pod_controlled_by_another_kind_or_uid_is_never_routed() -> None:
    uid = md_uid("default", "g")
    replica_set = {**owner_ref(uid), "apiVersion": "apps/v1", "kind": "ReplicaSet"}
    not_controller = {**owner_ref(uid), "controller": False}
    registry = fleet(
        [md_obj("g", served="gemma")],
        [
            pod_obj("a", "g", 8001, owners=[replica_set]),
            pod_obj("b", "g", 8002, owners=[not_controller]),
            pod_obj("c", "g", 8003, owners=[owner_ref("uid-of-something-else")]),
        ],
    )
    assert routed(registry, "gemma") == []
    assert registry.ignored_pods() == {NOT_CONTROLLED: 2, OWNER_MISMATCH: 1}


def test_a_pod_in_another_namespace_does_not_join_a_model_by_its_labels() -> None:
    # Its ownerReference names the real deployment's UID, but no such deployment exists where
    # the Pod is: the API server would garbage-collect it, and the gateway never routes to it.
    stolen = owner_ref(md_uid("default", "g"))
    registry = fleet(
        [md_obj("g", served="gemma")],
        [pod_obj("g-instance-1", "g", 8001, namespace="evil", served="gemma", owners=[stolen])],
    )
    assert routed(registry, "gemma") == []
    assert registry.ignored_pods() == {OWNER_MISMATCH: 1}


def test_a_recreated_deployment_does_not_route_to_the_old_objects_pods() -> None:
    old = pod_obj("g-instance-1", "g", 8001, owners=[owner_ref("uid-before")])
    registry = fleet([md_obj("g", served="gemma")], [old])
    assert routed(registry, "gemma") == []


def test_the_oldest_deployment_holds_a_served_name() -> None:
    registry = fleet(
        [
            md_obj("newer", served="m", namespace="team-b", created="2026-02-01T00:00:00Z"),
            md_obj("older", served="m", namespace="team-a", created="2026-01-01T00:00:00Z"),
        ],
        [
            pod_obj("newer-instance-1", "newer", 9001, namespace="team-b"),
            pod_obj("older-instance-1", "older", 8001, namespace="team-a"),
        ],
    )
    assert routed(registry, "m") == ["older-instance-1"]
    assert registry.holders["m"] == ("team-a", "older")
    assert [d.key for d in registry.models["m"]] == [("team-a", "older")]


def test_a_served_name_taken_in_the_same_second_goes_to_the_first_namespace_and_name() -> None:
    registry = fleet(
        [md_obj("b", served="m", namespace="x"), md_obj("a", served="m", namespace="x")],
        [
            pod_obj("a-instance-1", "a", 8001, namespace="x"),
            pod_obj("b-instance-1", "b", 9001, namespace="x"),
        ],
    )
    assert routed(registry, "m") == ["a-instance-1"]


def test_the_newer_deployment_takes_the_name_once_the_holder_is_gone() -> None:
    older = md_obj("older", served="m", created="2026-01-01T00:00:00Z")
    registry = fleet(
        [older, md_obj("newer", served="m", created="2026-02-01T00:00:00Z")],
        [pod_obj("newer-instance-1", "newer", 9001)],
    )
    assert routed(registry, "m") == []
    registry.apply_deployment("DELETED", older)
    assert routed(registry, "m") == ["newer-instance-1"]


def test_a_pod_cannot_claim_a_name_another_deployment_holds_by_its_annotation() -> None:
    registry = fleet(
        [md_obj("gemma", served="gemma"), md_obj("other", served="other")],
        [pod_obj("other-instance-1", "other", 9001, served="gemma")],
    )
    assert routed(registry, "gemma") == []


def test_the_default_served_name_is_the_deployment_name() -> None:
    # `spec.model` is not the served name: two deployments of the same model do not collide.
    registry = fleet(
        [md_obj("a"), md_obj("b")],
        [pod_obj("a-instance-1", "a", 8001), pod_obj("b-instance-1", "b", 9001)],
    )
    assert routed(registry, "a") == ["a-instance-1"]
    assert routed(registry, "b") == ["b-instance-1"]


def test_ignored_pods_have_a_metric_with_bounded_labels() -> None:
    metrics = GatewayMetrics()
    value = metrics.registry.get_sample_value
    assert value("modelfleet_gateway_ignored_pods", {"reason": NOT_CONTROLLED}) == 0
    assert value("modelfleet_gateway_ignored_pods", {"reason": OWNER_MISMATCH}) == 0


async def test_requests_never_reach_a_look_alike_and_it_shows_in_metrics(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet()
    await fleet.add_sim("real")
    await fleet.add_sim("trap")
    fleet.add_pod("real")
    fleet.add_pod("trap", owners=[])
    answered_by = {(await fleet.chat())[1] for _ in range(6)}
    assert answered_by == {"real"}
    assert fleet.sims["trap"].state.served == 0
    async with fleet.http.get(fleet.url + "/metrics") as resp:
        text = await resp.text()
    assert 'modelfleet_gateway_ignored_pods{reason="not_controlled"} 1.0' in text
    assert 'modelfleet_gateway_ignored_pods{reason="owner_mismatch"} 0.0' in text
