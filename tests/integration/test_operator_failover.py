"""Failover end to end: a GPU that turns unhealthy, an agent that stops answering, an agent pod
that is gone. Real control plane, real operator, agents and vLLM stand-ins (pod runner) on
simulated GPU nodes private to each test; faults go through the simulated agent's /sim/faults."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from clusterkit import Cluster, wait_for
from operator_kit import (
    TEST_POOL_LABEL,
    Operators,
    RunnerProcess,
    agent_daemonset,
    create_test_nodes,
    delete_test_nodes,
    start_pod_runner,
)
from test_operator import events_of, md, replica_pods, wait_ready

from modelfleet.api import labels as L
from modelfleet.kube.client import ApiError, KubeClient, list_and_watch
from modelfleet.kube.paths import md_path, pods_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

AGENTS = "app.kubernetes.io/component=agent"
# Short intervals so a failure is seen in seconds: 1 s polls, a breaker that opens after two
# failures, and a 5 s grace for an agent pod that is gone (3 poll intervals would be the floor).
FAST = {
    "MODELFLEET_POLL_INTERVAL_S": "1",
    "MODELFLEET_BREAKER_FAILURE_THRESHOLD": "2",
    "MODELFLEET_BACKOFF_BASE_S": "0.5",
    "MODELFLEET_BACKOFF_CAP_S": "2",
    "MODELFLEET_AGENT_MISSING_GRACE_S": "5",
    "MODELFLEET_RECHECK_INTERVAL_S": "10",
}


@pytest.fixture
def sim_runner(cluster: Cluster, tmp_path: Path) -> Iterator[RunnerProcess]:
    yield from start_pod_runner(cluster, tmp_path)


@pytest.fixture
async def nodes(
    kube: KubeClient, namespace: str, sim_runner: RunnerProcess
) -> AsyncIterator[list[str]]:
    """Three private GPU nodes with two GPUs each and a ready agent on each."""
    names = await create_test_nodes(kube, namespace, 3, 2)
    await kube.create(
        f"/apis/apps/v1/namespaces/{namespace}/daemonsets", agent_daemonset(namespace)
    )

    async def agents_ready() -> bool:
        pods = (await kube.list(pods_path(namespace), labelSelector=AGENTS))["items"]
        return sum(_ready(p) for p in pods) == len(names)

    await wait_for(agents_ready, timeout=60, what="3 agents ready")
    try:
        yield names
    finally:
        await delete_test_nodes(kube, namespace)
        for name in names:  # a node moved out of the test pool by the test
            with contextlib.suppress(ApiError):
                await kube.delete(f"/api/v1/nodes/{name}")


@pytest.fixture
def operators(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Operators]:
    ops = Operators(cluster, namespace, tmp_path)
    yield ops
    ops.stop_all()


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


async def agent_pod(kube: KubeClient, namespace: str, node: str) -> dict[str, Any]:
    pods = (await kube.list(pods_path(namespace), labelSelector=AGENTS))["items"]
    [pod] = [p for p in pods if p["spec"].get("nodeName") == node]
    return dict(pod)


async def set_faults(pod: dict[str, Any], faults: dict[str, Any]) -> None:
    """POST the simulated agent's fault knobs, on its pod IP (the pod runner's loopback)."""
    url = f"http://{pod['status']['podIP']}:9400/sim/faults"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(url, json=faults) as resp,
    ):
        assert resp.status == 200, await resp.text()


@contextlib.asynccontextmanager
async def degraded_reasons(
    kube: KubeClient, namespace: str, name: str
) -> AsyncIterator[list[tuple[str, str]]]:
    """Every Degraded (status, reason) the deployment shows while the block runs (a watch)."""
    seen: list[tuple[str, str]] = []

    async def follow() -> None:
        async for kind, obj in list_and_watch(
            kube, md_path(namespace), fieldSelector=f"metadata.name={name}"
        ):
            items = obj.get("items", []) if kind == "SYNC" else [obj]
            for item in items:
                for cond in (item.get("status") or {}).get("conditions") or []:
                    if cond["type"] == "Degraded":
                        seen.append((cond["status"], cond["reason"]))

    task = asyncio.create_task(follow())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_replaced(
    kube: KubeClient, namespace: str, old: dict[str, Any], *, away_from_node: bool, gpu: str = ""
) -> dict[str, Any]:
    """The replica with old's name, a new UID, ready, on another node (or another GPU)."""
    name, uid, node = old["metadata"]["name"], old["metadata"]["uid"], old["spec"]["nodeName"]
    deployment = old["metadata"]["labels"][L.LABEL_DEPLOYMENT]

    async def replaced() -> dict[str, Any] | None:
        pods = {p["metadata"]["name"]: p for p in await replica_pods(kube, namespace, deployment)}
        new = pods.get(name)
        if new is None or new["metadata"]["uid"] == uid or not _ready(new):
            return None
        if away_from_node and new["spec"]["nodeName"] == node:
            return None
        if gpu and gpu in new["metadata"]["annotations"][L.ANN_GPUS].split(","):
            return None
        return new

    found: dict[str, Any] = await wait_for(
        replaced, timeout=60, interval=0.2, what=f"{name} replaced"
    )
    return found


async def test_unhealthy_gpu_replica_replaced_on_a_healthy_gpu(
    kube: KubeClient, namespace: str, nodes: list[str], operators: Operators
) -> None:
    operators.start(**FAST)
    await kube.create(md_path(namespace), md("m", replicas=2))
    await wait_ready(kube, namespace, "m", 2)
    pods = {p["metadata"]["name"]: p for p in await replica_pods(kube, namespace, "m")}
    victim, bystander = pods["m-instance-1"], pods["m-instance-2"]
    [bad_gpu] = victim["metadata"]["annotations"][L.ANN_GPUS].split(",")
    index = bad_gpu.rsplit(":", 1)[1]
    agent = await agent_pod(kube, namespace, victim["spec"]["nodeName"])

    async with degraded_reasons(kube, namespace, "m") as seen:
        await set_faults(agent, {"unhealthy": {index: "XID 79: fell off the bus"}})
        started = asyncio.get_running_loop().time()
        new = await wait_replaced(kube, namespace, victim, away_from_node=False, gpu=bad_gpu)
        assert asyncio.get_running_loop().time() - started < 60
        await wait_for(lambda: ("True", "GpuUnhealthy") in seen, timeout=10, what="Degraded")

    assert bad_gpu not in new["metadata"]["annotations"][L.ANN_GPUS]
    events = [e for e in await events_of(kube, namespace, "m") if e["reason"] == "GpuUnhealthy"]
    assert events, "no GpuUnhealthy Event"
    assert bad_gpu in events[0]["message"]
    assert events[0]["type"] == "Warning"
    # Only the replica on the bad GPU moved.
    now = {p["metadata"]["name"]: p for p in await replica_pods(kube, namespace, "m")}
    assert now["m-instance-2"]["metadata"]["uid"] == bystander["metadata"]["uid"]
    obj = await wait_ready(kube, namespace, "m", 2)
    degraded = {c["type"]: c for c in obj["status"]["conditions"]}["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("False", "AsExpected")


async def test_agent_not_answering_replicas_replaced_elsewhere(
    kube: KubeClient, namespace: str, nodes: list[str], operators: Operators
) -> None:
    operators.start(**FAST)
    await kube.create(md_path(namespace), md("m", replicas=2))
    await wait_ready(kube, namespace, "m", 2)
    pods = {p["metadata"]["name"]: p for p in await replica_pods(kube, namespace, "m")}
    victim = pods["m-instance-1"]
    agent = await agent_pod(kube, namespace, victim["spec"]["nodeName"])

    async with degraded_reasons(kube, namespace, "m") as seen:
        await set_faults(agent, {"failStatus": 503})
        started = asyncio.get_running_loop().time()
        await wait_replaced(kube, namespace, victim, away_from_node=True)
        assert asyncio.get_running_loop().time() - started < 60
        await wait_for(lambda: ("True", "EndpointsDown") in seen, timeout=10, what="Degraded")

    events = [e for e in await events_of(kube, namespace, "m") if e["reason"] == "EndpointsDown"]
    assert events, "no EndpointsDown Event"
    assert victim["spec"]["nodeName"] in events[0]["message"]
    await wait_ready(kube, namespace, "m", 2)


async def test_agent_pod_gone_replicas_replaced_after_the_grace(
    kube: KubeClient, namespace: str, nodes: list[str], operators: Operators
) -> None:
    operators.start(**FAST)
    await kube.create(md_path(namespace), md("m", replicas=2))
    await wait_ready(kube, namespace, "m", 2)
    pods = {p["metadata"]["name"]: p for p in await replica_pods(kube, namespace, "m")}
    victim = pods["m-instance-1"]
    node = victim["spec"]["nodeName"]
    agent = await agent_pod(kube, namespace, node)

    async with degraded_reasons(kube, namespace, "m") as seen:
        started = asyncio.get_running_loop().time()
        # Out of the agent DaemonSet's node selector: its controller deletes the agent pod and
        # does not bring it back. The node itself stays Ready.
        await kube.patch(
            f"/api/v1/nodes/{node}", {"metadata": {"labels": {TEST_POOL_LABEL: "no-agent"}}}
        )

        async def agent_gone() -> bool:
            pods = (await kube.list(pods_path(namespace), labelSelector=AGENTS))["items"]
            return all(p["metadata"]["uid"] != agent["metadata"]["uid"] for p in pods)

        await wait_for(agent_gone, timeout=30, what=f"agent pod on {node} deleted")
        await wait_replaced(kube, namespace, victim, away_from_node=True)
        elapsed = asyncio.get_running_loop().time() - started
        assert elapsed < 60
        assert elapsed >= 5, f"replaced after {elapsed:.1f}s: the 5 s grace was not kept"
        await wait_for(lambda: ("True", "EndpointsDown") in seen, timeout=10, what="Degraded")

    events = [e for e in await events_of(kube, namespace, "m") if e["reason"] == "EndpointsDown"]
    assert events, "no EndpointsDown Event"
    assert node in events[0]["message"]
    await wait_ready(kube, namespace, "m", 2)


async def operator_status(operator: Any) -> dict[str, Any]:
    url = f"http://127.0.0.1:{operator.metrics_port}/status?gpus=false"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as resp,
    ):
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def test_a_gpu_node_without_an_agent_is_reported_and_used_once_its_agent_runs(
    kube: KubeClient, namespace: str, nodes: list[str], operators: Operators
) -> None:
    """A node whose device plugin advertises GPUs but where no agent runs (the agent DaemonSet
    does not select it, as on a GKE node without GPU Feature Discovery's label): placement
    cannot use it, and the blocked replica's reason, the operator's /status and its metric say
    so. Once the agent runs there, the replica is placed on it."""
    lonely = nodes[0]
    await kube.patch(
        f"/api/v1/nodes/{lonely}", {"metadata": {"labels": {TEST_POOL_LABEL: "no-agent"}}}
    )

    async def agent_gone() -> bool:
        pods = (await kube.list(pods_path(namespace), labelSelector=AGENTS))["items"]
        return all(p["spec"].get("nodeName") != lonely for p in pods)

    await wait_for(agent_gone, timeout=30, what=f"no agent pod on {lonely}")
    operator = operators.start(**FAST)
    # Two GPUs per node: each replica fills a node, and the third has only the unseen node.
    await kube.create(md_path(namespace), md("m", replicas=3, gpu={"count": 2}))

    async def blocked_naming_it() -> str | None:
        obj = await kube.get(md_path(namespace, "m"))
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if "without a node-stats agent" in cond.get("message", ""):
                return str(cond["message"])
        return None

    message = await wait_for(blocked_naming_it, timeout=60, what="the reason to name it")
    assert "check the agent DaemonSet's node affinity" in message, message
    status = await operator_status(operator)
    assert lonely in status["gpuNodesWithoutAgent"], status["gpuNodesWithoutAgent"]
    assert {p["spec"]["nodeName"] for p in await replica_pods(kube, namespace, "m")} == set(
        nodes[1:]
    )

    await kube.patch(
        f"/api/v1/nodes/{lonely}", {"metadata": {"labels": {TEST_POOL_LABEL: namespace}}}
    )
    await wait_ready(kube, namespace, "m", 3, deadline_s=90)
    assert lonely in {p["spec"]["nodeName"] for p in await replica_pods(kube, namespace, "m")}

    async def no_longer_listed() -> bool:
        return lonely not in (await operator_status(operator))["gpuNodesWithoutAgent"]

    await wait_for(no_longer_listed, timeout=30, what=f"{lonely} off the no-agent list")


async def test_silent_agent_makes_the_replacement_wait_and_evicts_nobody(
    kube: KubeClient, namespace: str, nodes: list[str], operators: Operators
) -> None:
    # Three 2-GPU nodes, full: `low` (priority 0, two replicas) on two of them, `svc` (priority
    # 10) on the third. svc's agent stops answering: its replica is replaced (EndpointsDown),
    # and the replacement could go only to that node, whose agent is silent. It waits, and
    # `low`, which eviction would otherwise take, keeps both replicas all along. Once the agent
    # answers again, svc runs there again.
    operators.start(**FAST)
    two = {"count": 2}
    await kube.create(md_path(namespace), md("low", replicas=2, priority=0, gpu=two))
    await wait_ready(kube, namespace, "low", 2)
    await kube.create(md_path(namespace), md("svc", replicas=1, priority=10, gpu=two))
    await wait_ready(kube, namespace, "svc", 1)
    [old] = await replica_pods(kube, namespace, "svc")
    node = old["spec"]["nodeName"]
    low_uids = {p["metadata"]["uid"] for p in await replica_pods(kube, namespace, "low")}
    lost: list[str] = []

    async def watch_low() -> None:
        while True:  # bounded by the test's timeout; cancelled at the end
            listing = await kube.list(
                pods_path(namespace), labelSelector=f"{L.LABEL_DEPLOYMENT}=low"
            )
            live = {
                p["metadata"]["uid"]
                for p in listing["items"]
                if not p["metadata"].get("deletionTimestamp")
            }
            lost.extend(sorted(low_uids - live))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch_low())
    try:
        agent = await agent_pod(kube, namespace, node)
        await set_faults(agent, {"failStatus": 503})

        async def waits_for_the_agent() -> bool:
            obj = await kube.get(md_path(namespace, "svc"))
            return any(
                c["reason"] == "WaitingForStats"
                and "whose agent is stale or unreachable could take it" in c["message"]
                for c in (obj.get("status") or {}).get("conditions") or []
            )

        await wait_for(waits_for_the_agent, timeout=60, what="svc waits for the silent agent")
        assert await replica_pods(kube, namespace, "svc") == []
        assert lost == [], f"low lost replicas {lost} while svc's agent was silent"
        await set_faults(agent, {"failStatus": None})
        await wait_ready(kube, namespace, "svc", 1)
        [new] = await replica_pods(kube, namespace, "svc")
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        assert new["spec"]["nodeName"] == node
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert lost == [], f"low lost replicas {lost} while svc's agent was silent"
    await wait_ready(kube, namespace, "low", 2)
