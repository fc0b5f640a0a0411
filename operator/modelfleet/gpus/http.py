"""`GET /status` for the operator's metrics port: the pool status document as JSON.

    app = web.Application()
    modelfleet.gpus.http.add_routes(app, pool)

`?gpus=false` leaves out the per-GPU lists (large pools). The handler only reads the pool's
latest snapshot, so it never waits on an agent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from modelfleet.gpus.pool import GpuPool
from modelfleet.gpus.status import build_status

STATUS_PATH = "/status"


def make_status_handler(
    pool: GpuPool, gpu_nodes_without_agent: Callable[[], Sequence[str]] = tuple
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`gpu_nodes_without_agent` names the GPU nodes no agent reports (the operator knows)."""

    async def status(request: web.Request) -> web.Response:
        flag = request.query.get("gpus", "true").lower()
        if flag not in ("true", "false", "1", "0"):
            raise web.HTTPBadRequest(
                text=f"gpus={flag!r}: expected true or false", content_type="text/plain"
            )
        doc = build_status(
            pool.snapshot(),
            "operator",
            with_gpus=flag in ("true", "1"),
            gpu_nodes_without_agent=gpu_nodes_without_agent(),
        )
        return web.Response(
            text=doc.model_dump_json(by_alias=True), content_type="application/json"
        )

    return status


def add_routes(app: web.Application, pool: GpuPool, path: str = STATUS_PATH) -> None:
    """Mount `GET <path>` (default /status) on `app`."""
    app.router.add_get(path, make_status_handler(pool))
