"""The Kubernetes source against a small list-and-watch server on 127.0.0.1 (an adapter test:
the real API server runs in the integration tier). It checks the level-triggered contract: a
full re-list after every watch reconnect, and a Pod that turns unready leaving at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from gwharness import md_obj, pod_obj, wait_until

from modelfleet.gateway.registry import Registry
from modelfleet.gateway.sources import REPLICA_SELECTOR, run_kube_source
from modelfleet.kube.client import ClusterConfig, KubeClient


@dataclass
class FakeCollection:
    items: list[dict[str, Any]]
    events: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    lists: int = 0
    selectors: list[str] = field(default_factory=list)


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, dict[str, FakeCollection]]]:
    collections = {
        "modeldeployments": FakeCollection([md_obj("gemma3-4b", served="gemma3-4B")]),
        "pods": FakeCollection(
            [pod_obj("gemma3-4b-instance-1", "gemma3-4b", 8001, served="gemma3-4B")]
        ),
    }

    async def handle(request: web.Request) -> web.StreamResponse:
        coll = collections[request.match_info["plural"]]
        coll.selectors.append(request.query.get("labelSelector", ""))
        if request.query.get("watch") != "true":
            coll.lists += 1
            return web.json_response(
                {"items": coll.items, "metadata": {"resourceVersion": str(coll.lists)}}
            )
        response = web.StreamResponse()
        await response.prepare(request)
        while True:
            event = await coll.events.get()
            if event is None:  # end this watch; the client must re-list
                return response
            await response.write(json.dumps(event).encode() + b"\n")

    app = web.Application()
    app.router.add_get("/apis/modelfleet.io/v1alpha1/{plural}", handle)
    app.router.add_get("/api/v1/{plural}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", collections
    for coll in collections.values():
        coll.events.put_nowait(None)
    await runner.cleanup()


async def test_watch_feeds_the_registry_and_relists_after_reconnect(
    api: tuple[str, dict[str, FakeCollection]],
) -> None:
    url, collections = api
    pods = collections["pods"]
    registry = Registry()
    async with KubeClient(ClusterConfig(server=url)) as kube:
        task = asyncio.create_task(run_kube_source(registry, kube, ""))
        try:
            await wait_until(lambda: registry.is_synced)
            await wait_until(lambda: bool(registry.routes.get("gemma3-4B", None)))
            route = registry.routes["gemma3-4B"]
            assert [r.name for r in route.replicas] == ["gemma3-4b-instance-1"]
            assert pods.selectors[0] == REPLICA_SELECTOR

            unready = pod_obj("gemma3-4b-instance-1", "gemma3-4b", 8001, ready=False)
            unready["metadata"]["resourceVersion"] = "5"
            await pods.events.put({"type": "MODIFIED", "object": unready})
            await wait_until(lambda: not registry.routes["gemma3-4B"].replicas)

            # While the watch is down a second replica appears; the re-list must find it.
            pods.items = [
                pod_obj("gemma3-4b-instance-1", "gemma3-4b", 8001),
                pod_obj("gemma3-4b-instance-2", "gemma3-4b", 8002),
            ]
            # The API server ends the watch with 410 Gone (the version is too old): re-list.
            await pods.events.put(
                {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
            )
            await wait_until(lambda: len(registry.routes["gemma3-4B"].replicas) == 2)
            assert pods.lists >= 2

            await collections["modeldeployments"].events.put(
                {"type": "DELETED", "object": md_obj("gemma3-4b", served="gemma3-4B")}
            )
            # Pods name their served model, so they still route; the deployment is gone.
            await wait_until(lambda: "gemma3-4B" not in registry.models)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
