"""The memory the stand-in holds on its GPUs, recorded in the fake GPU driver directory.

On a real kubelet node the project's fake device plugin gives a container its GPUs as a real one
does (`NVIDIA_VISIBLE_DEVICES=<uuid,...>`) and mounts the node's fake driver directory at
`MODELFLEET_FAKE_GPU_DIR`. With both set, the stand-in does what vLLM does to the GPUs it is
given: it takes `--gpu-memory-utilization` of each GPU's memory on the first
`--tensor-parallel-size` visible GPUs (CUDA's device order is the variable's order) while it runs,
and gives it back when it stops. The agent's fake NVML (`--fake-gpu-dir`) reads that back as
memory used.
The records carry an expiry that a heartbeat pushes forward, so a killed container's memory
comes free on its own. Without the two variables nothing is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from modelfleet.fakegpu.driverdir import (
    DIR_ENV,
    HEARTBEAT_S,
    RECORD_TTL_S,
    DriverDir,
    DriverDirError,
    build_holder_name,
    parse_visible_devices,
)
from modelfleet.sim.vllm.config import SimConfig

log = logging.getLogger(__name__)

VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"


class GpuMemoryError(RuntimeError):
    """The GPUs the container was given cannot be used (as vLLM would fail to start)."""


@dataclass
class GpuMemoryHold:
    """What this process holds: `uses` are (GPU UUID, MiB) pairs, under one holder name."""

    driver: DriverDir
    holder: str
    uses: list[tuple[str, int]]
    heartbeat_s: float = HEARTBEAT_S
    ttl_s: float = RECORD_TTL_S

    def write_blocking(self) -> None:
        for uuid, mib in self.uses:
            self.driver.write_memory(uuid, self.holder, mib, ttl_s=self.ttl_s)

    def remove_blocking(self) -> None:
        for uuid, _mib in self.uses:
            self.driver.remove_memory(uuid, self.holder)


def build_memory_hold(config: SimConfig, env: Mapping[str, str]) -> GpuMemoryHold | None:
    """The memory to hold, from the two variables; None without them.

    Raises GpuMemoryError when they name a directory or GPUs that cannot be used.
    """
    directory = env.get(DIR_ENV, "")
    visible = env.get(VISIBLE_DEVICES_ENV)
    if not directory or visible is None:
        return None
    driver = DriverDir(directory)
    try:
        _node, gpus = driver.read_inventory()
    except DriverDirError as exc:
        raise GpuMemoryError(f"{DIR_ENV}={directory}: {exc}") from None
    devices, unknown = parse_visible_devices(visible, gpus)
    if unknown:
        raise GpuMemoryError(
            f"{VISIBLE_DEVICES_ENV}={visible}: no such GPU in {driver.inventory_path}: "
            + ", ".join(unknown)
        )
    if len(devices) < config.tensor_parallel_size:
        raise GpuMemoryError(
            f"--tensor-parallel-size {config.tensor_parallel_size} needs that many GPUs; "
            f"{VISIBLE_DEVICES_ENV}={visible} gives {len(devices)}"
        )
    used = devices[: config.tensor_parallel_size]
    holder = build_holder_name(dict(env))
    uses = [(g.uuid, int(g.memory_mib * config.gpu_memory_utilization)) for g in used]
    # Records of an earlier run of this pod's container: that process has ended (the kubelet
    # restarts a container once it is gone), and a real driver frees its memory at once.
    own = env.get("POD_NAME", "")
    for gpu, (_, wanted) in zip(used, uses, strict=True):
        # vLLM's start check: the share of the GPU it is told to take must be free now.
        others = sum(
            r.memory_mib
            for r in driver.read_memory(gpu.uuid)
            if not (own and r.holder.startswith(f"{own}-"))
        )
        free = gpu.memory_mib - gpu.reserved_mib - others
        if wanted > free:
            raise GpuMemoryError(
                f"free memory on device {gpu.uuid} ({free / 1024:.2f}/{gpu.memory_mib / 1024:.2f} "
                f"GiB) on startup is less than desired GPU memory utilization "
                f"({config.gpu_memory_utilization}, {wanted / 1024:.2f} GiB); decrease "
                "--gpu-memory-utilization or free the GPU"
            )
    return GpuMemoryHold(driver=driver, holder=holder, uses=uses)


async def _heartbeat(hold: GpuMemoryHold) -> None:
    while True:
        await asyncio.sleep(hold.heartbeat_s)
        try:
            await asyncio.to_thread(hold.write_blocking)
        except OSError as exc:
            log.warning("cannot renew the GPU memory records (they expire meanwhile): %s", exc)


@contextlib.asynccontextmanager
async def hold_gpu_memory(hold: GpuMemoryHold | None) -> AsyncIterator[None]:
    """Record the memory before the body runs, renew it meanwhile, remove it afterwards."""
    if hold is None:
        yield
        return
    await asyncio.to_thread(hold.write_blocking)
    log.info(
        "holding GPU memory as %s: %s",
        hold.holder,
        ", ".join(f"{mib} MiB on {uuid}" for uuid, mib in hold.uses),
    )
    task = asyncio.create_task(_heartbeat(hold), name="gpu-memory-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(hold.remove_blocking)
        log.info("released the GPU memory held as %s", hold.holder)
