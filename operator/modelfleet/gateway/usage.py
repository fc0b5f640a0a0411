"""Last use, demand and held requests, written to ModelDeployment annotations in the background.

The request path only stores a float in a dict (`touch`) or adds a name to a set (`demand`); a
background task turns those into annotation patches, at most one last-use write per model per
interval, so a busy model costs the API server one write every `last_use_interval_s`.

The requests this gateway replica holds for a model with no ready replica (the registry's queue)
go to the annotation `held.modelfleet.io/<this pod>` (api/held.py), which the autoscaler adds up
over the gateway replicas: written at once for the first request of a burst (with demand-time),
then at most every HELD_INTERVAL_S while the count changes, refreshed every HELD_REFRESH_S while
it stays, and removed once nothing is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import aiohttp

from modelfleet.api import labels
from modelfleet.api.held import format_held, held_key
from modelfleet.api.times import format_time_ms
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.registry import Registry
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import md_path

log = logging.getLogger(__name__)

# A changing held count is written at most this often per model; one that stays is refreshed this
# often, well within the autoscaler's freshness (30 s, controller/autoscale_loop.py).
HELD_INTERVAL_S = 2.0
HELD_REFRESH_S = 10.0


class AnnotationWriter(Protocol):
    async def annotate(
        self, namespace: str, name: str, values: Mapping[str, str | None]
    ) -> None: ...


class KubeAnnotationWriter:
    """Merge-patches annotations onto a ModelDeployment."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube

    async def annotate(self, namespace: str, name: str, values: Mapping[str, str | None]) -> None:
        """A None value removes the annotation (JSON merge patch)."""
        await self.kube.patch(md_path(namespace, name), {"metadata": {"annotations": dict(values)}})


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
        identity: str | None = None,
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
        # This replica's held-count annotation: its Pod name is its hostname.
        self.held_key = held_key(identity or socket.gethostname())
        self._held: dict[str, int] = {}  # model -> count last written (absent: none written)
        self._held_at: dict[str, float] = {}  # model -> when

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

    async def flush(self, *, final: bool = False) -> None:
        """Write what is due; `final` (the gateway stops): every changed held count at once, so
        the requests this replica no longer holds stop counting now."""
        now = self.clock()
        demand, self._demand = self._demand, set()
        held = self._held_due(now, final)
        for model in sorted(demand | held.keys()):
            values: dict[str, str | None] = {}
            if model in demand:
                values[labels.ANN_DEMAND] = format_time_ms(now)
            count = held.get(model)
            if count is not None:
                values[self.held_key] = format_held(count, now) if count else None
            if not await self._write(model, values, "demand" if model in demand else "held"):
                if model in demand:
                    self._demand.add(model)  # try again on the next tick
                continue
            if count is None:
                continue
            if count:
                self._held[model], self._held_at[model] = count, now
            else:
                self._held.pop(model, None)
                self._held_at.pop(model, None)
        for model, last in list(self.last_request.items()):
            if last <= self._written.get(model, 0.0):
                continue
            if now - self._written_at.get(model, float("-inf")) < self.interval_s:
                continue
            if await self._write(model, {labels.ANN_LAST_REQUEST: format_time_ms(last)}, "last"):
                self._written[model] = last
                self._written_at[model] = now

    def _held_due(self, now: float, final: bool = False) -> dict[str, int]:
        """The held counts to write now, by model (0: remove this replica's annotation)."""
        queued = self.registry.queue_depths()
        due: dict[str, int] = {}
        for model in queued.keys() | self._held.keys():
            count, last = queued.get(model, 0), self._held.get(model)
            since = now - self._held_at.get(model, float("-inf"))
            # (A model with nothing written yet is in `queued`: its first count goes at once.)
            wait = HELD_INTERVAL_S if count != last else HELD_REFRESH_S
            if last is None or since >= wait or (final and count != last):
                due[model] = count
        return due

    async def _write(self, model: str, values: Mapping[str, str | None], kind: str) -> bool:
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
