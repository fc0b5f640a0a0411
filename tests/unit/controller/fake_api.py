"""A small in-memory API server on 127.0.0.1 for the controller's adapter tests (real HTTP).

It keeps objects by path and implements only what the controller relies on: create with 409 on
an existing name, get, merge patch (of the object or its status subresource), and delete with a
UID precondition (409 on mismatch). Tests may make the next creates of a kind fail with
`fail_next`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from modelfleet.kube.client import ClusterConfig, KubeClient


class FakeApi:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.failures: dict[str, int] = {}  # last path segment ("pods") -> creates left to fail

    def fail_next(self, kind: str, times: int = 1) -> None:
        """The next `times` creates whose path ends in /<kind> answer 500."""
        self.failures[kind] = times

    def _status(self, code: int, reason: str) -> web.Response:
        return web.json_response(
            {"kind": "Status", "code": code, "reason": reason, "message": reason}, status=code
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append((request.method, path))
        body = json.loads(await request.read() or b"null")
        if request.method == "POST":
            kind = path.rsplit("/", 1)[-1]
            if self.failures.get(kind, 0) > 0:
                self.failures[kind] -= 1
                return self._status(500, "InternalError")
            name = body["metadata"]["name"]
            key = f"{path}/{name}"
            if key in self.objects:
                return self._status(409, "AlreadyExists")
            body["metadata"].setdefault("uid", f"uid-{name}-{len(self.requests)}")
            self.objects[key] = body
            return web.json_response(body, status=201)
        subresource = path.endswith(("/status", "/scale"))
        if request.method == "PATCH" and subresource and path not in self.objects:
            path = path.rsplit("/", 1)[0]  # a subresource patches the object
        if path not in self.objects:
            return self._status(404, "NotFound")
        if request.method == "GET":
            return web.json_response(self.objects[path])
        if request.method == "PATCH":
            merge(self.objects[path], body)
            return web.json_response(self.objects[path])
        if request.method == "DELETE":
            uid = ((body or {}).get("preconditions") or {}).get("uid")
            if uid and self.objects[path]["metadata"].get("uid") != uid:
                return self._status(409, "Conflict")
            return web.json_response(self.objects.pop(path))
        return self._status(405, "MethodNotAllowed")


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        elif value is None:
            target.pop(key, None)
        else:
            target[key] = value


@contextlib.asynccontextmanager
async def serve_fake_api() -> AsyncIterator[tuple[FakeApi, KubeClient]]:
    fake = FakeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with KubeClient(ClusterConfig(server=f"http://127.0.0.1:{port}"), timeout_s=5) as client:
        yield fake, client
    await runner.cleanup()
