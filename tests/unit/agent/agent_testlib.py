"""Agent test helpers: a fake `pynvml` module (see conftest.py for why) and wait_for."""

from __future__ import annotations

import asyncio
import queue
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

MIB = 1024 * 1024


class FakeNVMLError(Exception):
    """Same shape as pynvml.NVMLError: an error code in `.value`."""

    NAMES = {
        1: "Uninitialized",
        3: "Not Supported",
        4: "Insufficient Permissions",
        6: "Not Found",
        9: "Driver Not Loaded",
        10: "Timeout",
        12: "NVML Shared Library Not Found",
        15: "GPU is lost",
        16: "GPU requires reset",
        18: "RM has detected an NVML/RM version mismatch.",
        999: "Unknown Error",
    }

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.NAMES.get(self.value, f"NVML Error with code {self.value}")


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total_mib: int = 81559
    used_mib: int = 0
    util: int = 0
    temp: int = 30
    power_mw: int = 70000
    fail_with: int | None = None  # error code every call on this GPU raises
    fail_temperature_with: int | None = None
    # "utilization", "power", "memory" -> the error code that reading raises
    fail_fields: dict[str, int] = field(default_factory=dict)
    mig_uuids: list[str] = field(default_factory=list)  # non-empty: MIG mode on, these devices


@dataclass
class FakeEvent:
    device: Any
    eventType: int
    eventData: int


# The NVML constants the backend reads, with pynvml's values.
NVML_CONSTANTS = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NOT_FOUND": 6,
    "NVML_DEVICE_MIG_ENABLE": 1,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_TIMEOUT": 10,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_UNKNOWN": 999,
    "NVML_TEMPERATURE_GPU": 0,
    "nvmlEventTypeXidCriticalError": 0x8,
}


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: int | None = None
    count_error: int | None = None
    fail_all: int | None = None  # every call but nvmlShutdown raises this (NVML down)
    events_supported: bool = True
    events: queue.Queue[FakeEvent] = field(default_factory=queue.Queue)
    calls: list[str] = field(default_factory=list)
    initialised: int = 0

    def module(self) -> types.ModuleType:
        """A `pynvml` module whose functions read and record this fake's state."""
        mod = types.ModuleType("pynvml")
        mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        for key, value in NVML_CONSTANTS.items():
            setattr(mod, key, value)
        for name, fn in self._functions().items():
            setattr(mod, name, fn)
        return mod

    def _functions(self) -> dict[str, Callable[..., Any]]:
        return {
            name: (fn if name == "nvmlShutdown" else self._guarded(fn))
            for name, fn in self._plain_functions().items()
        }

    def _guarded(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if self.fail_all is not None:
                raise FakeNVMLError(self.fail_all)
            return fn(*args)

        return call

    def _field(self, handle: int, name: str) -> FakeGpu:
        g = self._gpu(handle)
        if name in g.fail_fields:
            raise FakeNVMLError(g.fail_fields[name])
        return g

    def _plain_functions(self) -> dict[str, Callable[..., Any]]:
        gpu = self._gpu
        fld = self._field
        return {
            "nvmlInit": self._init,
            "nvmlShutdown": self._shutdown,
            "nvmlDeviceGetCount": self._count,
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetIndex": lambda h: h,
            "nvmlSystemGetDriverVersion": lambda: "550.54.15",
            # nvidia-ml-py returns str; older releases returned bytes: the backend takes both.
            "nvmlDeviceGetUUID": self._uuid,
            "nvmlDeviceGetMigMode": self._mig_mode,
            "nvmlDeviceGetMaxMigDeviceCount": lambda h: 7,
            "nvmlDeviceGetMigDeviceHandleByIndex": self._mig_device_handle,
            "nvmlDeviceGetName": lambda h: gpu(h).name.encode(),
            "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(
                total=fld(h, "memory").total_mib * MIB,
                used=gpu(h).used_mib * MIB,
                free=(gpu(h).total_mib - gpu(h).used_mib) * MIB,
            ),
            "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(
                gpu=fld(h, "utilization").util, memory=0
            ),
            "nvmlDeviceGetTemperature": self._temperature,
            "nvmlDeviceGetPowerUsage": lambda h: fld(h, "power").power_mw,
            "nvmlEventSetCreate": lambda: object(),
            "nvmlDeviceGetSupportedEventTypes": self._supported_event_types,
            "nvmlDeviceRegisterEvents": lambda h, types_, s: None,
            "nvmlEventSetWait_v2": self._event_wait,
            "nvmlEventSetFree": lambda s: None,
        }

    def _gpu(self, handle: int) -> FakeGpu:
        g = self.gpus[handle]
        if g.fail_with is not None:
            raise FakeNVMLError(g.fail_with)
        return g

    def _init(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.initialised += 1

    def _shutdown(self) -> None:
        self.calls.append("shutdown")
        self.initialised -= 1

    def _count(self) -> int:
        if self.count_error is not None:
            raise FakeNVMLError(self.count_error)
        return len(self.gpus)

    def _temperature(self, handle: int, sensor: int) -> int:
        g = self._gpu(handle)
        if g.fail_temperature_with is not None:
            raise FakeNVMLError(g.fail_temperature_with)
        return g.temp

    def _event_wait(self, event_set: object, timeout_ms: int) -> FakeEvent:
        try:
            return self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise FakeNVMLError(10) from None

    def _uuid(self, handle: Any) -> str:
        if isinstance(handle, tuple):  # a MIG device handle: (gpu handle, slot)
            return self._gpu(handle[0]).mig_uuids[handle[1]]
        return self._gpu(handle).uuid

    def _mig_mode(self, handle: int) -> list[int]:
        self.calls.append("mig-mode")
        if not self._gpu(handle).mig_uuids:
            raise FakeNVMLError(3)  # as on a GPU without MIG support
        return [1, 1]

    def _mig_device_handle(self, handle: int, slot: int) -> tuple[int, int]:
        if slot >= len(self._gpu(handle).mig_uuids):
            raise FakeNVMLError(6)  # an empty slot: NVML_ERROR_NOT_FOUND
        return (handle, slot)

    def _supported_event_types(self, handle: int) -> int:
        if not self.events_supported:
            raise FakeNVMLError(3)
        return 0x8 | 0x1

    def xid(self, index: int, code: int) -> None:
        self.events.put(FakeEvent(device=index, eventType=0x8, eventData=code))


async def wait_for(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout_s: float = 5.0,
    what: str = "condition",
) -> None:
    """Poll `predicate` until true or fail after the deadline (no fixed sleeps in tests)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)
