"""The kubelet's device part on simulated (kwok) nodes: devices, admission, pod-resources.

On a real GPU node the kubelet's device manager, with the NVIDIA device plugin, decides which GPUs
a pod gets, refuses a pod it cannot give them to, and tells the node-stats agent who holds what
through the pod-resources API. kwok plays none of that, so hack/pod_runner.py does it with these
pieces, by the same rules:

- every pod on a simulated node that asks for `nvidia.com/gpu` (any namespace, modelfleet's or
  not) is admitted or refused before it starts: kwok's pod stages (hack/kwok-stages.yaml) leave
  such a pod Pending until it carries the `sim.modelfleet.io/devices` annotation;
- admitted: each container gets its devices by the device plugin's preferred allocation (the
  lowest free indexes, `modelfleet.fakegpu.plugin.compute_preferred`), written to that annotation;
- refused: phase Failed, reason UnexpectedAdmissionError (devices) or OutOfpods, OutOfcpu,
  OutOfmemory (the node's allocatable less what the pods it runs request), the kubelet's message;
- the devices a pod holds are free again once it is Succeeded, Failed or gone;
- a per-node pod-resources v1 `List` endpoint on a unix socket reports the assignment, which the
  simulated agent reads exactly as the real agent reads the kubelet's.

The annotation is the device manager's checkpoint (kubelet_internal_checkpoint on a real node):
a restarted runner reads the assignment back from the Pods instead of recomputing it. Recomputing
from creation order would not do: once an earlier pod ends, a later pod would "move" to the
devices it freed, which no kubelet does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from modelfleet.agent.podresources import SERVICE, message_classes
from modelfleet.controller.nodeusage import compute_pod_requests
from modelfleet.fakegpu.plugin import compute_preferred
from modelfleet.gpufile import simulated_uuid
from modelfleet.placement import NO_REQUESTS, Requests

log = logging.getLogger("pod-runner")

GPU_RESOURCE = "nvidia.com/gpu"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
#: On a Pod: the devices its containers were given, JSON {"<container>": ["<device ID>", ...]}.
ANN_DEVICES = "sim.modelfleet.io/devices"
#: On a Node: the GPU indexes its device plugin advertises, comma-separated ("0,1,2"; "" for none).
#: Absent: every GPU the nvidia.com/gpu.count label counts. Fewer than the label says is what a
#: node looks like whose plugin lost a GPU (fallen off the bus, not yet re-enumerated).
ANN_PLUGIN_DEVICES = "sim.modelfleet.io/plugin-devices"
ADMISSION_REASON = "UnexpectedAdmissionError"
# The kubelet v1.36 device manager's text for a device shortage, as a pod bound by spec.nodeName
# shows it: devicemanager's "requested number of devices unavailable for %s. Requested: %d,
# Available: %d", wrapped by the admit handler ("Allocate failed due to %v, which is unexpected",
# reason UnexpectedAdmissionError) and prefixed by rejectPod ("Pod was rejected: ").
DEVICE_SHORTAGE_MESSAGE = (
    "Allocate failed due to requested number of devices unavailable for {resource}. "
    "Requested: {requested}, Available: {available}, which is unexpected"
)
REJECTED_PREFIX = "Pod was rejected: "
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

# (namespace, pod, container, resource name, device IDs): one entry of a pod-resources List reply.
PodResourcesEntry = tuple[str, str, str, str, tuple[str, ...]]
Assignment = dict[str, tuple[str, ...]]  # container -> device IDs


def _quantity(value: Any) -> int:
    """An nvidia.com/gpu quantity: a whole number (extended resources allow no fractions)."""
    return int(str(value).strip() or 0)


def container_gpu_requests(pod: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(container, GPUs) for every app container that asks for nvidia.com/gpu, in spec order.

    Extended resources must have limits (requests, if given, equal them), so limits decide;
    requests are read only where a client sent no limit. Init containers are not modelled.
    """
    out: list[tuple[str, int]] = []
    for container in pod.get("spec", {}).get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(GPU_RESOURCE)
        if value is None:
            value = (resources.get("requests") or {}).get(GPU_RESOURCE)
        if value is not None:
            out.append((str(container.get("name", "")), _quantity(value)))
    return out


def asks_for_gpus(pod: Mapping[str, Any]) -> bool:
    """Whether the pod names nvidia.com/gpu at all: then only this runner may start it."""
    return bool(container_gpu_requests(pod))


def parse_assignment(pod: Mapping[str, Any]) -> Assignment | None:
    """The devices recorded on the pod, or None when it was not admitted yet (or is unreadable)."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANN_DEVICES)
    if text is None:
        return None
    try:
        doc = json.loads(text)
        return {str(c): tuple(str(d) for d in ids) for c, ids in dict(doc).items()}
    except (ValueError, TypeError) as exc:
        meta = pod.get("metadata") or {}
        log.warning(
            "%s/%s: unreadable %s=%r: %s", meta.get("namespace"), meta.get("name"), ANN_DEVICES,
            text, exc,
        )  # fmt: skip
        return None


def format_assignment(assignment: Mapping[str, Sequence[str]]) -> str:
    return json.dumps({c: list(ids) for c, ids in assignment.items()}, separators=(",", ":"))


def holds_devices(pod: Mapping[str, Any]) -> bool:
    """Admitted and not finished: a terminating pod keeps its devices until it is gone."""
    return (
        parse_assignment(pod) is not None
        and pod.get("status", {}).get("phase") not in TERMINAL_PHASES
    )


def needs_admission(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    return (
        asks_for_gpus(pod)
        and not meta.get("deletionTimestamp")
        and pod.get("status", {}).get("phase", "Pending") == "Pending"
        and ANN_DEVICES not in (meta.get("annotations") or {})
    )


def parse_plugin_devices(text: str, count: int) -> tuple[int, ...]:
    """The indexes in ANN_PLUGIN_DEVICES; ValueError naming a bad or out-of-range entry."""
    out: list[int] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if not item.isdigit() or int(item) >= count:
            raise ValueError(f"{item!r} is not a GPU index below {count}")
        out.append(int(item))
    return tuple(sorted(set(out)))


def node_gpu_count(node: Mapping[str, Any]) -> int | None:
    text = ((node.get("metadata") or {}).get("labels") or {}).get(GPU_COUNT_LABEL)
    return int(text) if text is not None and str(text).isdigit() else None


def advertised_indexes(node: Mapping[str, Any]) -> tuple[int, ...]:
    """The GPU indexes the node's device plugin advertises (the label's count, or the knob)."""
    count = node_gpu_count(node) or 0
    meta = node.get("metadata") or {}
    text = (meta.get("annotations") or {}).get(ANN_PLUGIN_DEVICES)
    if text is None:
        return tuple(range(count))
    try:
        return parse_plugin_devices(text, count)
    except ValueError as exc:
        log.warning("node %s: ignoring %s=%r: %s", meta.get("name"), ANN_PLUGIN_DEVICES, text, exc)
        return tuple(range(count))


def node_devices(node: Mapping[str, Any]) -> dict[str, int]:
    """Device ID -> GPU index of what the device plugin advertises: the GPU UUIDs the simulated
    agent reports (modelfleet.gpufile.simulated_uuid), as the NVIDIA plugin's default strategy."""
    name = str((node.get("metadata") or {}).get("name", ""))
    return {simulated_uuid(name, i): i for i in advertised_indexes(node)}


@dataclass(frozen=True)
class Admitted:
    assignment: Assignment


@dataclass(frozen=True)
class Rejected:
    requested: int
    available: int
    resource: str = GPU_RESOURCE
    used: int = 0
    capacity: int = 0  # set for a node resource (cpu, memory, pods): allocatable

    @property
    def reason(self) -> str:
        """UnexpectedAdmissionError for devices; OutOf<resource> for the node's own."""
        return ADMISSION_REASON if self.resource == GPU_RESOURCE else f"OutOf{self.resource}"

    @property
    def message(self) -> str:
        """The Pod's status.message, as the kubelet writes it."""
        return REJECTED_PREFIX + self.event_message

    @property
    def event_message(self) -> str:
        """The Warning Event's message (rejectPod's event carries no prefix)."""
        if self.resource != GPU_RESOURCE:
            return NODE_SHORTAGE_MESSAGE.format(
                resource=self.resource,
                requested=self.requested,
                used=self.used,
                capacity=self.capacity,
            )
        return DEVICE_SHORTAGE_MESSAGE.format(
            resource=self.resource, requested=self.requested, available=self.available
        )


# The kubelet's predicate admission for the node's own resources (v1.36, seen on a real node of
# the test cluster): reason OutOf<resource>, CPU in millicores, memory in bytes, capacity the
# allocatable. The first resource short wins, in this order; devices are allocated before.
NODE_SHORTAGE_MESSAGE = (
    "Node didn't have enough resource: {resource}, requested: {requested}, used: {used}, "
    "capacity: {capacity}"
)


def compute_node_shortage(
    pod: Mapping[str, Any], allocatable: Requests | None, used: Requests
) -> Rejected | None:
    """The first of pods, cpu and memory the node lacks for `pod`, or None."""
    if allocatable is None:
        return None
    wants = compute_pod_requests(pod.get("spec") or {})
    for resource, asked, taken, capacity in (
        ("pods", wants.pods, used.pods, allocatable.pods),
        ("cpu", wants.cpu_m, used.cpu_m, allocatable.cpu_m),
        ("memory", wants.memory_bytes, used.memory_bytes, allocatable.memory_bytes),
    ):
        if asked and taken + asked > capacity:
            return Rejected(asked, max(capacity - taken, 0), resource, taken, capacity)
    return None


def compute_admission(
    pod: Mapping[str, Any],
    devices: Mapping[str, int],
    in_use: Iterable[str],
    allocatable: Requests | None = None,
    used: Requests = NO_REQUESTS,
) -> Admitted | Rejected:
    """Admit the pod with devices for each container, or refuse it as the kubelet does.

    Devices first (the device manager's admit handler runs before the predicates): containers
    are served in order, each from what the ones before it left free, by the plugin's preferred
    allocation (lowest index first). Then the node's pods, CPU and memory: `allocatable` less
    what the pods admitted there request (`used`); None skips that check.
    """
    free = [d for d in devices if d not in set(in_use)]
    assignment: Assignment = {}
    for container, wanted in container_gpu_requests(pod):
        if wanted > len(free):
            return Rejected(requested=wanted, available=len(free))
        chosen = compute_preferred(free, [], wanted, dict(devices)) if wanted else []
        assignment[container] = tuple(chosen)
        free = [d for d in free if d not in chosen]
    short = compute_node_shortage(pod, allocatable, used)
    return short if short is not None else Admitted(assignment)


def compute_used(pods: Iterable[Mapping[str, Any]]) -> Requests:
    """What the pods the node runs request: every one bound there that is not finished and not
    still waiting for admission (one node's pods)."""
    total = Requests()
    for pod in pods:
        if pod.get("status", {}).get("phase") in TERMINAL_PHASES or needs_admission(pod):
            continue
        total = total + compute_pod_requests(pod.get("spec") or {})
    return total


def compute_in_use(pods: Iterable[Mapping[str, Any]]) -> set[str]:
    """Device IDs held by the given pods (one node's)."""
    out: set[str] = set()
    for pod in pods:
        if holds_devices(pod):
            for ids in (parse_assignment(pod) or {}).values():
                out.update(ids)
    return out


def admission_order(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods waiting for admission, oldest first, as a kubelet sees them arrive."""
    waiting = [p for p in pods if needs_admission(p)]
    return sorted(
        waiting,
        key=lambda p: (
            str(p["metadata"].get("creationTimestamp", "")),
            str(p["metadata"].get("namespace", "")),
            str(p["metadata"].get("name", "")),
        ),
    )


def build_admit_patch(pod: Mapping[str, Any], assignment: Assignment) -> dict[str, Any]:
    """A merge patch recording the assignment; the resourceVersion makes it conditional, so a
    pod that changed meanwhile is decided again from its new state."""
    meta: dict[str, Any] = {"annotations": {ANN_DEVICES: format_assignment(assignment)}}
    rv = (pod.get("metadata") or {}).get("resourceVersion")
    if rv:
        meta["resourceVersion"] = rv
    return {"metadata": meta}


def build_reject_patch(rejected: Rejected) -> dict[str, Any]:
    """The status the kubelet sets on a pod it refuses (rejectPod): Failed, reason, message."""
    return {"status": {"phase": "Failed", "reason": rejected.reason, "message": rejected.message}}


def build_reject_event(pod: Mapping[str, Any], rejected: Rejected, now: str) -> dict[str, Any]:
    """The Warning Event the kubelet records with a rejection."""
    meta = pod.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "reason": rejected.reason,
        "message": rejected.event_message,
        "type": "Warning",
        "source": {"component": "kubelet", "host": pod.get("spec", {}).get("nodeName")},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def build_pod_resources(pods: Iterable[Mapping[str, Any]]) -> tuple[PodResourcesEntry, ...]:
    """What the node's pod-resources List reports: every device held, by pod and container."""
    out: list[PodResourcesEntry] = []
    for pod in pods:
        if not holds_devices(pod):
            continue
        meta = pod["metadata"]
        for container, ids in sorted((parse_assignment(pod) or {}).items()):
            if ids:
                out.append(
                    (str(meta["namespace"]), str(meta["name"]), container, GPU_RESOURCE, ids)
                )
    return tuple(out)


def build_list_response(entries: Iterable[PodResourcesEntry]) -> Any:
    """A v1 ListPodResourcesResponse, built with the agent's own descriptors."""
    _, response_cls = message_classes()
    response = response_cls()
    pods: dict[tuple[str, str], Any] = {}
    for namespace, name, container, resource, ids in entries:
        entry = pods.get((namespace, name))
        if entry is None:
            entry = response.pod_resources.add(name=name, namespace=namespace)  # type: ignore[attr-defined]
            pods[(namespace, name)] = entry
        ctr = next((c for c in entry.containers if c.name == container), None)
        if ctr is None:
            ctr = entry.containers.add(name=container)
        ctr.devices.add(resource_name=resource, device_ids=list(ids))
    return response


def pod_resources_socket(directory: str, node: str) -> str:
    """Where the node's pod-resources endpoint listens (the simulated agent's
    --pod-resources-socket)."""
    return os.path.join(directory, f"{node}.sock")


class PodResourcesServers:
    """One pod-resources v1 List endpoint per simulated node, each on its own unix socket.

    gRPC answers in its own threads: they read `entries`, which the runner replaces whole (one
    immutable tuple per node), never mutates.
    """

    def __init__(self) -> None:
        # Short: a unix socket path may not exceed 107 bytes, and node names take up to 63.
        self.directory = tempfile.mkdtemp(prefix="mf-podres-")
        self.entries: dict[str, tuple[PodResourcesEntry, ...]] = {}
        self._servers: dict[str, grpc.Server] = {}

    def socket_path(self, node: str) -> str:
        return pod_resources_socket(self.directory, node)

    def ensure(self, node: str) -> str:
        """Serve the node's endpoint (once); its socket path."""
        path = self.socket_path(node)
        if node in self._servers:
            return path
        request_cls, _ = message_classes()

        def list_(_request: Any, _context: grpc.ServicerContext) -> Any:
            return build_list_response(self.entries.get(node, ()))

        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "List": grpc.unary_unary_rpc_method_handler(
                    list_,
                    request_deserializer=request_cls.FromString,
                    response_serializer=lambda r: bytes(r.SerializeToString()),
                )
            },
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((handler,))
        if not server.add_insecure_port(f"unix://{path}"):
            raise RuntimeError(f"cannot serve pod-resources on {path}")
        server.start()
        self._servers[node] = server
        return path

    def drop(self, node: str) -> None:
        server = self._servers.pop(node, None)
        self.entries.pop(node, None)
        if server is not None:
            server.stop(grace=None).wait(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path(node))

    @property
    def nodes(self) -> list[str]:
        return list(self._servers)

    def close(self) -> None:
        for node in list(self._servers):
            self.drop(node)
        shutil.rmtree(self.directory, ignore_errors=True)
