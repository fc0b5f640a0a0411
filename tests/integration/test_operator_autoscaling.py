"""The built-in autoscaler end to end: real control plane, operator and gateway processes, vLLM
stand-ins on simulated GPU nodes. Load through the gateway makes a model grow and shrink; with
autoscaling off, writes to /scale (as HPA or KEDA make them) are left as they are."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from clusterkit import Cluster, wait_for
from operator_kit import GatewayProcess, Operators, md, start_gateway, wait_ready

from modelfleet.kube.client import KubeClient
from modelfleet.kube.paths import md_path

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

        async def routed() -> bool:
            status = (await http.get("/gateway/status")).json()
            return bool(status["active_models_by_id"].get("chat"))

        await wait_for(routed, timeout=30, what="the gateway routing to chat")

        async def ask(i: int) -> int:
            body = {"model": "chat", "prompt": f"request {i}", "max_tokens": 4}
            return (await http.post("/v1/completions", json=body)).status_code

        # Six requests in flight over one replica at target 2: three replicas' worth.
        load = [asyncio.create_task(ask(i)) for i in range(6)]

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
    operators.start()
    await kube.create(
        md_path(namespace),
        md("ext", replicas=1, autoscaling={"enabled": False, "maxReplicas": 1}),
    )
    await wait_ready(kube, namespace, "ext", 1)
    # What HPA or KEDA does: a merge patch of the scale subresource.
    scale = await kube.patch(md_path(namespace, "ext") + "/scale", {"spec": {"replicas": 2}})
    assert scale["spec"]["replicas"] == 2
    await wait_ready(kube, namespace, "ext", 2)
    # Over more than two autoscaler rounds the count stays what the external writer set, even
    # though maxReplicas says 1: the built-in autoscaler steps aside.
    await asyncio.sleep(12)
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

        async def routed() -> bool:
            status = (await http.get("/gateway/status")).json()
            return bool(status["active_models_by_id"].get("chat"))

        await wait_for(routed, timeout=30, what="the gateway routing to chat")

        async def ask(i: int) -> int:
            body = {"model": "chat", "prompt": f"request {i}", "max_tokens": 4}
            return (await http.post("/v1/completions", json=body)).status_code

        load = [asyncio.create_task(ask(i)) for i in range(4)]
        # Both GPUs are taken: the second chat replica takes batch's (lower priority, floor 0).
        await wait_ready(kube, namespace, "chat", 2, deadline_s=40)
        batch = await kube.get(md_path(namespace, "batch"))
        assert (batch.get("status") or {}).get("readyReplicas", 0) == 0
        assert await asyncio.gather(*load) == [200] * 4
