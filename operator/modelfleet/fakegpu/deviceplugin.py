"""The kubelet device plugin API v1beta1, described by hand: messages, services, method paths.

No generated stubs, as with the pod-resources client: the messages are built here with the
field numbers of k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/api.proto (package v1beta1). Every
message and field of that file is here except `CDIDevice` / `cdi_devices`, which this plugin
never sends; protobuf skips unknown fields, so a kubelet that sends more still decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

PACKAGE = "v1beta1"
VERSION = "v1beta1"
REGISTRATION_SERVICE = f"{PACKAGE}.Registration"
DEVICE_PLUGIN_SERVICE = f"{PACKAGE}.DevicePlugin"
REGISTER_METHOD = f"/{REGISTRATION_SERVICE}/Register"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

_F = descriptor_pb2.FieldDescriptorProto
_STRING = _F.TYPE_STRING
_BOOL = _F.TYPE_BOOL
_INT32 = _F.TYPE_INT32
_INT64 = _F.TYPE_INT64
_MESSAGE = _F.TYPE_MESSAGE
_ONE = _F.LABEL_OPTIONAL
_MANY = _F.LABEL_REPEATED

Field = tuple[str, int, int, int, str]  # (name, number, type, label, message type)


def _t(name: str) -> str:
    return f".{PACKAGE}.{name}"


# As in upstream api.proto; `map<string, string>` fields are repeated *Entry messages (below).
_MESSAGES: tuple[tuple[str, tuple[Field, ...]], ...] = (
    (
        "DevicePluginOptions",
        (
            ("pre_start_required", 1, _BOOL, _ONE, ""),
            ("get_preferred_allocation_available", 2, _BOOL, _ONE, ""),
        ),
    ),
    (
        "RegisterRequest",
        (
            ("version", 1, _STRING, _ONE, ""),
            ("endpoint", 2, _STRING, _ONE, ""),
            ("resource_name", 3, _STRING, _ONE, ""),
            ("options", 4, _MESSAGE, _ONE, _t("DevicePluginOptions")),
        ),
    ),
    ("Empty", ()),
    ("ListAndWatchResponse", (("devices", 1, _MESSAGE, _MANY, _t("Device")),)),
    ("TopologyInfo", (("nodes", 1, _MESSAGE, _MANY, _t("NUMANode")),)),
    ("NUMANode", (("ID", 1, _INT64, _ONE, ""),)),
    (
        "Device",
        (
            ("ID", 1, _STRING, _ONE, ""),
            ("health", 2, _STRING, _ONE, ""),
            ("topology", 3, _MESSAGE, _ONE, _t("TopologyInfo")),
        ),
    ),
    ("PreStartContainerRequest", (("devices_ids", 1, _STRING, _MANY, ""),)),
    ("PreStartContainerResponse", ()),
    (
        "PreferredAllocationRequest",
        (("container_requests", 1, _MESSAGE, _MANY, _t("ContainerPreferredAllocationRequest")),),
    ),
    (
        "ContainerPreferredAllocationRequest",
        (
            ("available_deviceIDs", 1, _STRING, _MANY, ""),
            ("must_include_deviceIDs", 2, _STRING, _MANY, ""),
            ("allocation_size", 3, _INT32, _ONE, ""),
        ),
    ),
    (
        "PreferredAllocationResponse",
        (
            (
                "container_responses",
                1,
                _MESSAGE,
                _MANY,
                _t("ContainerPreferredAllocationResponse"),
            ),
        ),
    ),
    ("ContainerPreferredAllocationResponse", (("deviceIDs", 1, _STRING, _MANY, ""),)),
    (
        "AllocateRequest",
        (("container_requests", 1, _MESSAGE, _MANY, _t("ContainerAllocateRequest")),),
    ),
    ("ContainerAllocateRequest", (("devices_ids", 1, _STRING, _MANY, ""),)),
    (
        "AllocateResponse",
        (("container_responses", 1, _MESSAGE, _MANY, _t("ContainerAllocateResponse")),),
    ),
    (
        "ContainerAllocateResponse",
        (
            ("envs", 1, _MESSAGE, _MANY, _t("ContainerAllocateResponse.EnvsEntry")),
            ("mounts", 2, _MESSAGE, _MANY, _t("Mount")),
            ("devices", 3, _MESSAGE, _MANY, _t("DeviceSpec")),
            ("annotations", 4, _MESSAGE, _MANY, _t("ContainerAllocateResponse.AnnotationsEntry")),
        ),
    ),
    (
        "Mount",
        (
            ("container_path", 1, _STRING, _ONE, ""),
            ("host_path", 2, _STRING, _ONE, ""),
            ("read_only", 3, _BOOL, _ONE, ""),
        ),
    ),
    (
        "DeviceSpec",
        (
            ("container_path", 1, _STRING, _ONE, ""),
            ("host_path", 2, _STRING, _ONE, ""),
            ("permissions", 3, _STRING, _ONE, ""),
        ),
    ),
)

# message -> its map<string, string> fields, each a nested `<Name>Entry {key = 1; value = 2}`.
_MAP_FIELDS = {"ContainerAllocateResponse": ("EnvsEntry", "AnnotationsEntry")}

# (service, [(method, input, output, server streaming)])
_SERVICES: tuple[tuple[str, tuple[tuple[str, str, str, bool], ...]], ...] = (
    ("Registration", (("Register", "RegisterRequest", "Empty", False),)),
    (
        "DevicePlugin",
        (
            ("GetDevicePluginOptions", "Empty", "DevicePluginOptions", False),
            ("ListAndWatch", "Empty", "ListAndWatchResponse", True),
            (
                "GetPreferredAllocation",
                "PreferredAllocationRequest",
                "PreferredAllocationResponse",
                False,
            ),
            ("Allocate", "AllocateRequest", "AllocateResponse", False),
            ("PreStartContainer", "PreStartContainerRequest", "PreStartContainerResponse", False),
        ),
    ),
)


def _add_fields(msg: descriptor_pb2.DescriptorProto, fields: tuple[Field, ...]) -> None:
    for name, number, kind, label, type_name in fields:
        desc = msg.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            desc.type_name = type_name


def build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """deviceplugin/v1beta1/api.proto as a descriptor."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="modelfleet/kubelet/deviceplugin/v1beta1/api.proto", package=PACKAGE, syntax="proto3"
    )
    for name, fields in _MESSAGES:
        msg = proto.message_type.add(name=name)
        _add_fields(msg, fields)
        for entry in _MAP_FIELDS.get(name, ()):
            nested = msg.nested_type.add(name=entry)
            nested.options.map_entry = True
            _add_fields(nested, (("key", 1, _STRING, _ONE, ""), ("value", 2, _STRING, _ONE, "")))
    for service_name, methods in _SERVICES:
        service = proto.service.add(name=service_name)
        for method, request, response, streaming in methods:
            service.method.add(
                name=method,
                input_type=_t(request),
                output_type=_t(response),
                server_streaming=streaming,
            )
    return proto


@dataclass(frozen=True)
class Messages:
    """The message classes, by upstream name."""

    DevicePluginOptions: type[message.Message]
    RegisterRequest: type[message.Message]
    Empty: type[message.Message]
    ListAndWatchResponse: type[message.Message]
    Device: type[message.Message]
    PreStartContainerRequest: type[message.Message]
    PreStartContainerResponse: type[message.Message]
    PreferredAllocationRequest: type[message.Message]
    PreferredAllocationResponse: type[message.Message]
    AllocateRequest: type[message.Message]
    AllocateResponse: type[message.Message]


@cache
def messages() -> Messages:
    """The message classes, built once in a pool of their own (no clash with another v1beta1)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(build_file_descriptor())

    def cls(name: str) -> type[message.Message]:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))

    return Messages(**{name: cls(name) for name in Messages.__dataclass_fields__})


def method_path(service: str, method: str) -> str:
    """The gRPC path of a method, e.g. /v1beta1.DevicePlugin/Allocate."""
    return f"/{PACKAGE}.{service}/{method}"
