"""NVML backend: reads real GPUs through nvidia-ml-py (`pynvml`), never through nvidia-smi.

NVML is initialised once for the process. Every NVML call is a blocking C call, so the poll and
the XID event wait run in worker threads (`asyncio.to_thread`), never on the event loop.

A failed read is a monitoring fault until NVML says the device is gone (docs/agent.md, "What a
failed NVML read means"):

- a sensor (utilization, temperature, power) that cannot be read is null, the GPU stays healthy;
- a GPU whose identity or memory cannot be read is stale: not placed on, never unhealthy for it;
- an error of `DEVICE_GONE_ERRORS` on any read makes that GPU unhealthy;
- NVML itself failing (`NVML_DOWN_ERRORS`, or every GPU unreadable) makes the whole backend not
  ready (`BackendNotReady`) and re-initialises NVML with backoff; no GPU is unhealthy for it.
  NVML that cannot start at all (no library, no driver, no GPU visible: usually a pod without the
  NVIDIA container runtime) is the same outage from the first moment, with a reason that names
  the likely fix (`START_HINTS`): the agent keeps serving, not ready, and keeps trying.

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
from modelfleet.agent.state import BackendNotReady
from modelfleet.api.gpustats import GpuHealth, GpuStats, PodRef
from modelfleet.gpuid import format_gpu_id

log = logging.getLogger(__name__)

MIB = 1024 * 1024
XID_WAIT_MS = 500  # short, so that a stopping agent's event thread ends within half a second
# MIG devices are enumerated when the kubelet names a device the agent does not know, at most
# this often: a MIG layout changes rarely, and an ID that matches nothing must not cost every poll.
MIG_RESCAN_S = 60.0
# A sensor that keeps failing is logged at most once per GPU and sensor in this many seconds;
# every failure is counted in modelfleet_agent_nvml_field_errors_total.
FIELD_ERROR_LOG_EVERY_S = 600.0
# NVML re-initialisation after it failed as a whole: the first try after this long, doubling up
# to the maximum, so a node whose driver is gone for good costs one nvmlInit every five minutes.
REINIT_BACKOFF_S = 5.0
REINIT_BACKOFF_MAX_S = 300.0

# NVML's return codes (nvml.h, nvmlReturn_t), by name. The ABI fixes them, and the fake NVML
# modules define only those they raise, so the backend carries its own table; the names are the
# values of the `error` metric label, a bounded set (anything else is OTHER).
NVML_ERROR_NAMES: dict[int, str] = {
    1: "UNINITIALIZED",
    2: "INVALID_ARGUMENT",
    3: "NOT_SUPPORTED",
    4: "NO_PERMISSION",
    5: "ALREADY_INITIALIZED",
    6: "NOT_FOUND",
    7: "INSUFFICIENT_SIZE",
    8: "INSUFFICIENT_POWER",
    9: "DRIVER_NOT_LOADED",
    10: "TIMEOUT",
    11: "IRQ_ISSUE",
    12: "LIBRARY_NOT_FOUND",
    13: "FUNCTION_NOT_FOUND",
    14: "CORRUPTED_INFOROM",
    15: "GPU_IS_LOST",
    16: "RESET_REQUIRED",
    17: "OPERATING_SYSTEM",
    18: "LIB_RM_VERSION_MISMATCH",
    19: "IN_USE",
    20: "MEMORY",
    21: "NO_DATA",
    22: "VGPU_ECC_NOT_SUPPORTED",
    23: "INSUFFICIENT_RESOURCES",
    24: "FREQ_NOT_SUPPORTED",
    25: "ARGUMENT_VERSION_MISMATCH",
    26: "DEPRECATED",
    27: "NOT_READY",
    28: "GPU_NOT_FOUND",
    29: "INVALID_STATE",
    30: "RESET_TYPE_NOT_SUPPORTED",
    999: "UNKNOWN",
}
_CODE = {name: code for code, name in NVML_ERROR_NAMES.items()}

# The GPU itself is gone or cannot work until someone acts on the node: the only read errors
# that make a GPU unhealthy (with critical XIDs). GPU_IS_LOST: fallen off the bus or otherwise
# inaccessible; RESET_REQUIRED: the GPU needs a reset before it can be used again;
# INSUFFICIENT_POWER: its external power cables are not properly attached; IRQ_ISSUE: the kernel
# driver detected an interrupt problem with it. None of them comes from a monitoring hiccup.
DEVICE_GONE_ERRORS = frozenset(
    {_CODE["GPU_IS_LOST"], _CODE["RESET_REQUIRED"], _CODE["INSUFFICIENT_POWER"], _CODE["IRQ_ISSUE"]}
)
# NVML itself does not answer: the session is gone (UNINITIALIZED), the kernel module is not
# loaded, the library cannot be loaded, or the library and the loaded driver differ (a driver
# upgrade without a reboot). No GPU is to blame: the agent is not ready and re-initialises NVML.
# NVML_ERROR_UNKNOWN is not here on its own: on one GPU it makes that GPU stale; only when no GPU
# can be read (what a `systemctl daemon-reload` that drops the container's device access looks
# like) is NVML down.
NVML_DOWN_ERRORS = frozenset(
    {
        _CODE["UNINITIALIZED"],
        _CODE["DRIVER_NOT_LOADED"],
        _CODE["LIBRARY_NOT_FOUND"],
        _CODE["LIB_RM_VERSION_MISMATCH"],
    }
)
# The reading does not exist on this device or driver (utilization on a MIG device, power on
# some boards, a function an older driver lacks): expected, reported null, noted once.
UNSUPPORTED_ERRORS = frozenset({_CODE["NOT_SUPPORTED"], _CODE["FUNCTION_NOT_FOUND"]})

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


# What a driver without the v2 memory structure (before R510) answers when asked for it.
MEMORY_V2_MISSING = frozenset({3, 13, 25})  # NOT_SUPPORTED, FUNCTION_NOT_FOUND, VERSION_MISMATCH

# Why nvmlInit fails, by NVML's error name, and what a person can do about it: the reason the
# agent reports while it waits for NVML. The chart's values are named because that is where the
# fix is made on a cluster (docs/install.md has the values per platform).
START_HINTS: dict[str, str] = {
    "LIBRARY_NOT_FOUND": (
        "libnvidia-ml.so.1 is not in the container, so the pod runs without the NVIDIA container "
        "runtime (or, on GKE, without the host's driver mounted): set agent.runtimeClassName "
        "(GPU Operator 25.10 and later: nvidia) or the agent.platform of this cluster "
        "(gpu-operator, gke, bottlerocket); on a machine without GPUs use --backend simulated"
    ),
    "DRIVER_NOT_LOADED": (
        "the NVIDIA kernel driver is not loaded on this node (not installed, or its driver "
        "container still installing it), or the GPU devices (/dev/nvidia*) are not in the "
        "container (NVIDIA_VISIBLE_DEVICES=all, agent.nvidiaVisibleDevices)"
    ),
    "NO_PERMISSION": (
        "the agent may not open the GPU devices: run it as root (agent.podResources.enabled "
        "does) or privileged (agent.platform gke or bottlerocket)"
    ),
    "LIB_RM_VERSION_MISMATCH": (
        "the driver library and the loaded kernel module differ (a driver upgrade without a "
        "reboot): drain and reboot the node"
    ),
}
NO_GPU_HINT = (
    "NVML started but sees no GPU: the runtime exposes none to the agent (NVIDIA_VISIBLE_DEVICES, "
    "agent.nvidiaVisibleDevices: all; Bottlerocket honours it in privileged containers only: "
    "agent.platform bottlerocket)"
)


class NvmlStartError(RuntimeError):
    """The NVML backend can never start here: nvidia-ml-py itself cannot be imported (a broken
    image). NVML failing to start (no library, no driver, no GPU) is not this: it is retried."""


class NvmlDown(RuntimeError):
    """NVML as a whole does not answer (see NVML_DOWN_ERRORS); the message says how."""


def load_pynvml() -> ModuleType:
    """Import nvidia-ml-py; tests replace the module in sys.modules (there is no GPU there)."""
    return importlib.import_module("pynvml")


def describe_xid(xid: int) -> str:
    meaning = XID_MEANINGS.get(xid)
    return f"XID {xid}: {meaning}" if meaning else f"XID {xid}"


def nvml_error_name(exc: BaseException) -> str:
    """NVML's name for the error's code (`GPU_IS_LOST`), or OTHER: a bounded metric label."""
    return NVML_ERROR_NAMES.get(_error_code(exc), "OTHER")


def _error_code(exc: BaseException) -> int:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else -1


def _describe(exc: BaseException) -> str:
    """`Unknown Error (NVML_ERROR_UNKNOWN)`: NVML's message and the code's name."""
    return f"{exc} (NVML_ERROR_{nvml_error_name(exc)})"


def describe_start_failure(exc: BaseException) -> str:
    """`NVML could not start (<NVML's message> (NVML_ERROR_<name>)): <what to do>`."""
    hint = START_HINTS.get(nvml_error_name(exc))
    return f"NVML could not start ({_describe(exc)})" + (f": {hint}" if hint else "")


def _lost_phrase(name: str) -> str:
    return {
        "GPU_IS_LOST": "GPU is lost",
        "RESET_REQUIRED": "GPU requires a reset",
        "INSUFFICIENT_POWER": "GPU has insufficient power (external power cables)",
        "IRQ_ISSUE": "GPU interrupt issue",
    }.get(name, "GPU is gone")


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class _Known:
    """The last values read from a GPU, used to describe it when a later read fails."""

    uuid: str = ""
    product: str = "unknown"
    memory_total_mib: int = 0
    memory_used_mib: int | None = None  # None: never read


@dataclass
class _Outage:
    """NVML down: since when (wall clock, for people), why, and the next re-init (monotonic)."""

    reason: str
    since: float
    next_try: float
    backoff_s: float
    why: str = ""  # the failure the reason names, without the retry note


def compute_next_backoff(backoff_s: float) -> float:
    return min(REINIT_BACKOFF_MAX_S, backoff_s * 2)


def compute_outage_reason(why: str) -> str:
    """The not-ready reason while NVML is down: why, and that the agent keeps trying."""
    return f"{why}; re-initialising NVML every {REINIT_BACKOFF_S:g} s to {REINIT_BACKOFF_MAX_S:g} s"


class NvmlBackend:
    """Samples every GPU on the node through NVML."""

    def __init__(
        self,
        node: str,
        *,
        nvml: ModuleType | None = None,
        on_gpu_error: Callable[[], None] | None = None,
        on_field_error: Callable[[str, str], None] | None = None,
        on_reinit: Callable[[bool], None] | None = None,
        pods_by_device: Callable[[], Mapping[str, list[PodRef]]] | None = None,
        name: str = "nvml",
    ) -> None:
        """`pods_by_device`: device ID (GPU UUID, MIG UUID or index, as the NVIDIA device plugin
        reports it) -> pods; called once per poll in the poll thread, so it may block briefly.
        `on_gpu_error()`: a GPU's identity or memory could not be read; `on_field_error(field,
        error)`: a sensor could not be read (NOT_SUPPORTED once per GPU and sensor, others
        every time); `on_reinit(ok)`: an NVML re-initialisation was tried.
        `name`: the backend name the agent reports (`fake-driver` over the fake NVML module)."""
        self.name = name
        self.node = node
        self._nvml = nvml
        self._on_gpu_error = on_gpu_error or (lambda: None)
        self._on_field_error = on_field_error or (lambda _field, _error: None)
        self._on_reinit = on_reinit or (lambda _ok: None)
        self._pods_by_device = pods_by_device
        self._mig_index: dict[str, int] = {}
        self._next_mig_scan = 0.0
        self._handles: list[Any] = []
        self._memory_v2: bool | None = None  # None: not tried yet
        self._known: dict[int, _Known] = {}
        self._driver: str | None = None
        self._event_set: Any = None
        self._initialised = False  # whether this backend holds an NVML session to shut down
        self._outage: _Outage | None = None
        # The backoff of an outage that a re-init ended, until a whole sample succeeds: NVML that
        # starts but cannot read a GPU must not be re-initialised every 5 s for ever.
        self._recovering_backoff_s = 0.0
        # (GPU index, field) -> when its failure was last logged (monotonic); NOT_SUPPORTED
        # ones are logged once, and kept here forever.
        self._field_logged: dict[tuple[int, str], float] = {}
        self._unsupported: set[tuple[int, str]] = set()
        # Written by the event thread, read by the poll thread.
        self._lock = threading.Lock()
        self._xid_count: dict[int, int] = {}
        self._last_xid: dict[int, int] = {}
        self._critical: dict[int, str] = {}
        self._stopping = threading.Event()
        self._xid_stop = threading.Event()
        self._restart_xids = False  # set by a re-init: the event thread runs again
        self._event_task: asyncio.Task[None] | None = None

    @property
    def nvml(self) -> ModuleType:
        if self._nvml is None:
            self._nvml = load_pynvml()
        return self._nvml

    @property
    def not_ready_reason(self) -> str:
        """Why NVML cannot be read now, or "" while it can."""
        return self._outage.reason if self._outage is not None else ""

    # --- blocking parts, run in worker threads -------------------------------------------

    def open_blocking(self) -> None:
        """nvmlInit, the device handles, the driver version and the XID event set.

        NVML that cannot start is an outage from the first moment, handled as one that begins
        later: not ready with a reason that names the likely fix, re-initialised with backoff.
        Raises NvmlStartError only when nvidia-ml-py cannot be imported, which no retry mends."""
        if self._nvml is None:
            try:
                self._nvml = load_pynvml()
            except ImportError as exc:
                raise NvmlStartError(f"nvidia-ml-py (pynvml) cannot be imported: {exc}") from None
        try:
            self._init_blocking()
        except NvmlDown as exc:
            self._enter_outage(str(exc), starting=True)
            return
        log.info(
            "NVML started: %d GPU(s), driver %s, XID events %s",
            len(self._handles),
            self._driver or "unknown",
            "on" if self._event_set is not None else "not supported",
        )

    def _init_blocking(self) -> None:
        """nvmlInit and everything read once per NVML session; NvmlDown when it fails."""
        nv = self.nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise NvmlDown(describe_start_failure(exc)) from None
        self._initialised = True
        try:
            count = nv.nvmlDeviceGetCount()
            self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nv.NVMLError as exc:
            self._shutdown_blocking()
            raise NvmlDown(f"NVML started but could not list the GPUs ({_describe(exc)})") from None
        if not self._handles:
            # The agent runs on GPU nodes only: none visible is the runtime's doing, not a node
            # without GPUs, and a ready agent with no GPUs would hide it.
            self._shutdown_blocking()
            raise NvmlDown(NO_GPU_HINT)
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

    def _read_memory(self, handle: Any) -> tuple[int, int, int]:
        """(total, used, free) in MiB. NVML's v2 structure where the driver has it (R510 on):
        its `used` leaves out the memory the driver reserves for itself (600 MiB and more on an
        idle H200), as nvidia-smi shows it; v1 counts that as used, which would make every idle
        GPU look busy. `free` is what applications can still allocate, in both."""
        nv = self.nvml
        v2 = getattr(nv, "nvmlMemory_v2", None)
        if v2 is not None and self._memory_v2 is not False:
            try:
                memory = nv.nvmlDeviceGetMemoryInfo(handle, version=v2)
            except nv.NVMLError as exc:
                if _error_code(exc) not in MEMORY_V2_MISSING:
                    raise
                log.info("NVML has no v2 memory information (%s): reading v1", _describe(exc))
                self._memory_v2 = False
            else:
                self._memory_v2 = True
                return int(memory.total) // MIB, int(memory.used) // MIB, int(memory.free) // MIB
        memory = nv.nvmlDeviceGetMemoryInfo(handle)
        return int(memory.total) // MIB, int(memory.used) // MIB, int(memory.free) // MIB

    def read_gpu_blocking(self, index: int, pods: Sequence[PodRef] = ()) -> GpuStats:
        """One GPU. A sensor that fails is null; identity or memory failing makes the GPU stale;
        a device-gone error makes it unhealthy. Raises NvmlDown when NVML itself fails."""
        nv = self.nvml
        handle = self._handles[index]
        known = self._known.setdefault(index, _Known())
        try:
            known.uuid = _text(nv.nvmlDeviceGetUUID(handle))
            known.product = _text(nv.nvmlDeviceGetName(handle))
            total, used, free = self._read_memory(handle)
        except nv.NVMLError as exc:
            self._on_gpu_error()
            if _error_code(exc) in NVML_DOWN_ERRORS:
                raise NvmlDown(f"NVML does not answer ({_describe(exc)})") from None
            if _error_code(exc) in DEVICE_GONE_ERRORS:
                return self._lost(index, pods, exc)
            return self.build_stale(index, pods, f"NVML could not read the GPU: {_describe(exc)}")
        if total <= 0:
            return self.build_stale(index, pods, "NVML reported no framebuffer memory")
        # The report promises used <= total (the pool refuses anything else); a driver that
        # counts more than the total has the GPU full, nothing more.
        used = min(used, total)
        known.memory_total_mib = total
        known.memory_used_mib = used
        gone: list[BaseException] = []
        util = self._read_field(
            index, "utilization", lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu, gone
        )
        temperature = self._read_field(
            index,
            "temperature",
            lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU),
            gone,
        )
        power_mw = self._read_field(
            index, "power", lambda: nv.nvmlDeviceGetPowerUsage(handle), gone
        )
        if gone:
            self._on_gpu_error()
            return self._lost(index, pods, gone[0])
        return GpuStats(
            index=index,
            gpu_id=format_gpu_id(self.node, index),
            uuid=known.uuid,
            product=known.product,
            memory_total_mib=known.memory_total_mib,
            memory_used_mib=used,
            memory_free_mib=max(0, min(free, known.memory_total_mib - used)),
            utilization_percent=None if util is None else float(min(100, max(0, int(util)))),
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if power_mw is None else float(power_mw) / 1000.0,
            health=self._health(index, ""),
            pods=list(pods),
        )

    def _read_field(
        self, index: int, field: str, read: Callable[[], Any], gone: list[BaseException]
    ) -> Any:
        """One sensor reading, or None when NVML cannot give it (counted and logged, rarely);
        a device-gone error is appended to `gone`; NvmlDown when NVML itself fails."""
        nv = self.nvml
        try:
            return read()
        except nv.NVMLError as exc:
            code = _error_code(exc)
            if code in NVML_DOWN_ERRORS:
                raise NvmlDown(f"NVML does not answer ({_describe(exc)})") from None
            if code in DEVICE_GONE_ERRORS:
                gone.append(exc)
                return None
            self._note_field_error(index, field, exc)
            return None

    def _note_field_error(self, index: int, field: str, exc: BaseException) -> None:
        key = (index, field)
        name = nvml_error_name(exc)
        if _error_code(exc) in UNSUPPORTED_ERRORS:
            if key not in self._unsupported:
                self._unsupported.add(key)
                self._on_field_error(field, name)
                log.info("GPU %d: %s is not supported (%s); reported as null", index, field, exc)
            return
        self._on_field_error(field, name)
        now = time.monotonic()
        last = self._field_logged.get(key)
        if last is None or now - last >= FIELD_ERROR_LOG_EVERY_S:
            self._field_logged[key] = now
            log.warning(
                "GPU %d: %s could not be read (%s); reported as null, the GPU stays healthy "
                "(logged at most every %.0f s)",
                index,
                field,
                _describe(exc),
                FIELD_ERROR_LOG_EVERY_S,
            )

    def _lost(self, index: int, pods: Sequence[PodRef], exc: BaseException) -> GpuStats:
        """The GPU is gone (DEVICE_GONE_ERRORS): unhealthy, and full so that nothing goes there."""
        known = self._known.setdefault(index, _Known())
        name = nvml_error_name(exc)
        reason = f"{_lost_phrase(name)} (NVML_ERROR_{name}: {exc}); the node needs attention"
        return GpuStats(
            index=index,
            gpu_id=format_gpu_id(self.node, index),
            uuid=known.uuid,
            product=known.product,
            memory_total_mib=known.memory_total_mib,
            memory_used_mib=known.memory_total_mib,
            memory_free_mib=0,
            health=self._health(index, reason),
            pods=list(pods),
        )

    def build_stale(self, index: int, pods: Sequence[PodRef], reason: str) -> GpuStats:
        """The GPU as last known, marked stale: memory as last read (all used if never read),
        no sensor values, healthy unless an XID said otherwise."""
        known = self._known.setdefault(index, _Known())
        total = known.memory_total_mib
        used = total if known.memory_used_mib is None else min(known.memory_used_mib, total)
        return GpuStats(
            index=index,
            gpu_id=format_gpu_id(self.node, index),
            uuid=known.uuid,
            product=known.product,
            memory_total_mib=total,
            memory_used_mib=used,
            memory_free_mib=total - used,
            stale=True,
            stale_reason=reason,
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
        """Every GPU; BackendNotReady while NVML as a whole does not answer (and re-init is
        tried when due)."""
        if self._outage is not None:
            if time.monotonic() < self._outage.next_try:
                raise self._not_ready()
            self._reinit_blocking()
        gpu_pods = self.gpu_pods_blocking()
        try:
            self.nvml.nvmlDeviceGetCount()  # the cheapest question NVML can answer
            gpus = [
                self.read_gpu_blocking(i, gpu_pods.get(i, ())) for i in range(len(self._handles))
            ]
        except self.nvml.NVMLError as exc:
            self._enter_outage(f"NVML does not answer ({_describe(exc)})")
            raise self._not_ready(gpu_pods) from None
        except NvmlDown as exc:
            self._enter_outage(str(exc))
            raise self._not_ready(gpu_pods) from None
        if gpus and all(g.stale for g in gpus):
            # Not one GPU answers: NVML is down, not every GPU at once.
            self._enter_outage(f"no GPU can be read: {gpus[0].stale_reason}")
            raise self._not_ready(gpu_pods)
        self._recovering_backoff_s = 0.0
        return gpus

    def _not_ready(self, gpu_pods: Mapping[int, Sequence[PodRef]] | None = None) -> BackendNotReady:
        reason = self.not_ready_reason
        if gpu_pods is None:
            gpu_pods = self.gpu_pods_blocking()
        gpus = [
            self.build_stale(i, gpu_pods.get(i, ()), f"the agent is not ready: {reason}")
            for i in sorted(self._known)
        ]
        return BackendNotReady(reason, gpus, self._driver)

    def _enter_outage(self, why: str, *, starting: bool = False) -> None:
        now = time.monotonic()
        backoff = (
            compute_next_backoff(self._recovering_backoff_s)
            if self._recovering_backoff_s
            else REINIT_BACKOFF_S
        )
        self._outage = _Outage(
            reason=compute_outage_reason(why),
            since=time.time(),
            next_try=now + backoff,
            backoff_s=backoff,
            why=why,
        )
        if starting:
            log.error(
                "%s. The agent keeps running and reports itself not ready (no GPU is read, none "
                "is called unhealthy); it starts NVML again in %g s, then less often, up to "
                "every %g s",
                why,
                backoff,
                REINIT_BACKOFF_MAX_S,
            )
            return
        log.error(
            "NVML does not answer, the agent reports itself not ready (no GPU is unhealthy for "
            "it): %s",
            why,
        )

    def reinit_due(self) -> bool:
        return self._outage is not None and time.monotonic() >= self._outage.next_try

    def _reinit_blocking(self) -> None:
        """Shut NVML down and start it again; BackendNotReady (with a longer backoff) on failure.

        The caller has stopped the XID event thread first (see `sample`)."""
        outage = self._outage
        assert outage is not None
        self._free_event_set()
        self._shutdown_blocking()
        try:
            self._init_blocking()
        except NvmlDown as exc:
            self._on_reinit(False)
            outage.backoff_s = compute_next_backoff(outage.backoff_s)
            outage.next_try = time.monotonic() + outage.backoff_s
            if str(exc) == outage.why:
                log.warning("NVML re-init failed as before, next try in %.0f s", outage.backoff_s)
            else:
                # The reason follows the latest failure: the library may be found now, and the
                # driver not loaded yet.
                outage.why = str(exc)
                outage.reason = compute_outage_reason(outage.why)
                log.warning("NVML re-init failed, next try in %.0f s: %s", outage.backoff_s, exc)
            raise self._not_ready() from None
        self._on_reinit(True)
        self._outage = None
        self._recovering_backoff_s = outage.backoff_s
        self._restart_xids = True
        log.warning(
            "NVML answers again after %.0f s: %d GPU(s), driver %s",
            time.time() - outage.since,
            len(self._handles),
            self._driver or "unknown",
        )

    def _free_event_set(self) -> None:
        if self._event_set is not None:
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlEventSetFree(self._event_set)
            self._event_set = None

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
        self._free_event_set()
        self._shutdown_blocking()

    def _shutdown_blocking(self) -> None:
        """nvmlShutdown for this backend's session, once (NVML counts inits and shutdowns)."""
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlShutdown()

    # --- async face -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start NVML and the XID event watcher; NVML that cannot start leaves the backend not
        ready and retrying (see `open_blocking`)."""
        await asyncio.to_thread(self.open_blocking)
        self._start_xid_watch()

    def _start_xid_watch(self) -> None:
        if self._event_set is not None and (self._event_task is None or self._event_task.done()):
            self._xid_stop.clear()
            self._event_task = asyncio.create_task(self._watch_xids(), name="nvml-xid-events")

    async def _stop_xid_watch(self) -> None:
        """Stop the event thread; it returns within XID_WAIT_MS (before its set may be freed)."""
        self._xid_stop.set()
        if self._event_task is not None:
            await asyncio.wait([self._event_task], timeout=XID_WAIT_MS / 1000 * 4)
            self._event_task.cancel()

    async def _watch_xids(self) -> None:
        while not (self._stopping.is_set() or self._xid_stop.is_set()):
            try:
                index = await asyncio.to_thread(self.wait_xid_blocking)
            except Exception as exc:
                log.warning("XID event wait failed, stopping XID events: %s", exc)
                return
            if index is not None:
                log.info("XID event on GPU %d recorded", index)

    async def sample(self) -> tuple[list[GpuStats], str | None]:
        if self.reinit_due():
            # nvmlShutdown must not free the event set under a thread waiting on it.
            await self._stop_xid_watch()
        try:
            gpus = await asyncio.to_thread(self.sample_blocking)
        finally:
            if self._restart_xids:
                self._restart_xids = False
                self._start_xid_watch()
        return gpus, self._driver

    async def close(self) -> None:
        self._stopping.set()
        await self._stop_xid_watch()
        await asyncio.to_thread(self.close_blocking)

    @property
    def gpu_count(self) -> int:
        return len(self._handles)
