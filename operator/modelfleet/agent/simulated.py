"""Simulated backend: GPUs as configured, memory use derived from the replica pods on the node.

So that a simulated cluster reports what a real one would, memory in use follows the modelfleet
replica pods bound to this node: each Running, not terminating pod takes its footprint
(`modelfleet.io/footprint-mib`, or vLLM's default of 90% of the GPU when empty) on every GPU in
`modelfleet.io/gpus`. Utilization, temperature and power are derived from memory use, so the same
pods always give the same numbers. Fault knobs (`Faults`) let tests make the agent unhealthy,
slow, failing or garbled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from modelfleet.api import labels
from modelfleet.api.gpustats import GpuHealth, GpuStats, PodRef
from modelfleet.gpuid import GpuIdError, format_gpu_id, parse_gpu_id

log = logging.getLogger(__name__)

VLLM_DEFAULT_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default
IDLE_POWER_W = 70.0
IDLE_TEMPERATURE_C = 32.0
_UUID_NAMESPACE = uuid.UUID("6f1c1d8e-8d4e-4a53-9a57-0b7a3c2e9f10")


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


@dataclass(frozen=True, slots=True)
class PodUse:
    """What one replica pod takes on this node's GPUs."""

    namespace: str
    name: str
    container: str
    gpu_indexes: tuple[int, ...]
    footprint_mib: int | None  # None: vLLM's default share of the whole GPU
    active: bool  # Running and not terminating: vLLM has reserved its memory


def parse_replica_pod(pod: Mapping[str, Any], node: str) -> PodUse | None:
    """The GPUs and footprint of one replica pod on `node`; None when it names no GPU here."""
    meta = pod.get("metadata", {})
    annotations = meta.get("annotations") or {}
    indexes: list[int] = []
    for raw in str(annotations.get(labels.ANN_GPUS, "")).split(","):
        if not raw.strip():
            continue
        try:
            gpu_node, index = parse_gpu_id(raw.strip())
        except GpuIdError as exc:
            log.warning(
                "pod %s/%s: ignoring GPU %r: %s", meta.get("namespace"), meta.get("name"), raw, exc
            )
            continue
        if gpu_node == node:
            indexes.append(index)
    if not indexes:
        return None
    footprint_text = str(annotations.get(labels.ANN_FOOTPRINT_MIB, "") or "").strip()
    footprint: int | None = None
    if footprint_text:
        try:
            footprint = max(0, int(footprint_text))
        except ValueError:
            log.warning(
                "pod %s/%s: %s=%r is not a number of MiB; using vLLM's default",
                meta.get("namespace"),
                meta.get("name"),
                labels.ANN_FOOTPRINT_MIB,
                footprint_text,
            )
    containers = pod.get("spec", {}).get("containers") or [{}]
    active = pod.get("status", {}).get("phase") == "Running" and not meta.get("deletionTimestamp")
    return PodUse(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        container=str(containers[0].get("name", "")),
        gpu_indexes=tuple(sorted(set(indexes))),
        footprint_mib=footprint,
        active=active,
    )


class Faults(BaseModel):
    """Fault knobs of the simulated backend, set with `POST /sim/faults`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    unhealthy: dict[int, str] = Field(
        default_factory=dict, description="GPU index -> reason; those GPUs report unhealthy."
    )
    xid: dict[int, int] = Field(
        default_factory=dict, description="GPU index -> XID code, as if NVML had reported it."
    )
    delay_s: float = Field(0.0, ge=0, le=600, description="Delay before every data reply.")
    fail_status: int | None = Field(
        None, ge=400, le=599, description="Answer data requests with this status."
    )
    garbage: bool = Field(False, description="Answer /v1/gpus with a body that is not a report.")
    freeze_sample: bool = Field(
        False,
        description="Stop sampling (the poll loop hangs) and keep serving the last sample.",
    )


def compute_sim_stats(
    node: str, gpus: Iterable[SimGpu], pods: Iterable[PodUse], faults: Faults
) -> list[GpuStats]:
    """Deterministic stats of every simulated GPU from the pods that use it."""
    pod_list = list(pods)
    out: list[GpuStats] = []
    for gpu in gpus:
        refs: list[PodRef] = []
        used = 0
        for pod in pod_list:
            if gpu.index not in pod.gpu_indexes:
                continue
            take = (
                pod.footprint_mib
                if pod.footprint_mib is not None
                else int(gpu.memory_mib * VLLM_DEFAULT_UTILIZATION)
            )
            take = take if pod.active else 0
            used += take
            refs.append(
                PodRef(
                    namespace=pod.namespace,
                    name=pod.name,
                    container=pod.container,
                    memory_used_mib=take,
                )
            )
        used = min(used, gpu.memory_mib)
        fraction = used / gpu.memory_mib
        # A loaded vLLM server keeps the GPU busy; these curves only need to be plausible.
        utilization = round(min(100.0, 95.0 * fraction), 1)
        reasons = []
        if gpu.index in faults.unhealthy:
            reasons.append(faults.unhealthy[gpu.index] or "marked unhealthy by a fault knob")
        xid = faults.xid.get(gpu.index)
        if xid is not None:
            reasons.append(f"XID {xid}")
        out.append(
            GpuStats(
                index=gpu.index,
                gpu_id=format_gpu_id(node, gpu.index),
                uuid=gpu.uuid,
                product=gpu.product,
                memory_total_mib=gpu.memory_mib,
                memory_used_mib=used,
                memory_free_mib=gpu.memory_mib - used,
                utilization_percent=utilization,
                temperature_c=round(IDLE_TEMPERATURE_C + 0.45 * utilization, 1),
                power_w=round(
                    IDLE_POWER_W + (gpu.max_power_w - IDLE_POWER_W) * utilization / 100, 1
                ),
                health=GpuHealth(
                    healthy=not reasons,
                    reason="; ".join(reasons),
                    xid_errors=1 if xid is not None else 0,
                    last_xid=xid,
                ),
                pods=refs,
            )
        )
    return out


class SimulatedBackend:
    """Configured GPUs plus a cache of this node's replica pods, kept by `watch_pods`."""

    name = "simulated"

    def __init__(self, node: str, gpus: list[SimGpu]) -> None:
        self.node = node
        self.gpus = gpus
        self.pods: dict[str, PodUse] = {}
        self._thawed = asyncio.Event()
        self.faults = Faults()

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self._faults = value
        if value.freeze_sample:
            self._thawed.clear()
        else:
            self._thawed.set()

    def apply_pod_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        """Update the pod cache from one list_and_watch event."""
        if kind == "SYNC":
            self.pods = {}
            for item in obj.get("items", []):
                self.apply_pod_event("ADDED", item)
            return
        uid = str(obj.get("metadata", {}).get("uid") or obj.get("metadata", {}).get("name"))
        use = parse_replica_pod(obj, self.node) if kind != "DELETED" else None
        if use is None:
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = use

    async def sample(self) -> tuple[list[GpuStats], str | None]:
        # freezeSample: the poll loop hangs here, as on a stuck driver call, and the server keeps
        # answering with the last sample it published (its sampledAt no longer advances).
        await self._thawed.wait()
        return compute_sim_stats(self.node, self.gpus, self.pods.values(), self.faults), None


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
