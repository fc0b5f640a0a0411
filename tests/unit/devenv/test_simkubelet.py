"""The simulated nodes' device manager: assignment rule, admission decision, pod-resources.

Named table cases, no cluster; the pod-resources endpoint is a real gRPC server on a unix socket,
read with the agent's own client.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelfleet.agent.podresources import PodResourcesClient
from modelfleet.controller.nodeusage import parse_allocatable
from modelfleet.gpufile import simulated_uuid
from simkubelet import (
    ANN_DEVICES,
    ANN_PLUGIN_DEVICES,
    Admitted,
    PodResourcesServers,
    Rejected,
    admission_order,
    advertised_indexes,
    build_admit_patch,
    build_pod_resources,
    build_reject_patch,
    compute_admission,
    compute_in_use,
    compute_used,
    container_gpu_requests,
    holds_devices,
    needs_admission,
    node_devices,
    parse_plugin_devices,
)

NODE = "gpu-l4-0"


def uuid(index: int) -> str:
    return simulated_uuid(NODE, index)


def node(count: int = 4, plugin: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": NODE, "labels": {"nvidia.com/gpu.count": str(count)}}
    if plugin is not None:
        meta["annotations"] = {ANN_PLUGIN_DEVICES: plugin}
    return {"metadata": meta}


def gpu_pod(
    name: str,
    *gpus: int,
    devices: dict[str, list[int]] | None = None,
    phase: str = "Pending",
    created: str = "2026-01-01T00:00:00Z",
    requests_only: bool = False,
    deleting: bool = False,
) -> dict[str, Any]:
    key = "requests" if requests_only else "limits"
    containers = [
        {"name": f"c{i}", "resources": {key: {"nvidia.com/gpu": str(n)}}}
        for i, n in enumerate(gpus)
    ]
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "uid": name,
        "creationTimestamp": created,
        "resourceVersion": "7",
    }
    if devices is not None:
        meta["annotations"] = {
            ANN_DEVICES: json.dumps({c: [uuid(i) for i in ids] for c, ids in devices.items()})
        }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    return {
        "metadata": meta,
        "spec": {"nodeName": NODE, "containers": containers or [{"name": "main"}]},
        "status": {"phase": phase},
    }


# --- assignment rule and admission decision ------------------------------------------------

CASES = [
    ("first pod gets the lowest indexes", node(4), [], gpu_pod("a", 2), {"c0": (0, 1)}),
    (
        "devices held by other pods are skipped",
        node(4),
        [gpu_pod("x", 1, devices={"c0": [0]}, phase="Running")],
        gpu_pod("a", 2),
        {"c0": (1, 2)},
    ),
    (
        "a gap left by a finished pod is filled first",
        node(4),
        [
            gpu_pod("x", 1, devices={"c0": [0]}, phase="Succeeded"),
            gpu_pod("y", 1, devices={"c0": [1]}, phase="Running"),
        ],
        gpu_pod("a", 2),
        {"c0": (0, 2)},
    ),
    (
        "a terminating pod still holds its devices",
        node(2),
        [gpu_pod("x", 1, devices={"c0": [0]}, phase="Running", deleting=True)],
        gpu_pod("a", 1),
        {"c0": (1,)},
    ),
    (
        "containers are served in order from what is left",
        node(4),
        [],
        gpu_pod("a", 1, 2),
        {"c0": (0,), "c1": (1, 2)},
    ),
    (
        "requests without limits count too",
        node(4),
        [],
        gpu_pod("a", 1, requests_only=True),
        {"c0": (0,)},
    ),
    ("zero GPUs: admitted with none", node(4), [], gpu_pod("a", 0), {"c0": ()}),
    (
        "a plugin that advertises fewer devices hands out only those",
        node(4, plugin="1,3"),
        [],
        gpu_pod("a", 2),
        {"c0": (1, 3)},
    ),
]


@pytest.mark.parametrize(
    ("name", "the_node", "others", "the_pod", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_assignment_follows_the_plugins_preferred_allocation(
    name: str,
    the_node: dict[str, Any],
    others: list[dict[str, Any]],
    the_pod: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
) -> None:
    decision = compute_admission(the_pod, node_devices(the_node), compute_in_use(others))
    assert decision == Admitted({c: tuple(uuid(i) for i in ids) for c, ids in expected.items()})


REJECTIONS = [
    ("more than the node has", node(4), [], gpu_pod("a", 5), 5, 4),
    (
        "more than is free",
        node(4),
        [gpu_pod("x", 1, devices={"c0": [2]}, phase="Running")],
        gpu_pod("a", 4),
        4,
        3,
    ),
    ("the second container is short", node(4), [], gpu_pod("a", 3, 2), 2, 1),
    (
        "the plugin advertises fewer than the label",
        node(8, plugin="0,1,2"),
        [],
        gpu_pod("a", 4),
        4,
        3,
    ),
    ("no plugin devices at all", node(4, plugin=""), [], gpu_pod("a", 1), 1, 0),
]


@pytest.mark.parametrize(
    ("name", "the_node", "others", "the_pod", "requested", "available"),
    REJECTIONS,
    ids=[c[0] for c in REJECTIONS],
)
def test_admission_refuses_what_the_node_cannot_give(
    name: str,
    the_node: dict[str, Any],
    others: list[dict[str, Any]],
    the_pod: dict[str, Any],
    requested: int,
    available: int,
) -> None:
    decision = compute_admission(the_pod, node_devices(the_node), compute_in_use(others))
    assert decision == Rejected(requested=requested, available=available)


def with_cpu(pod: dict[str, Any], cpu: str, memory: str = "1Gi") -> dict[str, Any]:
    pod["spec"]["containers"][0]["resources"]["requests"] = {"cpu": cpu, "memory": memory}
    return pod


def test_admission_refuses_cpu_memory_and_pods_the_node_does_not_have_left() -> None:
    # 2 CPUs and 24Gi allocatable, as a real node of the test cluster; a running pod requests
    # 1500m. Devices are allocated first: a pod short of both says devices.
    the_node = node(2)
    the_node["status"] = {"allocatable": {"cpu": "2", "memory": "24Gi", "pods": "3"}}
    alloc = parse_allocatable(the_node)
    running = with_cpu(gpu_pod("run", 1, devices={"c0": [0]}, phase="Running"), "1500m")
    used = compute_used([running, with_cpu(gpu_pod("waits", 1), "8")])  # not admitted: not used
    devices, in_use = node_devices(the_node), compute_in_use([running])
    cpu = compute_admission(with_cpu(gpu_pod("p", 1), "1"), devices, in_use, alloc, used)
    assert isinstance(cpu, Rejected)
    assert build_reject_patch(cpu)["status"] == {
        "phase": "Failed",
        "reason": "OutOfcpu",
        # As a v1.36 kubelet wrote it on a real node of the test cluster.
        "message": "Pod was rejected: Node didn't have enough resource: cpu, requested: 1000, "
        "used: 1500, capacity: 2000",
    }
    memory = compute_admission(
        with_cpu(gpu_pod("p", 1), "100m", "30Gi"), devices, in_use, alloc, used
    )
    assert isinstance(memory, Rejected)
    assert memory.reason == "OutOfmemory"
    assert "memory, requested: 32212254720, used: 1073741824, capacity: 25769803776" in (
        memory.message
    )
    both = compute_admission(with_cpu(gpu_pod("p", 2), "4"), devices, in_use, alloc, used)
    assert isinstance(both, Rejected)
    assert both.reason == "UnexpectedAdmissionError"
    assert isinstance(
        compute_admission(with_cpu(gpu_pod("p", 1), "500m"), devices, in_use, alloc, used),
        Admitted,
    )
    full = compute_used([running, running, running])
    pods = compute_admission(gpu_pod("p", 0), devices, set(), alloc, full)
    assert isinstance(pods, Rejected)
    assert pods.reason == "OutOfpods"


def test_rejection_is_the_kubelets_status_word_for_word() -> None:
    patch = build_reject_patch(Rejected(requested=4, available=3))
    assert patch == {
        "status": {
            "phase": "Failed",
            "reason": "UnexpectedAdmissionError",
            # As a v1.36 kubelet wrote it on the test cluster's real nodes (docs/real-nodes.md).
            "message": "Pod was rejected: Allocate failed due to requested number of devices "
            "unavailable for nvidia.com/gpu. Requested: 4, Available: 3, which is unexpected",
        }
    }


def test_admit_patch_records_the_devices_conditionally() -> None:
    patch = build_admit_patch(gpu_pod("a", 1), {"c0": (uuid(0),)})
    assert patch == {
        "metadata": {
            "annotations": {ANN_DEVICES: json.dumps({"c0": [uuid(0)]}, separators=(",", ":"))},
            "resourceVersion": "7",
        }
    }


WAITING = [
    ("pending GPU pod", gpu_pod("a", 1), True),
    ("already admitted", gpu_pod("a", 1, devices={"c0": [0]}), False),
    ("no GPU asked for", gpu_pod("a"), False),
    (
        "running (kwok started it before this runner existed)",
        gpu_pod("a", 1, phase="Running"),
        False,
    ),
    ("being deleted", gpu_pod("a", 1, deleting=True), False),
    ("zero GPUs still goes through admission", gpu_pod("a", 0), True),
]


@pytest.mark.parametrize(("name", "the_pod", "waits"), WAITING, ids=[c[0] for c in WAITING])
def test_needs_admission(name: str, the_pod: dict[str, Any], waits: bool) -> None:
    assert needs_admission(the_pod) is waits


def test_admission_order_is_oldest_first() -> None:
    pods = [
        gpu_pod("late", 1, created="2026-01-01T00:00:09Z"),
        gpu_pod("early", 1, created="2026-01-01T00:00:01Z"),
        gpu_pod("done", 1, devices={"c0": [0]}),
    ]
    assert [p["metadata"]["name"] for p in admission_order(pods)] == ["early", "late"]


def test_devices_are_free_once_the_pod_is_finished() -> None:
    assert holds_devices(gpu_pod("a", 1, devices={"c0": [0]}, phase="Running"))
    assert not holds_devices(gpu_pod("a", 1, devices={"c0": [0]}, phase="Failed"))
    assert not holds_devices(gpu_pod("a", 1, devices={"c0": [0]}, phase="Succeeded"))
    assert not holds_devices(gpu_pod("a", 1))


def test_container_gpu_requests_prefers_limits() -> None:
    pod = gpu_pod("a", 2)
    pod["spec"]["containers"][0]["resources"]["requests"] = {"nvidia.com/gpu": "2"}
    pod["spec"]["containers"].append({"name": "sidecar"})
    assert container_gpu_requests(pod) == [("c0", 2)]


@pytest.mark.parametrize(
    ("text", "count", "expected"),
    [("0,1,2", 4, (0, 1, 2)), ("3, 1", 4, (1, 3)), ("", 4, ()), ("2,2", 4, (2,))],
)
def test_parse_plugin_devices(text: str, count: int, expected: tuple[int, ...]) -> None:
    assert parse_plugin_devices(text, count) == expected


@pytest.mark.parametrize("text", ["4", "x", "-1"])
def test_parse_plugin_devices_refuses_what_the_node_lacks(text: str) -> None:
    with pytest.raises(ValueError, match="not a GPU index below 4"):
        parse_plugin_devices(text, 4)


def test_a_malformed_plugin_knob_advertises_every_gpu() -> None:
    assert advertised_indexes(node(4, plugin="0,9")) == (0, 1, 2, 3)


# --- pod-resources ---------------------------------------------------------------------------


def test_pod_resources_lists_held_devices_by_container() -> None:
    pods = [
        gpu_pod("a", 1, 2, devices={"c0": [0], "c1": [1, 2]}, phase="Running"),
        gpu_pod("done", 1, devices={"c0": [3]}, phase="Failed"),
        gpu_pod("waiting", 1),
    ]
    assert build_pod_resources(pods) == (
        ("ns", "a", "c0", "nvidia.com/gpu", (uuid(0),)),
        ("ns", "a", "c1", "nvidia.com/gpu", (uuid(1), uuid(2))),
    )


def test_pod_resources_endpoint_answers_the_agents_client() -> None:
    servers = PodResourcesServers()
    try:
        path = servers.ensure(NODE)
        assert servers.ensure(NODE) == path  # once per node
        servers.entries[NODE] = build_pod_resources(
            [gpu_pod("a", 2, devices={"c0": [1, 3]}, phase="Running")]
        )
        client = PodResourcesClient(path, deadline_s=5)
        try:
            by_device = client.list_blocking()
        finally:
            client.close()
        assert {d: [(r.namespace, r.name, r.container) for r in refs]
                for d, refs in by_device.items()} == {
            uuid(1): [("ns", "a", "c0")],
            uuid(3): [("ns", "a", "c0")],
        }  # fmt: skip
    finally:
        servers.close()
