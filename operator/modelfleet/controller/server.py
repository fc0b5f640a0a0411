"""The operator's HTTP port: /metrics, /healthz and the GPU pool's /status.

It starts before leader election, so a standby answers /healthz (and shows
modelfleet_operator_leader 0) while it waits; /status answers 503 until this instance leads and
its pool has started.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from modelfleet.gpus.http import make_status_handler
from modelfleet.gpus.pool import GpuPool
from modelfleet.settings import OperatorSettings


@dataclass
class ServerState:
    """What the routes read; the operator fills it in once it leads."""

    pool: GpuPool | None = None
    role: str = "standby"
    # The GPU nodes no agent reports, as the leading operator last computed them.
    gpu_nodes_without_agent: Callable[[], Sequence[str]] = tuple


def build_app(state: ServerState, registry: CollectorRegistry = REGISTRY) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "role": state.role})

    async def status(request: web.Request) -> web.Response:
        if state.pool is None:
            return web.json_response(
                {"status": "standby", "reason": "this operator instance is not the leader"},
                status=503,
            )
        return await make_status_handler(state.pool, state.gpu_nodes_without_agent)(request)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    return app


async def start_http_server(settings: OperatorSettings, state: ServerState) -> web.AppRunner:
    """Serve the app on MODELFLEET_METRICS_HOST:MODELFLEET_METRICS_PORT; returns the runner."""
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    return runner
