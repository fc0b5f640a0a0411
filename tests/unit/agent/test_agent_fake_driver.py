"""The agent's fake-driver backend: the real NVML code path over the fake driver directory.

Memory used comes from the records a vLLM stand-in writes on the GPUs it was given, pod
attribution from a real gRPC pod-resources server (kubelet_testlib.FakeKubelet), health from the
driver directory's health files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubelet_testlib import FakeKubelet

from modelfleet.agent import nvml as nvml_module
from modelfleet.agent.app import build_attribution, build_backend
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.nvml import NvmlBackend
from modelfleet.agent.state import AgentState, poll_once
from modelfleet.api.gpustats import GpuReport, PodRef
from modelfleet.fakegpu.driverdir import DriverDir
from modelfleet.gpufile import build_sim_gpus, simulated_uuid
from modelfleet.settings import AgentSettings
from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.gpumemory import build_memory_hold

NODE = "gpu-node-a"
TOTAL = 81559
UUIDS = [simulated_uuid(NODE, i) for i in range(4)]


@pytest.fixture
def driver(tmp_path: Path) -> DriverDir:
    d = DriverDir(tmp_path / "fake-gpu")
    d.init_inventory(NODE, build_sim_gpus(NODE, 4, TOTAL, "NVIDIA-H100-80GB-HBM3"))
    return d


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    fake = FakeKubelet()
    fake.start()
    yield fake
    fake.cleanup()


def settings_for(driver: DriverDir, kubelet: FakeKubelet) -> AgentSettings:
    return AgentSettings(
        backend="nvml",
        fake_gpu_dir=str(driver.path),
        pod_resources_socket=kubelet.socket_path,
    )


async def sample(driver: DriverDir, kubelet: FakeKubelet) -> tuple[NvmlBackend, AgentState]:
    settings = settings_for(driver, kubelet)
    metrics = AgentMetrics()
    backend, sim = build_backend(settings, NODE, metrics, build_attribution(settings, metrics))
    assert sim is None
    assert isinstance(backend, NvmlBackend)
    state = AgentState(node=NODE, backend=backend.name, poll_interval_s=5.0, metrics=metrics)
    await backend.start()
    assert await poll_once(backend, state)
    return backend, state


def report(state: AgentState) -> GpuReport:
    assert state.latest is not None
    return state.latest.report


def stand_in(driver: DriverDir, visible: str, pod: str, utilization: float, tp: int = 1) -> None:
    """What `modelfleet sim-vllm` records at start in a container the plugin gave `visible`."""
    config = SimConfig(
        model="m",
        served_names=("m",),
        instance=pod,
        gpu_memory_utilization=utilization,
        tensor_parallel_size=tp,
    )
    env = {
        "MODELFLEET_FAKE_GPU_DIR": str(driver.path),
        "NVIDIA_VISIBLE_DEVICES": visible,
        "POD_NAME": pod,
    }
    hold = build_memory_hold(config, env)
    assert hold is not None
    hold.write_blocking()


async def test_memory_used_only_where_a_stand_in_recorded_it(
    driver: DriverDir, kubelet: FakeKubelet
) -> None:
    stand_in(driver, UUIDS[2], "gemma-instance-1", 0.5)
    stand_in(driver, f"{UUIDS[0]},{UUIDS[3]}", "llama-instance-1", 0.25, tp=2)
    kubelet.assignments = [
        ("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", (UUIDS[2],)),
        ("ml", "llama-instance-1", "vllm", "nvidia.com/gpu", (UUIDS[0], UUIDS[3])),
    ]
    backend, state = await sample(driver, kubelet)
    await backend.close()
    got = report(state)
    assert got.backend == "fake-driver"
    assert got.driver_version == "550.54.15-modelfleet-fake"
    assert [g.uuid for g in got.gpus] == UUIDS
    assert [g.memory_used_mib for g in got.gpus] == [
        int(TOTAL * 0.25),
        0,
        int(TOTAL * 0.5),
        int(TOTAL * 0.25),
    ]
    assert [g.memory_total_mib for g in got.gpus] == [TOTAL] * 4
    assert got.gpus[1].utilization_percent == 0.0
    assert got.gpus[2].utilization_percent > 0  # derived from use
    assert got.gpus[2].pods == [PodRef(namespace="ml", name="gemma-instance-1", container="vllm")]
    assert got.gpus[1].pods == []
    assert all(g.health.healthy for g in got.gpus)


async def test_memory_the_driver_reserves_is_not_used_memory(
    tmp_path: Path, kubelet: FakeKubelet
) -> None:
    # An idle H200 with driver 580: nvidia-smi shows 0 MiB used of 143771, NVML v1 says 615
    # (it counts the driver's reserved memory), v2 says 0 and 615 reserved. The agent reports
    # what nvidia-smi shows: 615 MiB "used" would make every idle GPU look busy to placement.
    d = DriverDir(tmp_path / "fake-gpu")
    gpus = build_sim_gpus(NODE, 2, 143771, "NVIDIA H200")
    d.init_inventory(NODE, [g.model_copy(update={"reserved_mib": 615}) for g in gpus])
    stand_in(d, UUIDS[1], "gemma-instance-1", 0.5)
    backend, state = await sample(d, kubelet)
    await backend.close()
    idle, busy = report(state).gpus
    assert (idle.memory_total_mib, idle.memory_used_mib) == (143771, 0)
    assert idle.memory_free_mib == 143771 - 615  # what an application can still allocate
    assert busy.memory_used_mib == int(143771 * 0.5)
    assert busy.memory_free_mib == 143771 - 615 - int(143771 * 0.5)


async def test_a_driver_without_v2_memory_information_is_read_through_v1(
    tmp_path: Path, kubelet: FakeKubelet, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = DriverDir(tmp_path / "fake-gpu")
    gpus = build_sim_gpus(NODE, 1, 81559, "NVIDIA-H100-80GB-HBM3")
    d.init_inventory(NODE, [g.model_copy(update={"reserved_mib": 500}) for g in gpus])
    real = nvml_module.NvmlBackend._read_memory

    def old_driver(self: NvmlBackend, handle: object) -> tuple[int, int, int]:
        v1 = self.nvml.nvmlDeviceGetMemoryInfo
        nvml = self.nvml

        def no_v2(h: object, version: int | None = None) -> object:
            if version is not None:
                raise nvml.NVMLError(13)  # FUNCTION_NOT_FOUND: the symbol is missing
            return v1(h)

        monkeypatch.setattr(nvml, "nvmlDeviceGetMemoryInfo", no_v2)
        return real(self, handle)

    monkeypatch.setattr(nvml_module.NvmlBackend, "_read_memory", old_driver)
    backend, state = await sample(d, kubelet)
    await backend.close()
    (gpu,) = report(state).gpus
    # v1 counts the reserved memory as used; free is still what can be allocated.
    assert (gpu.memory_used_mib, gpu.memory_free_mib) == (500, 81559 - 500)


async def test_unhealthy_gpu_is_reported_with_the_reason_and_recovers(
    driver: DriverDir, kubelet: FakeKubelet
) -> None:
    backend, state = await sample(driver, kubelet)
    try:
        driver.set_health(UUIDS[1], "XID 79 injected by the test")
        assert await poll_once(backend, state)
        lost = report(state).gpus[1]
        assert not lost.health.healthy
        assert "NVML_ERROR_GPU_IS_LOST" in lost.health.reason
        assert "XID 79 injected by the test" in lost.health.reason
        assert lost.uuid == UUIDS[1]  # still named
        assert lost.memory_free_mib == 0  # and nothing is placed on it
        assert all(g.health.healthy for i, g in enumerate(report(state).gpus) if i != 1)
        driver.set_health(UUIDS[1], None)
        assert await poll_once(backend, state)
        assert report(state).gpus[1].health.healthy
    finally:
        await backend.close()


async def test_a_gpu_unhealthy_before_the_agent_starts_is_named_and_full(
    driver: DriverDir, kubelet: FakeKubelet
) -> None:
    driver.set_health(UUIDS[3], "lost before start")
    backend, state = await sample(driver, kubelet)
    await backend.close()
    lost = report(state).gpus[3]
    assert not lost.health.healthy
    assert "lost before start" in lost.health.reason
    assert (lost.uuid, lost.memory_total_mib, lost.memory_free_mib) == (UUIDS[3], TOTAL, 0)


async def test_a_stopped_holders_memory_comes_free_when_its_record_expires(
    driver: DriverDir, kubelet: FakeKubelet
) -> None:
    driver.write_memory(UUIDS[0], "killed-container", 4096, ttl_s=0.3)
    backend, state = await sample(driver, kubelet)
    try:
        assert report(state).gpus[0].memory_used_mib == 4096
        deadline = time.monotonic() + 3
        while report(state).gpus[0].memory_used_mib and time.monotonic() < deadline:
            assert await poll_once(backend, state)
        assert report(state).gpus[0].memory_used_mib == 0
    finally:
        await backend.close()


async def test_without_an_inventory_the_agent_waits_not_ready_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a node whose driver is still being installed: not ready, and ready once it is.
    monkeypatch.setattr(nvml_module, "REINIT_BACKOFF_S", 0.0)
    settings = AgentSettings(backend="nvml", fake_gpu_dir=str(tmp_path / "later"))
    metrics = AgentMetrics()
    backend, _ = build_backend(settings, NODE, metrics)
    assert isinstance(backend, NvmlBackend)
    state = AgentState(node=NODE, backend=backend.name, poll_interval_s=5.0, metrics=metrics)
    await backend.start()
    try:
        assert not await poll_once(backend, state)
        waiting = report(state)
        assert not waiting.ready
        assert "sim-gpu-driver init" in waiting.reason
        assert "NVML_ERROR_DRIVER_NOT_LOADED" in waiting.reason
        assert waiting.gpus == []
        later = DriverDir(tmp_path / "later")
        later.init_inventory(NODE, build_sim_gpus(NODE, 2, TOTAL, "NVIDIA-H100-80GB-HBM3"))
        assert await poll_once(backend, state)
        assert report(state).ready
        assert [g.uuid for g in report(state).gpus] == UUIDS[:2]
    finally:
        await backend.close()


def test_pod_attribution_is_on_for_the_fake_driver(driver: DriverDir, kubelet: FakeKubelet) -> None:
    attribution = build_attribution(settings_for(driver, kubelet), AgentMetrics())
    assert attribution is not None
    assert attribution.socket_path == kubelet.socket_path


async def test_nvml_field_fault_leaves_the_reading_null(
    driver: DriverDir, kubelet: FakeKubelet
) -> None:
    backend, state = await sample(driver, kubelet)
    try:
        driver.set_nvml_fault(UUIDS[2], "power", "UNKNOWN")
        driver.set_nvml_fault(UUIDS[2], "utilization", "NOT_SUPPORTED")
        assert await poll_once(backend, state)
        gpu = report(state).gpus[2]
        assert gpu.power_w is None
        assert gpu.utilization_percent is None
        assert gpu.temperature_c is not None
        assert gpu.health.healthy
        assert not gpu.stale
        driver.set_nvml_fault(UUIDS[2], "memory", "UNKNOWN")
        assert await poll_once(backend, state)
        assert report(state).gpus[2].stale
        assert report(state).gpus[2].health.healthy
        driver.clear_nvml_faults()
        assert await poll_once(backend, state)
        assert report(state).gpus[2].power_w is not None
    finally:
        await backend.close()


async def test_nvml_failing_wholesale_is_not_ready_then_recovers(
    driver: DriverDir, kubelet: FakeKubelet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nvml_module, "REINIT_BACKOFF_S", 0.0)
    backend, state = await sample(driver, kubelet)
    try:
        driver.set_nvml_fault_all("UNKNOWN")
        assert not await poll_once(backend, state)
        down = report(state)
        assert not down.ready
        assert "Unknown Error" in down.reason
        assert all(g.stale and g.health.healthy for g in down.gpus)
        assert not await poll_once(backend, state)  # nvmlInit fails too
        driver.clear_nvml_faults()
        assert await poll_once(backend, state)
        assert report(state).ready
        assert all(not g.stale for g in report(state).gpus)
    finally:
        await backend.close()
