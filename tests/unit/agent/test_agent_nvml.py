"""NVML backend against a fake `pynvml` (the only mock: no GPU or NVIDIA driver on this machine).

The fake is installed as sys.modules["pynvml"] by the `fake_nvml` fixture; the backend imports it
exactly as it imports nvidia-ml-py on a GPU node.
"""

from __future__ import annotations

import aiohttp
import pytest
from agent_testlib import FakeNvml, wait_for
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.agent import nvml as nvml_module
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.nvml import NvmlBackend, NvmlStartError
from modelfleet.agent.server import build_app
from modelfleet.agent.state import AgentState, BackendNotReady, poll_once
from modelfleet.api.gpustats import GpuReport, PodRef


def make_state(backend: NvmlBackend, metrics: AgentMetrics) -> AgentState:
    state = AgentState(node="gpu-node-a", backend="nvml", poll_interval_s=5.0, metrics=metrics)
    metrics.attach(lambda: state.latest)
    return state


async def started(metrics: AgentMetrics | None = None, **kwargs: object) -> NvmlBackend:
    backend = NvmlBackend(
        "gpu-node-a", on_gpu_error=(metrics.gpu_errors.inc if metrics else None), **kwargs
    )  # type: ignore[arg-type]
    await backend.start()
    return backend


async def test_normal_sample(fake_nvml: FakeNvml) -> None:
    backend = await started()
    try:
        gpus, driver = await backend.sample()
    finally:
        await backend.close()
    assert driver == "550.54.15"
    assert [g.gpu_id for g in gpus] == ["gpu-node-a:0", "gpu-node-a:1"]
    first = gpus[0]
    assert first.uuid == "GPU-aaaa"
    assert first.product == "NVIDIA H100 80GB HBM3"
    assert (first.memory_total_mib, first.memory_used_mib, first.memory_free_mib) == (
        81559,
        20480,
        81559 - 20480,
    )
    assert first.utilization_percent == 40.0
    assert first.temperature_c == 51.0
    assert first.power_w == 312.5
    assert first.health.healthy
    assert first.health.reason == ""
    assert gpus[1].memory_used_mib == 0
    # One NVML session for the process, closed at the end.
    assert fake_nvml.calls.count("init") == 1
    assert fake_nvml.initialised == 0


async def test_gpu_lost_mid_run_keeps_the_others(fake_nvml: FakeNvml) -> None:
    metrics = AgentMetrics()
    backend = await started(metrics)
    state = make_state(backend, metrics)
    try:
        assert await poll_once(backend, state)
        fake_nvml.gpus[0].fail_with = 15  # NVML_ERROR_GPU_IS_LOST
        assert await poll_once(backend, state)
    finally:
        await backend.close()
    assert state.latest is not None
    lost, other = state.latest.report.gpus
    assert not lost.health.healthy
    assert "GPU is lost" in lost.health.reason
    assert "NVML_ERROR_GPU_IS_LOST" in lost.health.reason
    # Described by what was last known, and full so that nothing is placed on it.
    assert lost.uuid == "GPU-aaaa"
    assert lost.memory_total_mib == 81559
    assert lost.memory_free_mib == 0
    assert other.health.healthy
    assert other.uuid == "GPU-bbbb"
    assert metrics.gpu_errors._value.get() == 1


async def test_nvml_error_on_one_reading_leaves_it_null(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[1].fail_temperature_with = 999
    backend = await started()
    try:
        gpus, _ = await backend.sample()
    finally:
        await backend.close()
    assert all(g.health.healthy and not g.stale for g in gpus)
    assert gpus[1].temperature_c is None
    assert gpus[1].power_w == 70.0  # the other readings are still read
    assert gpus[0].temperature_c == 51.0


async def test_whole_poll_failure_keeps_previous_sample(fake_nvml: FakeNvml) -> None:
    metrics = AgentMetrics()
    backend = await started(metrics)
    state = make_state(backend, metrics)
    try:
        assert await poll_once(backend, state)
        before = state.latest
        # Every NVML call fails (the library itself went away): a failing backend must not
        # replace a good sample with nothing.
        backend.sample_blocking = lambda: (_ for _ in ()).throw(RuntimeError("NVML gone"))  # type: ignore[method-assign]
        assert not await poll_once(backend, state)
    finally:
        await backend.close()
    assert state.latest is before
    assert metrics.poll_errors._value.get() == 1


async def test_critical_xid_marks_gpu_unhealthy(fake_nvml: FakeNvml) -> None:
    backend = await started()
    try:
        fake_nvml.xid(1, 79)
        fake_nvml.xid(0, 13)  # application error: counted, GPU stays healthy

        async def both_seen() -> bool:
            gpus, _ = await backend.sample()
            return gpus[1].health.xid_errors == 1 and gpus[0].health.xid_errors == 1

        await wait_for(both_seen, what="the XID events to be recorded")
        gpus, _ = await backend.sample()
    finally:
        await backend.close()
    assert not gpus[1].health.healthy
    assert gpus[1].health.reason == "XID 79: GPU has fallen off the bus"
    assert gpus[1].health.last_xid == 79
    assert gpus[0].health.healthy
    assert gpus[0].health.last_xid == 13


async def test_events_not_supported_still_samples(fake_nvml: FakeNvml) -> None:
    fake_nvml.events_supported = False
    backend = await started()
    try:
        gpus, _ = await backend.sample()
        assert backend._event_task is None
    finally:
        await backend.close()
    assert len(gpus) == 2
    assert all(g.health.healthy for g in gpus)


async def test_init_failure_is_not_ready_and_says_so(fake_nvml: FakeNvml) -> None:
    fake_nvml.init_error = 9  # NVML_ERROR_DRIVER_NOT_LOADED
    backend = NvmlBackend("gpu-node-a")
    await backend.start()  # no exception: the agent serves, not ready
    try:
        with pytest.raises(BackendNotReady, match=r"Driver Not Loaded.*kernel driver") as caught:
            await backend.sample()
    finally:
        await backend.close()
    assert caught.value.gpus == []  # no GPU was ever read: none to report, none unhealthy


async def test_device_listing_failure_shuts_nvml_down(fake_nvml: FakeNvml) -> None:
    fake_nvml.count_error = 999
    backend = NvmlBackend("gpu-node-a")
    await backend.start()
    assert "could not list the GPUs" in backend.not_ready_reason
    assert fake_nvml.initialised == 0
    await backend.close()
    assert fake_nvml.initialised == 0


async def test_nvidia_ml_py_missing_is_the_one_start_error(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pynvml() -> None:
        raise ModuleNotFoundError("No module named 'pynvml'")

    monkeypatch.setattr(nvml_module, "load_pynvml", no_pynvml)
    with pytest.raises(NvmlStartError, match="nvidia-ml-py"):
        await NvmlBackend("gpu-node-a").start()


async def test_pods_by_device_attribution(fake_nvml: FakeNvml) -> None:
    pod = PodRef(namespace="ml", name="gemma-instance-1", container="vllm")
    backend = await started(pods_by_device=lambda: {"GPU-bbbb": [pod]})
    try:
        gpus, _ = await backend.sample()
    finally:
        await backend.close()
    assert gpus[0].pods == []
    assert gpus[1].pods == [pod]


async def test_http_endpoints_with_nvml_backend(fake_nvml: FakeNvml, serve) -> None:  # type: ignore[no-untyped-def]
    metrics = AgentMetrics()
    backend = await started(metrics)
    state = make_state(backend, metrics)
    base = await serve(build_app(state))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 503
            async with http.get(f"{base}/v1/gpus") as resp:
                assert resp.status == 503
            fake_nvml.gpus[1].fail_with = 15
            assert await poll_once(backend, state)
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/v1/gpus") as resp:
                assert resp.status == 200
                report = GpuReport.model_validate_json(await resp.read())
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
    finally:
        await backend.close()
    assert report.backend == "nvml"
    assert report.driver_version == "550.54.15"
    assert [g.health.healthy for g in report.gpus] == [True, False]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    used = families["DCGM_FI_DEV_FB_USED"].samples
    assert [s.labels["UUID"] for s in used] == ["GPU-aaaa", "GPU-bbbb"]
    assert used[0].value == 20480
    # The lost GPU has no temperature reading: no series rather than a made-up value.
    assert [s.labels["gpu"] for s in families["DCGM_FI_DEV_GPU_TEMP"].samples] == ["0"]
    healthy = {s.labels["gpu"]: s.value for s in families["modelfleet_agent_gpu_healthy"].samples}
    assert healthy == {"0": 1.0, "1": 0.0}
    assert families["modelfleet_agent_gpu_read_errors"].samples[0].value == 1


async def test_failing_pod_source_never_costs_the_sample(fake_nvml: FakeNvml) -> None:
    def broken() -> dict[str, list[PodRef]]:
        raise RuntimeError("attribution bug")

    backend = await started(pods_by_device=broken)
    try:
        gpus, _ = await backend.sample()
    finally:
        await backend.close()
    assert [g.uuid for g in gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert all(g.health.healthy and g.pods == [] for g in gpus)
