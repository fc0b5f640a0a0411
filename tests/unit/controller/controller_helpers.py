"""Shared builders for the controller's pure tests: deployments, pods and a scripted placer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from modelfleet.api import ModelDeployment
from modelfleet.api.gpustats import GpuReport, GpuStats, PodRef
from modelfleet.controller.builders import PodDefaults
from modelfleet.controller.decisions import Decision, Placed, PlacementRequest, Placer
from modelfleet.controller.observed import NodeFacts, NodeHealth, ObservedPod, instance_name
from modelfleet.controller.place import compute_eviction_mark, compute_unused_reservation, place
from modelfleet.controller.plan import Plan, compute_plan
from modelfleet.controller.reservations import Reservation
from modelfleet.gpus.health import EndpointState
from modelfleet.gpus.snapshot import EndpointSample, PoolSnapshot, build_snapshot

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
    unseen_nodes: tuple[str, ...] = (),
    reserved: Reservation | None = None,
) -> Plan:
    """The two pure planning steps as the reconcile runs them: plan, then place."""
    plan = compute_plan(md, pods, health, now, template_hash)
    if not plan.to_place:
        return plan
    return place(
        plan,
        md,
        placer,
        defaults=PodDefaults(image=IMAGE),
        now=now,
        deleting=deleting,
        mark=compute_eviction_mark(md),
        unseen_nodes=unseen_nodes,
        reserved=compute_unused_reservation(reserved, pods),
    )


T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
H100 = "NVIDIA-H100-80GB-HBM3"


def report(
    node: str, gpus: int, used: dict[int, tuple[int, list[PodRef]]] | None = None
) -> GpuReport:
    used = used or {}
    return GpuReport(
        node=node,
        backend="simulated",
        sampled_at=T0,
        poll_interval_s=5,
        gpus=[
            GpuStats(
                index=i,
                gpu_id=f"{node}:{i}",
                uuid=f"GPU-{node}-{i}",
                product=H100,
                memory_total_mib=81559,
                memory_used_mib=used.get(i, (0, []))[0],
                memory_free_mib=81559 - used.get(i, (0, []))[0],
                pods=used.get(i, (0, []))[1],
            )
            for i in range(gpus)
        ],
    )


def snapshot(*reports: GpuReport, down: tuple[str, ...] = ()) -> PoolSnapshot:
    samples = [
        EndpointSample(
            url=f"http://127.0.0.{i + 1}:9400",
            node=r.node,
            state=EndpointState.DOWN if r.node in down else EndpointState.HEALTHY,
            report=r,
            last_success_at=T0,
        )
        for i, r in enumerate(reports)
    ]
    return build_snapshot(samples, taken_at=T0)


def facts(*names: str, ready: bool = True) -> dict[str, NodeFacts]:
    return {
        n: NodeFacts(name=n, ready=ready, labels={"nvidia.com/gpu.product": H100}) for n in names
    }
