"""What pods ask of a node's kubelet, and the per-node sums kept from the pod watch."""

from __future__ import annotations

from typing import Any

from modelfleet.controller.nodeusage import (
    NodeUsage,
    compute_pod_requests,
    parse_allocatable,
)
from modelfleet.placement import Requests

GI = 2**30
MI = 2**20


def container(name: str, requests: dict[str, str] | None = None, **kw: Any) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if "limits" in kw:
        resources["limits"] = kw.pop("limits")
    return {"name": name, "resources": resources, **kw}


def test_containers_add_up_and_a_limit_alone_is_the_request() -> None:
    spec = {
        "containers": [
            container("a", {"cpu": "500m", "memory": "1Gi"}),
            container("b", limits={"cpu": "1", "memory": "512Mi", "nvidia.com/gpu": "2"}),
            container("c"),  # BestEffort: nothing
        ]
    }
    assert compute_pod_requests(spec) == Requests(1500, GI + 512 * MI, 2, 1)


def test_init_containers_and_sidecars_follow_the_kubelet_rule() -> None:
    # The app needs 1 CPU; a restartable sidecar (restartPolicy Always) runs beside it all
    # along (+250m); a plain init container of 2 CPUs runs before, next to the sidecar started
    # ahead of it: max(1 + 0.25, 2 + 0.25) = 2.25 CPUs.
    spec = {
        "initContainers": [
            container("proxy", {"cpu": "250m"}, restartPolicy="Always"),
            container("fetch", {"cpu": "2", "memory": "100Mi"}),
        ],
        "containers": [container("app", {"cpu": "1", "memory": "2Gi"})],
        "overhead": {"cpu": "100m", "memory": "64Mi"},  # RuntimeClass overhead comes on top
    }
    got = compute_pod_requests(spec)
    assert got == Requests(2250 + 100, 2 * GI + 64 * MI, 0, 1)


def test_fractions_round_up_and_nonsense_counts_nothing() -> None:
    spec = {"containers": [container("a", {"cpu": "0.0001", "memory": "1.5"})]}
    assert compute_pod_requests(spec) == Requests(1, 2, 0, 1)
    assert compute_pod_requests({"containers": [container("a", {"cpu": "lots"})]}) == Requests(
        pods=1
    )


def test_allocatable_of_a_node() -> None:
    node = {"status": {"allocatable": {"cpu": "15900m", "memory": "64Gi", "pods": "110"}}}
    assert parse_allocatable(node) == Requests(15900, 64 * GI, 0, 110)
    assert parse_allocatable({"status": {"allocatable": {"nvidia.com/gpu": "8"}}}) is None


def pod(
    name: str,
    node: str,
    cpu: str = "1",
    *,
    ns: str = "team",
    phase: str = "Running",
    replica: bool = False,
) -> dict[str, Any]:
    labels = {"app.kubernetes.io/component": "replica", "modelfleet.io/deployment": "m"}
    return {
        "metadata": {"namespace": ns, "name": name, "labels": labels if replica else {}},
        "spec": {"nodeName": node, "containers": [container("c", {"cpu": cpu})]},
        "status": {"phase": phase},
    }


def test_usage_sums_the_pods_bound_to_each_node() -> None:
    usage = NodeUsage()
    assert not usage.synced
    usage.replace([pod("p1", "a"), pod("p2", "a", "500m"), pod("p3", "b")])
    assert usage.synced
    assert usage.others("a", set()) == Requests(cpu_m=1500, pods=2)
    assert usage.take_changed() is None  # a full listing: any node may have changed
    # A pod that finishes holds nothing any more; one deleted neither.
    assert usage.apply("MODIFIED", pod("p1", "a", phase="Succeeded"))
    assert usage.others("a", set()) == Requests(cpu_m=500, pods=1)
    assert usage.apply("DELETED", pod("p2", "a", "500m"))
    assert usage.others("a", set()) == Requests()
    assert usage.take_changed() == {"a"}
    # A status update that changes no request is no change.
    assert not usage.apply("MODIFIED", pod("p3", "b"))
    assert usage.take_changed() == set()


def test_replica_pods_count_only_when_the_operator_does_not_know_them() -> None:
    usage = NodeUsage()
    usage.replace([pod("m-instance-1", "a", "2", ns="ml", replica=True), pod("x", "a")])
    # The operator counts its own replica from its record: left out here.
    assert usage.others("a", {("ml", "m-instance-1")}) == Requests(cpu_m=1000, pods=1)
    # One it does not know (another operator's, or not in its index yet) counts as any pod.
    assert usage.others("a", set()) == Requests(cpu_m=3000, pods=2)
    # A replica's changes are not news for the placement view; another pod's are.
    usage.take_changed()
    assert usage.apply("DELETED", pod("m-instance-1", "a", "2", ns="ml", replica=True))
    assert usage.take_changed() == set()
    assert usage.apply("DELETED", pod("x", "a"))
    assert usage.take_changed() == {"a"}
