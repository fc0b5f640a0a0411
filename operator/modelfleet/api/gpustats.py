"""The node-stats agent's reply to `GET /v1/gpus`, shared by the agent and the pool client.

One model defines the wire format on both sides, so a change that breaks the contract breaks the
type check and the tests of both. Field names are camelCase on the wire; memory is in MiB.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from modelfleet.gpuid import MAX_GPU_INDEX, format_gpu_id, validate_node_name

SCHEMA_VERSION = "v1"
#: 16 TiB per GPU: far above any GPU made, far below where sums and byte counts stop being exact
#: floats (the pool adds thousands of these and exports them in bytes).
MAX_MEMORY_MIB = 16 * 1024 * 1024
#: The agent samples at most every 300 s (its MODELFLEET_AGENT_POLL_INTERVAL_S bound); a larger
#: value would keep a stuck agent from ever looking stale.
MAX_POLL_INTERVAL_S = 300.0


class _Wire(BaseModel):
    # No NaN or infinity anywhere: JSON has neither, but Python's encoder writes them and a
    # number like 1e400 parses as infinity.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,
    )


class PodRef(_Wire):
    """A pod that uses a GPU, where the agent can tell."""

    namespace: str = Field(..., description="Pod namespace.")
    name: str = Field(..., description="Pod name.")
    container: str = Field("", description="Container name within the pod, where known.")
    memory_used_mib: int | None = Field(
        None,
        ge=0,
        le=MAX_MEMORY_MIB,
        description="GPU memory this pod uses on this GPU, where known.",
    )


class GpuHealth(_Wire):
    """Whether a GPU can take work."""

    healthy: bool = Field(True, description="False when the GPU must not be used.")
    reason: str = Field("", description="Why it is unhealthy, e.g. 'XID 79: fallen off the bus'.")
    xid_errors: int = Field(
        0, ge=0, le=2**53, description="Critical XID events seen since the agent started."
    )
    last_xid: int | None = Field(None, description="The most recent XID code, if any.")


class GpuStats(_Wire):
    """One GPU in one sample."""

    index: int = Field(..., ge=0, description="Local index on the node (NVML index).")
    gpu_id: str = Field(..., description="Global GPU ID, <node>:<index>.")
    uuid: str = Field(..., description="GPU UUID, e.g. GPU-5fa3...")
    product: str = Field(..., description="Product name, e.g. NVIDIA-H100-80GB-HBM3.")
    memory_total_mib: int = Field(
        ...,
        ge=0,
        le=MAX_MEMORY_MIB,
        description="Framebuffer memory, MiB; 0 only on a stale or unhealthy GPU never read.",
    )
    memory_used_mib: int = Field(
        ..., ge=0, le=MAX_MEMORY_MIB, description="Memory in use, MiB; at most the total."
    )
    memory_free_mib: int = Field(
        ..., ge=0, le=MAX_MEMORY_MIB, description="Memory free, MiB; used + free <= total."
    )
    utilization_percent: float | None = Field(
        None, ge=0, le=100, description="GPU utilization, %; null when it could not be read."
    )
    temperature_c: float | None = Field(
        None, description="Core temperature, degrees Celsius; null when it could not be read."
    )
    power_w: float | None = Field(
        None, ge=0, description="Power draw, watts; null when it could not be read."
    )
    stale: bool = Field(
        False,
        description="True when this GPU's identity or memory could not be read in this sample: "
        "the memory figures are the last known ones (all used when none is), nothing is to be "
        "placed on it, and it is not unhealthy for that.",
    )
    stale_reason: str = Field("", description="Why the GPU is stale, e.g. the NVML error.")
    health: GpuHealth = Field(default_factory=GpuHealth, description="Health of this GPU.")
    pods: list[PodRef] = Field(default_factory=list, description="Pods using this GPU.")

    @model_validator(mode="after")
    def _memory_adds_up(self) -> GpuStats:
        total, used, free = self.memory_total_mib, self.memory_used_mib, self.memory_free_mib
        if used > total:
            raise ValueError(f"GPU {self.index}: memoryUsedMib {used} > memoryTotalMib {total}")
        if used + free > total:
            raise ValueError(
                f"GPU {self.index}: memoryUsedMib {used} + memoryFreeMib {free} > "
                f"memoryTotalMib {total}"
            )
        # A GPU the agent never read reports 0 MiB, but then it is stale or unhealthy and takes
        # nothing; a readable, healthy GPU without memory would look free to placement.
        if total == 0 and not self.stale and self.health.healthy:
            raise ValueError(
                f"GPU {self.index}: memoryTotalMib is 0 on a healthy GPU that is not stale"
            )
        return self


class GpuReport(_Wire):
    """The whole reply of `GET /v1/gpus`."""

    schema_version: str = Field(SCHEMA_VERSION, description="Version of this reply format.")
    node: str = Field(..., description="Node name the agent runs on.")
    backend: str = Field(
        ...,
        description="nvml, fake-driver (NVML over a fake GPU driver, on test nodes) or simulated.",
    )
    sampled_at: datetime = Field(..., description="When the GPUs were sampled (UTC).")
    poll_interval_s: float = Field(
        ..., gt=0, le=MAX_POLL_INTERVAL_S, description="Seconds between samples."
    )
    driver_version: str | None = Field(None, description="NVIDIA driver version, where known.")
    ready: bool = Field(
        True,
        description="False while the agent cannot read its GPUs at all (NVML not answering): "
        "every GPU is then stale; the node takes no new replicas and none is replaced for it.",
    )
    reason: str = Field("", description="Why the agent is not ready; empty when it is.")
    gpus: list[GpuStats] = Field(default_factory=list, description="Every GPU on the node.")

    @model_validator(mode="after")
    def _consistent(self) -> GpuReport:
        # Once per report, not per GPU ID: the pool parses thousands a round. Also without
        # GPUs: the name reaches logs, status tables and the pool's node map.
        validate_node_name(self.node)
        seen: set[int] = set()
        for gpu in self.gpus:
            if gpu.index in seen:
                raise ValueError(f"GPU index {gpu.index} appears twice in the report")
            seen.add(gpu.index)
            if gpu.index <= MAX_GPU_INDEX and gpu.gpu_id == f"{self.node}:{gpu.index}":
                continue  # the common case, without re-checking the node name per GPU
            expected = format_gpu_id(self.node, gpu.index)
            if gpu.gpu_id != expected:
                raise ValueError(
                    f"GPU {gpu.index} has gpuId {gpu.gpu_id[:80]!r}; on node {self.node!r} it must "
                    f"be {expected!r}"
                )
        return self
