"""The autoscaler's eyes: each Ready replica's engine figures, scraped from its /metrics.

A round scrapes every target at once, but never more than `concurrency` at a time and each
within `timeout`; a replica that does not answer, or answers with something that is not a vLLM
engine's metrics, keeps its last figures only until they are older than `max_age`, after which
the autoscaler no longer counts it (stale figures would hold a count up, or down, that the load
no longer asks for).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp

from modelfleet.controller.autoscale import Signal
from modelfleet.enginemetrics import EngineLoad, EngineMetricsError, parse_engine_load

log = logging.getLogger(__name__)

# A /metrics answer larger than this is not read further (a real vLLM's is ~100 KiB).
MAX_BODY = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    load: EngineLoad
    at: float  # monotonic seconds


class EngineScraper:
    """The latest fresh engine figures per replica (keyed by Pod name)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float = 2.0,
        concurrency: int = 8,
        max_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._limit = asyncio.Semaphore(concurrency)
        self._max_age = max_age
        self._clock = clock
        self._samples: dict[str, Sample] = {}
        self.failures = 0

    async def scrape(self, targets: Mapping[str, str]) -> None:
        """Scrape every target (Pod name -> metrics URL); forget replicas no longer listed."""
        for gone in self._samples.keys() - targets.keys():
            del self._samples[gone]
        await asyncio.gather(*(self._one(name, url) for name, url in targets.items()))

    async def _one(self, name: str, url: str) -> None:
        async with self._limit:
            try:
                async with self._session.get(url, timeout=self._timeout) as response:
                    if response.status != 200:
                        raise EngineMetricsError(f"GET {url} answered {response.status}")
                    body = await response.content.read(MAX_BODY)
                load = parse_engine_load(body)
            except (aiohttp.ClientError, TimeoutError, EngineMetricsError) as exc:
                self.failures += 1
                log.debug("no engine figures from %s (%s): %s", name, url, exc)
                return
        self._samples[name] = Sample(load, self._clock())

    def fresh(self, name: str) -> EngineLoad | None:
        sample = self._samples.get(name)
        if sample is None or self._clock() - sample.at > self._max_age:
            return None
        return sample.load

    def signal(self, replicas: Iterable[str], held: int = 0) -> Signal:
        """The load of one model: its replicas' fresh figures summed, and the held requests."""
        loads = [load for name in replicas if (load := self.fresh(name)) is not None]
        return Signal(
            running=sum(load.running for load in loads),
            waiting=sum(load.waiting for load in loads),
            reporting=len(loads),
            held=held,
        )
