"""LRU eviction on a full cluster, watched Pod by Pod: the exact victims, no deployment below its
floor, no deletion the placement did not need, no victim back on GPUs reserved for another, also
when the operator restarts between the eviction and the evictor's create."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clusterkit import wait_for
from operator_kit import Operators, conditions, md, pod_ready, replica_pods, wait_ready

from modelfleet.api import labels as L
from modelfleet.kube.client import KubeClient
from modelfleet.kube.paths import md_path, pods_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TWO_GPUS = {"count": 2}


def _ago(hours: float) -> str:
    return (datetime.now(UTC) - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PodLog:
    """Every replica Pod seen in the namespace, sampled every 100 ms for the whole test."""

    seen: dict[str, tuple[str, str]] = field(default_factory=dict)  # uid -> (pod, deployment)
    deleted: dict[str, str] = field(default_factory=dict)  # uid -> pod name
    below_floor: list[str] = field(default_factory=list)
    gpus_by_uid: dict[str, str] = field(default_factory=dict)
    samples: int = 0  # how many listings were taken so far

    def deleted_of(self, deployment: str) -> list[str]:
        return sorted(n for uid, n in self.deleted.items() if self.seen[uid][1] == deployment)


@contextlib.asynccontextmanager
async def pod_log(
    kube: KubeClient, namespace: str, floors: dict[str, int]
) -> AsyncIterator[PodLog]:
    """Sample the namespace's replica Pods until the block ends (bounded by the test timeout)."""
    log = PodLog()
    armed: set[str] = set()  # deployments whose floor was reached once (then it must hold)

    async def sample() -> None:
        while True:
            listing = await kube.list(
                pods_path(namespace), labelSelector=f"{L.LABEL_COMPONENT}={L.COMPONENT_REPLICA}"
            )
            ready: dict[str, int] = {}
            for pod in listing["items"]:
                meta = pod["metadata"]
                dep = meta["labels"][L.LABEL_DEPLOYMENT]
                log.seen.setdefault(meta["uid"], (meta["name"], dep))
                # The GPUs the node's device manager gave it once the operator recorded them
                # (the plan may name others: the simulated kubelet assigns by its own rule).
                ann = meta["annotations"]
                log.gpus_by_uid[meta["uid"]] = ann.get(L.ANN_ASSIGNED_GPUS) or ann.get(
                    L.ANN_GPUS, ""
                )
                if meta.get("deletionTimestamp"):
                    log.deleted[meta["uid"]] = meta["name"]
                elif pod_ready(pod):
                    ready[dep] = ready.get(dep, 0) + 1
            present = {p["metadata"]["uid"] for p in listing["items"]}
            for uid, (name, _) in log.seen.items():
                if uid not in present:
                    log.deleted.setdefault(uid, name)
            for dep, floor in floors.items():
                if ready.get(dep, 0) >= floor:
                    armed.add(dep)
                elif dep in armed:
                    log.below_floor.append(f"{dep}: {ready.get(dep, 0)} ready < {floor}")
            log.samples += 1
            await asyncio.sleep(0.1)

    task = asyncio.create_task(sample())
    try:
        yield log
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _fill(kube: KubeClient, namespace: str) -> None:
    """Three nodes x 4 GPUs, six 2-GPU replicas of four deployments: the cluster is full."""
    specs = {
        # The least recently used ones of the lowest priority: the expected victims.
        "low-old": {"replicas": 2, "priority": 0, "used": 6.0},
        # Older still, but at its floor: never a victim.
        "floor": {"replicas": 2, "minReplicas": 2, "priority": 0, "used": 7.0},
        # Same priority, used just now: it goes only if nothing older may.
        "recent": {"replicas": 1, "priority": 0, "used": 0.0},
        # The oldest of all, but of a higher priority than the newcomer.
        "high": {"replicas": 1, "priority": 100, "used": 8.0},
    }
    for name, spec in specs.items():
        used = spec.pop("used")
        body = md(name, gpu=TWO_GPUS, annotations={L.ANN_LAST_REQUEST: _ago(used)}, **spec)
        await kube.create(md_path(namespace), body)
    for name, spec in specs.items():
        await wait_ready(kube, namespace, name, int(spec["replicas"]))


async def _assert_outcome(kube: KubeClient, namespace: str, log: PodLog) -> None:
    await wait_ready(kube, namespace, "newcomer", 2, deadline_s=90)
    for name, count in (("floor", 2), ("recent", 1), ("high", 1)):
        await wait_ready(kube, namespace, name, count)

    async def low_old_waits() -> bool:
        obj = await kube.get(md_path(namespace, "low-old"))
        return conditions(obj).get("Available", ("", ""))[1] == "Evicted"

    await wait_for(low_old_waits, timeout=30, what="low-old reports Evicted")
    # A last look: ten more listings, and nothing else may be deleted after the newcomer is up.
    seen = log.samples

    async def ten_more() -> bool:
        return log.samples >= seen + 10

    await wait_for(ten_more, timeout=30, interval=0.05, what="ten more Pod listings")
    assert log.deleted_of("low-old") == ["low-old-instance-1", "low-old-instance-2"]
    assert sorted(log.deleted.values()) == ["low-old-instance-1", "low-old-instance-2"]
    assert log.below_floor == []
    assert await replica_pods(kube, namespace, "low-old") == []
    # Every Pod ever created: the victims' GPUs went to the newcomer and to nobody else.
    victims = {log.gpus_by_uid[u] for u, n in log.deleted.items()}
    newcomer = {log.gpus_by_uid[u] for u, (_, d) in log.seen.items() if d == "newcomer"}
    assert newcomer == victims
    live = [n for u, (n, _) in log.seen.items() if u not in log.deleted]
    assert len(live) == len(set(live)) == 6  # six replicas, no name twice


async def test_newcomer_evicts_exactly_the_lru_replicas_it_needs(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(3, 4)
    operators.start()
    await _fill(kube, namespace)
    async with pod_log(kube, namespace, {"floor": 2, "recent": 1, "high": 1}) as log:
        await kube.create(md_path(namespace), md("newcomer", replicas=2, priority=10, gpu=TWO_GPUS))
        await _assert_outcome(kube, namespace, log)


async def test_operator_restart_between_eviction_and_create_keeps_the_reservation(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(3, 4)
    first = operators.start()
    await _fill(kube, namespace)
    async with pod_log(kube, namespace, {"floor": 2, "recent": 1, "high": 1}) as log:
        await kube.create(md_path(namespace), md("newcomer", replicas=2, priority=10, gpu=TWO_GPUS))

        async def first_eviction() -> bool:
            return bool(log.deleted)

        await wait_for(first_eviction, timeout=60, interval=0.05, what="the first eviction")
        first.kill()
        obj = await kube.get(md_path(namespace, "newcomer"))
        reserved = obj["metadata"].get("annotations", {}).get(L.ANN_RESERVATION)
        operators.start()
        await _assert_outcome(kube, namespace, log)
        # The reservation outlived the operator that made it, and is gone once used.
        assert reserved is not None
        obj = await kube.get(md_path(namespace, "newcomer"))
        assert L.ANN_RESERVATION not in obj["metadata"].get("annotations", {})
