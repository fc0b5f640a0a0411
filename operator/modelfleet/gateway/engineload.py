"""Scrapes the engine's own load figures from the replicas of models that route by them.

Every `interval_s`, each replica of a model whose routing counts engine load (LoadAware, or a
hashed policy with engineLoad) gets one `GET /metrics`, bounded by the interval, on connections
of its own (never those of the request path). The figures land on the Replica objects the
balancer reads; a failed or slow scrape leaves the old ones, which the balancer ignores once
they are older than the route's freshness limit (three intervals).
"""

from __future__ import annotations

import asyncio
import logging
import time

from modelfleet.enginemetrics import EngineMetricsError, parse_engine_load
from modelfleet.gateway.balancer import Replica
from modelfleet.gateway.registry import Registry
from modelfleet.gateway.upstream import UpstreamClient, UpstreamError

log = logging.getLogger(__name__)

_MAX_METRICS_BYTES = 4 * 1024 * 1024  # a real vLLM's exposition is ~100 KiB


def stale_after(interval_s: float) -> float:
    """How old engine figures may be before the balancer ignores them."""
    return 3 * interval_s


async def scrape_replica(client: UpstreamClient, replica: Replica, timeout_s: float) -> bool:
    """One scrape into `replica`; False when it failed (the old figures stay, aging)."""
    head = f"GET /metrics HTTP/1.1\r\nHost: {replica.address}\r\n\r\n".encode()
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.post(replica.address, head, b"")
            try:
                if response.status != 200:
                    return False
                if response.content_length is not None:
                    if response.content_length > _MAX_METRICS_BYTES:
                        return False
                    text = await response.read()
                else:
                    parts = []
                    size = 0
                    async for chunk in response.iter_chunks():
                        parts.append(chunk)
                        size += len(chunk)
                        if size > _MAX_METRICS_BYTES:
                            return False
                    text = b"".join(parts)
            finally:
                response.release()
    except (UpstreamError, TimeoutError, OSError) as exc:
        log.debug("scraping %s failed: %s", replica.address, exc)
        return False
    try:
        load = parse_engine_load(text)
    except EngineMetricsError as exc:
        log.debug("replica %s: %s", replica.name, exc)
        return False
    replica.engine_running = load.running
    replica.engine_waiting = load.waiting
    replica.engine_kv_cache = load.kv_cache_usage
    replica.engine_at = time.monotonic()
    return True


async def run_engine_scraper(registry: Registry, interval_s: float) -> None:
    """Forever: scrape every replica of every model that routes by engine load."""
    client = UpstreamClient(connect_timeout_s=interval_s, read_timeout_s=interval_s)
    loop = asyncio.get_running_loop()
    try:
        while True:
            started = loop.time()
            replicas = [
                replica
                for route in registry.routes.values()
                if route.config.uses_engine_load
                for replica in route.replicas
            ]
            if replicas:
                await asyncio.gather(
                    *(scrape_replica(client, r, interval_s) for r in replicas),
                    return_exceptions=True,
                )
            await asyncio.sleep(max(0.0, interval_s - (loop.time() - started)))
    finally:
        await client.close()
