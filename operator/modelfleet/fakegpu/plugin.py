"""The fake GPU driver's kubelet device plugin (API v1beta1): advertises and hands out its GPUs.

It behaves as the NVIDIA device plugin does with the `envvar` device-list strategy, so the
kubelet's device manager, admission and pod-resources API work on it unchanged:

- serves `<plugin dir>/<name>.sock` and registers on `<plugin dir>/kubelet.sock` (version
  v1beta1, `get_preferred_allocation_available`);
- ListAndWatch streams every GPU of the inventory by UUID, Healthy or Unhealthy as the driver
  directory's `health/` says, and again on every change;
- GetPreferredAllocation: the devices that must be included, then the lowest indexes;
- Allocate: per container `NVIDIA_VISIBLE_DEVICES=<uuid,uuid>` (the IDs in request order) and
  nothing else: as with the NVIDIA plugin, the container runtime injects the driver for those
  GPUs (on the test cluster's real nodes, hack/fake_nvidia_runtime.py mounts the driver
  directory); an unknown or unhealthy device is a gRPC error (the kubelet turns it into
  UnexpectedAdmissionError);
- a kubelet restart deletes the plugin sockets and recreates kubelet.sock: the plugin notices
  either, serves its socket again and registers again, as real plugins do.

gRPC's server runs the calls in its thread pool; `run` (the main thread) polls the directories.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from modelfleet.fakegpu import deviceplugin as api
from modelfleet.fakegpu.driverdir import DriverDir, DriverDirError
from modelfleet.gpufile import SimGpu

log = logging.getLogger(__name__)

DEFAULT_RESOURCE = "nvidia.com/gpu"
VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"
REGISTER_TIMEOUT_S = 5.0
POLL_S = 0.5
SWEEP_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class DeviceState:
    """One advertised GPU: index, UUID, and the reason it is unhealthy ("" when healthy)."""

    index: int
    uuid: str
    unhealthy_reason: str = ""

    @property
    def healthy(self) -> bool:
        return not self.unhealthy_reason


class AllocationError(ValueError):
    """A request names a device that cannot be handed out; `code` is the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def compute_devices(gpus: Sequence[SimGpu], health: dict[str, str]) -> tuple[DeviceState, ...]:
    """Every GPU of the inventory, by index, with its health."""
    return tuple(
        DeviceState(index=g.index, uuid=g.uuid, unhealthy_reason=health.get(g.uuid, ""))
        for g in sorted(gpus, key=lambda g: g.index)
    )


def compute_preferred(
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    index_of: dict[str, int],
) -> list[str]:
    """`size` device IDs: every one of `must_include`, then the lowest-indexed of the others.

    Deterministic, like the NVIDIA plugin's simple policy for GPUs without NVLink topology; IDs
    the inventory does not know sort last, by name.
    """

    def key(device_id: str) -> tuple[int, int, str]:
        index = index_of.get(device_id)
        return (0, index, "") if index is not None else (1, 0, device_id)

    chosen = sorted(dict.fromkeys(must_include), key=key)
    rest = sorted((d for d in dict.fromkeys(available) if d not in chosen), key=key)
    return chosen + rest[: max(0, size - len(chosen))]


def check_allocation(
    resource: str, device_ids: Sequence[str], devices: dict[str, DeviceState]
) -> None:
    """Raise AllocationError unless every ID is a known, healthy device."""
    for device_id in device_ids:
        device = devices.get(device_id)
        if device is None:
            # The NVIDIA plugin's words for the same refusal.
            raise AllocationError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid allocation request for {resource!r}: unknown device: {device_id}",
            )
        if not device.healthy:
            raise AllocationError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"invalid allocation request for {resource!r}: device {device_id} is unhealthy: "
                f"{device.unhealthy_reason}",
            )


def build_container_envs(device_ids: Sequence[str]) -> dict[str, str]:
    return {VISIBLE_DEVICES_ENV: ",".join(device_ids)}


def socket_name_for(resource: str) -> str:
    """`modelfleet-nvidia.com-gpu.sock` for nvidia.com/gpu."""
    return "modelfleet-" + resource.replace("/", "-") + ".sock"


def describe_rpc_error(exc: grpc.RpcError) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code()}: {details()}"
    return str(exc)


def _identity(path: str) -> tuple[int, int] | None:
    """Who a socket file is (inode, change time): a recreated socket is a different one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_ctime_ns)


class GpuDevicePlugin:
    """One device plugin over one driver directory; `run` until `stop` is set, then `close`."""

    def __init__(
        self,
        driver: DriverDir,
        plugin_dir: str,
        *,
        resource: str = DEFAULT_RESOURCE,
        poll_s: float = POLL_S,
    ) -> None:
        self.driver = driver
        self.plugin_dir = os.path.abspath(plugin_dir)
        self.resource = resource
        self.socket_name = socket_name_for(resource)
        self.socket_path = os.path.join(self.plugin_dir, self.socket_name)
        self.kubelet_socket = os.path.join(self.plugin_dir, api.KUBELET_SOCKET)
        self.poll_s = poll_s
        self.registrations = 0
        self._messages = api.messages()
        self._cond = threading.Condition()
        self._devices: tuple[DeviceState, ...] = ()
        self._version = 0
        self._closing = False
        self._inventory_key: tuple[int, int] | None = None
        self._inventory_error = ""
        self._gpus: list[SimGpu] = []
        self._server: grpc.Server | None = None
        self._socket_id: tuple[int, int] | None = None
        self._registered_with: tuple[int, int] | None = None
        self._register_failures = 0
        self._next_register = 0.0
        self._next_sweep = 0.0

    # --- the device list -------------------------------------------------------------------

    @property
    def devices(self) -> tuple[DeviceState, ...]:
        with self._cond:
            return self._devices

    def refresh_blocking(self) -> bool:
        """Re-read the inventory (when it changed) and the health; True when the list changed.

        Raises DriverDirError when the inventory cannot be read at all.
        """
        try:
            st = os.stat(self.driver.inventory_path)
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        if key is None or key != self._inventory_key:
            _node, self._gpus = self.driver.read_inventory()
            self._inventory_key = key
        devices = compute_devices(self._gpus, self.driver.read_health())
        with self._cond:
            if devices == self._devices:
                return False
            before = {d.uuid: d for d in self._devices}
            self._devices = devices
            self._version += 1
            self._cond.notify_all()
        for device in devices:
            old = before.get(device.uuid)
            if old is not None and old.healthy != device.healthy:
                if device.healthy:
                    log.info("GPU %d (%s) is healthy again", device.index, device.uuid)
                else:
                    log.warning(
                        "GPU %d (%s) is unhealthy: %s",
                        device.index,
                        device.uuid,
                        device.unhealthy_reason,
                    )
        return True

    def _list_response(self, devices: Sequence[DeviceState]) -> Any:
        response = self._messages.ListAndWatchResponse()
        for device in devices:
            response.devices.add(  # type: ignore[attr-defined]
                ID=device.uuid, health=api.HEALTHY if device.healthy else api.UNHEALTHY
            )
        return response

    # --- the DevicePlugin service ----------------------------------------------------------

    def get_device_plugin_options(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._messages.DevicePluginOptions(get_preferred_allocation_available=True)

    def list_and_watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """The device list now, then again after every change, until the kubelet hangs up."""
        seen = -1
        while context.is_active():
            with self._cond:
                if self._version == seen and not self._closing:
                    # A bounded wait, so a hung-up kubelet frees this thread within a second.
                    self._cond.wait(timeout=1.0)
                if self._closing:
                    return
                if self._version == seen:
                    continue
                seen, devices = self._version, self._devices
            healthy = sum(d.healthy for d in devices)
            log.info("ListAndWatch: sending %d device(s), %d healthy", len(devices), healthy)
            yield self._list_response(devices)

    def get_preferred_allocation(self, request: Any, context: grpc.ServicerContext) -> Any:
        index_of = {d.uuid: d.index for d in self.devices}
        response = self._messages.PreferredAllocationResponse()
        for container in request.container_requests:
            chosen = compute_preferred(
                list(container.available_deviceIDs),
                list(container.must_include_deviceIDs),
                int(container.allocation_size),
                index_of,
            )
            log.info(
                "GetPreferredAllocation: %d of [%s], must include [%s] -> [%s]",
                container.allocation_size,
                ",".join(container.available_deviceIDs),
                ",".join(container.must_include_deviceIDs),
                ",".join(chosen),
            )
            response.container_responses.add(deviceIDs=chosen)  # type: ignore[attr-defined]
        return response

    def allocate(self, request: Any, context: grpc.ServicerContext) -> Any:
        devices = {d.uuid: d for d in self.devices}
        response = self._messages.AllocateResponse()
        for number, container in enumerate(request.container_requests, start=1):
            ids = list(container.devices_ids)
            try:
                check_allocation(self.resource, ids, devices)
            except AllocationError as exc:
                log.warning("Allocate refused: %s", exc)
                context.abort(exc.code, str(exc))
            answer = response.container_responses.add()  # type: ignore[attr-defined]
            for name, value in build_container_envs(ids).items():
                answer.envs[name] = value
            log.info(
                "Allocate: container %d gets %s (GPU %s)",
                number,
                ",".join(ids),
                ",".join(str(devices[i].index) for i in ids),
            )
        return response

    def pre_start_container(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._messages.PreStartContainerResponse()

    def _handler(self) -> grpc.GenericRpcHandler:
        m = self._messages

        def unary(fn: Any, request_cls: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=request_cls.FromString,
                response_serializer=lambda msg: msg.SerializeToString(),
            )

        return grpc.method_handlers_generic_handler(
            api.DEVICE_PLUGIN_SERVICE,
            {
                "GetDevicePluginOptions": unary(self.get_device_plugin_options, m.Empty),
                "ListAndWatch": grpc.unary_stream_rpc_method_handler(
                    self.list_and_watch,
                    request_deserializer=m.Empty.FromString,
                    response_serializer=lambda msg: msg.SerializeToString(),
                ),
                "GetPreferredAllocation": unary(
                    self.get_preferred_allocation, m.PreferredAllocationRequest
                ),
                "Allocate": unary(self.allocate, m.AllocateRequest),
                "PreStartContainer": unary(self.pre_start_container, m.PreStartContainerRequest),
            },
        )

    # --- serving and registering -----------------------------------------------------------

    def start_server(self) -> None:
        """Serve on the plugin socket (a stale file from an earlier run is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        with self._cond:
            self._closing = False
        # Each ListAndWatch stream holds a thread for its life; a kubelet keeps one open.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((self._handler(),))
        if not server.add_insecure_port(f"unix://{self.socket_path}"):
            raise OSError(f"cannot listen on {self.socket_path}")
        server.start()
        self._server = server
        self._socket_id = _identity(self.socket_path)
        log.info("device plugin serving on %s", self.socket_path)

    def stop_server(self) -> None:
        """Stop serving, end the ListAndWatch streams, remove the socket if it is still ours."""
        server, self._server = self._server, None
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if server is not None:
            server.stop(grace=0.5).wait(2)
        if self._socket_id is not None and _identity(self.socket_path) == self._socket_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self._socket_id = None
        self._registered_with = None

    def register_blocking(self) -> None:
        """Registration.Register on kubelet.sock; raises grpc.RpcError when the kubelet refuses."""
        m = self._messages
        request = m.RegisterRequest(
            version=api.VERSION,
            endpoint=self.socket_name,
            resource_name=self.resource,
            options=m.DevicePluginOptions(get_preferred_allocation_available=True),
        )
        with grpc.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
            register: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
                api.REGISTER_METHOD,
                request_serializer=lambda msg: msg.SerializeToString(),
                response_deserializer=m.Empty.FromString,
            )
            register(request, timeout=REGISTER_TIMEOUT_S)

    def step(self) -> None:
        """One round of `run`: refresh the devices, notice a kubelet restart, (re-)register."""
        try:
            self.refresh_blocking()
            self._inventory_error = ""
        except DriverDirError as exc:
            if str(exc) != self._inventory_error:
                log.warning("keeping the last device list: %s", exc)
            self._inventory_error = str(exc)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY_S
            if removed := self.driver.sweep_expired():
                log.info("removed %d long-expired memory record(s)", removed)
        kubelet = _identity(self.kubelet_socket)
        if self._server is not None and _identity(self.socket_path) != self._socket_id:
            log.warning("%s was removed (kubelet restart?): serving it again", self.socket_path)
            self.stop_server()
        elif (
            self._server is not None
            and kubelet is not None  # None: the kubelet stopped; wait for the new one's socket
            and self._registered_with not in (None, kubelet)
        ):
            log.warning(
                "%s was recreated (kubelet restart): registering again", self.kubelet_socket
            )
            self.stop_server()
        if self._server is None and os.path.isdir(self.plugin_dir):
            self.start_server()
        if (
            self._server is not None
            and self._registered_with is None
            and kubelet is not None
            and now >= self._next_register
        ):
            self._register(kubelet)

    def _register(self, kubelet: tuple[int, int]) -> None:
        try:
            self.register_blocking()
        except grpc.RpcError as exc:
            self._register_failures += 1
            # Back off to at most 5 s between tries; say so once, then every tenth failure.
            self._next_register = time.monotonic() + min(5.0, self.poll_s * self._register_failures)
            if self._register_failures % 10 == 1:
                log.warning(
                    "registering %s with the kubelet at %s failed (%s); retrying",
                    self.resource,
                    self.kubelet_socket,
                    describe_rpc_error(exc),
                )
            return
        self._registered_with = kubelet
        self._register_failures = 0
        self.registrations += 1
        devices = self.devices
        log.info(
            "registered with the kubelet at %s: resource %s, endpoint %s, %d GPU(s), %d healthy "
            "(registration %d)",
            self.kubelet_socket,
            self.resource,
            self.socket_name,
            len(devices),
            sum(d.healthy for d in devices),
            self.registrations,
        )

    def run(self, stop: threading.Event) -> None:
        """Serve, register and watch until `stop` is set; `close` afterwards."""
        while not stop.is_set():
            self.step()
            stop.wait(self.poll_s)

    def close(self) -> None:
        self.stop_server()
