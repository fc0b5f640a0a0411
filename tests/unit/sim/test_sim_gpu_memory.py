"""The vLLM stand-in's GPU memory records in the fake driver directory: which GPUs, how much,
the heartbeat, and removal on a clean stop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from modelfleet.fakegpu.driverdir import DriverDir
from modelfleet.gpufile import build_sim_gpus, simulated_uuid
from modelfleet.sim.vllm.cli import serve
from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.gpumemory import GpuMemoryError, build_memory_hold, hold_gpu_memory

NODE = "gpu-node-a"
UUIDS = [simulated_uuid(NODE, i) for i in range(3)]


@pytest.fixture
def driver(tmp_path: Path) -> DriverDir:
    d = DriverDir(tmp_path / "fake-gpu")
    d.init_inventory(NODE, build_sim_gpus(NODE, 3, 10000, "X"))
    return d


def config(utilization: float = 0.9, tp: int = 1) -> SimConfig:
    return SimConfig(
        model="m",
        served_names=("m",),
        instance="sim",
        port=0,
        gpu_memory_utilization=utilization,
        tensor_parallel_size=tp,
    )


def env(driver: DriverDir, visible: str) -> dict[str, str]:
    return {
        "MODELFLEET_FAKE_GPU_DIR": str(driver.path),
        "NVIDIA_VISIBLE_DEVICES": visible,
        "POD_NAME": "gemma-instance-1",
    }


def test_nothing_without_both_variables(driver: DriverDir) -> None:
    assert build_memory_hold(config(), {}) is None
    assert build_memory_hold(config(), {"NVIDIA_VISIBLE_DEVICES": UUIDS[0]}) is None
    assert build_memory_hold(config(), {"MODELFLEET_FAKE_GPU_DIR": str(driver.path)}) is None


def test_takes_its_share_of_the_first_tp_visible_gpus(driver: DriverDir) -> None:
    hold = build_memory_hold(config(0.5, tp=2), env(driver, f"{UUIDS[2]},{UUIDS[0]},{UUIDS[1]}"))
    assert hold is not None
    # CUDA numbers the visible GPUs in the variable's order; vLLM uses the first tp of them.
    assert hold.uses == [(UUIDS[2], 5000), (UUIDS[0], 5000)]
    assert hold.holder.startswith("gemma-instance-1-")


@pytest.mark.parametrize(
    ("visible", "tp", "message"),
    [
        pytest.param("GPU-elsewhere", 1, "no such GPU", id="unknown GPU"),
        pytest.param("UUID0", 2, "needs that many GPUs", id="fewer GPUs than tensor parallel"),
        pytest.param("void", 1, "needs that many GPUs", id="no GPU"),
    ],
)
def test_refuses_gpus_it_cannot_use(driver: DriverDir, visible: str, tp: int, message: str) -> None:
    with pytest.raises(GpuMemoryError, match=message):
        build_memory_hold(config(tp=tp), env(driver, visible.replace("UUID0", UUIDS[0])))


def test_refuses_a_directory_without_inventory(tmp_path: Path) -> None:
    with pytest.raises(GpuMemoryError, match="MODELFLEET_FAKE_GPU_DIR"):
        build_memory_hold(
            config(), {"MODELFLEET_FAKE_GPU_DIR": str(tmp_path), "NVIDIA_VISIBLE_DEVICES": "0"}
        )


async def test_held_while_running_renewed_and_removed_after(driver: DriverDir) -> None:
    hold = build_memory_hold(config(0.3), env(driver, UUIDS[1]))
    assert hold is not None
    hold.heartbeat_s, hold.ttl_s = 0.05, 0.3
    async with hold_gpu_memory(hold):
        assert driver.used_mib(UUIDS[1]) == 3000
        first = driver.read_memory(UUIDS[1])[0].expires_at
        await asyncio.sleep(0.5)  # past the first record's expiry: only the heartbeat keeps it
        assert driver.used_mib(UUIDS[1]) == 3000
        assert driver.read_memory(UUIDS[1])[0].expires_at > first
        assert driver.used_mib(UUIDS[0]) == 0
    assert driver.read_memory(UUIDS[1]) == []
    assert not list((driver.memory_dir / UUIDS[1]).iterdir())


async def test_serve_holds_the_memory_until_it_stops(driver: DriverDir) -> None:
    hold = build_memory_hold(config(0.9), env(driver, "0"))
    task = asyncio.create_task(serve(config(0.9), hold))
    for _ in range(200):
        if driver.used_mib(UUIDS[0]):
            break
        await asyncio.sleep(0.01)
    assert driver.used_mib(UUIDS[0]) == 9000
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert driver.used_mib(UUIDS[0]) == 0


def test_the_command_refuses_to_start_on_an_unknown_gpu(driver: DriverDir) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modelfleet", "sim-vllm", "m", "--port", "0"],
        env={**env(driver, "GPU-elsewhere"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no such GPU" in result.stderr


def test_the_stand_in_refuses_to_start_like_vllm() -> None:
    from modelfleet.sim.vllm.cli import check_start

    gated = ["google/gemma-", "meta-llama/"]
    # A gated model without a token: the Hub's 401.
    refusal = check_start("google/gemma-3-4b-it", gated, {"USER": "vllm"})
    assert "401 Client Error" in refusal
    assert "HF_TOKEN" in refusal
    assert check_start("google/gemma-3-4b-it", gated, {"USER": "vllm", "HF_TOKEN": "hf_x"}) == ""
    assert check_start("Qwen/Qwen2.5-7B-Instruct", gated, {"USER": "vllm"}) == ""


def test_refuses_to_start_when_the_gpu_lacks_the_free_memory_it_asks_for(driver: DriverDir) -> None:
    # vLLM's start check: --gpu-memory-utilization 0.9 of a 10,000 MiB GPU with 2,000 MiB held
    # by another process.
    driver.write_memory(UUIDS[0], "other-pod-1-abc", 2000)
    with pytest.raises(GpuMemoryError, match="less than desired GPU memory utilization"):
        build_memory_hold(config(0.9), env(driver, UUIDS[0]))
    assert build_memory_hold(config(0.7), env(driver, UUIDS[0])) is not None
    # What an earlier run of this pod's container left is not in the way: that process is gone.
    driver.remove_memory(UUIDS[0], "other-pod-1-abc")
    driver.write_memory(UUIDS[0], "gemma-instance-1-7-abc123", 9000)
    assert build_memory_hold(config(0.9), env(driver, UUIDS[0])) is not None
