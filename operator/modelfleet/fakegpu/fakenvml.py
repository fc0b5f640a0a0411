"""A pynvml-compatible module over the fake driver directory: the one place NVML is mocked.

The agent's NVML backend with `--fake-gpu-dir` runs the real `NvmlBackend` against the module that
`build_fake_pynvml(dir)` returns, so the NVML code path (start, per-GPU reads, error handling,
pod attribution through the kubelet's pod-resources socket) is the one real GPU nodes run; only
the answers come from the driver directory instead of the NVIDIA driver:

- the GPUs, their UUIDs, product names and memory are the inventory (`gpus.yaml`, read once at
  `nvmlInit`, as NVML enumerates devices once);
- memory used is the sum of the live memory records on the GPU (what the containers the kubelet
  gave it to hold); utilization, temperature and power follow from it with the simulated
  backend's curves;
- an unhealthy GPU answers every sensor reading with `NVML_ERROR_GPU_IS_LOST`, the error a GPU
  that fell off the bus gives, with the reason from `health/<uuid>` in the message, and answers
  again once it is marked healthy. Its identity (handle, UUID, name) and memory size stay
  readable so the agent can name and size it. XID events and MIG are "not supported", as on a
  GPU without them;
- the NVML faults in `nvml-faults.json` (`sim-gpu-driver set-fault`) make one reading of one GPU
  fail with the NVML error named there, or every call (nvmlInit included) when `all` is set, as
  NVML does after a `systemctl daemon-reload` takes the container's device access away. The
  file is read again whenever it changes; a malformed one counts as no fault.

Only the functions and constants `NvmlBackend` uses are here, with pynvml's names and values.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfleet.fakegpu.driverdir import DriverDir, DriverDirError, NvmlFaults
from modelfleet.gpufile import SimGpu, compute_sim_readings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DRIVER_VERSION = "550.54.15-modelfleet-fake"

# pynvml's values for the names NvmlBackend reads.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_UNKNOWN = 999
NVML_TEMPERATURE_GPU = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
nvmlEventTypeXidCriticalError = 0x8

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}
FAULT_DETAIL = "injected by sim-gpu-driver set-fault"


def fault_code(name: str) -> int:
    """The code of NVML_ERROR_<name> (FAULT_ERRORS in driverdir names them)."""
    code = globals().get(f"NVML_ERROR_{name}")
    return code if isinstance(code, int) else NVML_ERROR_UNKNOWN


class NVMLError(Exception):
    """pynvml.NVMLError's shape: the code in `.value`; str() is NVML's message (plus detail)."""

    def __init__(self, value: int, detail: str = "") -> None:
        super().__init__(value, detail)
        self.value = value
        self.detail = detail

    def __str__(self) -> str:
        message = _MESSAGES.get(self.value, f"NVML Error with code {self.value}")
        return f"{message}: {self.detail}" if self.detail else message


@dataclass(frozen=True)
class DeviceHandle:
    """What nvmlDeviceGetHandleByIndex returns: opaque to the caller."""

    index: int


@dataclass(frozen=True)
class Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class MemoryV2:
    """nvmlMemory_v2_t: `used` leaves out what the driver reserves."""

    total: int
    reserved: int
    free: int
    used: int
    version: int = 0


# What pynvml passes as `version` for the v2 structure (its value is opaque to callers).
nvmlMemory_v2 = 0x02000028


@dataclass(frozen=True)
class Utilization:
    gpu: int
    memory: int


class FakeNvml:
    """The state behind one fake pynvml module: the driver directory and the inventory."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = DriverDir(directory)
        self.gpus: list[SimGpu] = []
        self.initialised = 0
        self._faults_key: tuple[int, int, int] | None = None
        self._faults = NvmlFaults()

    # --- injected faults -------------------------------------------------------------------

    def faults(self) -> NvmlFaults:
        """The faults file, parsed again only when it changed (it is replaced by a rename)."""
        try:
            st = os.stat(self.dir.nvml_faults_path)
        except FileNotFoundError:
            self._faults_key, self._faults = None, NvmlFaults()
            return self._faults
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._faults_key:
            try:
                self._faults = self.dir.read_nvml_faults()
            except (DriverDirError, OSError) as exc:
                log.warning("ignoring the NVML faults file: %s", exc)
                self._faults = NvmlFaults()
            self._faults_key = key
        return self._faults

    def _fail_all(self) -> None:
        every = self.faults().all
        if every is not None:
            raise NVMLError(fault_code(every), FAULT_DETAIL)

    def _fail_reading(self, gpu: SimGpu, reading: str) -> None:
        error = self.faults().error_for(gpu.uuid, reading)
        if error is not None:
            raise NVMLError(fault_code(error), FAULT_DETAIL)

    # --- lifecycle and enumeration ---------------------------------------------------------

    def nvmlInit(self) -> None:
        self._fail_all()
        try:
            _node, self.gpus = self.dir.read_inventory()
        except DriverDirError as exc:
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED, str(exc)) from None
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        if self.initialised <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def _check_init(self) -> None:
        if self.initialised <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self._fail_all()

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return DRIVER_VERSION

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> DeviceHandle:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return DeviceHandle(index)

    def _gpu(self, handle: Any) -> SimGpu:
        self._check_init()
        if not isinstance(handle, DeviceHandle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[handle.index]

    def _reachable(self, handle: Any) -> SimGpu:
        """The GPU, or GPU_IS_LOST with the reason while the driver directory marks it unhealthy."""
        gpu = self._gpu(handle)
        reason = self.dir.read_health().get(gpu.uuid)
        if reason is not None:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST, reason)
        return gpu

    # --- identity: readable even when the GPU is lost --------------------------------------

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._gpu(handle).index

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu(handle).product

    # --- readings --------------------------------------------------------------------------

    def _used_mib(self, gpu: SimGpu) -> int:
        return min(self.dir.used_mib(gpu.uuid), gpu.memory_mib)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Memory | MemoryV2:
        # Answers on a lost GPU too, so one lost before the agent started still has its size
        # (the agent then counts all of it used); the sensors below are what fail. As the real
        # NVML: v1 counts the driver's reserved memory as used, v2 reports it apart.
        gpu = self._gpu(handle)
        self._fail_reading(gpu, "memory")
        reserved = min(gpu.reserved_mib, gpu.memory_mib)
        used = min(self._used_mib(gpu), gpu.memory_mib - reserved)
        free = (gpu.memory_mib - reserved - used) * MIB
        if version is None:
            return Memory(total=gpu.memory_mib * MIB, used=(used + reserved) * MIB, free=free)
        return MemoryV2(
            total=gpu.memory_mib * MIB, reserved=reserved * MIB, free=free, used=used * MIB,
            version=version,
        )  # fmt: skip

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Utilization:
        gpu = self._reachable(handle)
        self._fail_reading(gpu, "utilization")
        used = self._used_mib(gpu)
        readings = compute_sim_readings(gpu, used)
        return Utilization(
            gpu=round(readings.utilization_percent), memory=round(100 * used / gpu.memory_mib)
        )

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu = self._reachable(handle)
        self._fail_reading(gpu, "temperature")
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return round(compute_sim_readings(gpu, self._used_mib(gpu)).temperature_c)

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        """Milliwatts, as NVML reports power."""
        gpu = self._reachable(handle)
        self._fail_reading(gpu, "power")
        return round(compute_sim_readings(gpu, self._used_mib(gpu)).power_w * 1000)

    # --- not supported: XID events, MIG ----------------------------------------------------

    def _not_supported(self, *_args: Any) -> Any:
        self._check_init()
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)

    def functions(self) -> dict[str, Callable[..., Any]]:
        unsupported = (
            "nvmlEventSetCreate",
            "nvmlEventSetFree",
            "nvmlEventSetWait_v2",
            "nvmlDeviceGetSupportedEventTypes",
            "nvmlDeviceRegisterEvents",
            "nvmlDeviceGetMigMode",
            "nvmlDeviceGetMaxMigDeviceCount",
            "nvmlDeviceGetMigDeviceHandleByIndex",
        )
        out: dict[str, Callable[..., Any]] = {
            name: getattr(self, name) for name in dir(self) if name.startswith("nvml")
        }
        out.update(dict.fromkeys(unsupported, self._not_supported))
        return out


def build_fake_pynvml(directory: str | Path) -> types.ModuleType:
    """A module with pynvml's names that reads the fake driver directory `directory`."""
    state = FakeNvml(directory)
    module = types.ModuleType("pynvml", "fake pynvml over a modelfleet fake GPU driver directory")
    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    for name, value in globals().items():
        if name.startswith(("NVML_", "nvmlEventType", "nvmlMemory_")):
            setattr(module, name, value)
    for name, fn in state.functions().items():
        setattr(module, name, fn)
    module.fake_state = state  # type: ignore[attr-defined]
    return module
