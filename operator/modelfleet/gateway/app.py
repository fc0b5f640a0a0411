"""The gateway's composition root: settings in, a running aiohttp application out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from modelfleet.api.ownership import IGNORED_REASONS
from modelfleet.gateway.balancer import EjectionPolicy
from modelfleet.gateway.connections import (
    ClientLimits,
    Connections,
    GuardedSite,
    build_middleware,
)
from modelfleet.gateway.documents import ModelList, build_status_document
from modelfleet.gateway.engineload import run_engine_scraper, stale_after
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.proxy import Proxy, ProxyConfig
from modelfleet.gateway.registry import Registry
from modelfleet.gateway.routing import RoutingConfig
from modelfleet.gateway.upstream import UpstreamClient
from modelfleet.gateway.usage import AnnotationWriter, UsageRecorder
from modelfleet.settings import GatewaySettings

log = logging.getLogger(__name__)

Source = Callable[[Registry], Coroutine[Any, Any, None]]


@dataclass
class Gateway:
    """Everything one gateway process shares: registry, metrics, recorder and the proxy."""

    settings: GatewaySettings
    registry: Registry
    metrics: GatewayMetrics
    usage: UsageRecorder
    model_list: ModelList
    connections: Connections
    source: Source | None = None
    proxy: Proxy | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def build_proxy_config(settings: GatewaySettings) -> ProxyConfig:
    return ProxyConfig(
        max_body_bytes=settings.max_body_bytes,
        max_buffered_body_bytes=settings.max_buffered_body_bytes,
        body_timeout_s=settings.client_body_timeout_s,
        retries=settings.retries,
        retry_backoff_s=settings.retry_backoff_s,
        queue_size=settings.queue_size,
        cold_start_timeout_s=settings.cold_start_timeout_s,
        retry_after_s=settings.retry_after_s,
        ejection=EjectionPolicy(
            failures=settings.eject_after_failures,
            base_s=settings.eject_base_s,
            max_s=settings.eject_max_s,
        ),
        # No total timeout: a stream may run for many minutes. The read timeout bounds a silent
        # replica (the longest wait between two reads, the first one included); the head
        # timeout bounds a head that has begun, so a replica cannot drip it byte by byte.
        connect_timeout_s=settings.upstream_connect_timeout_s,
        read_timeout_s=settings.upstream_read_timeout_s,
        head_timeout_s=settings.upstream_head_timeout_s,
    )


def build_registry(settings: GatewaySettings) -> Registry:
    """The registry, with the gateway's routing defaults for models that set none."""
    return Registry(
        settings.balancing,
        RoutingConfig(
            policy=settings.balancing,
            prefix_chars=settings.prefix_chars,
            load_factor=settings.load_factor,
            engine_load=settings.engine_load,
        ),
        engine_fresh_s=stale_after(settings.engine_metrics_interval_s),
    )


def build_client_limits(settings: GatewaySettings) -> ClientLimits:
    return ClientLimits(
        header_timeout_s=settings.client_header_timeout_s,
        max_connections=settings.max_client_connections,
        retry_after_s=settings.retry_after_s,
    )


def build_upstream(config: ProxyConfig) -> UpstreamClient:
    """The one upstream client: kept-alive connections pooled per replica."""
    return UpstreamClient(
        connect_timeout_s=config.connect_timeout_s,
        read_timeout_s=config.read_timeout_s,
        head_timeout_s=config.head_timeout_s,
    )


def build_app(
    settings: GatewaySettings,
    *,
    registry: Registry | None = None,
    source: Source | None = None,
    writer: AnnotationWriter | None = None,
    metrics: GatewayMetrics | None = None,
) -> web.Application:
    """The gateway application; `source` fills the registry (None: the caller fills it)."""
    registry = registry or build_registry(settings)
    metrics = metrics or GatewayMetrics()
    metrics.watch_replicas(lambda: registry.routes, registry.engine_fresh_s)
    usage = UsageRecorder(registry, writer, metrics, interval_s=settings.last_use_interval_s)
    connections = Connections(build_client_limits(settings), metrics)
    gateway = Gateway(settings, registry, metrics, usage, ModelList(registry), connections, source)
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[build_middleware(connections)]
    )
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_lifecycle)

    async def inference(request: web.Request) -> web.StreamResponse:
        assert gateway.proxy is not None
        return await gateway.proxy.handle(request)

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, inference)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/gateway/status", handle_status)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    config = build_proxy_config(gateway.settings)
    upstream = build_upstream(config)
    gateway.proxy = Proxy(config, gateway.registry, gateway.metrics, gateway.usage, upstream)
    gateway.tasks.append(asyncio.create_task(gateway.usage.run(), name="usage"))
    gateway.tasks.append(
        asyncio.create_task(
            run_engine_scraper(gateway.registry, gateway.settings.engine_metrics_interval_s),
            name="engine-load",
        )
    )
    if gateway.source is not None:
        gateway.tasks.append(asyncio.create_task(gateway.source(gateway.registry), name="source"))
    try:
        yield
    finally:
        for task in gateway.tasks:
            task.cancel()
        for task in gateway.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            # The last use of every model once more, and no held count left behind.
            await gateway.usage.flush(final=True)
        await upstream.close()


async def handle_models(request: web.Request) -> web.StreamResponse:
    body = request.app[GATEWAY].model_list.body()
    return web.Response(body=body, content_type="application/json")


async def handle_status(request: web.Request) -> web.StreamResponse:
    return web.json_response(build_status_document(request.app[GATEWAY].registry, time.monotonic()))


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    gauge = gateway.metrics.ready_replicas
    for model, route in gateway.registry.routes.items():
        gauge.labels(model).set(len(route.replicas))
    ignored = gateway.registry.ignored_pods()
    for reason in IGNORED_REASONS:
        gateway.metrics.ignored_pods.labels(reason).set(ignored.get(reason, 0))
    return web.Response(
        body=generate_latest(gateway.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def handle_healthz(request: web.Request) -> web.StreamResponse:
    """Liveness: the process serves. `synced` says whether it has seen the fleet yet."""
    registry = request.app[GATEWAY].registry
    return web.json_response({"status": "ok", "synced": registry.is_synced})


async def handle_readyz(request: web.Request) -> web.StreamResponse:
    """Readiness: 200 once the ModelDeployments and replica Pods have been listed.

    Until then the gateway would answer known models with 404 or hold them, so a new gateway
    Pod stays out of its Service until it has seen the fleet.
    """
    registry = request.app[GATEWAY].registry
    if registry.is_synced:
        return web.json_response({"status": "ready"})
    waiting = sorted(name for name, done in registry.synced.items() if not done)
    return web.json_response({"status": "syncing", "waitingFor": waiting}, status=503)


def build_runner(app: web.Application, settings: GatewaySettings) -> web.AppRunner:
    return web.AppRunner(
        app,
        access_log=None,
        # A client that disconnects cancels its handler, which closes the upstream request.
        handler_cancellation=True,
        max_line_size=settings.max_header_bytes,
        max_field_size=settings.max_header_bytes,
        max_headers=settings.max_headers,
        # aiohttp closes a connection that waits this long for its next request head (from
        # accepting it, or from the end of the last answer); connections.py adds the rest.
        keepalive_timeout=settings.client_idle_timeout_s,
    )


@dataclass
class RunningGateway:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_gateway(
    app: web.Application, settings: GatewaySettings, host: str, port: int
) -> RunningGateway:
    """Start serving `app`; port 0 picks a free port."""
    runner = build_runner(app, settings)
    await runner.setup()
    site = GuardedSite(runner, app[GATEWAY].connections, host, port, backlog=4096)
    await site.start()
    port = int(runner.addresses[0][1])
    return RunningGateway(f"http://{host}:{port}", app, runner)
