"""The fake GPU device plugin against a fake kubelet device manager, over real gRPC on unix
sockets: registration, ListAndWatch and health, preferred allocation, Allocate, refusals, and
re-registration after a kubelet restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from devicemanager_testlib import FakeDeviceManager

from modelfleet.fakegpu import deviceplugin as api
from modelfleet.fakegpu.driverdir import DriverDir
from modelfleet.fakegpu.plugin import GpuDevicePlugin, compute_preferred
from modelfleet.gpufile import build_sim_gpus, simulated_uuid

NODE = "gpu-node-a"
UUIDS = [simulated_uuid(NODE, i) for i in range(4)]
HEALTHY = [(u, "Healthy") for u in UUIDS]


@pytest.fixture
def driver(tmp_path: Path) -> DriverDir:
    d = DriverDir(tmp_path / "fake-gpu")
    d.init_inventory(NODE, build_sim_gpus(NODE, 4, 81559, "NVIDIA-H100-80GB-HBM3"))
    return d


@pytest.fixture
def kubelet() -> Iterator[FakeDeviceManager]:
    manager = FakeDeviceManager()
    manager.start()
    yield manager
    manager.cleanup()


class Running:
    """A plugin running its loop in a thread, as `modelfleet sim-gpu-plugin` runs it."""

    def __init__(self, plugin: GpuDevicePlugin) -> None:
        self.plugin = plugin
        self.stop = threading.Event()
        self.thread = threading.Thread(target=plugin.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.plugin.close()


@pytest.fixture
def plugin(driver: DriverDir, kubelet: FakeDeviceManager) -> Iterator[GpuDevicePlugin]:
    running = Running(GpuDevicePlugin(driver, kubelet.plugin_dir, poll_s=0.02))
    yield running.plugin
    running.close()


def test_registers_and_lists_every_gpu(plugin: GpuDevicePlugin, kubelet: FakeDeviceManager) -> None:
    reg = kubelet.wait_registrations(1)
    assert reg.version == "v1beta1"
    assert reg.resource_name == "nvidia.com/gpu"
    assert reg.endpoint == "modelfleet-nvidia.com-gpu.sock"
    assert reg.preferred_allocation is True
    assert reg.pre_start_required is False
    assert os.path.exists(os.path.join(kubelet.plugin_dir, reg.endpoint))
    kubelet.wait_list(HEALTHY)
    assert kubelet.options[0].get_preferred_allocation_available is True
    assert kubelet.lists[0] == HEALTHY  # the first list is the whole inventory


def test_list_and_watch_follows_health(
    plugin: GpuDevicePlugin, kubelet: FakeDeviceManager, driver: DriverDir
) -> None:
    kubelet.wait_list(HEALTHY)
    driver.set_health(UUIDS[2], "XID 79: fell off the bus")
    kubelet.wait_list([(u, "Unhealthy" if i == 2 else "Healthy") for i, u in enumerate(UUIDS)])
    driver.set_health(UUIDS[2], None)
    kubelet.wait_list(HEALTHY)
    assert len(kubelet.lists) == 3  # one list per change, none in between


def test_preferred_allocation_honours_must_include_then_lowest_index(
    plugin: GpuDevicePlugin, kubelet: FakeDeviceManager
) -> None:
    kubelet.wait_list(HEALTHY)
    available = [UUIDS[3], UUIDS[1], UUIDS[2], UUIDS[0]]
    assert kubelet.preferred(available, [], 2) == [UUIDS[0], UUIDS[1]]
    assert kubelet.preferred(available, [UUIDS[3]], 2) == [UUIDS[3], UUIDS[0]]
    assert kubelet.preferred([UUIDS[2], UUIDS[3]], [], 1) == [UUIDS[2]]


@pytest.mark.parametrize(
    ("available", "must", "size", "expected"),
    [
        pytest.param(["c", "a", "b"], [], 2, ["a", "b"], id="lowest indexes"),
        pytest.param(["c", "a", "b"], ["c"], 2, ["c", "a"], id="must include first"),
        pytest.param(["c", "a", "b"], ["c", "b"], 2, ["b", "c"], id="must include fills it"),
        pytest.param(["x", "b", "a"], [], 3, ["a", "b", "x"], id="unknown IDs last"),
        pytest.param(["a", "b"], [], 0, [], id="nothing asked"),
    ],
)
def test_compute_preferred(
    available: list[str], must: list[str], size: int, expected: list[str]
) -> None:
    assert compute_preferred(available, must, size, {"a": 0, "b": 1, "c": 2}) == expected


def test_allocate_gives_only_the_visible_devices(
    plugin: GpuDevicePlugin, kubelet: FakeDeviceManager, driver: DriverDir
) -> None:
    kubelet.wait_list(HEALTHY)
    response = kubelet.allocate([UUIDS[2], UUIDS[0]], [UUIDS[1]])
    first, second = response.container_responses
    # The NVIDIA plugin's envvar strategy: the runtime injects the driver, not the plugin.
    assert dict(first.envs) == {"NVIDIA_VISIBLE_DEVICES": f"{UUIDS[2]},{UUIDS[0]}"}
    assert dict(second.envs) == {"NVIDIA_VISIBLE_DEVICES": UUIDS[1]}
    assert not first.mounts
    assert not first.devices  # no device nodes: there is no /dev/nvidia* to give


def test_allocate_refuses_unknown_and_unhealthy_devices(
    plugin: GpuDevicePlugin, kubelet: FakeDeviceManager, driver: DriverDir
) -> None:
    kubelet.wait_list(HEALTHY)
    with pytest.raises(grpc.RpcError) as unknown:
        kubelet.allocate([UUIDS[0], "GPU-not-here"])
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown device: GPU-not-here" in unknown.value.details()
    driver.set_health(UUIDS[1], "overheated")
    kubelet.wait(lambda: kubelet.lists[-1][1][1] == "Unhealthy", "GPU 1 to be unhealthy")
    with pytest.raises(grpc.RpcError) as unhealthy:
        kubelet.allocate([UUIDS[1]])
    assert unhealthy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"device {UUIDS[1]} is unhealthy: overheated" in unhealthy.value.details()


def test_registers_again_after_a_kubelet_restart(
    plugin: GpuDevicePlugin, kubelet: FakeDeviceManager, driver: DriverDir
) -> None:
    kubelet.wait_list(HEALTHY)
    kubelet.wait(lambda: plugin.registrations == 1, "the plugin to see its registration")
    kubelet.restart()  # deletes the plugin's socket and serves a new kubelet.sock
    reg = kubelet.wait_registrations(2)
    assert reg.endpoint == "modelfleet-nvidia.com-gpu.sock"
    kubelet.wait(lambda: len(kubelet.options) == 2, "the kubelet to dial the plugin again")
    # The new kubelet gets a stream of its own that follows health again.
    driver.set_health(UUIDS[0], "lost")
    kubelet.wait_list([(u, "Unhealthy" if i == 0 else "Healthy") for i, u in enumerate(UUIDS)])
    assert kubelet.allocate([UUIDS[3]]).container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"]


def test_registers_again_when_only_kubelet_sock_is_recreated(
    plugin: GpuDevicePlugin, kubelet: FakeDeviceManager
) -> None:
    kubelet.wait(lambda: plugin.registrations == 1, "the plugin to see its registration")
    kubelet.stop()
    kubelet.start()
    kubelet.wait_registrations(2)
    kubelet.wait_list(HEALTHY)
    kubelet.wait(lambda: plugin.registrations == 2, "the plugin to see its second registration")


def test_waits_for_the_kubelet_then_registers(driver: DriverDir, tmp_path: Path) -> None:
    manager = FakeDeviceManager()
    manager.start()
    manager.stop()  # a plugin directory with no kubelet.sock yet
    running = Running(GpuDevicePlugin(driver, manager.plugin_dir, poll_s=0.02))
    try:
        time.sleep(0.1)  # a few rounds with nobody to register with
        assert running.plugin.registrations == 0
        manager.start()
        manager.wait_registrations(1)
        manager.wait_list(HEALTHY)
    finally:
        running.close()
        manager.cleanup()


def test_a_refused_registration_is_retried(driver: DriverDir, kubelet: FakeDeviceManager) -> None:
    kubelet.refuse = "not now"
    running = Running(GpuDevicePlugin(driver, kubelet.plugin_dir, poll_s=0.02))
    try:
        time.sleep(0.1)
        assert running.plugin.registrations == 0
        kubelet.refuse = ""
        kubelet.wait_registrations(1)
    finally:
        running.close()


def test_sigterm_exits_cleanly_and_removes_the_socket(
    driver: DriverDir, kubelet: FakeDeviceManager
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelfleet",
            "sim-gpu-plugin",
            "--dir",
            str(driver.path),
            "--plugin-dir",
            kubelet.plugin_dir,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        kubelet.wait_registrations(1, timeout_s=15.0)
        socket_path = os.path.join(kubelet.plugin_dir, "modelfleet-nvidia.com-gpu.sock")
        assert os.path.exists(socket_path)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert not os.path.exists(socket_path)
    assert "registered with the kubelet" in output
    assert "resource nvidia.com/gpu" in output


# --- the wire format, from upstream's field numbers ------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bool(number: int) -> bytes:
    return _varint(number << 3) + b"\x01"


def test_register_request_matches_upstream_field_numbers() -> None:
    m = api.messages()
    request = m.RegisterRequest(
        version="v1beta1",
        endpoint="x.sock",
        resource_name="nvidia.com/gpu",
        options=m.DevicePluginOptions(get_preferred_allocation_available=True),
    )
    # version = 1, endpoint = 2, resource_name = 3, options = 4 {get_preferred_... = 2}
    expected = (
        _bytes(1, b"v1beta1")
        + _bytes(2, b"x.sock")
        + _bytes(3, b"nvidia.com/gpu")
        + _bytes(4, _bool(2))
    )
    assert request.SerializeToString() == expected


def test_allocate_response_decodes_upstream_bytes() -> None:
    # ContainerAllocateResponse: envs = 1 (map entries: key = 1, value = 2), mounts = 2
    # (container_path = 1, host_path = 2, read_only = 3), annotations = 4.
    env = _bytes(1, _bytes(1, b"NVIDIA_VISIBLE_DEVICES") + _bytes(2, b"GPU-a,GPU-b"))
    mount = _bytes(2, _bytes(1, b"/run/x") + _bytes(2, b"/host/x") + _bool(3))
    note = _bytes(4, _bytes(1, b"k") + _bytes(2, b"v"))
    data = _bytes(1, env + mount + note)  # AllocateResponse.container_responses = 1
    (answer,) = api.messages().AllocateResponse.FromString(data).container_responses
    assert dict(answer.envs) == {"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}
    assert (answer.mounts[0].container_path, answer.mounts[0].host_path) == ("/run/x", "/host/x")
    assert answer.mounts[0].read_only is True
    assert dict(answer.annotations) == {"k": "v"}


def test_list_and_watch_response_matches_upstream_field_numbers() -> None:
    m = api.messages()
    response = m.ListAndWatchResponse()
    response.devices.add(ID="GPU-a", health="Healthy")  # type: ignore[attr-defined]
    # ListAndWatchResponse.devices = 1; Device.ID = 1, health = 2
    assert response.SerializeToString() == _bytes(1, _bytes(1, b"GPU-a") + _bytes(2, b"Healthy"))


def test_preferred_allocation_request_decodes_upstream_bytes() -> None:
    # container_requests = 1 {available_deviceIDs = 1, must_include_deviceIDs = 2,
    # allocation_size = 3 (varint)}
    body = _bytes(1, b"a") + _bytes(1, b"b") + _bytes(2, b"b") + _varint(3 << 3) + _varint(2)
    request = api.messages().PreferredAllocationRequest.FromString(_bytes(1, body))
    (container,) = request.container_requests
    assert list(container.available_deviceIDs) == ["a", "b"]
    assert list(container.must_include_deviceIDs) == ["b"]
    assert container.allocation_size == 2
