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


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class PodRef(_Wire):
    """A pod that uses a GPU, where the agent can tell."""

    namespace: str = Field(..., description="Pod namespace.")
    name: str = Field(..., description="Pod name.")
    container: str = Field("", description="Container name within the pod, where known.")
    memory_used_mib: int | None = Field(
        None, ge=0, description="GPU memory this pod uses on this GPU, where known."
    )


class GpuHealth(_Wire):
    """Whether a GPU can take work."""

    healthy: bool = Field(True, description="False when the GPU must not be used.")
    reason: str = Field("", description="Why it is unhealthy, e.g. 'XID 79: fallen off the bus'.")
    xid_errors: int = Field(
        0, ge=0, description="Critical XID events seen since the agent started."
    )
    last_xid: int | None = Field(None, description="The most recent XID code, if any.")


class GpuStats(_Wire):
    """One GPU in one sample."""

    index: int = Field(..., ge=0, description="Local index on the node (NVML index).")
    gpu_id: str = Field(..., description="Global GPU ID, <node>:<index>.")
    uuid: str = Field(..., description="GPU UUID, e.g. GPU-5fa3...")
    product: str = Field(..., description="Product name, e.g. NVIDIA-H100-80GB-HBM3.")
    memory_total_mib: int = Field(..., ge=0, description="Framebuffer memory, MiB.")
    memory_used_mib: int = Field(..., ge=0, description="Memory in use, MiB.")
    memory_free_mib: int = Field(..., ge=0, description="Memory free, MiB.")
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


class GpuReport(_Wire):
    """The whole reply of `GET /v1/gpus`."""

    schema_version: str = Field(SCHEMA_VERSION, description="Version of this reply format.")
    node: str = Field(..., description="Node name the agent runs on.")
    backend: str = Field(
        ...,
        description="nvml, fake-driver (NVML over a fake GPU driver, on test nodes) or simulated.",
    )
    sampled_at: datetime = Field(..., description="When the GPUs were sampled (UTC).")
    poll_interval_s: float = Field(..., gt=0, description="Seconds between samples.")
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
        if self.gpus:
            validate_node_name(self.node)  # once per report: the pool parses thousands a round
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
                    f"GPU {gpu.index} has gpuId {gpu.gpu_id!r}; on node {self.node!r} it must "
                    f"be {expected!r}"
                )
        return self
