"""The latest sample and the poll loop that refreshes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.api.gpustats import GpuReport, GpuStats

log = logging.getLogger(__name__)


class Backend(Protocol):
    """Where GPU stats come from."""

    name: str

    async def sample(self) -> tuple[list[GpuStats], str | None]:
        """Read every GPU once: (stats, driver version); BackendNotReady when none can be read."""
        ...


class BackendNotReady(Exception):
    """The backend cannot read its GPUs now (NVML as a whole fails); it is trying to recover.

    `gpus` are the GPUs as last known, each marked stale: the sample says who they are and that
    their figures are not measurements, and nothing in it calls them unhealthy.
    """

    def __init__(
        self, reason: str, gpus: Sequence[GpuStats] = (), driver_version: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.gpus = list(gpus)
        self.driver_version = driver_version


@dataclass(frozen=True, slots=True)
class Sample:
    """One complete sample: the reply model and its JSON, encoded once per poll."""

    report: GpuReport
    body: bytes
    monotonic: float


def build_report(
    node: str,
    backend: str,
    gpus: Sequence[GpuStats],
    *,
    driver_version: str | None,
    poll_interval_s: float,
    sampled_at: datetime,
    not_ready: str = "",
) -> GpuReport:
    """The `/v1/gpus` reply for one sample; `not_ready` says why the backend cannot read GPUs."""
    return GpuReport(
        node=node,
        backend=backend,
        sampled_at=sampled_at,
        poll_interval_s=poll_interval_s,
        driver_version=driver_version,
        ready=not not_ready,
        reason=not_ready,
        gpus=sorted(gpus, key=lambda g: g.index),
    )


@dataclass
class AgentState:
    """What the server reads: the latest sample and counters of the poll loop."""

    node: str
    backend: str
    poll_interval_s: float
    metrics: AgentMetrics
    latest: Sample | None = None
    last_success_unix: float | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(
        self, gpus: Sequence[GpuStats], driver_version: str | None, *, not_ready: str = ""
    ) -> Sample:
        now = datetime.now(UTC)
        report = build_report(
            self.node,
            self.backend,
            gpus,
            driver_version=driver_version,
            poll_interval_s=self.poll_interval_s,
            sampled_at=now,
            not_ready=not_ready,
        )
        sample = Sample(
            report=report,
            body=report.model_dump_json(by_alias=True).encode(),
            monotonic=time.monotonic(),
        )
        self.latest = sample
        self.last_success_unix = now.timestamp()
        return sample


async def poll_once(backend: Backend, state: AgentState) -> bool:
    """Take one sample into `state`; False when the backend is not ready or failed as a whole.

    Not ready (NVML down): a fresh sample that says so, with the GPUs marked stale, so that the
    pool keeps hearing from this node, places nothing on it and replaces nothing because of it.
    Any other failure keeps the previous sample (its `sampledAt` ages) and is counted.
    """
    started = time.perf_counter()
    try:
        gpus, driver = await backend.sample()
    except BackendNotReady as exc:
        state.publish(exc.gpus, exc.driver_version, not_ready=exc.reason)
        return False
    except Exception as exc:
        state.metrics.poll_errors.inc()
        log.warning("poll failed, keeping the previous sample: %s", exc)
        return False
    finally:
        state.metrics.poll_duration.observe(time.perf_counter() - started)
    state.publish(gpus, driver)
    return True


async def run_poll_loop(backend: Backend, state: AgentState) -> None:
    """Sample now, then every poll interval; `state.wake` asks for an early sample."""
    while True:
        started = time.monotonic()
        # Cleared before sampling, so a change that arrives during the poll asks for another.
        state.wake.clear()
        await poll_once(backend, state)
        remaining = state.poll_interval_s - (time.monotonic() - started)
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.wake.wait(), remaining)
