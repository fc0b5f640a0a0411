"""Inputs and results of the placement engine: plain frozen dataclasses, no I/O.

The operator adapts what it observed (the GPU pool snapshot, Node objects, replica Pods and their
annotations) to these types; the engine never reads anything else. Memory is in MiB, times are
seconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from modelfleet.api.times import format_time
from modelfleet.api.v1alpha1 import PlacementStrategy, SharingMode

__all__ = [
    "NO_REQUESTS",
    "ONE_POD",
    "PRODUCT_LABEL",
    "Decision",
    "DeploymentRef",
    "Evict",
    "GpuInfo",
    "NodeInfo",
    "Placed",
    "PlacedReplica",
    "PlacementInputError",
    "PlacementSettings",
    "PlacementStrategy",
    "ReplicaRequest",
    "ReplicaState",
    "Requests",
    "SharingMode",
    "Taint",
    "Toleration",
    "Unplaceable",
    "UnplaceableCode",
]

# The node label GPU Feature Discovery sets; spec.gpu.product is matched against it.
PRODUCT_LABEL = "nvidia.com/gpu.product"


class PlacementInputError(ValueError):
    """An input to the placement engine is inconsistent; the message names it and the fix."""


class ReplicaState(StrEnum):
    """Where a replica is in its life, as far as placement and eviction care."""

    STARTING = "Starting"  # placed, not serving yet: never a victim
    READY = "Ready"  # serving: a victim if priority, last use and its deployment's floor allow
    TERMINATING = "Terminating"  # deleted, still holding its GPUs: the cheapest victim of all
    RESERVED = "Reserved"  # GPUs an eviction freed, held for the deployment that evicted


class DeploymentRef(NamedTuple):
    """A ModelDeployment by namespace and name (a tuple: hashed and compared in C, and fast)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Taint:
    """A node taint, as in a Node spec."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"  # NoSchedule, PreferNoSchedule or NoExecute


@dataclass(frozen=True, slots=True)
class Toleration:
    """A toleration, as in a Pod spec (same matching rules as the kube-scheduler)."""

    key: str | None = None
    operator: str = "Equal"  # Equal or Exists
    value: str | None = None
    effect: str | None = None  # None or "" matches every effect

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.operator == "Exists":
            return not self.key or self.key == taint.key
        return self.key == taint.key and (self.value or "") == taint.value


class Requests(NamedTuple):
    """What pods ask of a node's kubelet at admission, summed like the kubelet sums them: CPU in
    millicores, memory in bytes, nvidia.com/gpu devices, and pods (each pod counts 1)."""

    cpu_m: int = 0
    memory_bytes: int = 0
    gpus: int = 0
    pods: int = 0

    def __add__(self, other: object) -> Requests:
        if not isinstance(other, Requests):
            return NotImplemented
        return Requests(
            self.cpu_m + other.cpu_m,
            self.memory_bytes + other.memory_bytes,
            self.gpus + other.gpus,
            self.pods + other.pods,
        )

    def __sub__(self, other: Requests) -> Requests:
        return Requests(
            self.cpu_m - other.cpu_m,
            self.memory_bytes - other.memory_bytes,
            self.gpus - other.gpus,
            self.pods - other.pods,
        )


NO_REQUESTS = Requests()
ONE_POD = Requests(pods=1)  # a pod asking for nothing else


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as the pool last saw it."""

    index: int
    gpu_id: str  # <node>:<index>
    uuid: str
    product: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    healthy: bool = True
    reason: str = ""  # why it is unhealthy
    # Pods the node says hold this GPU that are not modelfleet replicas (namespace/name).
    foreign_pods: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One GPU node: Node object facts plus its agent's view of the GPUs."""

    name: str
    gpus: tuple[GpuInfo, ...] = ()
    schedulable: bool = True  # False when cordoned (spec.unschedulable)
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    healthy: bool = True  # the agent answers and the node is Ready
    # The agent's figures cannot be trusted now (its sample is too old, it does not answer, or
    # it cannot read the GPUs) while the Node is Ready: nothing is placed there, and a replica
    # that could go there waits for it rather than evicting elsewhere. (A Node that is NotReady
    # or gone is lost, not stale: `healthy` false, and nothing waits for it.)
    stale: bool = False
    reason: str = ""  # why it is unhealthy or stale
    # Why no replica may go there for now: its kubelet rejected one at admission (backoff).
    rejected: str = ""
    # nvidia.com/gpu the node allocates (healthy devices of its device plugin); None: unknown.
    gpu_allocatable: int | None = None
    # status.allocatable cpu, memory and pods (`gpus` unused: see gpu_allocatable); None: the
    # operator does not watch the pods bound to nodes, and only the kubelet checks them.
    allocatable: Requests | None = None
    # What the pods bound to the node that are not modelfleet's replicas request (all
    # namespaces, not Succeeded or Failed); the replicas' own requests come with them.
    others: Requests = NO_REQUESTS


@dataclass(frozen=True, slots=True)
class PlacedReplica:
    """A replica that already exists, rebuilt by the operator from its Pod and annotations."""

    deployment: DeploymentRef
    pod: str  # Pod name, <deployment>-instance-<n>
    node: str
    gpu_ids: tuple[str, ...]
    sharing: SharingMode = SharingMode.EXCLUSIVE
    footprint_mib: int | None = None  # promised per GPU; None: the whole GPUs
    priority: int = 0
    last_used: float = 0.0  # last request to its deployment, seconds since the epoch; 0: never
    min_replicas: int = 0  # its deployment's spec.minReplicas
    state: ReplicaState = ReplicaState.STARTING
    measured: bool = False  # the agent already reports its memory (it is in memory_used)
    requests: Requests = NO_REQUESTS  # what its Pod asks of the kubelet (CPU, memory, GPUs, 1 pod)

    @property
    def whole_gpus(self) -> bool:
        """True when it holds its GPUs whole: Exclusive, or a discovery run not yet measured."""
        return self.sharing == SharingMode.EXCLUSIVE or self.footprint_mib is None

    @property
    def key(self) -> tuple[str, str]:
        return (self.deployment.namespace, self.pod)

    def describe(self) -> str:
        used = "never used" if self.last_used <= 0 else "last used " + format_time(self.last_used)
        return f"{self.deployment.namespace}/{self.pod} (priority {self.priority}, {used})"


@dataclass(frozen=True, slots=True)
class ReplicaRequest:
    """A replica to place, from its ModelDeployment's spec and status."""

    deployment: DeploymentRef
    pod: str  # Pod name, <deployment>-instance-<n>
    gpu_count: int = 1
    memory_mib: int | None = None  # spec.gpu.memory
    measured_footprint_mib: int | None = None  # status.footprint
    sharing: SharingMode = SharingMode.EXCLUSIVE
    product: str | None = None  # spec.gpu.product
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    strategy: PlacementStrategy | None = None  # None: the operator's default
    spread: bool = True
    priority: int = 0
    min_replicas: int = 0
    last_used: float = 0.0
    # Replicas that other deployments' own load needs now (autoscaled models whose priority is
    # not below this request's): eviction leaves each at least that many Ready, as it does
    # minReplicas, so a model never takes replicas that another one of its rank is using.
    load_floors: Mapping[DeploymentRef, int] = field(default_factory=dict)
    # What its Pod will ask of the kubelet: spec.engine.resources, the GPUs of an Exclusive
    # replica, and the pod itself.
    requests: Requests = ONE_POD

    @property
    def footprint_mib(self) -> int | None:
        """Declared memory, else the measured footprint, else None (a discovery run)."""
        return self.memory_mib if self.memory_mib is not None else self.measured_footprint_mib


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    """What the operator's settings say about placement (passed in, never read from globals)."""

    default_strategy: PlacementStrategy = PlacementStrategy.AVAILABILITY
    memory_margin_mib: int = 1024  # kept free on every GPU in Shared mode
    # Rank nodes first by the free blocks a placement would break up, then by the strategy.
    fragmentation_aware: bool = True


class UnplaceableCode(StrEnum):
    """Why a replica stays pending, as one CamelCase word (for conditions and Events)."""

    NO_CAPACITY = "NoCapacity"  # nodes match, but nothing fits, not even after eviction
    NO_MATCHING_NODE = "NoMatchingNode"  # selector, product, taints, cordons or health exclude all
    WAITING_FOR_STATS = "WaitingForStats"  # stats missing or stale, or a discovery run unmeasured
    START_SERIALIZED = "StartSerialized"  # room exists, but a Shared replica is starting there
    FOOTPRINT_TOO_LARGE = "FootprintTooLarge"  # spec.gpu.memory exceeds every eligible GPU
    # The nodes that match rejected a replica at admission lately; placement retries after a while.
    ADMISSION_BACKOFF = "AdmissionBackoff"


@dataclass(frozen=True, slots=True)
class Placed:
    """Run the replica on `node`, on `gpu_ids` (same order as `uuids`)."""

    node: str
    gpu_ids: tuple[str, ...]
    uuids: tuple[str, ...]
    reason: str
    score: float
    cursor: str | None  # round-robin cursor to persist (unchanged by other strategies)
    strategy: PlacementStrategy
    discovery: bool  # the footprint is unknown: this replica measures it
    replica: PlacedReplica  # the record to add to the view (and to write as annotations)


@dataclass(frozen=True, slots=True)
class Evict:
    """Delete `victims` first; the replica then fits on `node`, on `gpu_ids`."""

    victims: tuple[PlacedReplica, ...]
    node: str
    gpu_ids: tuple[str, ...]
    uuids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """Nothing fits now; `reason` says why in words a person can act on."""

    code: UnplaceableCode
    reason: str


Decision = Placed | Evict | Unplaceable
