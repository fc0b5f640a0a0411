"""Monitoring faults are not GPU faults: what each kind of failed NVML read does to the reply.

- a sensor NVML cannot give is null and the GPU healthy (NOT_SUPPORTED quietly, once);
- a GPU whose memory cannot be read is stale, not unhealthy;
- a device-gone error (lost, reset required) is the only read error that makes it unhealthy;
- NVML failing as a whole makes the agent not ready, never a GPU unhealthy, and it re-inits.
"""

from __future__ import annotations

import logging

import aiohttp
import pytest
from agent_testlib import FakeNvml, wait_for
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.agent import nvml as nvml_module
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.nvml import (
    DEVICE_GONE_ERRORS,
    NVML_DOWN_ERRORS,
    NVML_ERROR_NAMES,
    UNSUPPORTED_ERRORS,
    NvmlBackend,
    compute_next_backoff,
)
from modelfleet.agent.server import build_app
from modelfleet.agent.state import AgentState, BackendNotReady, poll_once
from modelfleet.api.gpustats import GpuReport

NOT_SUPPORTED = 3
UNINITIALIZED = 1
GPU_IS_LOST = 15
RESET_REQUIRED = 16
UNKNOWN = 999


async def started(metrics: AgentMetrics) -> NvmlBackend:
    backend = NvmlBackend(
        "gpu-node-a",
        on_gpu_error=metrics.gpu_errors.inc,
        on_field_error=metrics.count_field_error,
        on_reinit=metrics.count_reinit,
    )
    await backend.start()
    return backend


def make_state(metrics: AgentMetrics) -> AgentState:
    state = AgentState(node="gpu-node-a", backend="nvml", poll_interval_s=5.0, metrics=metrics)
    metrics.attach(lambda: state.latest)
    return state


def field_errors(metrics: AgentMetrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["field"], s.labels["error"]): s.value
        for family in metrics.registry.collect()
        if family.name == "modelfleet_agent_nvml_field_errors"
        for s in family.samples
        if s.name.endswith("_total")
    }


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-init at every poll, so the tests need no clock."""
    monkeypatch.setattr(nvml_module, "REINIT_BACKOFF_S", 0.0)


def test_error_classes_are_disjoint_and_named() -> None:
    assert not DEVICE_GONE_ERRORS & NVML_DOWN_ERRORS
    assert not DEVICE_GONE_ERRORS & UNSUPPORTED_ERRORS
    assert not NVML_DOWN_ERRORS & UNSUPPORTED_ERRORS
    # Unknown Error alone proves nothing about the GPU or NVML.
    assert UNKNOWN not in DEVICE_GONE_ERRORS | NVML_DOWN_ERRORS
    names = {NVML_ERROR_NAMES[c] for c in DEVICE_GONE_ERRORS}
    assert {"GPU_IS_LOST", "RESET_REQUIRED"} <= names


async def test_utilization_not_supported_everywhere_is_null_and_quiet(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    # Every MIG device answers NOT_SUPPORTED for utilization.
    for gpu in fake_nvml.gpus:
        gpu.fail_fields["utilization"] = NOT_SUPPORTED
    metrics = AgentMetrics()
    backend = await started(metrics)
    state = make_state(metrics)
    caplog.set_level(logging.INFO, logger="modelfleet.agent.nvml")
    try:
        for _ in range(3):
            assert await poll_once(backend, state)
    finally:
        await backend.close()
    assert state.latest is not None
    report = state.latest.report
    assert report.ready
    assert all(g.health.healthy and not g.stale for g in report.gpus)
    assert [g.utilization_percent for g in report.gpus] == [None, None]
    # Not "full", not "busy": memory is what NVML measured.
    assert [g.memory_used_mib for g in report.gpus] == [20480, 0]
    # Counted and logged once per GPU and field, however many polls.
    assert field_errors(metrics) == {("utilization", "NOT_SUPPORTED"): 2.0}
    notes = [r for r in caplog.records if "utilization is not supported" in r.getMessage()]
    assert len(notes) == 2
    assert all(r.levelno == logging.INFO for r in notes)


async def test_failing_power_read_is_counted_every_time_logged_once(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml.gpus[0].fail_fields["power"] = UNKNOWN
    metrics = AgentMetrics()
    backend = await started(metrics)
    state = make_state(metrics)
    try:
        for _ in range(3):
            assert await poll_once(backend, state)
    finally:
        await backend.close()
    assert state.latest is not None
    gpu = state.latest.report.gpus[0]
    assert gpu.power_w is None
    assert gpu.health.healthy
    assert not gpu.stale
    assert gpu.temperature_c == 51.0
    assert gpu.utilization_percent == 40.0
    assert field_errors(metrics) == {("power", "UNKNOWN"): 3.0}
    warnings = [r for r in caplog.records if "power could not be read" in r.getMessage()]
    assert len(warnings) == 1
    assert metrics.gpu_errors._value.get() == 0  # a sensor is not the GPU


async def test_null_readings_leave_no_dcgm_series(fake_nvml: FakeNvml, serve) -> None:  # type: ignore[no-untyped-def]
    fake_nvml.gpus[1].fail_fields["utilization"] = NOT_SUPPORTED
    metrics = AgentMetrics()
    backend = await started(metrics)
    state = make_state(metrics)
    base = await serve(build_app(state))
    try:
        assert await poll_once(backend, state)
        async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    finally:
        await backend.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert [s.labels["gpu"] for s in families["DCGM_FI_DEV_GPU_UTIL"].samples] == ["0"]
    assert [s.labels["gpu"] for s in families["DCGM_FI_DEV_FB_USED"].samples] == ["0", "1"]
    errors = families["modelfleet_agent_nvml_field_errors"].samples
    assert [(s.labels["field"], s.labels["error"], s.value) for s in errors] == [
        ("utilization", "NOT_SUPPORTED", 1.0)
    ]


@pytest.mark.parametrize(
    ("code", "words"),
    [(GPU_IS_LOST, "GPU is lost"), (RESET_REQUIRED, "GPU requires a reset")],
)
async def test_device_gone_on_a_sensor_read_is_unhealthy(
    fake_nvml: FakeNvml, code: int, words: str
) -> None:
    fake_nvml.gpus[1].fail_fields["power"] = code
    metrics = AgentMetrics()
    backend = await started(metrics)
    try:
        gpus, _ = await backend.sample()
    finally:
        await backend.close()
    assert gpus[0].health.healthy
    lost = gpus[1]
    assert not lost.health.healthy
    assert words in lost.health.reason
    assert f"NVML_ERROR_{NVML_ERROR_NAMES[code]}" in lost.health.reason
    assert lost.memory_free_mib == 0
    assert metrics.gpu_errors._value.get() == 1


async def test_unreadable_memory_makes_the_gpu_stale_not_unhealthy(fake_nvml: FakeNvml) -> None:
    metrics = AgentMetrics()
    backend = await started(metrics)
    state = make_state(metrics)
    try:
        assert await poll_once(backend, state)
        fake_nvml.gpus[0].fail_fields["memory"] = UNKNOWN
        assert await poll_once(backend, state)
    finally:
        await backend.close()
    assert state.latest is not None
    report = state.latest.report
    assert report.ready  # one GPU unreadable is that GPU's problem, not NVML's
    stale, other = report.gpus
    assert stale.stale
    assert stale.health.healthy
    assert "Unknown Error" in stale.stale_reason
    assert "NVML_ERROR_UNKNOWN" in stale.stale_reason
    # The last known figures, named as before; no sensor values.
    assert (stale.uuid, stale.memory_total_mib, stale.memory_used_mib) == ("GPU-aaaa", 81559, 20480)
    assert stale.utilization_percent is None
    assert not other.stale
    assert other.health.healthy
    assert metrics.gpu_errors._value.get() == 1


async def test_stale_gpu_never_read_counts_all_memory_used(fake_nvml: FakeNvml) -> None:
    metrics = AgentMetrics()
    backend = await started(metrics)
    fake_nvml.gpus[1].fail_fields["memory"] = UNKNOWN  # from the first sample on
    try:
        gpus, _ = await backend.sample()
    finally:
        await backend.close()
    assert gpus[1].stale
    assert (gpus[1].memory_used_mib, gpus[1].memory_free_mib) == (81559, 0)


async def test_nvml_down_makes_the_agent_not_ready_and_it_recovers(
    fake_nvml: FakeNvml,
    serve,
    no_backoff: None,  # type: ignore[no-untyped-def]
) -> None:
    metrics = AgentMetrics()
    backend = await started(metrics)
    state = make_state(metrics)
    base = await serve(build_app(state))
    try:
        async with aiohttp.ClientSession() as http:
            assert await poll_once(backend, state)
            # What a `systemctl daemon-reload` that drops the container's device access does:
            # every NVML call answers Unknown Error, nvmlInit too.
            fake_nvml.fail_all = UNKNOWN
            assert not await poll_once(backend, state)
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 503
                body = await resp.json()
            async with http.get(f"{base}/v1/gpus") as resp:
                assert resp.status == 200
                down = GpuReport.model_validate_json(await resp.read())
            # Re-init is tried, fails and is counted; the agent stays not ready.
            assert not await poll_once(backend, state)
            assert state.latest is not None
            assert not state.latest.report.ready
            fake_nvml.fail_all = None
            assert await poll_once(backend, state)
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
    finally:
        await backend.close()
    assert body["status"] == "not ready"
    assert "Unknown Error" in body["reason"]
    assert "re-initialising NVML" in body["reason"]
    # /v1/gpus says why, names every GPU as last known, and calls none of them unhealthy.
    assert not down.ready
    assert down.reason == body["reason"]
    assert [g.uuid for g in down.gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert all(g.stale and g.health.healthy for g in down.gpus)
    assert all("the agent is not ready" in g.stale_reason for g in down.gpus)
    recovered = state.latest.report
    assert recovered.ready
    assert recovered.reason == ""
    assert all(not g.stale and g.health.healthy for g in recovered.gpus)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    reinits = {
        s.labels["outcome"]: s.value
        for s in families["modelfleet_agent_nvml_reinits"].samples
        if s.name.endswith("_total")
    }
    assert reinits == {"failed": 1.0, "ok": 1.0}
    assert families["modelfleet_agent_ready"].samples[0].value == 1.0
    assert fake_nvml.initialised == 0  # every nvmlInit matched by a shutdown


async def test_uninitialized_on_one_read_is_nvml_down(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[1].fail_fields["power"] = UNINITIALIZED
    metrics = AgentMetrics()
    backend = await started(metrics)
    try:
        with pytest.raises(BackendNotReady, match="Uninitialized") as caught:
            await backend.sample()
    finally:
        await backend.close()
    assert all(g.stale and g.health.healthy for g in caught.value.gpus)
    assert "NVML_ERROR_UNINITIALIZED" in backend.not_ready_reason


async def test_every_gpu_unreadable_is_nvml_down(fake_nvml: FakeNvml) -> None:
    for gpu in fake_nvml.gpus:
        gpu.fail_fields["memory"] = UNKNOWN
    metrics = AgentMetrics()
    backend = await started(metrics)
    try:
        with pytest.raises(BackendNotReady, match="no GPU can be read"):
            await backend.sample()
    finally:
        await backend.close()


async def test_reinit_waits_for_its_backoff(fake_nvml: FakeNvml) -> None:
    metrics = AgentMetrics()
    backend = await started(metrics)
    try:
        fake_nvml.fail_all = UNKNOWN
        with pytest.raises(BackendNotReady):
            await backend.sample()
        inits = fake_nvml.calls.count("init")
        fake_nvml.fail_all = None
        # Within the backoff nothing is tried, even though NVML would answer now.
        with pytest.raises(BackendNotReady):
            await backend.sample()
        assert fake_nvml.calls.count("init") == inits
    finally:
        await backend.close()
    assert compute_next_backoff(5.0) == 10.0
    assert compute_next_backoff(250.0) == 300.0


async def test_nvml_that_starts_but_reads_nothing_backs_off(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nvmlInit succeeds, yet no GPU can be read: each re-init that ends in the same outage
    # waits longer than the last, until one whole sample succeeds.
    monkeypatch.setattr(nvml_module, "REINIT_BACKOFF_S", 1e-6)
    metrics = AgentMetrics()
    backend = await started(metrics)
    for gpu in fake_nvml.gpus:
        gpu.fail_fields["memory"] = UNKNOWN
    try:
        with pytest.raises(BackendNotReady):
            await backend.sample()
        backoffs = []
        for _ in range(3):
            await wait_for(backend.reinit_due, what="the re-init to be due")
            with pytest.raises(BackendNotReady):
                await backend.sample()
            assert backend._outage is not None
            backoffs.append(backend._outage.backoff_s)
        assert backoffs[0] < backoffs[1] < backoffs[2]
        for gpu in fake_nvml.gpus:
            gpu.fail_fields.clear()
        await wait_for(backend.reinit_due, what="the re-init to be due")
        await backend.sample()
        assert backend.not_ready_reason == ""
        assert backend._recovering_backoff_s == 0.0
    finally:
        await backend.close()


async def test_xid_events_watched_again_after_reinit(fake_nvml: FakeNvml, no_backoff: None) -> None:
    metrics = AgentMetrics()
    backend = await started(metrics)
    try:
        fake_nvml.fail_all = UNKNOWN
        with pytest.raises(BackendNotReady):
            await backend.sample()
        # The event wait fails too, and its thread stops.
        await wait_for(
            lambda: backend._event_task is not None and backend._event_task.done(),
            what="the XID thread to stop",
        )
        fake_nvml.fail_all = None
        await backend.sample()
        fake_nvml.xid(0, 79)

        async def recorded() -> bool:
            gpus, _ = await backend.sample()
            return not gpus[0].health.healthy

        await wait_for(recorded, what="the XID after the re-init")
    finally:
        await backend.close()


# ---- NVML missing at start: the same outage, from the first moment ----

LIBRARY_NOT_FOUND = 12
DRIVER_NOT_LOADED = 9
NO_PERMISSION = 4
LIB_RM_VERSION_MISMATCH = 18


async def test_nvml_missing_at_start_is_not_ready_then_recovers(
    fake_nvml: FakeNvml,
    serve,  # type: ignore[no-untyped-def]
    no_backoff: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A pod without the NVIDIA runtime: no libnvidia-ml.so.1 in the container.
    fake_nvml.init_error = LIBRARY_NOT_FOUND
    metrics = AgentMetrics()
    caplog.set_level(logging.INFO, logger="modelfleet.agent.nvml")
    backend = await started(metrics)  # starts: the agent serves, not ready
    state = make_state(metrics)
    base = await serve(build_app(state))
    try:
        async with aiohttp.ClientSession() as http:
            assert not await poll_once(backend, state)
            async with http.get(f"{base}/healthz") as resp:
                live = resp.status
            async with http.get(f"{base}/readyz") as resp:
                ready_status, body = resp.status, await resp.json()
            async with http.get(f"{base}/v1/gpus") as resp:
                assert resp.status == 200
                waiting = GpuReport.model_validate_json(await resp.read())
            assert not await poll_once(backend, state)  # re-init tried, fails the same way
            fake_nvml.init_error = None  # the runtime class is set, the pod comes back: NVML
            assert await poll_once(backend, state)
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
    finally:
        await backend.close()
    assert live == 200
    assert ready_status == 503
    assert body["status"] == "not ready"
    reason = body["reason"]
    assert reason.startswith("NVML could not start (NVML Shared Library Not Found")
    assert "NVML_ERROR_LIBRARY_NOT_FOUND" in reason
    assert "agent.runtimeClassName (GPU Operator 25.10 and later: nvidia)" in reason
    assert "agent.platform" in reason
    assert "re-initialising NVML" in reason
    assert not waiting.ready
    assert waiting.reason == reason
    assert waiting.gpus == []  # nothing read, nothing called unhealthy
    assert waiting.driver_version is None
    recovered = state.latest.report  # type: ignore[union-attr]
    assert recovered.ready
    assert [g.uuid for g in recovered.gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert all(g.health.healthy and not g.stale for g in recovered.gpus)
    # One clear line at start; the retry that failed the same way says so briefly.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "NVML could not start" in errors[0].getMessage()
    assert "keeps running and reports itself not ready" in errors[0].getMessage()
    again = [r.getMessage() for r in caplog.records if "re-init failed" in r.getMessage()]
    assert again
    assert set(again) == {"NVML re-init failed as before, next try in 0 s"}
    assert fake_nvml.initialised == 0


async def test_xid_events_are_watched_once_nvml_starts_late(
    fake_nvml: FakeNvml, no_backoff: None
) -> None:
    fake_nvml.init_error = DRIVER_NOT_LOADED
    backend = await started(AgentMetrics())
    try:
        with pytest.raises(BackendNotReady):
            await backend.sample()
        assert backend._event_task is None
        fake_nvml.init_error = None
        await backend.sample()
        fake_nvml.xid(1, 79)

        async def recorded() -> bool:
            gpus, _ = await backend.sample()
            return not gpus[1].health.healthy

        await wait_for(recorded, what="the XID on the GPU NVML found late")
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (LIBRARY_NOT_FOUND, "set agent.runtimeClassName"),
        (DRIVER_NOT_LOADED, "kernel driver is not loaded"),
        (NO_PERMISSION, "run it as root"),
        (LIB_RM_VERSION_MISMATCH, "drain and reboot the node"),
    ],
)
async def test_start_failure_reason_names_the_fix(fake_nvml: FakeNvml, code: int, fix: str) -> None:
    fake_nvml.init_error = code
    backend = await started(AgentMetrics())
    await backend.close()
    assert f"NVML_ERROR_{NVML_ERROR_NAMES[code]}" in backend.not_ready_reason
    assert fix in backend.not_ready_reason


async def test_start_failure_without_a_known_fix_names_the_error(fake_nvml: FakeNvml) -> None:
    fake_nvml.init_error = UNKNOWN
    backend = await started(AgentMetrics())
    await backend.close()
    assert backend.not_ready_reason.startswith(
        "NVML could not start (Unknown Error (NVML_ERROR_UNKNOWN)); re-initialising NVML"
    )


async def test_no_gpu_visible_at_start_is_not_ready(fake_nvml: FakeNvml, no_backoff: None) -> None:
    # NVML starts, but the runtime exposed no GPU to the agent (NVIDIA_VISIBLE_DEVICES).
    gpus, fake_nvml.gpus = fake_nvml.gpus, []
    backend = await started(AgentMetrics())
    try:
        assert "NVML started but sees no GPU" in backend.not_ready_reason
        assert fake_nvml.initialised == 0  # the session that saw nothing is closed
        fake_nvml.gpus = gpus
        sampled, _ = await backend.sample()
    finally:
        await backend.close()
    assert len(sampled) == 2
    assert backend.not_ready_reason == ""


async def test_reason_follows_the_latest_start_failure(
    fake_nvml: FakeNvml, no_backoff: None
) -> None:
    # The runtime class is set: the library is there now, the driver is not loaded yet.
    fake_nvml.init_error = LIBRARY_NOT_FOUND
    backend = await started(AgentMetrics())
    try:
        fake_nvml.init_error = DRIVER_NOT_LOADED
        with pytest.raises(BackendNotReady):
            await backend.sample()
    finally:
        await backend.close()
    assert "NVML_ERROR_DRIVER_NOT_LOADED" in backend.not_ready_reason
    assert "LIBRARY_NOT_FOUND" not in backend.not_ready_reason
