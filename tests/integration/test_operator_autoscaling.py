"""The built-in autoscaler end to end: real control plane, operator and gateway processes, vLLM
stand-ins on simulated GPU nodes. Load through the gateway makes a model grow and shrink; with
autoscaling off, writes to /scale (as HPA or KEDA make them) are left as they are; a model that
cannot grow says so and stops asking; requests held at zero size the wake-up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from autoscale_kit import complete, wait_autoscaler_rounds, wait_routed
from clusterkit import Cluster, wait_for
from operator_kit import (
    GatewayProcess,
    Operators,
    conditions,
    md,
    replica_pods,
    start_gateway,
    wait_ready,
)

from modelfleet.api.held import HELD_PREFIX
from modelfleet.kube.client import KubeClient
from modelfleet.kube.paths import md_path, resource_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

# Each request keeps its replica's engine busy this long: the load the autoscaler sees.
REQUEST_S = 25


@pytest.fixture
def gateway(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway(cluster, namespace, tmp_path)
    try:
        yield gw
    finally:
        gw.stop()


async def spec_replicas(kube: KubeClient, namespace: str, name: str) -> int:
    return int((await kube.get(md_path(namespace, name)))["spec"]["replicas"])


async def test_load_through_the_gateway_makes_a_model_grow_and_shrink(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    gateway: GatewayProcess,
) -> None:
    await gpus(3, 1)
    operators.start()
    slow = [{"name": "MODELFLEET_SIM_REQUEST_LATENCY_S", "value": str(REQUEST_S)}]
    await kube.create(
        md_path(namespace),
        md(
            "chat",
            replicas=1,
            engine={"env": slow},
            autoscaling={
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 3,
                "targetPerReplica": 2,
                "scaleDownWindow": "10s",
            },
        ),
    )
    await wait_ready(kube, namespace, "chat", 1)

    async with httpx.AsyncClient(base_url=gateway.url, timeout=REQUEST_S + 60) as http:
        await wait_routed(http, "chat")

        # Six requests in flight over one replica at target 2: three replicas' worth.
        load = [asyncio.create_task(complete(http, "chat", f"request {i}")) for i in range(6)]

        async def grown() -> bool:
            return await spec_replicas(kube, namespace, "chat") == 3

        await wait_for(grown, timeout=20, what="the autoscaler raising spec.replicas to 3")
        await wait_ready(kube, namespace, "chat", 3)
        assert await asyncio.gather(*load) == [200] * 6

    # No load: after the scale-down window it goes back to minReplicas.
    async def shrunk() -> bool:
        return await spec_replicas(kube, namespace, "chat") == 1

    await wait_for(shrunk, timeout=40, what="the autoscaler lowering spec.replicas to 1")
    await wait_ready(kube, namespace, "chat", 1)


async def test_with_autoscaling_off_external_scale_writes_are_respected(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(2, 1)
    operator = operators.start()
    await kube.create(
        md_path(namespace),
        md("ext", replicas=1, autoscaling={"enabled": False, "maxReplicas": 1}),
    )
    await wait_ready(kube, namespace, "ext", 1)
    # What HPA or KEDA does: a merge patch of the scale subresource.
    scale = await kube.patch(md_path(namespace, "ext") + "/scale", {"spec": {"replicas": 2}})
    assert scale["spec"]["replicas"] == 2
    await wait_ready(kube, namespace, "ext", 2)
    # Over two autoscaler rounds after the write the count stays what the external writer set,
    # even though maxReplicas says 1: the built-in autoscaler steps aside.
    await wait_autoscaler_rounds(operator.metrics_port, 2)
    assert await spec_replicas(kube, namespace, "ext") == 2
    await wait_ready(kube, namespace, "ext", 2)


async def test_a_scale_up_on_a_full_cluster_makes_a_lower_priority_model_yield(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    gateway: GatewayProcess,
) -> None:
    await gpus(2, 1)
    operators.start()
    await kube.create(md_path(namespace), md("batch", replicas=1, priority=-10))
    await wait_ready(kube, namespace, "batch", 1)
    slow = [{"name": "MODELFLEET_SIM_REQUEST_LATENCY_S", "value": str(REQUEST_S)}]
    await kube.create(
        md_path(namespace),
        md(
            "chat",
            replicas=1,
            priority=10,
            engine={"env": slow},
            autoscaling={"enabled": True, "maxReplicas": 2, "targetPerReplica": 2},
        ),
    )
    await wait_ready(kube, namespace, "chat", 1)

    async with httpx.AsyncClient(base_url=gateway.url, timeout=REQUEST_S + 60) as http:
        await wait_routed(http, "chat")

        load = [asyncio.create_task(complete(http, "chat", f"request {i}")) for i in range(4)]
        # Both GPUs are taken: the second chat replica takes batch's (lower priority, floor 0).
        await wait_ready(kube, namespace, "chat", 2, deadline_s=40)
        batch = await kube.get(md_path(namespace, "batch"))
        assert (batch.get("status") or {}).get("readyReplicas", 0) == 0
        assert await asyncio.gather(*load) == [200] * 4


def _limited(obj: dict[str, Any]) -> dict[str, Any] | None:
    """status.autoscaling's ScalingLimited condition, when the autoscaler has written one."""
    auto = (obj.get("status") or {}).get("autoscaling") or {}
    return next((c for c in auto.get("conditions", []) if c["type"] == "ScalingLimited"), None)


async def test_a_model_that_cannot_grow_says_so_and_stops_asking(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    gateway: GatewayProcess,
) -> None:
    # Two GPUs: one for a neighbour of the same priority with a floor of 1 (never evicted),
    # one for chat. Chat's second replica has nowhere to go.
    await gpus(2, 1)
    operators.start()
    await kube.create(md_path(namespace), md("other", replicas=1, minReplicas=1))
    await wait_ready(kube, namespace, "other", 1)
    slow = [{"name": "MODELFLEET_SIM_REQUEST_LATENCY_S", "value": "90"}]
    await kube.create(
        md_path(namespace),
        md(
            "chat",
            replicas=1,
            engine={"env": slow},
            autoscaling={"enabled": True, "maxReplicas": 4, "targetPerReplica": 2},
        ),
    )
    await wait_ready(kube, namespace, "chat", 1)

    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as http:
        await wait_routed(http, "chat")

        # Four in flight at target 2: two replicas' worth. The second cannot be placed.
        load = [asyncio.create_task(complete(http, "chat", f"request {i}")) for i in range(4)]
        try:

            async def limited() -> dict[str, Any] | None:
                obj = await kube.get(md_path(namespace, "chat"))
                cond = _limited(obj)
                return obj if cond and cond["status"] == "True" else None

            obj = await wait_for(limited, timeout=40, what="chat's status saying it is limited")
            assert obj["spec"]["replicas"] == 2
            cond = _limited(obj)
            assert cond is not None
            # The placement's own reason, as the reconcile reports it (NoCapacity here).
            assert conditions(obj)["Progressing"] == ("False", cond["reason"])
            assert cond["message"].startswith("1 of 2 replicas cannot be placed: ")
            assert obj["status"]["autoscaling"]["desiredReplicas"] == 2

            # Twice the load: four replicas' worth. The count stays where it is.
            load += [
                asyncio.create_task(complete(http, "chat", f"request {i}")) for i in range(4, 8)
            ]

            async def held_back() -> dict[str, Any] | None:
                obj = await kube.get(md_path(namespace, "chat"))
                auto = obj["status"]["autoscaling"]
                busy = auto["signal"]["running"] + auto["signal"]["waiting"]
                return obj if busy >= 8 and auto["reason"].startswith("limited at 2") else None

            obj = await wait_for(held_back, timeout=40, what="the autoscaler holding chat at 2")
            assert obj["spec"]["replicas"] == 2
            assert obj["status"]["autoscaling"]["desiredReplicas"] == 2
            assert f"placement says {cond['reason']}" in obj["status"]["autoscaling"]["reason"]
            assert len(await replica_pods(kube, namespace, "chat")) == 1
            # One Warning for the whole episode, not one per round.
            events = await kube.list(
                resource_path("events", namespace),
                fieldSelector="involvedObject.name=chat,reason=ScalingLimited",
            )
            assert [(e["type"], e.get("count", 1)) for e in events["items"]] == [("Warning", 1)]
            other = await kube.get(md_path(namespace, "other"))
            assert other["status"]["readyReplicas"] == 1
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)


async def test_requests_held_at_zero_size_the_wake_up(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    gateway: GatewayProcess,
) -> None:
    await gpus(3, 1)
    operators.start()
    # Slow to start, so the gateway holds the requests for a few autoscaler rounds.
    env = [{"name": "MODELFLEET_SIM_STARTUP_DELAY_S", "value": "10"}]
    await kube.create(
        md_path(namespace),
        md(
            "cold",
            replicas=1,
            minReplicas=0,
            idleTimeout="5s",
            engine={"env": env},
            autoscaling={"enabled": True, "maxReplicas": 3, "targetPerReplica": 2},
        ),
    )
    await wait_ready(kube, namespace, "cold", 1, deadline_s=60)

    async def scaled_to_zero() -> bool:
        obj = await kube.get(md_path(namespace, "cold"))
        idle = conditions(obj).get("Available") == ("False", "ScaledToZero")
        return idle and not await replica_pods(kube, namespace, "cold")

    await wait_for(scaled_to_zero, timeout=40, interval=0.2, what="cold scaled to zero")
    assert (await kube.get(md_path(namespace, "cold")))["spec"]["replicas"] == 1

    async with httpx.AsyncClient(base_url=gateway.url, timeout=90) as http:
        # Six held requests at target 2: three replicas at once, not one.
        load = [asyncio.create_task(complete(http, "cold", f"request {i}")) for i in range(6)]
        try:

            async def woken() -> dict[str, Any] | None:
                obj = await kube.get(md_path(namespace, "cold"))
                # /scale first, then the status that explains it: wait for both.
                auto = (obj.get("status") or {}).get("autoscaling") or {}
                return obj if obj["spec"]["replicas"] == auto.get("desiredReplicas") == 3 else None

            obj = await wait_for(woken, timeout=40, what="the autoscaler raising cold to 3")
            auto = obj["status"]["autoscaling"]
            assert auto["signal"]["held"] >= 5  # ceil(held / 2) == 3
            assert auto["signal"]["replicasMeasured"] == 0
            assert "requests held by the gateway over" in auto["reason"]
            assert auto["lastScaleTime"]
            assert await asyncio.gather(*load) == [200] * 6
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)

    # Nothing held any more: the gateway removes its count.
    async def count_removed() -> bool:
        obj = await kube.get(md_path(namespace, "cold"))
        annotations = obj["metadata"].get("annotations") or {}
        return not any(k.startswith(HELD_PREFIX) for k in annotations)

    await wait_for(count_removed, timeout=20, what="the gateway removing its held count")
