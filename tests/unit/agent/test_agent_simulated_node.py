"""Simulated backend on a simulated node: the node's word (pod-resources) decides which pods hold
which GPU, and the node's fault knobs (annotations) act as NVML would.

The pod-resources endpoint is a real gRPC server (kubelet_testlib.FakeKubelet), read through the
agent's own `PodAttribution`, as `modelfleet agent --backend simulated --pod-resources-socket`
does on the test cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubelet_testlib import FakeKubelet

from modelfleet.agent.podresources import PodAttribution, PodResourcesClient
from modelfleet.agent.simulated import (
    ANN_FOREIGN_MEMORY_MIB,
    ANN_NVML_FAULTS,
    ANN_POD_GPU_MEMORY_MIB,
    SimulatedBackend,
    build_sim_gpus,
    simulated_uuid,
)
from modelfleet.agent.state import BackendNotReady

NODE = "sim-node-b"
MIB = 80000


def uuid(index: int) -> str:
    return simulated_uuid(NODE, index)


def pod(
    name: str,
    *,
    replica: bool = True,
    planned: str = "",
    footprint: str | None = None,
    memory: str | None = None,
    visible: str | None = None,
    phase: str = "Running",
) -> dict[str, Any]:
    annotations: dict[str, str] = {}
    if planned:
        annotations["modelfleet.io/gpus"] = planned
    if footprint is not None:
        annotations["modelfleet.io/footprint-mib"] = footprint
    if memory is not None:
        annotations[ANN_POD_GPU_MEMORY_MIB] = memory
    labels = {"app.kubernetes.io/component": "replica"} if replica else {}
    container: dict[str, Any] = {"name": "vllm" if replica else "main"}
    if visible is not None:
        container["env"] = [{"name": "NVIDIA_VISIBLE_DEVICES", "value": visible}]
    return {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": name,
            "annotations": annotations,
            "labels": labels,
        },
        "spec": {"nodeName": NODE, "containers": [container]},
        "status": {"phase": phase},
    }


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    fake = FakeKubelet()
    fake.start()
    yield fake
    fake.cleanup()


def backend_for(kubelet: FakeKubelet | None, *pods: dict[str, Any]) -> SimulatedBackend:
    gpus = build_sim_gpus(NODE, 4, MIB, "NVIDIA-H100-80GB-HBM3")
    attribution = (
        PodAttribution(PodResourcesClient(kubelet.socket_path, deadline_s=5))
        if kubelet is not None
        else None
    )
    backend = SimulatedBackend(
        NODE,
        gpus,
        pods_by_device=attribution.refresh_blocking if attribution else None,
        pod_resources_socket=attribution.socket_path if attribution else "",
    )
    backend.apply_pod_event("SYNC", {"items": list(pods)})
    return backend


def memory(stats: list[Any]) -> list[int]:
    return [g.memory_used_mib for g in stats]


def pods_on(stats: list[Any]) -> list[list[str]]:
    return [[p.name for p in g.pods] for g in stats]


async def test_the_nodes_assignment_decides_not_the_annotation(kubelet: FakeKubelet) -> None:
    # The operator planned GPU 0; the node's device manager gave GPU 2.
    kubelet.assignments = [("ml", "r1", "vllm", "nvidia.com/gpu", (uuid(2),))]
    backend = backend_for(kubelet, pod("r1", planned=f"{NODE}:0", footprint="30000"))
    stats, _ = await backend.sample()
    assert memory(stats) == [0, 0, 30000, 0]
    assert pods_on(stats) == [[], [], ["r1"], []]
    assert stats[2].pods[0].container == "vllm"


async def test_without_the_socket_the_annotation_is_the_only_word() -> None:
    backend = backend_for(None, pod("r1", planned=f"{NODE}:0", footprint="30000"))
    stats, _ = await backend.sample()
    assert memory(stats) == [30000, 0, 0, 0]


async def test_foreign_pods_hold_gpus_with_their_own_memory(kubelet: FakeKubelet) -> None:
    kubelet.assignments = [
        ("ml", "batch", "main", "nvidia.com/gpu", (uuid(0), uuid(1))),
        ("ml", "quiet", "main", "nvidia.com/gpu", (uuid(3),)),
        ("ml", "not-yet-seen", "main", "nvidia.com/gpu", (uuid(3),)),
    ]
    backend = backend_for(
        kubelet, pod("batch", replica=False, memory="12000"), pod("quiet", replica=False)
    )
    stats, _ = await backend.sample()
    assert memory(stats) == [12000, 12000, 0, 0]
    assert pods_on(stats) == [["batch"], ["batch"], [], ["not-yet-seen", "quiet"]]


async def test_a_replica_with_vllms_default_share(kubelet: FakeKubelet) -> None:
    kubelet.assignments = [("ml", "r1", "vllm", "nvidia.com/gpu", (uuid(1),))]
    stats, _ = await backend_for(kubelet, pod("r1")).sample()
    assert memory(stats) == [0, int(MIB * 0.9), 0, 0]


async def test_runtime_exposed_gpus_use_memory_but_list_no_pod(kubelet: FakeKubelet) -> None:
    # A Shared replica: no nvidia.com/gpu, the runtime exposes the GPU named in the env.
    backend = backend_for(kubelet, pod("shared", footprint="20000", visible=uuid(3)))
    stats, _ = await backend.sample()
    assert memory(stats) == [0, 0, 0, 20000]
    assert pods_on(stats) == [[], [], [], []]


async def test_pending_pods_take_no_memory(kubelet: FakeKubelet) -> None:
    kubelet.assignments = [("ml", "r1", "vllm", "nvidia.com/gpu", (uuid(0),))]
    stats, _ = await backend_for(kubelet, pod("r1", footprint="1000", phase="Pending")).sample()
    assert memory(stats) == [0, 0, 0, 0]
    assert pods_on(stats)[0] == ["r1"]


# --- node fault knobs --------------------------------------------------------------------------


def knobs(**annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": NODE, "annotations": annotations}}


async def test_memory_held_outside_any_pod(kubelet: FakeKubelet) -> None:
    backend = backend_for(kubelet)
    backend.apply_node(knobs(**{ANN_FOREIGN_MEMORY_MIB: "1=70000, 3=512"}))
    stats, _ = await backend.sample()
    assert memory(stats) == [0, 70000, 0, 512]
    assert pods_on(stats) == [[], [], [], []]


async def test_sensor_errors_are_null_and_the_gpu_stays_healthy() -> None:
    backend = backend_for(None)
    faults = {"gpus": {"0": {"utilization": "NOT_SUPPORTED"}, uuid(1): {"power": "UNKNOWN"}}}
    backend.apply_node(knobs(**{ANN_NVML_FAULTS: json.dumps(faults)}))
    stats, _ = await backend.sample()
    assert stats[0].utilization_percent is None
    assert stats[0].power_w is not None
    assert stats[1].power_w is None
    assert stats[1].utilization_percent is not None
    assert all(g.health.healthy and not g.stale for g in stats)


async def test_memory_error_is_stale_and_device_gone_is_unhealthy() -> None:
    backend = backend_for(None)
    faults = {"gpus": {"0": {"memory": "UNKNOWN"}, "2": {"temperature": "GPU_IS_LOST"}}}
    backend.apply_node(knobs(**{ANN_NVML_FAULTS: json.dumps(faults)}))
    stats, _ = await backend.sample()
    assert stats[0].stale
    assert stats[0].health.healthy
    assert "NVML_ERROR_UNKNOWN" in stats[0].stale_reason
    assert not stats[2].health.healthy
    assert "GPU_IS_LOST" in stats[2].health.reason
    assert stats[2].memory_free_mib == 0
    assert [g.stale or not g.health.healthy for g in stats] == [True, False, True, False]


@pytest.mark.parametrize(
    "faults",
    [
        {"all": "UNKNOWN"},
        {"gpus": {"1": {"memory": "DRIVER_NOT_LOADED"}}},
        {"gpus": {str(i): {"memory": "UNKNOWN"} for i in range(4)}},
    ],
    ids=["every call fails", "the driver is gone", "no GPU can be read"],
)
async def test_nvml_failing_wholesale_is_not_ready(faults: dict[str, Any]) -> None:
    backend = backend_for(None, pod("r1", planned=f"{NODE}:0", footprint="1000"))
    backend.apply_node(knobs(**{ANN_NVML_FAULTS: json.dumps(faults)}))
    with pytest.raises(BackendNotReady) as caught:
        await backend.sample()
    assert len(caught.value.gpus) == 4
    assert all(g.stale and g.health.healthy for g in caught.value.gpus)
    assert caught.value.gpus[0].pods[0].name == "r1"


async def test_malformed_knobs_are_ignored() -> None:
    backend = backend_for(None)
    backend.apply_node(knobs(**{ANN_NVML_FAULTS: "{not json", ANN_FOREIGN_MEMORY_MIB: "x=1,2=300"}))
    stats, _ = await backend.sample()
    assert memory(stats) == [0, 0, 300, 0]
    assert all(not g.stale for g in stats)
