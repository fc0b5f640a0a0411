"""Last use and demand, written to ModelDeployment annotations in the background.

The request path only stores a float in a dict (`touch`) or adds a name to a set (`demand`); a
background task turns those into annotation patches, at most one last-use write per model per
interval, so a busy model costs the API server one write every `last_use_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp

from modelfleet.api import labels
from modelfleet.api.times import format_time_ms
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.registry import Registry
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import md_path

log = logging.getLogger(__name__)


class AnnotationWriter(Protocol):
    async def annotate(self, namespace: str, name: str, values: dict[str, str]) -> None: ...


class KubeAnnotationWriter:
    """Merge-patches annotations onto a ModelDeployment."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube

    async def annotate(self, namespace: str, name: str, values: dict[str, str]) -> None:
        await self.kube.patch(md_path(namespace, name), {"metadata": {"annotations": values}})


class UsageRecorder:
    """Collects last-request times and demand; `run()` writes them out."""

    def __init__(
        self,
        registry: Registry,
        writer: AnnotationWriter | None,
        metrics: GatewayMetrics,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.writer = writer
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self.last_request: dict[str, float] = {}
        self._written: dict[str, float] = {}  # model -> last-request time last written
        self._written_at: dict[str, float] = {}  # model -> when it was written
        self._demand: set[str] = set()
        self._wake = asyncio.Event()

    def touch(self, model: str) -> None:
        """Hot path: remember that `model` was asked for now."""
        self.last_request[model] = self.clock()

    def demand(self, model: str) -> None:
        """A request waits for `model`, which has no ready replica: tell the operator soon."""
        self._demand.add(model)
        self._wake.set()

    async def run(self, tick_s: float = 1.0) -> None:
        """Flush forever: on every tick, and at once when demand is recorded."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick_s)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        now = self.clock()
        for model in sorted(self._demand):
            self._demand.discard(model)
            ok = await self._write(model, {labels.ANN_DEMAND: format_time_ms(now)}, "demand")
            if not ok:
                self._demand.add(model)  # try again on the next tick
        for model, last in list(self.last_request.items()):
            if last <= self._written.get(model, 0.0):
                continue
            if now - self._written_at.get(model, float("-inf")) < self.interval_s:
                continue
            if await self._write(model, {labels.ANN_LAST_REQUEST: format_time_ms(last)}, "last"):
                self._written[model] = last
                self._written_at[model] = now

    async def _write(self, model: str, values: dict[str, str], kind: str) -> bool:
        deployments = self.registry.models.get(model, [])
        if self.writer is None or not deployments:
            return True  # static upstreams: nothing to write to
        ok = True
        for info in deployments:
            try:
                await self.writer.annotate(info.namespace, info.name, values)
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                ok = False
                log.warning(
                    "could not annotate ModelDeployment %s/%s (%s): %s",
                    info.namespace,
                    info.name,
                    kind,
                    exc,
                )
                self.metrics.annotation_writes.labels(kind, "error").inc()
            else:
                self.metrics.annotation_writes.labels(kind, "ok").inc()
        return ok
