"""Shared builders for the controller's pure tests: deployments, pods and a scripted placer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from modelfleet.api import ModelDeployment
from modelfleet.controller.decisions import Decision, Placed, PlacementRequest, Placer
from modelfleet.controller.observed import NodeHealth, ObservedPod, instance_name
from modelfleet.controller.place import compute_eviction_mark, place
from modelfleet.controller.plan import Plan, compute_plan

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
HASH = "current-hash"
IMAGE = "vllm/vllm-openai:v0.11.0"


def make_md(name: str = "gemma", uid: str = "uid-1", **spec: Any) -> ModelDeployment:
    annotations = spec.pop("annotations", {})
    created = spec.pop("created", NOW - timedelta(hours=1))
    status = spec.pop("status", {})
    return ModelDeployment.model_validate(
        {
            "metadata": {
                "name": name,
                "namespace": "ns",
                "uid": uid,
                "generation": 3,
                "annotations": annotations,
                "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "spec": {"model": "google/gemma-3-4b-it", **spec},
            "status": status,
        }
    )


def pod(
    n: int,
    *,
    deployment: str = "gemma",
    node: str = "node-a",
    ready: bool = True,
    phase: str = "Running",
    deleting: bool = False,
    template_hash: str = HASH,
    gpus: tuple[str, ...] | None = None,
    owner_uid: str = "uid-1",
    footprint_mib: int | None = 20480,
    waiting_reason: str = "",
    ready_since: datetime | None = None,
) -> ObservedPod:
    return ObservedPod(
        name=instance_name(deployment, n),
        namespace="ns",
        uid=f"pod-uid-{deployment}-{n}",
        deployment=deployment,
        ordinal=n,
        node=node,
        phase=phase,
        ready=ready,
        ready_since=(ready_since or NOW - timedelta(minutes=5)) if ready else None,
        deleting=deleting,
        deleting_since=NOW - timedelta(seconds=5) if deleting else None,
        created_at=NOW - timedelta(minutes=10),
        template_hash=template_hash,
        gpu_ids=gpus if gpus is not None else (f"{node}:{n - 1}",),
        owner_uid=owner_uid,
        footprint_mib=footprint_mib,
        waiting_reason=waiting_reason,
    )


def nodes(*names: str, **overrides: NodeHealth) -> dict[str, NodeHealth]:
    out = {n: NodeHealth(agent_known=True) for n in names}
    out.update(overrides)
    return out


@dataclass
class FreeGpus:
    """A placer for tests: takes the first free GPU, in order, skipping GPUs planned already.

    It stands in for the placement engine (tested on its own) so that plan tests exercise only
    the planner's logic.
    """

    free: list[str]
    requests: list[PlacementRequest] = field(default_factory=list)
    otherwise: Callable[[PlacementRequest], Decision] | None = None

    def __call__(self, request: PlacementRequest) -> Decision:
        self.requests.append(request)
        taken = {g for p in request.planned for g in p.gpu_ids}
        for gpu in self.free:
            if gpu not in taken:
                node = gpu.rsplit(":", 1)[0]
                return Placed(
                    node=node,
                    gpu_ids=(gpu,),
                    gpu_uuids=(f"GPU-{gpu}",),
                    gpu_memory_mib=81559,
                    footprint_mib=request.footprint_mib,
                    reason=f"{gpu} is free",
                )
        assert self.otherwise is not None, "test placer ran out of GPUs"
        return self.otherwise(request)


def plan_and_place(
    md: ModelDeployment,
    pods: list[ObservedPod],
    health: dict[str, NodeHealth],
    placer: Placer,
    now: datetime,
    *,
    template_hash: str = HASH,
    deleting: frozenset[tuple[str, str]] = frozenset(),
) -> Plan:
    """The two pure planning steps as the reconcile runs them: plan, then place."""
    plan = compute_plan(md, pods, health, now, template_hash)
    if not plan.to_place:
        return plan
    return place(
        plan,
        md,
        placer,
        default_image=IMAGE,
        now=now,
        deleting=deleting,
        mark=compute_eviction_mark(md),
    )
