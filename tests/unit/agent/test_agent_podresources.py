"""Pod attribution on the NVML backend from the kubelet pod-resources API.

The kubelet is a real gRPC server on a unix socket (kubelet_testlib.FakeKubelet); the GPUs are the
fake `pynvml` of the other NVML tests, the only mock (no GPU or NVIDIA driver on this machine).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import aiohttp
import grpc
import pytest
from agent_testlib import FakeNvml, wait_for
from kubelet_testlib import Assignment, FakeKubelet, wire_list_response
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.agent.app import build_agent
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.nvml import NvmlBackend
from modelfleet.agent.podresources import (
    PodAttribution,
    PodResourcesClient,
    build_pods_by_device,
    compute_gpu_pods,
    parse_list_response,
    unknown_device_ids,
)
from modelfleet.api.gpustats import GpuReport, PodRef
from modelfleet.settings import AgentSettings

GEMMA = PodRef(namespace="ml", name="gemma-instance-1", container="vllm")
LLAMA = PodRef(namespace="ml", name="llama-instance-2", container="vllm")


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    fake = FakeKubelet()
    fake.start()
    yield fake
    fake.cleanup()


def attribution(path: str, metrics: AgentMetrics, deadline_s: float = 1.0) -> PodAttribution:
    return PodAttribution(
        PodResourcesClient(path, deadline_s=deadline_s), on_error=metrics.pod_resources_errors.inc
    )


async def nvml_with(source: PodAttribution) -> NvmlBackend:
    backend = NvmlBackend("gpu-node-a", pods_by_device=source.refresh_blocking)
    await backend.start()
    return backend


# --- pure parts -----------------------------------------------------------------------------


def test_descriptors_decode_upstream_wire_format() -> None:
    """Bytes laid out by upstream's field numbers decode into the right pods and devices."""
    assignments: list[Assignment] = [
        ("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-aaaa", "GPU-bbbb")),
        ("kube-system", "sriov", "cni", "intel.com/sriov", ("0000:3b:00.1",)),
    ]
    pods = parse_list_response(wire_list_response(assignments))
    assert pods == {"GPU-aaaa": [GEMMA], "GPU-bbbb": [GEMMA]}


def test_build_pods_by_device_keeps_gpu_and_mig_resources_only() -> None:
    kubelet = FakeKubelet(
        assignments=[
            ("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-aaaa",)),
            ("ml", "gemma-instance-1", "sidecar", "nvidia.com/gpu", ("GPU-aaaa",)),
            ("ml", "llama-instance-2", "vllm", "nvidia.com/mig-1g.10gb", ("MIG-1111",)),
            ("ml", "other", "x", "example.com/fpga", ("GPU-aaaa",)),
        ]
    )
    pods = build_pods_by_device(kubelet.build_response())
    assert pods == {
        "GPU-aaaa": [GEMMA, GEMMA.model_copy(update={"container": "sidecar"})],
        "MIG-1111": [LLAMA],
    }


@pytest.mark.parametrize(
    ("device_id", "expected_index"),
    [
        ("GPU-aaaa", 0),  # --device-id-strategy=uuid (the default)
        ("MIG-1111", 1),  # a MIG device, by its UUID
        ("1", 1),  # --device-id-strategy=index
        ("1:0", 1),  # a MIG device by index: <gpu>:<mig>
        ("GPU-unknown", None),  # a GPU this agent cannot see
        ("x:1", None),
        # time-slicing and MPS: every device is handed out as replicas <id>::<n>
        ("GPU-bbbb::0", 1),
        ("GPU-aaaa::7", 0),
        ("1::3", 1),  # index strategy
        ("MIG-1111::2", 1),  # a time-sliced MIG device
        ("1:0::1", 1),
        ("GPU-unknown::0", None),
        # MIG devices as drivers before R470 name them: parent GPU UUID / GI / CI
        ("MIG-GPU-bbbb/7/0", 1),
        ("MIG-GPU-aaaa/1/0::1", 0),
        ("MIG-GPU-unknown/1/0", None),
        # not a device ID of the NVIDIA plugin
        ("GPU-aaaa:::1", None),
        ("::1", None),
        ("", None),
    ],
)
def test_compute_gpu_pods(device_id: str, expected_index: int | None) -> None:
    index_of = {"GPU-aaaa": 0, "GPU-bbbb": 1, "MIG-1111": 1}
    got = compute_gpu_pods({device_id: [GEMMA]}, index_of)
    assert got == ({} if expected_index is None else {expected_index: [GEMMA]})


def test_compute_gpu_pods_merges_devices_of_one_gpu() -> None:
    index_of = {"MIG-1": 0, "MIG-2": 0}
    got = compute_gpu_pods({"MIG-1": [GEMMA], "MIG-2": [LLAMA, GEMMA]}, index_of)
    assert got == {0: [GEMMA, LLAMA]}


def test_time_sliced_replicas_of_one_gpu_count_once_per_pod() -> None:
    # Two pods time-slice GPU 0; one of them holds two of its replicas.
    index_of = {"GPU-aaaa": 0, "GPU-bbbb": 1}
    got = compute_gpu_pods(
        {"GPU-aaaa::0": [GEMMA], "GPU-aaaa::1": [GEMMA], "GPU-aaaa::2": [LLAMA]}, index_of
    )
    assert got == {0: [GEMMA, LLAMA]}


def test_only_unresolvable_ids_ask_for_a_mig_scan() -> None:
    index_of = {"GPU-aaaa": 0}
    ids = ["GPU-aaaa::1", "0::2", "MIG-GPU-aaaa/1/0", "MIG-new", "MIG-new::1"]
    assert unknown_device_ids(ids, index_of) == ["MIG-new", "MIG-new::1"]


# --- the real gRPC server ---------------------------------------------------------------------


def test_attribution_reads_the_kubelet(kubelet: FakeKubelet) -> None:
    kubelet.assignments = [("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-bbbb",))]
    metrics = AgentMetrics()
    source = attribution(kubelet.socket_path, metrics)
    try:
        assert source.refresh_blocking() == {"GPU-bbbb": [GEMMA]}
        kubelet.assignments = []
        assert source.refresh_blocking() == {}
    finally:
        source.close()
    assert kubelet.calls == 2
    assert metrics.pod_resources_errors._value.get() == 0


async def test_nvml_gpus_carry_their_pods(fake_nvml: FakeNvml, kubelet: FakeKubelet) -> None:
    kubelet.assignments = [
        ("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-bbbb",)),
        ("ml", "llama-instance-2", "vllm", "nvidia.com/gpu", ("GPU-aaaa", "GPU-bbbb")),
    ]
    source = attribution(kubelet.socket_path, AgentMetrics())
    backend = await nvml_with(source)
    try:
        gpus, _ = await backend.sample()
    finally:
        await backend.close()
        source.close()
    assert gpus[0].pods == [LLAMA]
    assert gpus[1].pods == [GEMMA, LLAMA]
    # GPU stats are read as usual.
    assert gpus[0].memory_used_mib == 20480
    assert "mig-mode" not in fake_nvml.calls  # every ID is a known GPU UUID: no MIG scan


async def test_mig_devices_count_for_their_gpu(fake_nvml: FakeNvml, kubelet: FakeKubelet) -> None:
    fake_nvml.gpus[1].mig_uuids = ["MIG-1111", "MIG-2222"]
    kubelet.assignments = [
        ("ml", "gemma-instance-1", "vllm", "nvidia.com/mig-3g.40gb", ("MIG-2222",)),
    ]
    source = attribution(kubelet.socket_path, AgentMetrics())
    backend = await nvml_with(source)
    try:
        gpus, _ = await backend.sample()
        scans = fake_nvml.calls.count("mig-mode")
        # An ID that matches no device does not rescan MIG devices on every poll.
        kubelet.assignments.append(("ml", "x", "y", "nvidia.com/gpu", ("GPU-gone",)))
        await backend.sample()
        await backend.sample()
    finally:
        await backend.close()
        source.close()
    assert gpus[0].pods == []
    assert gpus[1].pods == [GEMMA]
    assert scans == 2  # one MIG scan: both GPUs asked once
    assert fake_nvml.calls.count("mig-mode") == scans


async def test_socket_absent_is_off_until_it_appears(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.agent.podresources")
    kubelet = FakeKubelet(
        assignments=[("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-aaaa",))]
    )
    kubelet.start()
    path = kubelet.socket_path
    kubelet.stop()  # the path is known, nothing is there
    metrics = AgentMetrics()
    source = attribution(path, metrics)
    backend = await nvml_with(source)
    try:
        for _ in range(3):
            gpus, _ = await backend.sample()
            assert [g.pods for g in gpus] == [[], []]
            assert all(g.health.healthy for g in gpus)
        kubelet.start()  # the kubelet comes up: attribution turns on at the next poll
        gpus, _ = await backend.sample()
    finally:
        await backend.close()
        source.close()
        kubelet.cleanup()
    assert gpus[0].pods == [GEMMA]
    assert metrics.pod_resources_errors._value.get() == 0  # absent is not an error
    off = [r for r in caplog.records if "pod attribution off" in r.getMessage()]
    assert len(off) == 1
    assert any("pod attribution on" in r.getMessage() for r in caplog.records)


async def test_kubelet_errors_leave_pods_empty_and_gpus_intact(
    fake_nvml: FakeNvml, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.agent.podresources")
    kubelet.assignments = [("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-aaaa",))]
    metrics = AgentMetrics()
    source = attribution(kubelet.socket_path, metrics)
    backend = await nvml_with(source)
    try:
        good, _ = await backend.sample()
        kubelet.fail_code = grpc.StatusCode.INTERNAL
        failing = [(await backend.sample())[0] for _ in range(3)]
        kubelet.fail_code = None
        recovered, _ = await backend.sample()
    finally:
        await backend.close()
        source.close()
    assert good[0].pods == [GEMMA]
    for gpus in failing:
        assert [g.pods for g in gpus] == [[], []]
        # Only the pod lists change: GPU stats and health are as before.
        assert [g.model_copy(update={"pods": []}) for g in gpus] == [
            g.model_copy(update={"pods": []}) for g in good
        ]
    assert recovered[0].pods == [GEMMA]
    assert metrics.pod_resources_errors._value.get() == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once, not once per poll
    assert "INTERNAL" in warnings[0].getMessage()
    assert "injected by the test kubelet" in warnings[0].getMessage()


def test_reply_that_does_not_parse_is_an_error(kubelet: FakeKubelet) -> None:
    kubelet.assignments = [("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-aaaa",))]
    kubelet.garbage = True
    metrics = AgentMetrics()
    source = attribution(kubelet.socket_path, metrics)
    try:
        assert source.refresh_blocking() == {}
        assert metrics.pod_resources_errors._value.get() == 1
        kubelet.garbage = False
        assert source.refresh_blocking() == {"GPU-aaaa": [GEMMA]}
    finally:
        source.close()


def test_hung_kubelet_is_cut_by_the_deadline(kubelet: FakeKubelet) -> None:
    kubelet.assignments = [("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-aaaa",))]
    kubelet.hang = True
    metrics = AgentMetrics()
    source = attribution(kubelet.socket_path, metrics, deadline_s=0.2)
    try:
        assert source.refresh_blocking() == {}
        assert metrics.pod_resources_errors._value.get() == 1
        kubelet.hang = False
        kubelet.release.set()
        assert source.refresh_blocking() == {"GPU-aaaa": [GEMMA]}
    finally:
        source.close()


def test_kubelet_restart_is_picked_up(kubelet: FakeKubelet) -> None:
    """A restarted kubelet (new socket at the same path) answers on the next call."""
    kubelet.assignments = [("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-aaaa",))]
    metrics = AgentMetrics()
    source = attribution(kubelet.socket_path, metrics)
    try:
        assert source.refresh_blocking() == {"GPU-aaaa": [GEMMA]}
        kubelet.stop()
        kubelet.start()
        # The old connection may fail once; the one after must answer.
        first = source.refresh_blocking()
        second = source.refresh_blocking()
        assert second == {"GPU-aaaa": [GEMMA]}
        assert first in ({}, second)
    finally:
        source.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_agent_serves_pods_and_dcgm_pod_labels(
    fake_nvml: FakeNvml, kubelet: FakeKubelet
) -> None:
    """The composition root wires the socket setting to the NVML backend; HTTP shows the pods."""
    kubelet.assignments = [("ml", "gemma-instance-1", "vllm", "nvidia.com/gpu", ("GPU-bbbb",))]
    settings = AgentSettings(
        backend="nvml",
        host="127.0.0.1",
        port=free_port(),
        poll_interval_s=0.05,
        pod_resources_socket=kubelet.socket_path,
    )
    agent = await build_agent(settings, "gpu-node-a")
    await agent.start()
    base = f"http://127.0.0.1:{agent.port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def pods_listed() -> bool:
                async with http.get(f"{base}/v1/gpus") as resp:
                    if resp.status != 200:
                        return False
                    report = GpuReport.model_validate_json(await resp.read())
                return report.gpus[1].pods == [GEMMA]

            await wait_for(pods_listed, what="GPU 1 to list the kubelet's pod")
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
    finally:
        await agent.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    used = {s.labels["gpu"]: s.labels for s in families["DCGM_FI_DEV_FB_USED"].samples}
    assert (used["1"]["pod"], used["1"]["namespace"], used["1"]["container"]) == (
        "gemma-instance-1",
        "ml",
        "vllm",
    )
    assert (used["0"]["pod"], used["0"]["namespace"]) == ("", "")
    assert families["modelfleet_agent_pod_resources_errors"].samples[0].value == 0


async def test_empty_socket_setting_turns_attribution_off(fake_nvml: FakeNvml) -> None:
    settings = AgentSettings(backend="nvml", host="127.0.0.1", pod_resources_socket="")
    agent = await build_agent(settings, "gpu-node-a")
    assert agent.attribution is None
    await agent.stop()
