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
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modelfleet.api import labels
from modelfleet.api.gpustats import GpuHealth, GpuStats, PodRef

# The GPU file format lives in modelfleet.gpufile (the fake GPU driver shares it); these names
# stay importable from here.
from modelfleet.gpufile import GpuFileError as GpuFileError
from modelfleet.gpufile import SimGpu as SimGpu
from modelfleet.gpufile import build_sim_gpus as build_sim_gpus
from modelfleet.gpufile import compute_sim_readings
from modelfleet.gpufile import load_gpu_file as load_gpu_file
from modelfleet.gpufile import parse_gpu_file as parse_gpu_file
from modelfleet.gpufile import simulated_uuid as simulated_uuid
from modelfleet.gpuid import GpuIdError, format_gpu_id, parse_gpu_id

log = logging.getLogger(__name__)

VLLM_DEFAULT_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default


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
        readings = compute_sim_readings(gpu, used)
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
                utilization_percent=readings.utilization_percent,
                temperature_c=readings.temperature_c,
                power_w=readings.power_w,
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
