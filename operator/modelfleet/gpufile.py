"""The GPU inventory file: a YAML or JSON list of GPUs, and the simulated GPUs' stable UUIDs.

One format for the agent's simulated backend (`--gpu-file`) and the fake GPU driver's inventory
(`gpus.yaml` in the driver directory, see `modelfleet.fakegpu`), so both describe a node's GPUs
the same way and give them the same UUIDs.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from modelfleet.gpuid import format_gpu_id

_UUID_NAMESPACE = uuid.UUID("6f1c1d8e-8d4e-4a53-9a57-0b7a3c2e9f10")
IDLE_POWER_W = 70.0
IDLE_TEMPERATURE_C = 32.0


class GpuFileError(ValueError):
    """The GPU description file cannot be used; the message says where and why."""


class SimGpu(BaseModel):
    """One simulated GPU."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    index: int = Field(..., ge=0, le=1023)
    uuid: str = Field(..., min_length=1)
    product: str = Field(..., min_length=1)
    memory_mib: int = Field(..., ge=1)
    max_power_w: float = Field(700.0, gt=0)
    # Framebuffer the driver keeps for itself (NVML v2's `reserved`: about 600 MiB on an H200
    # with driver 580); NVML v1 counts it as used, v2 and nvidia-smi do not.
    reserved_mib: int = Field(0, ge=0)


def simulated_uuid(node: str, index: int) -> str:
    """A stable UUID per (node, index), shaped like NVML's GPU-xxxxxxxx-... UUIDs."""
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, format_gpu_id(node, index))}"


def build_sim_gpus(node: str, count: int, memory_mib: int, product: str) -> list[SimGpu]:
    """`count` identical GPUs."""
    return [
        SimGpu(index=i, uuid=simulated_uuid(node, i), product=product, memory_mib=memory_mib)
        for i in range(count)
    ]


def parse_gpu_file(text: str, node: str, *, source: str = "GPU file") -> list[SimGpu]:
    """A YAML or JSON list of GPUs: each `{memoryMib, product?, index?, uuid?, maxPowerW?}`."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GpuFileError(f"{source}: not valid YAML or JSON: {exc}") from None
    if isinstance(doc, dict) and "gpus" in doc:
        doc = doc["gpus"]
    if not isinstance(doc, list) or not doc:
        raise GpuFileError(
            f"{source}: expected a non-empty list of GPUs, e.g. "
            "[{memoryMib: 81559, product: NVIDIA-H100-80GB-HBM3}]"
        )
    gpus: list[SimGpu] = []
    for position, item in enumerate(doc):
        if not isinstance(item, dict):
            raise GpuFileError(f"{source}: GPU #{position} must be a mapping, got {item!r}")
        index = item.get("index", position)
        fields = {
            "index": index,
            "uuid": item.get("uuid") or simulated_uuid(node, int(index)),
            "product": item.get("product", "NVIDIA-H100-80GB-HBM3"),
            **{k: v for k, v in item.items() if k not in ("index", "uuid", "product")},
        }
        try:
            gpus.append(SimGpu.model_validate(fields))
        except (ValidationError, ValueError) as exc:
            raise GpuFileError(f"{source}: GPU #{position}: {exc}") from None
    seen = [g.index for g in gpus]
    if len(set(seen)) != len(seen):
        raise GpuFileError(f"{source}: GPU indexes repeat: {seen}")
    return gpus


def load_gpu_file(path: str, node: str) -> list[SimGpu]:
    """Read and parse --gpu-file (called once at start, before the event loop serves)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise GpuFileError(f"cannot read GPU file {path}: {exc.strerror}") from None
    if file.suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise GpuFileError(f"{path}: not valid JSON: {exc}") from None
    return parse_gpu_file(text, node, source=path)


@dataclass(frozen=True, slots=True)
class SimReadings:
    """What a simulated GPU's sensors read at a given memory use."""

    utilization_percent: float
    temperature_c: float
    power_w: float


def compute_sim_readings(gpu: SimGpu, used_mib: int) -> SimReadings:
    """Utilization, temperature and power of a simulated GPU, derived from its memory use.

    A loaded vLLM server keeps the GPU busy; these curves only need to be plausible, and the same
    use always gives the same numbers.
    """
    fraction = min(max(used_mib, 0), gpu.memory_mib) / gpu.memory_mib
    utilization = round(min(100.0, 95.0 * fraction), 1)
    return SimReadings(
        utilization_percent=utilization,
        temperature_c=round(IDLE_TEMPERATURE_C + 0.45 * utilization, 1),
        power_w=round(IDLE_POWER_W + (gpu.max_power_w - IDLE_POWER_W) * utilization / 100, 1),
    )
