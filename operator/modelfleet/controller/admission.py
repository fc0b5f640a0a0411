"""Nodes whose kubelet rejected a replica at admission, and how long placement leaves them alone.

The operator binds replica Pods with spec.nodeName, so no scheduler stands between its belief
and the kubelet: when the node cannot admit the Pod (its device manager has fewer free GPUs
than the operator counted, a kubelet restart left no healthy devices yet, CPU or memory ran
out), the Pod ends Failed at once. Recreating it on the same node at once would loop, a Warning
Event each turn. Instead each rejection puts the node in backoff: 30 s, doubling on each further
rejection up to 10 minutes, forgotten once a replica created after the rejection runs there.
Placement skips a node in backoff (and says so in its reason), so the replacement goes to
another node or waits.

State lives in this process only: after a restart the operator may try a node once more, which
costs one rejection, not a loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from modelfleet.api.units import format_duration
from modelfleet.controller.observed import NodeHealth, ObservedPod
from modelfleet.controller.plan import EventSpec, Reason

BASE_BACKOFF = timedelta(seconds=30)
MAX_BACKOFF = timedelta(minutes=10)
_SEEN_LIMIT = 4096  # rejected Pod UIDs remembered, so each one counts once
# The reason of a backoff started by an unhealthy GPU the device manager handed out.
UNHEALTHY_ASSIGNED = "AssignedUnhealthyGpu"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A node's latest rejection and the backoff it started."""

    node: str
    pod: str  # namespace/name of the rejected Pod
    reason: str  # the Pod's status.reason
    message: str  # the Pod's status.message
    at: datetime
    delay: timedelta

    @property
    def until(self) -> datetime:
        return self.at + self.delay

    @property
    def what(self) -> str:
        if self.reason == UNHEALTHY_ASSIGNED:
            return "gave a replica an unhealthy GPU"
        return "rejected a replica at admission"

    def describe(self, now: datetime) -> str:
        """For placement reasons and status: what happened and when it is tried again."""
        left = max(self.until - now, timedelta(0))
        return (
            f"{self.what} ({self.reason}: {self.message or 'no message'}); "
            f"no replica goes there for {format_duration(left)}"
        )


class AdmissionBackoff:
    """Rejections per node, from the replica Pods the reconciles observe."""

    def __init__(self, base: timedelta = BASE_BACKOFF, ceiling: timedelta = MAX_BACKOFF) -> None:
        self.base = base
        self.ceiling = ceiling
        self._latest: dict[str, Rejection] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def observe(self, pods: Iterable[ObservedPod], now: datetime) -> list[Rejection]:
        """Record every rejection not seen before; forget a node's backoff once a replica
        created after its latest rejection runs there. Returns the new rejections."""
        new: list[Rejection] = []
        running: list[ObservedPod] = []
        for pod in pods:
            if pod.node is None:
                continue
            if pod.rejected_at_admission:
                if pod.uid and pod.uid not in self._seen:
                    self._remember(pod.uid)
                    new.append(self.record(pod, now))
            elif pod.phase == "Running":
                running.append(pod)
        for pod in running:
            latest = self._latest.get(pod.node or "")
            if latest is not None and pod.created_at is not None and pod.created_at > latest.at:
                del self._latest[latest.node]
        return new

    def observe_unhealthy_assignments(
        self, pods: Iterable[ObservedPod], health: Mapping[str, NodeHealth], now: datetime
    ) -> list[Rejection]:
        """Replicas the node's device manager handed a GPU its agent reports unhealthy, which
        placement had not planned: the device plugin still advertises that GPU, so any replica
        placed on the node may get it again. The node backs off like one that rejected a
        replica; without it, the replacement is placed there again and replaced again, in a
        loop. Each Pod counts once. Returns the new ones."""
        new: list[Rejection] = []
        for pod in pods:
            node = health.get(pod.node or "")
            if node is None or not pod.uid or pod.uid in self._seen or pod.deleting:
                continue
            handed = [g for g in pod.assigned_gpus if g in node.unhealthy_gpus]
            if not handed or any(g in pod.gpu_ids for g in handed):
                continue
            self._remember(pod.uid)
            new.append(
                self.record(
                    pod,
                    now,
                    reason=UNHEALTHY_ASSIGNED,
                    message=(
                        f"its device manager assigned {', '.join(handed)}, which the agent "
                        f"reports unhealthy, instead of the planned {', '.join(pod.gpu_ids)}; "
                        "the device plugin still advertises the GPU"
                    ),
                )
            )
        return new

    def record(
        self, pod: ObservedPod, now: datetime, *, reason: str = "", message: str = ""
    ) -> Rejection:
        node = pod.node or ""
        previous = self._latest.get(node)
        delay = self.base if previous is None else min(previous.delay * 2, self.ceiling)
        rejection = Rejection(
            node=node,
            pod=f"{pod.namespace}/{pod.name}",
            reason=reason or pod.reason,
            message=message or pod.message,
            at=now,
            delay=delay,
        )
        self._latest[node] = rejection
        return rejection

    def blocked(self, now: datetime) -> dict[str, str]:
        """Node -> why placement skips it now, for the nodes still in backoff."""
        return {n: r.describe(now) for n, r in self._latest.items() if r.until > now}

    def _remember(self, uid: str) -> None:
        self._seen[uid] = None
        while len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)


def build_rejection_event(deployment: tuple[str, str], rejection: Rejection) -> EventSpec:
    """The Warning a person reads on the ModelDeployment."""
    r = rejection
    return EventSpec(
        deployment[0],
        deployment[1],
        "Warning",
        Reason.ADMISSION_REJECTED,
        f"node {r.node} {r.what.replace('a replica', r.pod)} "
        f"({r.reason}: {r.message or 'no message'}); "
        f"no replica goes there for {format_duration(r.delay)}: the replacement goes to another "
        "node or waits",
    )


def build_assignment_event(deployment: tuple[str, str], pod: ObservedPod) -> EventSpec:
    """The node's device manager chose other GPUs than placement planned: the node's word wins
    (status, the ledger and health replacement follow it), which is news, not an error."""
    return EventSpec(
        deployment[0],
        deployment[1],
        "Normal",
        Reason.GPUS_ASSIGNED,
        f"node {pod.node} gave {pod.name} GPUs {', '.join(pod.assigned_gpus)} (placement planned "
        f"{', '.join(pod.gpu_ids)}); status, placement and health checks follow the node",
    )
