"""Agent discovery: the pure pod -> endpoint rules, and following pods over a real watch stream.

The watch test serves the Kubernetes list and watch protocol from a small aiohttp server (the
real control plane is the integration tier's); the pool's own client and list_and_watch loop
talk to it over HTTP.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from pool_fakes import FakeAgent
from prometheus_client import CollectorRegistry

from modelfleet.gpus.client import create_session
from modelfleet.gpus.discovery import build_discovered_endpoints, watch_agent_pods
from modelfleet.gpus.metrics import PoolMetrics
from modelfleet.gpus.pool import GpuPool
from modelfleet.kube import ClusterConfig, KubeClient
from modelfleet.settings import OperatorSettings


def pod(
    name: str,
    node: str | None = "node-a",
    ip: str | None = "10.0.0.1",
    phase: str = "Running",
    *,
    created: str = "2025-01-01T00:00:00Z",
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-02T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": phase, **({"podIP": ip} if ip else {})},
    }


@pytest.mark.parametrize(
    ("name", "pods", "expected"),
    [
        ("running pod", [pod("a")], {"http://10.0.0.1:9400": "node-a"}),
        ("no IP yet", [pod("a", ip=None)], {}),
        ("not scheduled", [pod("a", node=None)], {}),
        ("pending", [pod("a", phase="Pending")], {}),
        ("terminating", [pod("a", deleting=True)], {}),
        ("ipv6", [pod("a", ip="fd00::5")], {"http://[fd00::5]:9400": "node-a"}),
        (
            "two nodes",
            [pod("a"), pod("b", "node-b", "10.0.0.2")],
            {"http://10.0.0.1:9400": "node-a", "http://10.0.0.2:9400": "node-b"},
        ),
        (
            "rollout: the newer pod on a node wins",
            [pod("old", ip="10.0.0.1"), pod("new", ip="10.0.0.9", created="2025-02-01T00:00:00Z")],
            {"http://10.0.0.9:9400": "node-a"},
        ),
        (
            "rollout: the terminating pod is ignored",
            [pod("old", ip="10.0.0.1", created="2025-03-01T00:00:00Z", deleting=True), pod("new")],
            {"http://10.0.0.1:9400": "node-a"},
        ),
        ("a bad IP is skipped", [pod("a", ip="not-an-ip")], {}),
    ],
)
def test_pods_to_endpoints(name: str, pods: list[dict[str, Any]], expected: dict[str, str]) -> None:
    assert build_discovered_endpoints(pods, 9400) == expected, name


class FakeApiServer:
    """Serves LIST and WATCH of pods; the test pushes watch events through a queue."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queries: list[dict[str, str]] = []

    async def pods(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        if request.query.get("watch") != "true":
            return web.json_response(
                {"kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": self.items}
            )
        resp = web.StreamResponse()
        await resp.prepare(request)
        while True:
            event = await self.events.get()
            await resp.write(json.dumps(event).encode() + b"\n")


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApiServer, KubeClient]]:
    server = FakeApiServer([pod("agent-a", "node-a", "127.0.0.11")])
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/gpu-system/pods", server.pods)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with KubeClient(ClusterConfig(server=f"http://127.0.0.1:{port}")) as kube:
        yield server, kube
    await runner.cleanup()


async def test_watch_follows_agent_pods(api: tuple[FakeApiServer, KubeClient]) -> None:
    server, kube = api
    seen: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    task = asyncio.create_task(
        watch_agent_pods(
            kube,
            namespace="gpu-system",
            selector="app.kubernetes.io/component=agent",
            port=9400,
            on_change=seen.put_nowait,
        )
    )
    try:
        async with asyncio.timeout(10):
            assert await seen.get() == {"http://127.0.0.11:9400": "node-a"}
            b = pod("agent-b", "node-b", "127.0.0.12")
            b["metadata"]["resourceVersion"] = "2"
            server.events.put_nowait({"type": "ADDED", "object": b})
            assert await seen.get() == {
                "http://127.0.0.11:9400": "node-a",
                "http://127.0.0.12:9400": "node-b",
            }
            gone = pod("agent-a", "node-a", "127.0.0.11", deleting=True)
            server.events.put_nowait({"type": "MODIFIED", "object": gone})
            assert await seen.get() == {"http://127.0.0.12:9400": "node-b"}
            server.events.put_nowait({"type": "DELETED", "object": gone})
            assert await seen.get() == {"http://127.0.0.12:9400": "node-b"}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert server.queries[0]["labelSelector"] == "app.kubernetes.io/component=agent"


async def test_pool_discovers_agents_and_follows_them(
    api: tuple[FakeApiServer, KubeClient],
) -> None:
    """Discovery end to end: agents on two loopback addresses, same port, like pod IPs."""
    server, kube = api
    a = await FakeAgent("node-a", host="127.0.0.11").start()
    b = await FakeAgent("node-b", host="127.0.0.12", port=a.port).start()
    settings = OperatorSettings(
        agent_namespace="gpu-system",
        agent_selector="app.kubernetes.io/component=agent",
        agent_port=a.port,
        poll_interval_s=0.05,
    )
    try:
        async with create_session(8) as session:
            pool = GpuPool(settings, session, kube=kube, metrics=PoolMetrics(CollectorRegistry()))
            async with pool:
                await wait_for(pool, lambda s: s.totals.figures.gpus_total == 8)
                assert pool.endpoint_for_node("node-a") == a.url
                pb = pod("agent-b", "node-b", "127.0.0.12")
                server.events.put_nowait({"type": "ADDED", "object": pb})
                await wait_for(pool, lambda s: s.totals.figures.gpus_total == 16)
                assert pool.endpoint_for_node("node-b") == b.url
                server.events.put_nowait({"type": "DELETED", "object": pb})
                await wait_for(pool, lambda s: len(s.endpoints) == 1)
                assert pool.snapshot().totals.figures.gpus_total == 8
    finally:
        await a.stop()
        await b.stop()


async def wait_for(pool: GpuPool, predicate: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate(pool.snapshot()):
            await pool.wait_for_round(pool.rounds, timeout_s)
