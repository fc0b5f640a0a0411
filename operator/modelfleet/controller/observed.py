"""What the operator observes, as small immutable values parsed once from API objects.

Everything here is pure: `parse_*` functions turn Pod and Node dicts into dataclasses that the
planner, the status computation and the placement adapter read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from modelfleet.api import labels as L
from modelfleet.api.ownership import compute_ignored_reason, controller_uid
from modelfleet.api.times import parse_time
from modelfleet.controller.nodeusage import compute_pod_requests, parse_allocatable
from modelfleet.placement import ONE_POD, Requests

GPU = "nvidia.com/gpu"
_INSTANCE_NAME = re.compile(r"^(?P<deployment>.+)-instance-(?P<n>[1-9][0-9]*)$")


def instance_name(deployment: str, n: int) -> str:
    """The name of replica `n` of `deployment`."""
    return f"{deployment}-instance-{n}"


def parse_ordinal(deployment: str, pod_name: str) -> int | None:
    """n from `<deployment>-instance-<n>`, None when the name does not belong to `deployment`."""
    match = _INSTANCE_NAME.match(pod_name)
    if not match or match["deployment"] != deployment:
        return None
    return int(match["n"])


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


# The reasons a kubelet gives a Pod bound to its node that it will not admit: the device
# manager's `UnexpectedAdmissionError` (e.g. "Allocate failed due to requested number of devices
# unavailable for nvidia.com/gpu"), `OutOf<resource>` (cpu, memory, pods, an extended resource),
# and the scheduling predicates it re-checks (node affinity, taints, OS).
ADMISSION_REASONS = frozenset(
    {
        "UnexpectedAdmissionError",
        "NodeAffinity",
        "TaintToleration",
        "PodOSNotSupported",
        "PodOSSelectorNodeLabelDoesNotMatch",
        "InvalidNodeInfo",
    }
)


def is_admission_reason(reason: str) -> bool:
    return reason in ADMISSION_REASONS or reason.startswith("OutOf")


@dataclass(frozen=True, slots=True)
class ObservedPod:
    """One replica Pod, as far as planning and status care."""

    name: str
    namespace: str
    deployment: str
    ordinal: int  # n of <deployment>-instance-<n>
    uid: str = ""
    node: str | None = None
    phase: str = "Pending"  # the Pod's status.phase
    ready: bool = False
    ready_since: datetime | None = None
    deleting: bool = False
    deleting_since: datetime | None = None
    created_at: datetime | None = None
    template_hash: str = ""
    gpu_ids: tuple[str, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    footprint_mib: int | None = None  # promised per GPU; None = the whole GPU (discovery run)
    sharing: str = "Exclusive"
    priority: int = 0
    min_replicas: int = 0
    waiting_reason: str = ""  # e.g. CrashLoopBackOff, ImagePullBackOff
    # What the kubelet says with it (`secret "hf" not found`), or how the last run ended
    # (`exit code 1: ...`) while it crash-loops: what a person needs to fix it.
    waiting_message: str = ""
    restarts: int = 0
    # The UID of the ModelDeployment that controls it (api/ownership.py); "" for none. Only a
    # Pod whose owner is the labelled deployment is a replica (`is_replica_of`).
    owner_uid: str = ""
    reason: str = ""  # the Pod's status.reason, e.g. UnexpectedAdmissionError
    message: str = ""  # the Pod's status.message
    # The GPUs the node says it holds (the agents read the kubelet's pod-resources API), or, while
    # no agent reports it, what the operator recorded of that on the Pod; empty until known, and
    # for Shared replicas, which request no device.
    assigned_gpus: tuple[str, ...] = ()
    recorded_assigned: tuple[str, ...] = ()  # the Pod's ANN_ASSIGNED_GPUS
    requests: Requests = ONE_POD  # what it asks of the kubelet (nodeusage.py)
    # A consolidation copy (labels.ANN_MOVE_OF): the Pod it replaces, by name and UID, the
    # deployment (<namespace>/<name>) the move makes room for, when it was decided, and by when
    # it must be Ready. All empty for any other replica.
    move_of: str = ""
    move_of_uid: str = ""
    move_for: str = ""
    moved_at: datetime | None = None
    move_deadline: datetime | None = None
    ip: str = ""  # status.podIP: where the autoscaler scrapes the engine's /metrics

    @property
    def gpus(self) -> tuple[str, ...]:
        """Its GPUs: what the node assigned where known, else what placement planned."""
        return self.assigned_gpus or self.gpu_ids

    @property
    def assignment_differs(self) -> bool:
        return bool(self.assigned_gpus) and set(self.assigned_gpus) != set(self.gpu_ids)

    @property
    def failed(self) -> bool:
        return self.phase in ("Failed", "Succeeded")

    @property
    def rejected_at_admission(self) -> bool:
        """The node's kubelet refused to run it (phase Failed before any container started)."""
        return self.phase == "Failed" and is_admission_reason(self.reason)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def parse_pod(pod: Mapping[str, Any]) -> ObservedPod | None:
    """An ObservedPod from a Pod dict with the replica labels and name; None for any other Pod.

    The labels are only a claim: whether it is a replica is `is_replica_of` its deployment.
    """
    meta = pod.get("metadata") or {}
    pod_labels = meta.get("labels") or {}
    ann = meta.get("annotations") or {}
    deployment = pod_labels.get(L.LABEL_DEPLOYMENT)
    if pod_labels.get(L.LABEL_COMPONENT) != L.COMPONENT_REPLICA or not deployment:
        return None
    name = str(meta.get("name", ""))
    ordinal = parse_ordinal(deployment, name)
    if ordinal is None:
        return None
    status = pod.get("status") or {}
    ready = False
    ready_since = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            ready = True
            ready_since = parse_time(cond.get("lastTransitionTime"))
    waiting = ""
    waiting_message = ""
    restarts = 0
    for cs in status.get("containerStatuses") or []:
        restarts += int(cs.get("restartCount") or 0)
        state = (cs.get("state") or {}).get("waiting") or {}
        reason = state.get("reason")
        if reason and reason not in ("ContainerCreating", "PodInitializing"):
            waiting = str(reason)
            waiting_message = compute_waiting_message(state, cs.get("lastState") or {})
    footprint = ann.get(L.ANN_FOOTPRINT_MIB, "")
    return ObservedPod(
        name=name,
        namespace=str(meta.get("namespace", "")),
        deployment=deployment,
        ordinal=ordinal,
        uid=str(meta.get("uid", "")),
        node=(pod.get("spec") or {}).get("nodeName") or None,
        phase=str(status.get("phase") or "Pending"),
        ready=ready,
        ready_since=ready_since,
        deleting=bool(meta.get("deletionTimestamp")),
        deleting_since=parse_time(meta.get("deletionTimestamp")),
        created_at=parse_time(meta.get("creationTimestamp")),
        template_hash=str(ann.get(L.ANN_TEMPLATE_HASH, "")),
        gpu_ids=_split(ann.get(L.ANN_GPUS)),
        gpu_uuids=_split(ann.get(L.ANN_GPU_UUIDS)),
        footprint_mib=int(footprint) if footprint.isdigit() else None,
        sharing=str(ann.get(L.ANN_SHARING, "Exclusive")),
        priority=_int(ann.get(L.ANN_PRIORITY), 0),
        min_replicas=_int(ann.get(L.ANN_MIN_REPLICAS), 0),
        waiting_reason=waiting,
        waiting_message=waiting_message,
        restarts=restarts,
        owner_uid=controller_uid(meta),
        reason=str(status.get("reason") or ""),
        message=str(status.get("message") or ""),
        assigned_gpus=_split(ann.get(L.ANN_ASSIGNED_GPUS)),
        recorded_assigned=_split(ann.get(L.ANN_ASSIGNED_GPUS)),
        ip=str(status.get("podIP") or ""),
        requests=compute_pod_requests(pod.get("spec") or {}),
        move_of=str(ann.get(L.ANN_MOVE_OF, "")),
        move_of_uid=str(ann.get(L.ANN_MOVE_OF_UID, "")),
        move_for=str(ann.get(L.ANN_MOVE_FOR, "")),
        moved_at=parse_time(ann.get(L.ANN_MOVED_AT)),
        move_deadline=parse_time(ann.get(L.ANN_MOVE_DEADLINE)),
    )


def is_replica_of(pod: ObservedPod, deployment_uid: str | None) -> bool:
    """True when `pod` is controlled by the ModelDeployment with `deployment_uid` (the one that
    exists under its label's name; None: none does)."""
    return compute_ignored_reason(pod.owner_uid, deployment_uid) is None


def compute_ignored_pods(
    indexed: Mapping[tuple[str, str], Iterable[ObservedPod]],
    deployment_uids: Mapping[tuple[str, str], str],
) -> dict[str, int]:
    """Pods with the replica labels that are not replicas, counted by why (api/ownership.py)."""
    counts: dict[str, int] = {}
    for key, pods in indexed.items():
        for pod in pods:
            why = compute_ignored_reason(pod.owner_uid, deployment_uids.get(key))
            if why is not None:
                counts[why] = counts.get(why, 0) + 1
    return counts


# Enough of a message for a status line; the Pod has the rest.
WAITING_MESSAGE_MAX = 300


def compute_waiting_message(waiting: Mapping[str, Any], last: Mapping[str, Any]) -> str:
    """The kubelet's message for a waiting container, else how its last run ended."""
    ended = last.get("terminated") or {}
    if waiting.get("reason") == "CrashLoopBackOff" and ended:
        # A log tail (FallbackToLogsOnError): its end says why, so the end is what is kept.
        head = f"last run ended with exit code {ended.get('exitCode')}"
        detail = " ".join(str(ended.get("message") or ended.get("reason") or "").split())
        room = WAITING_MESSAGE_MAX - len(head) - 2
        if len(detail) > room:
            detail = "..." + detail[-(room - 3) :]
        return f"{head}: {detail}" if detail else head
    text = " ".join(str(waiting.get("message") or "").split())
    return text if len(text) <= WAITING_MESSAGE_MAX else text[: WAITING_MESSAGE_MAX - 3] + "..."


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """What the operator knows about one node's ability to keep running replicas.

    `exists` and `ready` come from the Node object; `agent_up` and `unhealthy_gpus` from the GPU
    pool. `agent_known` is False until the pool has heard from the node's agent at least once, so
    a freshly started operator does not mistake "not polled yet" for "agent down".
    `agent_missing` is True once no agent pod has been discovered on the node for longer than
    the missing-agent grace (the agent pod was deleted, or never came back after a rollout).
    """

    exists: bool = True
    ready: bool = True
    agent_known: bool = False
    agent_up: bool = True
    agent_missing: bool = False
    unhealthy_gpus: frozenset[str] = field(default_factory=frozenset)


def parse_node_ready(node: Mapping[str, Any]) -> bool:
    """True when the Node's Ready condition is True (an unknown kubelet counts as not ready)."""
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """The parts of a Node object placement and failure detection read."""

    name: str
    ready: bool
    schedulable: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[tuple[str, str, str], ...] = ()  # (key, value, effect)
    # status.allocatable["nvidia.com/gpu"]: the healthy devices the device plugin advertises;
    # None when the Node does not list the resource (no plugin has registered: unknown).
    gpu_allocatable: int | None = None
    # status.allocatable cpu, memory and pods; None while the Node lists no CPU or memory.
    allocatable: Requests | None = None


def parse_node(node: Mapping[str, Any]) -> NodeFacts:
    """NodeFacts from a Node dict."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    return NodeFacts(
        name=str(meta.get("name", "")),
        ready=parse_node_ready(node),
        schedulable=not spec.get("unschedulable", False),
        labels=dict(meta.get("labels") or {}),
        taints=tuple(
            (str(t.get("key", "")), str(t.get("value") or ""), str(t.get("effect", "")))
            for t in spec.get("taints") or []
        ),
        gpu_allocatable=_count(((node.get("status") or {}).get("allocatable") or {}).get(GPU)),
        allocatable=parse_allocatable(node),
    )


def _count(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def compute_last_use_time(
    annotations: Mapping[str, str], creation_timestamp: str | None
) -> datetime | None:
    """Start of the idle clock and the LRU order: the latest request or demand, else creation."""
    used = [
        t
        for t in (
            parse_time(annotations.get(L.ANN_LAST_REQUEST)),
            parse_time(annotations.get(L.ANN_DEMAND)),
        )
        if t is not None
    ]
    return max(used) if used else parse_time(creation_timestamp)


@dataclass(frozen=True, slots=True)
class DeploymentEntry:
    """A ModelDeployment as the operator's index holds it: the body and its last use (epoch s)."""

    body: Mapping[str, Any]
    last_used: float


def parse_deployment(body: Mapping[str, Any]) -> DeploymentEntry:
    """The index entry of a ModelDeployment body (cheap: no validation here)."""
    meta = body.get("metadata") or {}
    last = compute_last_use_time(meta.get("annotations") or {}, meta.get("creationTimestamp"))
    kept = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}
    return DeploymentEntry(body=kept, last_used=last.timestamp() if last else 0.0)


def parse_service(svc: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Service the operator keeps in shape: selector and ports."""
    spec = svc.get("spec") or {}
    return {
        "selector": dict(spec.get("selector") or {}),
        "ports": [
            {k: p.get(k) for k in ("name", "port", "targetPort", "protocol")}
            for p in spec.get("ports") or []
        ],
    }


def with_assigned_gpus(
    pods: Iterable[ObservedPod], assigned: Mapping[tuple[str, str], tuple[str, ...]]
) -> list[ObservedPod]:
    """`pods` with the GPUs the nodes report for them (namespace, name -> global GPU IDs); a pod
    no agent reports keeps what was recorded on it."""
    out = []
    for pod in pods:
        gpus = assigned.get(pod.key) or pod.recorded_assigned
        out.append(replace(pod, assigned_gpus=gpus) if gpus != pod.assigned_gpus else pod)
    return out


def compute_assignment_records(pods: Iterable[ObservedPod]) -> list[ObservedPod]:
    """Replicas whose assigned GPUs are known but not (or differently) recorded on the Pod."""
    return [
        p
        for p in pods
        if p.assigned_gpus and p.assigned_gpus != p.recorded_assigned and not p.deleting
    ]
