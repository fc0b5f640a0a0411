"""NVML backend: reads real GPUs through nvidia-ml-py (`pynvml`), never through nvidia-smi.

NVML is initialised once for the process. Every NVML call is a blocking C call, so the poll and
the XID event wait run in worker threads (`asyncio.to_thread`), never on the event loop. A failure
on one GPU marks that GPU unhealthy with the reason and leaves the others reported.

Pod attribution (which pods use which GPU) comes from a `pods_by_device` source, the kubelet's
pod-resources API in the agent, read once per poll in the same worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from modelfleet.agent.podresources import compute_gpu_pods, unknown_device_ids
from modelfleet.api.gpustats import GpuHealth, GpuStats, PodRef
from modelfleet.gpuid import format_gpu_id

log = logging.getLogger(__name__)

MIB = 1024 * 1024
XID_WAIT_MS = 500  # short, so that a stopping agent's event thread ends within half a second
# MIG devices are enumerated when the kubelet names a device the agent does not know, at most
# this often: a MIG layout changes rarely, and an ID that matches nothing must not cost every poll.
MIG_RESCAN_S = 60.0

# XIDs that an application can cause (a bad kernel, an out-of-range access): counted and shown,
# but the GPU stays healthy. The NVIDIA device plugin skips the same set by default.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})

XID_MEANINGS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup, due to previous errors",
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapping recording failure",
    68: "video processor exception",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
}


class NvmlStartError(RuntimeError):
    """NVML could not start: no driver, no library or no GPU visible."""


def load_pynvml() -> ModuleType:
    """Import nvidia-ml-py; tests replace the module in sys.modules (there is no GPU there)."""
    return importlib.import_module("pynvml")


def describe_xid(xid: int) -> str:
    meaning = XID_MEANINGS.get(xid)
    return f"XID {xid}: {meaning}" if meaning else f"XID {xid}"


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class _Known:
    """The last values read from a GPU, used to describe it when a later read fails."""

    uuid: str = ""
    product: str = "unknown"
    memory_total_mib: int = 0


class NvmlBackend:
    """Samples every GPU on the node through NVML."""

    def __init__(
        self,
        node: str,
        *,
        nvml: ModuleType | None = None,
        on_gpu_error: Callable[[], None] | None = None,
        pods_by_device: Callable[[], Mapping[str, list[PodRef]]] | None = None,
        name: str = "nvml",
    ) -> None:
        """`pods_by_device`: device ID (GPU UUID, MIG UUID or index, as the NVIDIA device plugin
        reports it) -> pods; called once per poll in the poll thread, so it may block briefly.
        `name`: the backend name the agent reports (`fake-driver` over the fake NVML module)."""
        self.name = name
        self.node = node
        self._nvml = nvml
        self._on_gpu_error = on_gpu_error or (lambda: None)
        self._pods_by_device = pods_by_device
        self._mig_index: dict[str, int] = {}
        self._next_mig_scan = 0.0
        self._handles: list[Any] = []
        self._known: dict[int, _Known] = {}
        self._driver: str | None = None
        self._event_set: Any = None
        # Written by the event thread, read by the poll thread.
        self._lock = threading.Lock()
        self._xid_count: dict[int, int] = {}
        self._last_xid: dict[int, int] = {}
        self._critical: dict[int, str] = {}
        self._stopping = threading.Event()
        self._event_task: asyncio.Task[None] | None = None

    @property
    def nvml(self) -> ModuleType:
        if self._nvml is None:
            self._nvml = load_pynvml()
        return self._nvml

    # --- blocking parts, run in worker threads -------------------------------------------

    def open_blocking(self) -> None:
        """nvmlInit, the device handles, the driver version and the XID event set."""
        nv = self.nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise NvmlStartError(
                f"NVML could not start ({exc}): is the NVIDIA driver installed and are the GPUs "
                "visible to this container (NVIDIA container runtime, NVIDIA_VISIBLE_DEVICES)? "
                "On a node without GPUs use --backend simulated."
            ) from None
        try:
            count = nv.nvmlDeviceGetCount()
            self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nv.NVMLError as exc:
            nv.nvmlShutdown()
            raise NvmlStartError(f"NVML started but could not list the GPUs: {exc}") from None
        for index, handle in enumerate(self._handles):
            # Remember who each GPU is, so that one lost before its first sample is still named.
            known = self._known.setdefault(index, _Known())
            with contextlib.suppress(nv.NVMLError):
                known.uuid = _text(nv.nvmlDeviceGetUUID(handle))
                known.product = _text(nv.nvmlDeviceGetName(handle))
                known.memory_total_mib = int(nv.nvmlDeviceGetMemoryInfo(handle).total) // MIB
        try:
            self._driver = _text(nv.nvmlSystemGetDriverVersion())
        except nv.NVMLError:
            self._driver = None
        self._event_set = self._register_xid_events()
        log.info(
            "NVML started: %d GPU(s), driver %s, XID events %s",
            len(self._handles),
            self._driver or "unknown",
            "on" if self._event_set is not None else "not supported",
        )

    def _register_xid_events(self) -> Any:
        nv = self.nvml
        try:
            event_set = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            log.warning("XID events unavailable: %s", exc)
            return None
        registered = 0
        for index, handle in enumerate(self._handles):
            try:
                supported = nv.nvmlDeviceGetSupportedEventTypes(handle)
                if supported & nv.nvmlEventTypeXidCriticalError:
                    nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, event_set)
                    registered += 1
            except nv.NVMLError as exc:
                log.warning("GPU %d: XID events not supported: %s", index, exc)
        if not registered:
            nv.nvmlEventSetFree(event_set)
            return None
        return event_set

    def read_gpu_blocking(self, index: int, pods: Sequence[PodRef] = ()) -> GpuStats:
        """One GPU; an NVML error becomes an unhealthy entry with the reason."""
        nv = self.nvml
        handle = self._handles[index]
        known = self._known.setdefault(index, _Known())
        gpu_id = format_gpu_id(self.node, index)
        try:
            known.uuid = _text(nv.nvmlDeviceGetUUID(handle))
            known.product = _text(nv.nvmlDeviceGetName(handle))
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            known.memory_total_mib = int(memory.total) // MIB
            util = nv.nvmlDeviceGetUtilizationRates(handle)
            temperature = nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)
            power_mw = nv.nvmlDeviceGetPowerUsage(handle)
        except nv.NVMLError as exc:
            self._on_gpu_error()
            if exc.value == nv.NVML_ERROR_GPU_IS_LOST:
                reason = f"GPU is lost (NVML_ERROR_GPU_IS_LOST: {exc}); the node needs attention"
            else:
                reason = f"NVML error reading the GPU: {exc}"
            # Unknown usage: report it full so that nothing is placed on it.
            return GpuStats(
                index=index,
                gpu_id=gpu_id,
                uuid=known.uuid,
                product=known.product,
                memory_total_mib=known.memory_total_mib,
                memory_used_mib=known.memory_total_mib,
                memory_free_mib=0,
                health=self._health(index, reason),
                pods=list(pods),
            )
        used = int(memory.used) // MIB
        return GpuStats(
            index=index,
            gpu_id=gpu_id,
            uuid=known.uuid,
            product=known.product,
            memory_total_mib=known.memory_total_mib,
            memory_used_mib=used,
            memory_free_mib=max(0, known.memory_total_mib - used),
            utilization_percent=float(min(100, max(0, int(util.gpu)))),
            temperature_c=float(temperature),
            power_w=float(power_mw) / 1000.0,
            health=self._health(index, ""),
            pods=list(pods),
        )

    def _health(self, index: int, read_error: str) -> GpuHealth:
        with self._lock:
            critical = self._critical.get(index, "")
            count = self._xid_count.get(index, 0)
            last = self._last_xid.get(index)
        reason = "; ".join(r for r in (read_error, critical) if r)
        return GpuHealth(healthy=not reason, reason=reason, xid_errors=count, last_xid=last)

    def sample_blocking(self) -> list[GpuStats]:
        gpu_pods = self.gpu_pods_blocking()
        return [self.read_gpu_blocking(i, gpu_pods.get(i, ())) for i in range(len(self._handles))]

    def gpu_pods_blocking(self) -> dict[int, list[PodRef]]:
        """GPU index -> pods using it (or one of its MIG devices), from the attribution source."""
        if self._pods_by_device is None:
            return {}
        try:
            by_device = self._pods_by_device()
        except Exception as exc:
            # The source handles its own failures; this is the last guard, so that attribution
            # can never cost the GPU sample.
            log.warning("pod attribution failed, pod lists empty for this poll: %s", exc)
            return {}
        if not by_device:
            return {}
        index_of = self._device_index()
        if unknown_device_ids(by_device, index_of) and time.monotonic() >= self._next_mig_scan:
            self.scan_mig_blocking()
            index_of = self._device_index()
        return compute_gpu_pods(by_device, index_of)

    def _device_index(self) -> dict[str, int]:
        gpus = {known.uuid: index for index, known in self._known.items() if known.uuid}
        return {**self._mig_index, **gpus}

    def scan_mig_blocking(self) -> None:
        """Map the UUID of every MIG device to its GPU's index (GPUs in MIG mode only)."""
        nv = self.nvml
        found: dict[str, int] = {}
        for index, handle in enumerate(self._handles):
            try:
                current, _pending = nv.nvmlDeviceGetMigMode(handle)
                if current != nv.NVML_DEVICE_MIG_ENABLE:
                    continue
                slots = int(nv.nvmlDeviceGetMaxMigDeviceCount(handle))
            except nv.NVMLError:
                continue  # no MIG support (NOT_SUPPORTED), or the GPU cannot be read now
            for slot in range(slots):
                try:
                    mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                    found[_text(nv.nvmlDeviceGetUUID(mig))] = index
                except nv.NVMLError:
                    continue  # an empty slot answers NVML_ERROR_NOT_FOUND
        self._mig_index = found
        self._next_mig_scan = time.monotonic() + MIG_RESCAN_S
        log.info("MIG devices: %d found", len(found))

    def wait_xid_blocking(self, timeout_ms: int = XID_WAIT_MS) -> int | None:
        """Wait for one XID event; record it and return its GPU index, or None on timeout."""
        nv = self.nvml
        try:
            event = nv.nvmlEventSetWait_v2(self._event_set, timeout_ms)
        except nv.NVMLError as exc:
            if exc.value == nv.NVML_ERROR_TIMEOUT:
                return None
            raise
        if not event.eventType & nv.nvmlEventTypeXidCriticalError:
            return None
        try:
            index = int(nv.nvmlDeviceGetIndex(event.device))
        except nv.NVMLError as exc:
            log.warning("XID %d on a GPU whose index cannot be read: %s", event.eventData, exc)
            return None
        self.record_xid(index, int(event.eventData))
        return index

    def record_xid(self, index: int, xid: int) -> None:
        with self._lock:
            self._xid_count[index] = self._xid_count.get(index, 0) + 1
            self._last_xid[index] = xid
            if xid not in APPLICATION_XIDS:
                # Critical XIDs stay until the agent restarts, as with the device plugin.
                self._critical[index] = describe_xid(xid)
        log.warning("GPU %d: %s", index, describe_xid(xid))

    def close_blocking(self) -> None:
        nv = self.nvml
        if self._event_set is not None:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlEventSetFree(self._event_set)
            self._event_set = None
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()

    # --- async face -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start NVML (raises NvmlStartError) and the XID event watcher."""
        await asyncio.to_thread(self.open_blocking)
        if self._event_set is not None:
            self._event_task = asyncio.create_task(self._watch_xids(), name="nvml-xid-events")

    async def _watch_xids(self) -> None:
        while not self._stopping.is_set():
            try:
                index = await asyncio.to_thread(self.wait_xid_blocking)
            except Exception as exc:
                log.warning("XID event wait failed, stopping XID events: %s", exc)
                return
            if index is not None:
                log.info("XID event on GPU %d recorded", index)

    async def sample(self) -> tuple[list[GpuStats], str | None]:
        gpus = await asyncio.to_thread(self.sample_blocking)
        return gpus, self._driver

    async def close(self) -> None:
        self._stopping.set()
        if self._event_task is not None:
            # The event thread returns within XID_WAIT_MS; wait for it before freeing the set.
            await asyncio.wait([self._event_task], timeout=XID_WAIT_MS / 1000 * 4)
            self._event_task.cancel()
        await asyncio.to_thread(self.close_blocking)

    @property
    def gpu_count(self) -> int:
        return len(self._handles)
