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
        6: "Not Found",
        9: "Driver Not Loaded",
        10: "Timeout",
        15: "GPU is lost",
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
    mig_uuids: list[str] = field(default_factory=list)  # non-empty: MIG mode on, these devices


@dataclass
class FakeEvent:
    device: Any
    eventType: int
    eventData: int


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: int | None = None
    count_error: int | None = None
    events_supported: bool = True
    events: queue.Queue[FakeEvent] = field(default_factory=queue.Queue)
    calls: list[str] = field(default_factory=list)
    initialised: int = 0

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        fake = self
        mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        consts = {
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
        for key, value in consts.items():
            setattr(mod, key, value)

        def gpu(handle: int) -> FakeGpu:
            g = fake.gpus[handle]
            if g.fail_with is not None:
                raise FakeNVMLError(g.fail_with)
            return g

        def nvmlInit() -> None:
            fake.calls.append("init")
            if fake.init_error is not None:
                raise FakeNVMLError(fake.init_error)
            fake.initialised += 1

        def nvmlShutdown() -> None:
            fake.calls.append("shutdown")
            fake.initialised -= 1

        def nvmlDeviceGetCount() -> int:
            if fake.count_error is not None:
                raise FakeNVMLError(fake.count_error)
            return len(fake.gpus)

        def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
            g = gpu(handle)
            if g.fail_temperature_with is not None:
                raise FakeNVMLError(g.fail_temperature_with)
            return g.temp

        def nvmlEventSetWait_v2(event_set: object, timeout_ms: int) -> FakeEvent:
            try:
                return fake.events.get(timeout=timeout_ms / 1000)
            except queue.Empty:
                raise FakeNVMLError(10) from None

        def nvmlDeviceGetUUID(handle: Any) -> str:
            if isinstance(handle, tuple):  # a MIG device handle: (gpu handle, slot)
                return gpu(handle[0]).mig_uuids[handle[1]]
            return gpu(handle).uuid

        def nvmlDeviceGetMigMode(handle: int) -> list[int]:
            fake.calls.append("mig-mode")
            if not gpu(handle).mig_uuids:
                raise FakeNVMLError(3)  # as on a GPU without MIG support
            return [1, 1]

        def nvmlDeviceGetMigDeviceHandleByIndex(handle: int, slot: int) -> tuple[int, int]:
            if slot >= len(gpu(handle).mig_uuids):
                raise FakeNVMLError(6)  # an empty slot: NVML_ERROR_NOT_FOUND
            return (handle, slot)

        def nvmlDeviceGetSupportedEventTypes(handle: int) -> int:
            if not fake.events_supported:
                raise FakeNVMLError(3)
            return 0x8 | 0x1

        functions: dict[str, Callable[..., Any]] = {
            "nvmlInit": nvmlInit,
            "nvmlShutdown": nvmlShutdown,
            "nvmlDeviceGetCount": nvmlDeviceGetCount,
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetIndex": lambda h: h,
            "nvmlSystemGetDriverVersion": lambda: "550.54.15",
            # nvidia-ml-py returns str; older releases returned bytes: the backend takes both.
            "nvmlDeviceGetUUID": nvmlDeviceGetUUID,
            "nvmlDeviceGetMigMode": nvmlDeviceGetMigMode,
            "nvmlDeviceGetMaxMigDeviceCount": lambda h: 7,
            "nvmlDeviceGetMigDeviceHandleByIndex": nvmlDeviceGetMigDeviceHandleByIndex,
            "nvmlDeviceGetName": lambda h: gpu(h).name.encode(),
            "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(
                total=gpu(h).total_mib * MIB,
                used=gpu(h).used_mib * MIB,
                free=(gpu(h).total_mib - gpu(h).used_mib) * MIB,
            ),
            "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(
                gpu=gpu(h).util, memory=0
            ),
            "nvmlDeviceGetTemperature": nvmlDeviceGetTemperature,
            "nvmlDeviceGetPowerUsage": lambda h: gpu(h).power_mw,
            "nvmlEventSetCreate": lambda: object(),
            "nvmlDeviceGetSupportedEventTypes": nvmlDeviceGetSupportedEventTypes,
            "nvmlDeviceRegisterEvents": lambda h, types_, s: None,
            "nvmlEventSetWait_v2": nvmlEventSetWait_v2,
            "nvmlEventSetFree": lambda s: None,
        }
        for name, fn in functions.items():
            setattr(mod, name, fn)
        return mod

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
