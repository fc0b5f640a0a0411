"""Pod attribution from the kubelet pod-resources API (gRPC over a unix socket).

The kubelet serves `v1.PodResourcesLister` on a unix socket; `List` says which device IDs the
device plugins handed to which container. For the NVIDIA device plugin the IDs are GPU UUIDs
(`GPU-...`), MIG device UUIDs (`MIG-...`, or `MIG-GPU-<uuid>/<gi>/<ci>` from drivers before
R470), or, with `--device-id-strategy=index`, GPU indices (`3`) and MIG indices (`3:1`); with
time-slicing or MPS sharing each of those is handed out as several replicas, `<id>::<n>`.

No generated stubs: the few messages the agent reads are described here by hand, with the field
numbers of k8s.io/kubelet/pkg/apis/podresources/v1/api.proto. Fields the agent does not read
(CPU IDs, memory, topology, DRA) are left out; protobuf skips unknown fields when parsing, so a
newer kubelet's replies still decode.

Every call here blocks, and runs in the poll thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from modelfleet.api.gpustats import PodRef

log = logging.getLogger(__name__)

SERVICE = "v1.PodResourcesLister"
LIST_METHOD = f"/{SERVICE}/List"
GPU_RESOURCE = "nvidia.com/gpu"
# The device plugin's "mixed" MIG strategy names one resource per profile: nvidia.com/mig-1g.10gb.
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
DEFAULT_DEADLINE_S = 1.0

_F = descriptor_pb2.FieldDescriptorProto
_STRING = _F.TYPE_STRING
_MESSAGE = _F.TYPE_MESSAGE
_ONE = _F.LABEL_OPTIONAL
_MANY = _F.LABEL_REPEATED

# (message, [(field, number, type, label, message type)]), as in upstream api.proto (package v1):
#   message ListPodResourcesRequest {}
#   message ListPodResourcesResponse { repeated PodResources pod_resources = 1; }
#   message PodResources { string name = 1; string namespace = 2;
#                          repeated ContainerResources containers = 3; }
#   message ContainerResources { string name = 1; repeated ContainerDevices devices = 2; ... }
#   message ContainerDevices { string resource_name = 1; repeated string device_ids = 2; ... }
_MESSAGES: tuple[tuple[str, tuple[tuple[str, int, int, int, str], ...]], ...] = (
    ("ListPodResourcesRequest", ()),
    ("ListPodResourcesResponse", (("pod_resources", 1, _MESSAGE, _MANY, ".v1.PodResources"),)),
    (
        "PodResources",
        (
            ("name", 1, _STRING, _ONE, ""),
            ("namespace", 2, _STRING, _ONE, ""),
            ("containers", 3, _MESSAGE, _MANY, ".v1.ContainerResources"),
        ),
    ),
    (
        "ContainerResources",
        (
            ("name", 1, _STRING, _ONE, ""),
            ("devices", 2, _MESSAGE, _MANY, ".v1.ContainerDevices"),
        ),
    ),
    (
        "ContainerDevices",
        (
            ("resource_name", 1, _STRING, _ONE, ""),
            ("device_ids", 2, _STRING, _MANY, ""),
        ),
    ),
)


def build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The subset of kubelet's podresources/v1/api.proto that the agent reads, as a descriptor."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="modelfleet/kubelet/podresources/v1/api.proto", package="v1", syntax="proto3"
    )
    for name, fields in _MESSAGES:
        msg = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            desc = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                desc.type_name = type_name
    service = proto.service.add(name="PodResourcesLister")
    service.method.add(
        name="List",
        input_type=".v1.ListPodResourcesRequest",
        output_type=".v1.ListPodResourcesResponse",
    )
    return proto


@cache
def message_classes() -> tuple[type[message.Message], type[message.Message]]:
    """(ListPodResourcesRequest, ListPodResourcesResponse) classes.

    Built in a pool of their own, so they never clash with another `v1` package in the default
    pool.
    """
    pool = descriptor_pool.DescriptorPool()
    pool.Add(build_file_descriptor())
    request = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("v1.ListPodResourcesRequest")
    )
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("v1.ListPodResourcesResponse")
    )
    return request, response


def is_gpu_resource(resource_name: str) -> bool:
    return resource_name == GPU_RESOURCE or resource_name.startswith(MIG_RESOURCE_PREFIX)


def build_pods_by_device(response: Any) -> dict[str, list[PodRef]]:
    """Device ID -> the containers it is assigned to, for NVIDIA GPU and MIG resources only."""
    out: dict[str, list[PodRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            ref = PodRef(namespace=pod.namespace, name=pod.name, container=container.name)
            for devices in container.devices:
                if not is_gpu_resource(devices.resource_name):
                    continue
                for device_id in devices.device_ids:
                    refs = out.setdefault(device_id, [])
                    if ref not in refs:
                        refs.append(ref)
    return out


def parse_list_response(data: bytes) -> dict[str, list[PodRef]]:
    """Decode a serialized ListPodResourcesResponse into device ID -> pods."""
    _, response_cls = message_classes()
    return build_pods_by_device(response_cls.FromString(data))


_INDEX_ID = re.compile(r"^(\d+)(?::\d+)?$")
# Time-slicing and MPS: the device plugin advertises each device N times as `<id>::<replica>`.
_REPLICA_SUFFIX = re.compile(r"::\d+$")
# MIG devices as drivers before R470 named them: the parent GPU's UUID, GPU and compute instance.
_LEGACY_MIG = re.compile(r"^MIG-(GPU-[0-9A-Za-z-]+)/\d+/\d+$")


def resolve_device_id(device_id: str, index_of: Mapping[str, int]) -> int | None:
    """The physical GPU's index for one device ID, or None when it names no GPU of this node.

    `index_of`: GPU and MIG device UUIDs -> GPU index. Accepted: `GPU-<uuid>`, `MIG-<uuid>`,
    `MIG-GPU-<uuid>/<gi>/<ci>`, `<index>`, `<index>:<mig>`, each optionally with the `::<n>`
    replica suffix of time-slicing and MPS.
    """
    base = _REPLICA_SUFFIX.sub("", device_id)
    index = index_of.get(base)
    if index is not None:
        return index
    legacy = _LEGACY_MIG.match(base)
    if legacy is not None:
        return index_of.get(legacy.group(1))
    match = _INDEX_ID.match(base)
    return int(match.group(1)) if match is not None else None


def compute_gpu_pods(
    pods_by_device: Mapping[str, list[PodRef]], index_of: Mapping[str, int]
) -> dict[int, list[PodRef]]:
    """GPU index -> pods, from device IDs of any shape `resolve_device_id` takes.

    A pod holding several devices of one GPU (MIG instances, time-sliced replicas) is listed
    once. IDs that match no GPU (a GPU the agent cannot see, another device plugin's IDs) are
    dropped.
    """
    out: dict[int, list[PodRef]] = {}
    for device_id, refs in pods_by_device.items():
        index = resolve_device_id(device_id, index_of)
        if index is None:
            continue
        gpu_refs = out.setdefault(index, [])
        gpu_refs.extend(ref for ref in refs if ref not in gpu_refs)
    return out


def socket_target(path: str) -> str:
    """gRPC target of a unix socket path (`unix:///abs/path`)."""
    return "unix://" + os.path.abspath(path)


class PodResourcesClient:
    """Blocking `List` calls on one channel; a failed call drops the channel for a fresh one.

    A fresh channel after a failure (rather than grpc's reconnect backoff, which grows to two
    minutes) lets attribution come back on the next poll once a restarted kubelet answers.
    """

    def __init__(self, socket_path: str, *, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self.socket_path = socket_path
        self.deadline_s = deadline_s
        self._channel: grpc.Channel | None = None
        self._call: grpc.UnaryUnaryMultiCallable[Any, Any] | None = None
        self._lock = threading.Lock()

    def list_blocking(self) -> dict[str, list[PodRef]]:
        """Device ID -> pods; raises grpc.RpcError when the kubelet does not answer in time."""
        request_cls, response_cls = message_classes()
        with self._lock:
            if self._call is None:
                self._channel = grpc.insecure_channel(socket_target(self.socket_path))
                self._call = self._channel.unary_unary(
                    LIST_METHOD,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
            call = self._call
        try:
            response = call(request_cls(), timeout=self.deadline_s)
        except grpc.RpcError:
            self.close()
            raise
        return build_pods_by_device(response)

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._call = self._channel, None, None
        if channel is not None:
            channel.close()


@dataclass
class PodAttribution:
    """Who uses which device, refreshed once per poll from the kubelet; off without the socket.

    Failures never fail the poll: they are counted, logged once (and once again on recovery),
    and leave the attribution empty until the kubelet answers again.
    """

    client: PodResourcesClient
    on_error: Callable[[], None] = lambda: None
    _state: str = field(default="new", init=False)  # new | ok | failing | absent

    @property
    def socket_path(self) -> str:
        return self.client.socket_path

    def refresh_blocking(self) -> dict[str, list[PodRef]]:
        """Device ID -> pods now, or {} when the socket is absent or the kubelet fails."""
        if not os.path.exists(self.socket_path):
            if self._state != "absent":
                log.info(
                    "pod attribution off: no kubelet pod-resources socket at %s "
                    "(mount /var/lib/kubelet/pod-resources to turn it on)",
                    self.socket_path,
                )
                self.client.close()
            self._state = "absent"
            return {}
        try:
            pods = self.client.list_blocking()
        except (grpc.RpcError, ValueError) as exc:  # ValueError: a reply that does not parse
            self.on_error()
            if self._state != "failing":
                log.warning(
                    "kubelet pod-resources List on %s failed (%s); GPU pod lists stay empty "
                    "until it answers",
                    self.socket_path,
                    describe_rpc_error(exc),
                )
            self._state = "failing"
            return {}
        if self._state != "ok":
            log.info(
                "pod attribution on: kubelet pod-resources at %s lists %d GPU device(s) in use",
                self.socket_path,
                len(pods),
            )
        self._state = "ok"
        return pods

    def close(self) -> None:
        self.client.close()


def describe_rpc_error(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code()}: {details()}"
    return str(exc)


def unknown_device_ids(pods_by_device: Iterable[str], index_of: Mapping[str, int]) -> list[str]:
    """Device IDs that resolve to no GPU (a MIG device the agent has not enumerated yet, for
    instance)."""
    return [d for d in pods_by_device if resolve_device_id(d, index_of) is None]
