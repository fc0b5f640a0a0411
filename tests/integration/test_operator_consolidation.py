"""Consolidation on the local control plane, watched Pod by Pod: a large model that fits on no
node gets room by moving one replica of another deployment make-before-break, with that
deployment never below any of its replicas Ready (so never below its floor) and nothing evicted,
although an eviction could have made the same room."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from clusterkit import wait_for
from operator_kit import Operators, events_of, md, replica_pods, wait_ready
from test_operator_eviction import pod_log

from modelfleet.api import labels as L
from modelfleet.kube.client import KubeClient
from modelfleet.kube.paths import md_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@contextlib.asynccontextmanager
async def condition_log(
    kube: KubeClient, namespace: str, name: str, seen: list[str]
) -> AsyncIterator[None]:
    """Every Available reason `name` shows while the block runs, sampled every 100 ms."""

    async def sample() -> None:
        while True:
            with contextlib.suppress(Exception):
                obj = await kube.get(md_path(namespace, name))
                for cond in (obj.get("status") or {}).get("conditions") or []:
                    if cond["type"] == "Available" and (not seen or seen[-1] != cond["reason"]):
                        seen.append(cond["reason"])
            await asyncio.sleep(0.1)

    task = asyncio.create_task(sample())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_large_model_gets_room_by_consolidation_not_eviction(
    kube: KubeClient, namespace: str, gpus: object, operators: Operators
) -> None:
    await gpus(2, 4)  # type: ignore[operator]
    operators.start()
    # Spread puts one 2-GPU replica of `small` on each node: 4 GPUs free, but 2 per node.
    # minReplicas 1 and a lower priority: evicting one of them would also make room.
    await kube.create(
        md_path(namespace), md("small", replicas=2, minReplicas=1, priority=0, gpu={"count": 2})
    )
    await wait_ready(kube, namespace, "small", 2)
    before = {
        p["metadata"]["name"]: p["spec"]["nodeName"]
        for p in await replica_pods(kube, namespace, "small")
    }
    assert len(set(before.values())) == 2, before
    # The floor the watcher holds `small` to is every replica it has: none may be down at any
    # moment, not only its minReplicas.
    big_reasons: list[str] = []
    async with (
        pod_log(kube, namespace, {"small": 2}) as log,
        condition_log(kube, namespace, "big", big_reasons),
    ):

        async def first_listing() -> bool:
            return log.samples >= 1

        # Both replicas are seen Ready before `big` exists: from then on, one fewer is a failure.
        await wait_for(first_listing, timeout=30, interval=0.05, what="the first Pod listing")
        await kube.create(md_path(namespace), md("big", replicas=1, priority=10, gpu={"count": 4}))
        await wait_ready(kube, namespace, "big", 1, deadline_s=120)
        await wait_ready(kube, namespace, "small", 2)
        seen = log.samples

        async def ten_more() -> bool:
            return log.samples >= seen + 10

        await wait_for(ten_more, timeout=30, interval=0.05, what="ten more Pod listings")

    assert log.below_floor == []
    # Exactly one replica of `small` went, and only after its copy (a new instance) was Ready.
    deleted = sorted(log.deleted.values())
    assert len(deleted) == 1, deleted
    assert deleted[0] in before
    after = {p["metadata"]["name"]: p for p in await replica_pods(kube, namespace, "small")}
    assert sorted(after) == sorted(set(before) - set(deleted) | {"small-instance-3"})
    copy = after["small-instance-3"]["metadata"]["annotations"]
    assert copy[L.ANN_MOVE_OF] == deleted[0]
    assert copy[L.ANN_MOVE_FOR] == f"{namespace}/big"
    # Both of `small`'s replicas now share one node; `big` has the other one whole.
    (big,) = await replica_pods(kube, namespace, "big")
    moved_from = before[deleted[0]]
    assert big["spec"]["nodeName"] == moved_from
    assert {p["spec"]["nodeName"] for p in after.values()} == {
        n for n in before.values() if n != moved_from
    }
    # Nothing was evicted; `big` said it waited for a consolidation; Events on both.
    small_obj = await kube.get(md_path(namespace, "small"))
    assert L.ANN_EVICTED_AT not in (small_obj["metadata"].get("annotations") or {})
    assert "Consolidating" in big_reasons, big_reasons
    small_events = {e["reason"] for e in await events_of(kube, namespace, "small")}
    big_events = {e["reason"] for e in await events_of(kube, namespace, "big")}
    assert "Moved" in small_events, small_events
    assert "Evicted" not in small_events
    assert "Consolidating" in big_events, big_events
    big_obj = await kube.get(md_path(namespace, "big"))
    assert L.ANN_RESERVATION not in (big_obj["metadata"].get("annotations") or {})
