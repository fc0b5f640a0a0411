"""modelfleet.kube against a small real HTTP server playing the API (the real API server is the
integration tier's): kubeconfig loading, errors, and list_and_watch's re-list contract."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from modelfleet.kube import ApiError, KubeClient, KubeConfigError, list_and_watch, load_kubeconfig


def pod(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": rv}}


class FakeApi:
    """Serves a pod collection; each watch sends the queued events and then ends normally."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = [pod("a", "1")]
        self.lists = 0
        self.watch_events: list[list[dict[str, Any]]] = []
        self.auth: list[str | None] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization"))
        if request.path.endswith("/missing"):
            body = {"kind": "Status", "reason": "NotFound", "message": 'pods "missing" not found'}
            return web.json_response(body, status=404)
        if request.query.get("watch") != "true":
            self.lists += 1
            return web.json_response(
                {"metadata": {"resourceVersion": str(self.lists * 10)}, "items": list(self.items)}
            )
        resp = web.StreamResponse()
        await resp.prepare(request)
        events = self.watch_events.pop(0) if self.watch_events else []
        for event in events:
            await resp.write(json.dumps(event).encode() + b"\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[FakeApi, KubeClient]]:
    fake = FakeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config_file = tmp_path / "kubeconfig"
    config_file.write_text(
        yaml.safe_dump(
            {
                "current-context": "t",
                "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "secret-token"}}],
            }
        )
    )
    client = KubeClient(load_kubeconfig(config_file))
    yield fake, client
    await client.close()
    await runner.cleanup()


async def test_errors_carry_status_and_message(api: tuple[FakeApi, KubeClient]) -> None:
    fake, client = api
    with pytest.raises(ApiError) as caught:
        await client.get("/api/v1/namespaces/x/pods/missing")
    assert caught.value.not_found
    assert 'pods "missing" not found' in str(caught.value)
    assert fake.auth[-1] == "Bearer secret-token"


async def test_relists_after_a_normal_watch_end(api: tuple[FakeApi, KubeClient]) -> None:
    fake, client = api
    fake.watch_events = [[{"type": "ADDED", "object": pod("b", "11")}]]
    seen: list[tuple[str, list[str]]] = []

    async def consume() -> None:
        async for kind, obj in list_and_watch(client, "/api/v1/pods", watch_timeout_s=5):
            names = [i["metadata"]["name"] for i in obj.get("items", [obj])]
            seen.append((kind, names))
            if kind == "SYNC" and fake.lists == 1:
                # While the first watch is open, "a" vanishes: only a re-list can tell.
                fake.items = [pod("b", "11")]
            if len(seen) == 3:
                return

    await asyncio.wait_for(consume(), timeout=10)
    assert seen == [("SYNC", ["a"]), ("ADDED", ["b"]), ("SYNC", ["b"])]


async def test_watch_error_410_relists(api: tuple[FakeApi, KubeClient]) -> None:
    fake, client = api
    gone = {"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "too old"}}
    fake.watch_events = [[gone]]
    kinds: list[str] = []

    async def consume() -> None:
        async for kind, _obj in list_and_watch(client, "/api/v1/pods", retry_delay_s=0.01):
            kinds.append(kind)
            if len(kinds) == 2:
                return

    await asyncio.wait_for(consume(), timeout=10)
    assert kinds == ["SYNC", "SYNC"]
    assert fake.lists == 2


def test_missing_kubeconfig_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="set KUBECONFIG or pass --kubeconfig"):
        load_kubeconfig(tmp_path / "nope")


def test_unknown_context_is_named(tmp_path: Path) -> None:
    f = tmp_path / "kubeconfig"
    f.write_text(yaml.safe_dump({"current-context": "ghost", "contexts": [], "clusters": []}))
    with pytest.raises(KubeConfigError, match="context 'ghost' not found"):
        load_kubeconfig(f)
