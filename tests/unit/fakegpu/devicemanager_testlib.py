"""A fake kubelet device manager: the Registration service on a real unix socket, and the
kubelet's side of the device plugin API (dial back, ListAndWatch, GetPreferredAllocation,
Allocate) over real gRPC.

Like the kubelet it answers Register, then dials the plugin's endpoint in the plugin directory,
asks for its options and keeps a ListAndWatch stream open, recording every device list. `restart`
does what a kubelet start does to the directory: removes every socket in it and serves a new
kubelet.sock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from modelfleet.fakegpu import deviceplugin as api

Devices = list[tuple[str, str]]  # (ID, health) as ListAndWatch sent them


@dataclass
class Registration:
    version: str
    endpoint: str
    resource_name: str
    preferred_allocation: bool
    pre_start_required: bool


@dataclass
class FakeDeviceManager:
    plugin_dir: str = ""
    registrations: list[Registration] = field(default_factory=list)
    lists: list[Devices] = field(default_factory=list)
    options: list[Any] = field(default_factory=list)
    refuse: str = ""  # non-empty: Register answers INVALID_ARGUMENT with this message
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _server: Any = None
    _channel: Any = None
    _stream: Any = None
    _owns_dir: bool = False

    @property
    def kubelet_socket(self) -> str:
        return os.path.join(self.plugin_dir, api.KUBELET_SOCKET)

    def start(self) -> str:
        """Serve kubelet.sock in a short temp dir (unix socket paths are limited to 107 bytes)."""
        if not self.plugin_dir:
            self.plugin_dir = tempfile.mkdtemp(prefix="mf-dp-")
            self._owns_dir = True
        m = api.messages()
        handler = grpc.method_handlers_generic_handler(
            api.REGISTRATION_SERVICE,
            {
                "Register": grpc.unary_unary_rpc_method_handler(
                    self._register,
                    request_deserializer=m.RegisterRequest.FromString,
                    response_serializer=lambda msg: msg.SerializeToString(),
                )
            },
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((handler,))
        if not self._server.add_insecure_port(f"unix://{self.kubelet_socket}"):
            raise RuntimeError(f"cannot listen on {self.kubelet_socket}")
        self._server.start()
        return self.plugin_dir

    def _register(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.refuse:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.refuse)
        with self._cond:
            self.registrations.append(
                Registration(
                    version=request.version,
                    endpoint=request.endpoint,
                    resource_name=request.resource_name,
                    preferred_allocation=request.options.get_preferred_allocation_available,
                    pre_start_required=request.options.pre_start_required,
                )
            )
            self._cond.notify_all()
        # The kubelet dials the plugin after answering, not inside the call.
        threading.Thread(target=self._connect, args=(request.endpoint,), daemon=True).start()
        return api.messages().Empty()

    def _connect(self, endpoint: str) -> None:
        m = api.messages()
        with self._cond:
            self._close_channel()
            channel = grpc.insecure_channel(f"unix://{os.path.join(self.plugin_dir, endpoint)}")
            self._channel = channel
        try:
            options = self._unary("GetDevicePluginOptions", m.Empty, m.DevicePluginOptions)(
                m.Empty(), timeout=5
            )
            with self._cond:
                self.options.append(options)
            stream = channel.unary_stream(
                api.method_path("DevicePlugin", "ListAndWatch"),
                request_serializer=lambda msg: msg.SerializeToString(),
                response_deserializer=m.ListAndWatchResponse.FromString,
            )(m.Empty())
            self._stream = stream
            for response in stream:
                with self._cond:
                    self.lists.append([(d.ID, d.health) for d in response.devices])
                    self._cond.notify_all()
        except (grpc.RpcError, ValueError):
            return  # the plugin went away, or this side hung up (ValueError: channel closed)

    def _unary(self, method: str, request_cls: Any, response_cls: Any) -> Callable[..., Any]:
        return self._channel.unary_unary(  # type: ignore[no-any-return]
            api.method_path("DevicePlugin", method),
            request_serializer=lambda msg: msg.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )

    # --- what the kubelet asks while admitting a pod -----------------------------------------

    def preferred(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        m = api.messages()
        request = m.PreferredAllocationRequest()
        request.container_requests.add(  # type: ignore[attr-defined]
            available_deviceIDs=list(available),
            must_include_deviceIDs=list(must_include),
            allocation_size=size,
        )
        call = self._unary(
            "GetPreferredAllocation", m.PreferredAllocationRequest, m.PreferredAllocationResponse
        )
        response = call(request, timeout=5)
        return list(response.container_responses[0].deviceIDs)

    def allocate(self, *containers: Sequence[str]) -> Any:
        m = api.messages()
        request = m.AllocateRequest()
        for ids in containers:
            request.container_requests.add(devices_ids=list(ids))  # type: ignore[attr-defined]
        return self._unary("Allocate", m.AllocateRequest, m.AllocateResponse)(request, timeout=5)

    # --- waiting ------------------------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
                self._cond.wait(min(left, 0.05))

    def wait_registrations(self, count: int, timeout_s: float = 5.0) -> Registration:
        self.wait(lambda: len(self.registrations) >= count, f"registration #{count}", timeout_s)
        return self.registrations[count - 1]

    def wait_list(self, expected: Devices) -> None:
        self.wait(
            lambda: bool(self.lists) and self.lists[-1] == expected,
            f"ListAndWatch to send {expected} (last: {self.lists[-1:]})",
        )

    # --- lifecycle -------------------------------------------------------------------------------

    def _close_channel(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self) -> None:
        """Stop serving and remove kubelet.sock, as a stopped kubelet does."""
        with self._cond:
            self._close_channel()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if os.path.exists(self.kubelet_socket):
            os.unlink(self.kubelet_socket)

    def restart(self) -> None:
        """A kubelet start: every socket in the plugin directory goes, a new kubelet.sock comes."""
        self.stop()
        for name in os.listdir(self.plugin_dir):
            os.unlink(os.path.join(self.plugin_dir, name))
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.plugin_dir, ignore_errors=True)
