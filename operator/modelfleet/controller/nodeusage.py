"""What every pod bound to a node asks of its kubelet, summed per node, as the kubelet sums it.

A kubelet admits a pod only when the node's `status.allocatable` covers the requests of every pod
already bound there plus the new one (reasons `OutOfcpu`, `OutOfmemory`, `OutOfpods`,
`UnexpectedAdmissionError` for devices). Placement binds replicas itself (`spec.nodeName`), so it
must count the same way, other teams' pods included, or its replicas are refused.

- `compute_pod_requests`: one pod's effective requests (containers, init containers and
  restartable sidecars, and `spec.overhead`), the kubelet's rule;
- `NodeUsage`: the requests of every bound pod that is not Succeeded or Failed, kept from a
  cluster-wide pod watch (`loops.watch_node_usage`), per node.

Pure apart from `NodeUsage`'s own state; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from decimal import Decimal
from typing import Any

from modelfleet.api import labels as L
from modelfleet.api.units import parse_quantity
from modelfleet.placement import Requests

GPU = "nvidia.com/gpu"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
# The pods the watch lists: bound to a node, not finished (a finished pod holds nothing).
BOUND_POD_SELECTOR = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"

PodKey = tuple[str, str]  # (namespace, name)


def _amount(value: Any, scale: int) -> int:
    """A quantity in `scale` units per base unit, rounded up (1m of CPU: scale 1000)."""
    try:
        number = parse_quantity(value if isinstance(value, int) else str(value))
    except ValueError:
        return 0  # the API server validated it; an unreadable one counts as nothing
    return max(math.ceil(number * Decimal(scale)), 0)


def compute_resources_requests(resources: Mapping[str, Any] | None) -> Requests:
    """One container's requests; a resource with a limit and no request requests its limit."""
    resources = resources or {}
    limits = resources.get("limits") or {}
    requests = {**limits, **(resources.get("requests") or {})}
    return Requests(
        cpu_m=_amount(requests["cpu"], 1000) if "cpu" in requests else 0,
        memory_bytes=_amount(requests["memory"], 1) if "memory" in requests else 0,
        gpus=_amount(requests[GPU], 1) if GPU in requests else 0,
    )


def _max(a: Requests, b: Requests) -> Requests:
    return Requests(*(max(x, y) for x, y in zip(a, b, strict=True)))


def compute_pod_requests(spec: Mapping[str, Any]) -> Requests:
    """A pod's effective requests from its spec, counting 1 pod.

    Per resource: the larger of (every app container plus every restartable init container)
    and, for each other init container, itself plus the restartable ones started before it;
    then `spec.overhead` on top (RuntimeClass overhead).
    """
    apps = sum(
        (compute_resources_requests(c.get("resources")) for c in spec.get("containers") or []),
        Requests(),
    )
    sidecars = Requests()
    init_peak = Requests()
    for c in spec.get("initContainers") or []:
        own = compute_resources_requests(c.get("resources"))
        if c.get("restartPolicy") == "Always":
            sidecars = sidecars + own
            init_peak = _max(init_peak, sidecars)
        else:
            init_peak = _max(init_peak, sidecars + own)
    total = _max(apps + sidecars, init_peak)
    overhead = compute_resources_requests({"requests": spec.get("overhead") or {}})
    return total + overhead + Requests(pods=1)


def parse_allocatable(node: Mapping[str, Any]) -> Requests | None:
    """A Node's allocatable CPU, memory and pods; None while it reports no CPU or memory."""
    alloc = (node.get("status") or {}).get("allocatable") or {}
    if "cpu" not in alloc or "memory" not in alloc:
        return None
    pods = _amount(alloc["pods"], 1) if "pods" in alloc else 1 << 30
    return Requests(_amount(alloc["cpu"], 1000), _amount(alloc["memory"], 1), 0, pods)


def _is_replica(labels: Mapping[str, str]) -> bool:
    return labels.get(L.LABEL_COMPONENT) == L.COMPONENT_REPLICA and bool(
        labels.get(L.LABEL_DEPLOYMENT)
    )


class NodeUsage:
    """The requests of the pods bound to each node, from a pod watch.

    Replica Pods (by label) are kept apart: the operator counts its own replicas from their
    records, so at read time only the replica Pods it does not know (another operator's, or
    one its index has not shown yet) are added to the other pods' sums.
    """

    def __init__(self) -> None:
        self._pods: dict[PodKey, tuple[str, Requests, bool]] = {}  # -> (node, requests, replica)
        self._others: dict[str, Requests] = {}  # node -> sum over pods that are not replicas
        self._replicas: dict[str, dict[PodKey, Requests]] = {}  # node -> replica Pods there
        self.synced = False  # a full listing has been read
        self._dirty: set[str] | None = set()  # nodes changed since `take_changed`; None: all

    def __len__(self) -> int:
        return len(self._pods)

    def replace(self, pods: Iterable[Mapping[str, Any]]) -> None:
        """A full listing: forget everything else."""
        self._pods.clear()
        self._others.clear()
        self._replicas.clear()
        for pod in pods:
            self.apply("ADDED", pod)
        self.synced = True
        self._dirty = None

    def apply(self, event: str, pod: Mapping[str, Any]) -> bool:
        """One watch event; True when a node's sums changed."""
        meta = pod.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        spec = pod.get("spec") or {}
        node = spec.get("nodeName") or ""
        phase = (pod.get("status") or {}).get("phase")
        gone = event == "DELETED" or not node or phase in TERMINAL_PHASES
        new = (
            None
            if gone
            else (node, compute_pod_requests(spec), _is_replica(meta.get("labels") or {}))
        )
        old = self._pods.get(key)
        if new == old:
            return False
        if old is not None:
            self._remove(key, old)
        if new is not None:
            self._add(key, new)
        if self._dirty is not None:
            # Only other pods' changes are news to placement: a replica's own come through the
            # replica index and the operator's in-flight book, which keep the view current.
            self._dirty.update(e[0] for e in (old, new) if e is not None and not e[2])
            if len(self._dirty) > 4096:
                self._dirty = None
        return True

    def take_changed(self) -> set[str] | None:
        """The nodes whose sums changed since the last call; None: maybe any of them."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def _add(self, key: PodKey, entry: tuple[str, Requests, bool]) -> None:
        node, requests, replica = entry
        self._pods[key] = entry
        if replica:
            self._replicas.setdefault(node, {})[key] = requests
        else:
            self._others[node] = self._others.get(node, Requests()) + requests

    def _remove(self, key: PodKey, entry: tuple[str, Requests, bool]) -> None:
        node, requests, replica = entry
        del self._pods[key]
        if replica:
            on_node = self._replicas.get(node, {})
            on_node.pop(key, None)
            if not on_node:
                self._replicas.pop(node, None)
            return
        left = self._others[node] - requests
        if left.pods <= 0:
            del self._others[node]
        else:
            self._others[node] = left

    def others(self, node: str, replicas: AbstractSet[PodKey]) -> Requests:
        """What the pods bound to `node` request, leaving out the replica Pods in `replicas`."""
        total = self._others.get(node, Requests())
        for key, requests in self._replicas.get(node, {}).items():
            if key not in replicas:
                total = total + requests
        return total
