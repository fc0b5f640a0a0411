"""ModelDeployment status from the observed Pods and the plan. Pure.

Conditions follow the Kubernetes convention: Available, Progressing, Degraded and Routed (does
the gateway route the served name here, or does an older deployment hold it), each with one
CamelCase reason a person can act on. A condition keeps its lastTransitionTime while its status
stays the same, so recomputing an unchanged state yields an identical status and nothing is
written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from modelfleet.api import (
    Condition,
    ConditionStatus,
    ConditionType,
    Instance,
    ModelDeployment,
    ModelDeploymentStatus,
)
from modelfleet.api.times import format_time
from modelfleet.controller.builders import selector_string
from modelfleet.controller.observed import ObservedPod
from modelfleet.controller.plan import BROKEN_WAITING, EventSpec, FailureKind, Plan, Reason

# Container waiting reasons that mean "this replica will not come up by itself".
_BROKEN = BROKEN_WAITING


def compute_measured_footprint_mib(
    pods: Sequence[ObservedPod], gpu_used_mib: Mapping[str, int]
) -> int | None:
    """GPU memory per GPU used by the first ready discovery-run replica, from the pool's stats.

    A discovery run is a replica placed without a known footprint (empty footprint annotation);
    it had its GPUs to itself, so what the GPU reports in use is what the model needs.
    """
    for pod in sorted(pods, key=lambda p: p.ordinal):
        if not pod.ready or pod.deleting or pod.footprint_mib is not None or not pod.gpus:
            continue
        used = [gpu_used_mib[g] for g in pod.gpus if g in gpu_used_mib]
        if used and max(used) > 0:
            return max(used)
    return None


def _instance(pod: ObservedPod, deleting: Mapping[str, str]) -> Instance:
    if pod.deleting or pod.name in deleting:
        phase, reason = "Terminating", deleting.get(pod.name, "Deleted")
    elif pod.failed:
        phase, reason = "Failed", pod.phase
    elif pod.ready:
        phase, reason = "Ready", ""
    elif pod.phase == "Running":
        phase, reason = "Starting", pod.waiting_reason or "WaitingForHealth"
    else:
        phase, reason = "Pending", pod.waiting_reason or "Bound"
    return Instance(
        name=pod.name,
        message=pod.waiting_message if reason == pod.waiting_reason else "",
        node=pod.node,
        gpus=list(pod.gpus),
        planned_gpus=list(pod.gpu_ids) if pod.assignment_differs else [],
        phase=phase,
        reason=reason,
        started_at=pod.ready_since if phase == "Ready" else None,
    )


def _cond(kind: ConditionType, ok: bool, reason: str, message: str) -> Condition:
    return Condition(
        type=kind.value,
        status=ConditionStatus.TRUE if ok else ConditionStatus.FALSE,
        reason=reason,
        message=message,
    )


def compute_status(
    md: ModelDeployment,
    pods: Sequence[ObservedPod],
    plan: Plan,
    now: datetime,
    measured_footprint_mib: int | None = None,
    *,
    name_holder: tuple[str, str] | None = None,
) -> ModelDeploymentStatus:
    """The status to write after `plan` is applied to `pods`.

    `name_holder` is the ModelDeployment that holds the served name (runtime.name_holder);
    None: this one.
    """
    instances = _instances(md, pods, plan)
    live = [i for i in instances if i.phase not in ("Terminating", "Failed")]
    ready = sum(1 for i in live if i.phase == "Ready")
    target = plan.target
    available = _available(md, plan, live, ready)
    progressing = _progressing(plan, live, ready)
    degraded = _degraded(plan, live, ready)
    conditions = [available, progressing, degraded, _routed(md, name_holder)]
    if target == 0 and not live:
        phase, reason = "ScaledToZero", available.reason
    elif degraded.status == ConditionStatus.TRUE:
        phase, reason = ("Degraded" if ready else "Pending"), degraded.reason
    elif ready >= target and len(live) == target and progressing.reason == "Complete":
        phase, reason = "Ready", ""
    else:
        phase, reason = "Progressing", progressing.reason

    footprint = md.status.footprint
    if footprint is None and measured_footprint_mib is not None:
        footprint = f"{measured_footprint_mib}Mi"

    return ModelDeploymentStatus(
        replicas=len(live),
        ready_replicas=ready,
        instances=instances,
        footprint=footprint,
        conditions=_keep_transition_times(conditions, md.status.conditions, now, md),
        observed_generation=md.metadata.generation,
        selector=selector_string(md.metadata.name),
        phase=phase,
        reason=reason,
    )


def _instances(md: ModelDeployment, pods: Sequence[ObservedPod], plan: Plan) -> list[Instance]:
    deleting = {d.name: d.reason for d in plan.to_delete if d.deployment == md.metadata.name}
    instances = [_instance(p, deleting) for p in sorted(pods, key=lambda p: p.ordinal)]
    for create in plan.to_create:
        instances.append(
            Instance(
                name=create.name,
                node=create.placed.node,
                gpus=list(create.placed.gpu_ids),
                phase="Pending",
                reason="Created",
            )
        )
    instances.sort(key=lambda i: int(i.name.rsplit("-", 1)[-1]))
    return instances


def _available(md: ModelDeployment, plan: Plan, live: list[Instance], ready: int) -> Condition:
    """Can the model serve requests at all?"""
    target, blocker = plan.target, plan.blocker
    if target == 0 and not live:
        why = (
            f"idle for longer than {md.spec.idle_timeout}; a request scales it back up"
            if plan.target_reason == Reason.IDLE
            else (
                "switched off by spec.replicas: 0; the gateway refuses its requests until it is "
                f"scaled up (kubectl scale modeldeployment/{md.metadata.name} --replicas=1)"
            )
        )
        return _cond(ConditionType.AVAILABLE, False, "ScaledToZero", why)
    if ready > 0:
        return _cond(
            ConditionType.AVAILABLE, True, "ReplicasReady", f"{ready}/{target} replicas ready"
        )
    if blocker is not None:
        return _cond(ConditionType.AVAILABLE, False, blocker.reason, blocker.message)
    return _cond(ConditionType.AVAILABLE, False, "NoReplicaReady", f"0/{target} replicas ready")


def _progressing(plan: Plan, live: list[Instance], ready: int) -> Condition:
    """Is the operator still moving towards the spec, or stuck?"""
    target, blocker = plan.target, plan.blocker
    failures = [d for d in plan.to_delete if isinstance(d.reason, FailureKind)]
    starting = [i for i in live if i.phase in ("Pending", "Starting")]
    kind = ConditionType.PROGRESSING
    if blocker is not None and blocker.reason not in (Reason.EVICTING, Reason.CONSOLIDATING):
        return _cond(kind, False, blocker.reason, blocker.message)
    if plan.rolling:
        return _cond(kind, True, "RollingUpdate", "replacing replicas one at a time")
    if failures:
        text = "; ".join(f"{d.name}: {d.message}" for d in failures)
        return _cond(kind, True, "Replacing", text)
    if blocker is not None:
        return _cond(kind, True, blocker.reason, blocker.message)
    if plan.to_create or plan.waiting_for or len(live) < target:
        return _cond(kind, True, "ScalingUp", f"{len(live)}/{target} replicas exist")
    scaling_down = any(d.reason in (Reason.SCALE_DOWN, Reason.IDLE) for d in plan.to_delete)
    if len(live) > target or scaling_down:
        return _cond(kind, True, "ScalingDown", f"scaling down to {target}")
    if starting:
        names = ", ".join(i.name for i in starting)
        return _cond(kind, True, "Starting", f"{len(starting)} replica(s) starting: {names}")
    return _cond(kind, False, "Complete", f"{ready}/{target} replicas ready")


def _degraded(plan: Plan, live: list[Instance], ready: int) -> Condition:
    """Fewer ready replicas than wanted, for a reason someone should look at?"""
    failures = [d for d in plan.to_delete if isinstance(d.reason, FailureKind)]
    broken = [i for i in live if i.reason in _BROKEN]
    kind = ConditionType.DEGRADED
    if failures:
        text = "; ".join(f"{d.name}: {d.message}" for d in failures)
        return _cond(kind, True, failures[0].reason, text)
    if broken:
        return _cond(
            kind,
            True,
            broken[0].reason,
            ", ".join(
                f"{i.name} is {i.reason}" + (f" ({i.message})" if i.message else "") for i in broken
            ),
        )
    if plan.blocker is not None and ready < plan.target:
        return _cond(kind, True, plan.blocker.reason, plan.blocker.message)
    return _cond(kind, False, "AsExpected", "")


def _holder_text(holder: tuple[str, str]) -> str:
    return f"{holder[0]}/{holder[1]}"


def build_name_taken_message(md: ModelDeployment, holder: tuple[str, str]) -> str:
    """Why the gateway does not route a deployment whose served name an older one holds."""
    return (
        f"served model name {md.served_name} is held by ModelDeployment {_holder_text(holder)}, "
        "created earlier; the gateway routes the name there and never here. Give this one its "
        "own spec.servedModelName, or delete the other"
    )


def _is_holder(md: ModelDeployment, holder: tuple[str, str] | None) -> bool:
    return holder is None or holder == (md.metadata.namespace or "", md.metadata.name)


def _routed(md: ModelDeployment, holder: tuple[str, str] | None) -> Condition:
    """Does the gateway route the served name to this deployment?"""
    if holder is None or _is_holder(md, holder):
        return _cond(
            ConditionType.ROUTED,
            True,
            Reason.SERVED_NAME_HELD,
            f"the gateway routes model {md.served_name} here",
        )
    message = build_name_taken_message(md, holder)
    return _cond(ConditionType.ROUTED, False, Reason.SERVED_NAME_TAKEN, message)


def compute_name_taken_event(md: ModelDeployment, holder: tuple[str, str]) -> EventSpec | None:
    """A Warning when the served name is taken and the status does not say so yet (one Event
    per change of holder or name, not one per re-check)."""
    if _is_holder(md, holder):
        return None
    message = build_name_taken_message(md, holder)
    for cond in md.status.conditions:
        if cond.type == ConditionType.ROUTED and cond.message == message:
            return None
    namespace, name = md.metadata.namespace or "", md.metadata.name
    return EventSpec(namespace, name, "Warning", Reason.SERVED_NAME_TAKEN, message)


def _keep_transition_times(
    new: list[Condition], old: Sequence[Condition], now: datetime, md: ModelDeployment
) -> list[Condition]:
    previous = {c.type: c for c in old}
    out = []
    for cond in new:
        before = previous.get(cond.type)
        since = (
            before.last_transition_time
            if before is not None and before.status == cond.status and before.last_transition_time
            else now.replace(microsecond=0)
        )
        out.append(
            cond.model_copy(
                update={
                    "last_transition_time": since,
                    "observed_generation": md.metadata.generation,
                }
            )
        )
    return out


def status_changed(old: ModelDeploymentStatus, new: ModelDeploymentStatus) -> bool:
    """True when writing `new` would change what the API server holds."""
    return bool(dump_status(old) != dump_status(new))


def dump_status(status: ModelDeploymentStatus) -> dict[str, object]:
    """The reconcile's part of the status as the API server stores it (camelCase, no nulls).

    status.autoscaling is the autoscaler's (autoscale_loop.py) and left out: the reconcile writes
    a merge patch of what this returns, so it never sends back the autoscaler's decision as it
    read it (which would undo a newer one) and never drops it either.
    """
    return status.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"autoscaling"})


def describe_invalid(errors: Sequence[Mapping[str, Any]]) -> str:
    """pydantic's errors as one line a person can act on: `field.path: what is wrong; ...`."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ())) or "the object"
        what = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {what}")
    return "; ".join(parts)


def compute_invalid_status(
    body: Mapping[str, Any], message: str, now: datetime, reason: Reason = Reason.INVALID_SPEC
) -> dict[str, Any]:
    """The status of a ModelDeployment whose spec the operator cannot run (the API server let it
    in: created before a stricter CRD, or a rule only the operator checks)."""
    meta = body.get("metadata") or {}
    old = {
        c.get("type"): c
        for c in ((body.get("status") or {}).get("conditions") or [])
        if isinstance(c, Mapping)
    }
    generation = meta.get("generation")
    conditions = []
    for kind, status in (
        (ConditionType.AVAILABLE, "False"),
        (ConditionType.PROGRESSING, "False"),
        (ConditionType.DEGRADED, "True"),
    ):
        before = old.get(kind.value) or {}
        since = before.get("lastTransitionTime") if before.get("status") == status else None
        conditions.append(
            {
                "type": kind.value,
                "status": status,
                "reason": reason.value,
                "message": message,
                "lastTransitionTime": since or format_time(now),
                **({"observedGeneration": generation} if generation is not None else {}),
            }
        )
    return {
        "phase": "Invalid",
        "reason": reason.value,
        "conditions": conditions,
        **({"observedGeneration": generation} if generation is not None else {}),
    }
