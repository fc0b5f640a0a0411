"""The operator's side of a placement: the request it asks and the three answers it acts on.

The placement engine has its own input and output types; `inputs.py` adapts between the two, so
the planner and its tests depend only on these small values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from modelfleet.api import ModelDeploymentSpec
from modelfleet.placement import NO_REQUESTS, Requests


@dataclass(frozen=True, slots=True)
class Placed:
    """Run the replica on `node`, on these GPUs."""

    node: str
    gpu_ids: tuple[str, ...]
    gpu_uuids: tuple[str, ...]
    gpu_memory_mib: int  # total memory of one of the chosen GPUs
    footprint_mib: int | None  # promised per GPU; None = the whole GPU (a discovery run)
    reason: str


@dataclass(frozen=True, slots=True)
class Victim:
    """A replica Pod of another deployment that must go to make room."""

    namespace: str
    pod: str
    deployment: str


@dataclass(frozen=True, slots=True)
class Evict:
    """Nothing fits now; removing these replicas (least recently used first) would make room."""

    victims: tuple[Victim, ...]
    reason: str
    node: str = ""  # where the replica goes once the victims are gone
    gpu_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """Nothing fits and nothing may be evicted. `code` is a condition reason (NoCapacity, ...)."""

    reason: str
    code: str = "NoCapacity"


Decision = Placed | Evict | Unplaceable


@dataclass(frozen=True, slots=True)
class Move:
    """Start replica `ordinal` of `deployment` (a copy of its Pod `pod`) on `placed`; delete
    `pod` once the copy is Ready."""

    namespace: str
    deployment: str
    deployment_uid: str
    pod: str
    pod_uid: str
    ordinal: int  # the copy's n: a free instance number of its deployment
    placed: Placed


@dataclass(frozen=True, slots=True)
class Consolidate:
    """Nothing fits now; these moves, run make-before-break, free `gpu_ids` on `node`."""

    moves: tuple[Move, ...]
    node: str
    gpu_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """One replica to place, with what this plan already decided for its siblings."""

    namespace: str
    deployment: str
    ordinal: int  # n of <deployment>-instance-<n>
    spec: ModelDeploymentSpec
    footprint_mib: int | None  # per GPU; None = not known yet (discovery run takes the whole GPU)
    planned: tuple[Placed, ...] = ()  # decided earlier in the same plan, not yet in the cluster
    released: tuple[str, ...] = ()  # pod names this plan deletes: their GPUs count as free
    may_evict: bool = True
    requests: Requests = NO_REQUESTS  # CPU, memory and pod slot the replica asks of its node
    # (namespace, name) -> Ready replicas that deployment's own load needs now; eviction for
    # this replica leaves it that many (place.compute_load_floors).
    load_floors: Mapping[tuple[str, str], int] = field(default_factory=dict)


Placer = Callable[[PlacementRequest], Decision]
