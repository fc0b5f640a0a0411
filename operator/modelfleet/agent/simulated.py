"""Simulated backend: GPUs as configured, memory use derived from the pods on the node.

So that a simulated cluster reports what a real one would, memory in use follows the pods bound
to this node. Which GPUs a pod holds is the node's word, as on a real node:

- with a pod-resources socket (the test cluster's pod runner serves one per simulated node, the
  node's "kubelet", hack/simkubelet.py): the devices that API lists for each container, read
  with the real agent's client and parser (`podresources`); those pods are the GPU's pods;
- a pod the API does not list but whose container names GPUs in `NVIDIA_VISIBLE_DEVICES` (a
  Shared replica: the container runtime, not the device plugin, exposes its GPUs) uses memory on
  them and is listed on no GPU, as NVML plus pod-resources would show it;
- without a pod-resources socket (a cluster with no simulated kubelet, e.g. kind): the GPUs in
  the operator's `modelfleet.io/gpus` annotation, the plan and not a kubelet's assignment.

Each Running, not terminating pod takes its footprint on each of its GPUs: a replica's
`modelfleet.io/footprint-mib`, or vLLM's default of 90% of the GPU when empty; any other pod its
`sim.modelfleet.io/gpu-memory-mib`, else nothing. Utilization, temperature and power are derived
from memory use, so the same pods always give the same numbers.

Fault knobs: `Faults` (`POST /sim/faults`) make the agent unhealthy, slow, failing or garbled;
the node's annotations (`NodeKnobs`, docs/development.md) add memory held by a process outside
any pod and NVML errors, per reading or for NVML as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modelfleet.agent.nvml import DEVICE_GONE_ERRORS, NVML_DOWN_ERRORS, NVML_ERROR_NAMES
from modelfleet.agent.podresources import compute_gpu_pods
from modelfleet.agent.state import BackendNotReady
from modelfleet.api import labels
from modelfleet.api.gpustats import GpuHealth, GpuStats, PodRef
from modelfleet.fakegpu.driverdir import DriverDirError, NvmlFaults, parse_nvml_faults

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
VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"
SIM_PREFIX = "sim.modelfleet.io"
#: On a pod that is not a modelfleet replica: MiB it uses on each of its GPUs (default 0).
ANN_POD_GPU_MEMORY_MIB = f"{SIM_PREFIX}/gpu-memory-mib"
#: On the Node: memory held by processes outside any pod, "<index>=<MiB>,...".
ANN_FOREIGN_MEMORY_MIB = f"{SIM_PREFIX}/foreign-memory-mib"
#: On the Node: NVML errors, the fake driver's nvml-faults.json format with GPUs by index or UUID:
#: {"all": ERROR|null, "gpus": {"<index>": {"memory"|"utilization"|"temperature"|"power": ERROR}}}.
ANN_NVML_FAULTS = f"{SIM_PREFIX}/nvml-faults"
_CODE = {name: code for code, name in NVML_ERROR_NAMES.items()}


@dataclass(frozen=True, slots=True)
class PodUse:
    """What one replica pod takes on this node's GPUs."""

    namespace: str
    name: str
    container: str
    gpu_indexes: tuple[int, ...]
    footprint_mib: int | None  # None: vLLM's default share of the whole GPU
    active: bool  # Running and not terminating: vLLM has reserved its memory
    listed: bool = True  # named on the GPU's pod list (False: the runtime exposed the GPU)


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


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the API says about one pod on this node, for charging the GPUs the node gave it."""

    namespace: str
    name: str
    container: str
    footprint_mib: int | None  # None: vLLM's default share of the whole GPU
    active: bool
    visible_uuids: tuple[str, ...] = ()  # NVIDIA_VISIBLE_DEVICES of its first container


def _mib(text: str, where: str) -> int | None:
    try:
        return max(0, int(text))
    except ValueError:
        log.warning("%s=%r is not a number of MiB; ignored", where, text)
        return None


def parse_pod_info(pod: Mapping[str, Any]) -> PodInfo:
    """Footprint, phase and runtime-exposed GPUs of one pod (any pod, modelfleet's or not)."""
    meta = pod.get("metadata", {})
    annotations = meta.get("annotations") or {}
    ref = f"pod {meta.get('namespace')}/{meta.get('name')}"
    is_replica = (meta.get("labels") or {}).get(labels.LABEL_COMPONENT) == labels.COMPONENT_REPLICA
    footprint: int | None
    if is_replica:
        text = str(annotations.get(labels.ANN_FOOTPRINT_MIB, "") or "").strip()
        footprint = _mib(text, f"{ref}: {labels.ANN_FOOTPRINT_MIB}") if text else None
    else:
        text = str(annotations.get(ANN_POD_GPU_MEMORY_MIB, "") or "").strip()
        footprint = (_mib(text, f"{ref}: {ANN_POD_GPU_MEMORY_MIB}") or 0) if text else 0
    containers = pod.get("spec", {}).get("containers") or [{}]
    visible = next(
        (
            str(e.get("value") or "")
            for e in containers[0].get("env") or []
            if e.get("name") == VISIBLE_DEVICES_ENV
        ),
        "",
    )
    return PodInfo(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        container=str(containers[0].get("name", "")),
        footprint_mib=footprint,
        active=pod.get("status", {}).get("phase") == "Running"
        and not meta.get("deletionTimestamp"),
        visible_uuids=tuple(v.strip() for v in visible.split(",") if v.strip().startswith("GPU-")),
    )


def compute_node_uses(
    gpu_pods: Mapping[int, Sequence[PodRef]],
    pods: Iterable[PodInfo],
    index_of: Mapping[str, int],
) -> list[PodUse]:
    """Who uses which GPU by the node's word: the pod-resources attribution (`gpu_pods`), plus
    pods whose container runtime exposed GPUs to them (NVIDIA_VISIBLE_DEVICES), unlisted.

    A pod the attribution names but the API has not shown yet counts as using no memory.
    """
    info = {(p.namespace, p.name): p for p in pods}
    by_pod: dict[tuple[str, str, str], set[int]] = {}
    for index, refs in gpu_pods.items():
        for ref in refs:
            by_pod.setdefault((ref.namespace, ref.name, ref.container), set()).add(index)
    out: list[PodUse] = []
    for (namespace, name, container), indexes in sorted(by_pod.items()):
        known = info.get((namespace, name))
        out.append(
            PodUse(
                namespace=namespace,
                name=name,
                container=container,
                gpu_indexes=tuple(sorted(indexes)),
                footprint_mib=known.footprint_mib if known else 0,
                active=known.active if known else False,
            )
        )
    attributed = {(n, p) for n, p, _ in by_pod}
    for pod in info.values():
        if (pod.namespace, pod.name) in attributed or not pod.visible_uuids:
            continue
        exposed = sorted({index_of[u] for u in pod.visible_uuids if u in index_of})
        if exposed:
            out.append(
                PodUse(
                    namespace=pod.namespace,
                    name=pod.name,
                    container=pod.container,
                    gpu_indexes=tuple(exposed),
                    footprint_mib=pod.footprint_mib,
                    active=pod.active,
                    listed=False,
                )
            )
    return out


@dataclass(frozen=True)
class NodeKnobs:
    """Fault knobs read from the node's annotations: memory no pod holds, NVML errors."""

    foreign_memory_mib: Mapping[int, int] = field(default_factory=dict)
    nvml_all: str | None = None
    nvml_fields: Mapping[int, Mapping[str, str]] = field(default_factory=dict)  # index -> field


def parse_node_knobs(node: Mapping[str, Any], gpus: Sequence[SimGpu]) -> NodeKnobs:
    """The knobs in the node's annotations; a malformed one is logged and ignored."""
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    foreign: dict[int, int] = {}
    text = str(annotations.get(ANN_FOREIGN_MEMORY_MIB, "") or "")
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        index, _, mib = item.partition("=")
        if not index.strip().isdigit() or not mib.strip().isdigit():
            log.warning("%s: ignoring %r (expected <index>=<MiB>)", ANN_FOREIGN_MEMORY_MIB, item)
            continue
        foreign[int(index)] = foreign.get(int(index), 0) + int(mib)
    faults = NvmlFaults()
    raw = annotations.get(ANN_NVML_FAULTS)
    if raw:
        try:
            faults = parse_nvml_faults(str(raw), ANN_NVML_FAULTS)
        except DriverDirError as exc:
            log.warning("ignoring the node's NVML faults: %s", exc)
    index_of = {g.uuid: g.index for g in gpus}
    fields: dict[int, dict[str, str]] = {}
    for key, readings in faults.gpus.items():
        gpu = int(key) if key.isdigit() else index_of.get(key)
        if gpu is not None:
            fields.setdefault(gpu, {}).update(readings)
    return NodeKnobs(foreign_memory_mib=foreign, nvml_all=faults.all, nvml_fields=fields)


def _nvml_error(name: str) -> str:
    return f"NVML_ERROR_{name}, set by {ANN_NVML_FAULTS}"


def apply_nvml_faults(stats: list[GpuStats], knobs: NodeKnobs) -> list[GpuStats]:
    """The GPUs as the NVML backend reports them under the node's NVML faults (agent/nvml.py):
    a sensor that fails is null; memory failing makes the GPU stale; a device-gone error makes
    it unhealthy and full; NVML itself failing, or no GPU readable, is BackendNotReady."""
    down = knobs.nvml_all
    if down is None:
        down = next(
            (e for f in knobs.nvml_fields.values() for e in f.values() if _CODE.get(e, -1)
             in NVML_DOWN_ERRORS),
            None,
        )  # fmt: skip
    if down is not None:
        raise _not_ready(stats, f"NVML does not answer ({_nvml_error(down)})")
    out: list[GpuStats] = []
    for gpu in stats:
        errors = knobs.nvml_fields.get(gpu.index, {})
        gone = next((e for e in errors.values() if _CODE.get(e, -1) in DEVICE_GONE_ERRORS), None)
        if gone is not None:
            reason = f"GPU is gone ({_nvml_error(gone)}); the node needs attention"
            health = gpu.health.model_copy(
                update={
                    "healthy": False,
                    "reason": "; ".join(r for r in (reason, gpu.health.reason) if r),
                }
            )
            out.append(
                gpu.model_copy(
                    update={
                        "memory_used_mib": gpu.memory_total_mib,
                        "memory_free_mib": 0,
                        "utilization_percent": None,
                        "temperature_c": None,
                        "power_w": None,
                        "health": health,
                    }
                )
            )
        elif "memory" in errors:
            out.append(
                gpu.model_copy(
                    update={
                        "stale": True,
                        "stale_reason": "NVML could not read the GPU: "
                        + _nvml_error(errors["memory"]),
                        "utilization_percent": None,
                        "temperature_c": None,
                        "power_w": None,
                    }
                )
            )
        else:
            nulls = {
                attr: None
                for reading, attr in (
                    ("utilization", "utilization_percent"),
                    ("temperature", "temperature_c"),
                    ("power", "power_w"),
                )
                if reading in errors
            }
            out.append(gpu.model_copy(update=nulls) if nulls else gpu)
    if out and all(g.stale for g in out):
        raise _not_ready(out, f"no GPU can be read: {out[0].stale_reason}")
    return out


def _not_ready(stats: Sequence[GpuStats], reason: str) -> BackendNotReady:
    stale = [
        g.model_copy(
            update={
                "stale": True,
                "stale_reason": f"the agent is not ready: {reason}",
                "utilization_percent": None,
                "temperature_c": None,
                "power_w": None,
            }
        )
        for g in stats
    ]
    return BackendNotReady(reason, stale)


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
    node: str,
    gpus: Iterable[SimGpu],
    pods: Iterable[PodUse],
    faults: Faults,
    knobs: NodeKnobs | None = None,
) -> list[GpuStats]:
    """Deterministic stats of every simulated GPU from the pods that use it, plus the memory of
    processes outside any pod (`knobs`); `apply_nvml_faults` applies the NVML faults after."""
    pod_list = list(pods)
    foreign = knobs.foreign_memory_mib if knobs is not None else {}
    out: list[GpuStats] = []
    for gpu in gpus:
        refs: list[PodRef] = []
        used = foreign.get(gpu.index, 0)
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
            if not pod.listed:
                continue
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
    """Configured GPUs plus a cache of this node's pods and Node, kept by the agent's watches.

    `pods_by_device`: the node's pod-resources source (the agent's `PodAttribution`) and the
    socket it reads; while that socket exists, the node's word decides which pods hold which GPU,
    otherwise the operator's annotations do.
    """

    name = "simulated"

    def __init__(
        self,
        node: str,
        gpus: list[SimGpu],
        pods_by_device: Callable[[], Mapping[str, list[PodRef]]] | None = None,
        pod_resources_socket: str = "",
    ) -> None:
        self.node = node
        self.gpus = gpus
        self.pods: dict[str, PodUse] = {}  # by uid: replicas by their modelfleet.io/gpus
        self.pod_info: dict[str, PodInfo] = {}  # by uid: every pod on the node
        self.knobs = NodeKnobs()
        self.pods_by_device = pods_by_device
        self.pod_resources_socket = pod_resources_socket
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
            self.pod_info = {}
            for item in obj.get("items", []):
                self.apply_pod_event("ADDED", item)
            return
        meta = obj.get("metadata", {})
        uid = str(meta.get("uid") or meta.get("name"))
        if kind == "DELETED":
            self.pods.pop(uid, None)
            self.pod_info.pop(uid, None)
            return
        self.pod_info[uid] = parse_pod_info(obj)
        is_replica = (meta.get("labels") or {}).get(labels.LABEL_COMPONENT) == (
            labels.COMPONENT_REPLICA
        )
        use = parse_replica_pod(obj, self.node) if is_replica else None
        if use is None:
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = use

    def apply_node(self, node: Mapping[str, Any]) -> None:
        """Take the fault knobs from the node's annotations."""
        self.knobs = parse_node_knobs(node, self.gpus)

    @property
    def attributing(self) -> bool:
        """Whether the node's pod-resources socket decides who holds which GPU now."""
        return self.pods_by_device is not None and os.path.exists(self.pod_resources_socket)

    async def sample(self) -> tuple[list[GpuStats], str | None]:
        # freezeSample: the poll loop hangs here, as on a stuck driver call, and the server keeps
        # answering with the last sample it published (its sampledAt no longer advances).
        await self._thawed.wait()
        if self.attributing and self.pods_by_device is not None:
            by_device = await asyncio.to_thread(self.pods_by_device)
            index_of = {g.uuid: g.index for g in self.gpus}
            uses: Iterable[PodUse] = compute_node_uses(
                compute_gpu_pods(by_device, index_of), self.pod_info.values(), index_of
            )
        else:
            uses = self.pods.values()
        stats = compute_sim_stats(self.node, self.gpus, uses, self.faults, self.knobs)
        return apply_nvml_faults(stats, self.knobs), None
