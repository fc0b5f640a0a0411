"""A real gRPC server playing the kubelet's pod-resources API on a unix socket.

It serves `v1.PodResourcesLister/List` with grpcio's generic handler and the agent's own message
descriptors; `wire_list_response` builds the same reply byte by byte from upstream's field
numbers, so a wrong number in the descriptors cannot hide behind both sides sharing them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from modelfleet.agent.podresources import SERVICE, message_classes

# (namespace, pod, container, resource name, device IDs)
Assignment = tuple[str, str, str, str, tuple[str, ...]]


@dataclass
class FakeKubelet:
    """What List answers: `assignments`, or a failure with `fail_code`, or nothing until
    `release` is set when `hang` is on."""

    assignments: list[Assignment] = field(default_factory=list)
    fail_code: grpc.StatusCode | None = None
    hang: bool = False
    garbage: bool = False  # answer bytes that are not a ListPodResourcesResponse
    release: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    socket_path: str = ""
    _server: Any = None
    _dir: str = ""

    def build_response(self) -> Any:
        _, response_cls = message_classes()
        response = response_cls()
        pods: dict[tuple[str, str], Any] = {}
        for namespace, pod, container, resource, ids in self.assignments:
            entry = pods.get((namespace, pod))
            if entry is None:
                entry = response.pod_resources.add(name=pod, namespace=namespace)  # type: ignore[attr-defined]
                pods[(namespace, pod)] = entry
            ctr = next((c for c in entry.containers if c.name == container), None)
            if ctr is None:
                ctr = entry.containers.add(name=container)
            ctr.devices.add(resource_name=resource, device_ids=list(ids))
        return response

    def list(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.hang:
            self.release.wait(10)
        if self.fail_code is not None:
            context.abort(self.fail_code, "injected by the test kubelet")
        return self.build_response()

    def serialize(self, response: Any) -> bytes:
        return b"\x0a\xff\xff\xff\xff\x0f" if self.garbage else bytes(response.SerializeToString())

    def start(self) -> str:
        """Serve on <short temp dir>/kubelet.sock (unix socket paths are limited to 107 bytes)."""
        request_cls, _ = message_classes()
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "List": grpc.unary_unary_rpc_method_handler(
                    self.list,
                    request_deserializer=request_cls.FromString,
                    response_serializer=self.serialize,
                )
            },
        )
        if not self._dir:
            self._dir = tempfile.mkdtemp(prefix="mf-kubelet-")
        self.socket_path = os.path.join(self._dir, "kubelet.sock")
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((handler,))
        if not self._server.add_insecure_port(f"unix://{self.socket_path}"):
            raise RuntimeError(f"cannot listen on {self.socket_path}")
        self._server.start()
        return self.socket_path

    def stop(self) -> None:
        """Stop serving and remove the socket, as a stopped kubelet does."""
        self.release.set()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if self.socket_path and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def cleanup(self) -> None:
        self.stop()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def wire_list_response(assignments: list[Assignment]) -> bytes:
    """A ListPodResourcesResponse encoded by hand from upstream api.proto's field numbers,
    with fields the agent does not read (cpu_ids = 3, topology = 3) mixed in."""
    pods = b""
    for namespace, pod, container, resource, ids in assignments:
        topology = _field(1, _varint(1 << 3 | 0) + _varint(1))  # TopologyInfo{nodes: [{ID: 1}]}
        devices = _field(1, resource.encode())  # ContainerDevices.resource_name = 1
        devices += b"".join(_field(2, i.encode()) for i in ids)  # device_ids = 2
        devices += _field(3, topology)  # topology = 3 (not read)
        ctr = _field(1, container.encode())  # ContainerResources.name = 1
        ctr += _field(2, devices)  # devices = 2
        ctr += _field(3, _varint(4) + _varint(5))  # cpu_ids = 3, packed (not read)
        body = _field(1, pod.encode()) + _field(2, namespace.encode())  # name = 1, namespace = 2
        body += _field(3, ctr)  # containers = 3
        pods += _field(1, body)  # ListPodResourcesResponse.pod_resources = 1
    return pods
