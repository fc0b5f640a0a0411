"""The pool and `modelfleet status` against the real agent (`modelfleet agent --backend
simulated`) run as processes on loopback ports, faulted through its `/sim/faults` knobs.

Rounds are driven one by one with a fake clock and scripted jitter, so breaker timings are
exact; every request is real HTTP to a real agent process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from pool_fakes import FakeClock, ScriptedJitter
from prometheus_client import CollectorRegistry

from modelfleet.api.gpustats import GpuReport
from modelfleet.api.times import format_time
from modelfleet.gpus.breaker import BreakerState
from modelfleet.gpus.client import create_session
from modelfleet.gpus.health import EndpointState
from modelfleet.gpus.metrics import PoolMetrics
from modelfleet.gpus.pool import GpuPool
from modelfleet.gpus.snapshot import EndpointSummary, PoolSnapshot
from modelfleet.settings import OperatorSettings

INTERVAL = 5.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RealAgent:
    """`modelfleet agent --backend simulated` as a child process."""

    def __init__(self, node: str, http: aiohttp.ClientSession, *extra: str) -> None:
        self.node = node
        self.extra = extra
        self.port = free_port()
        self.http = http
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RealAgent:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "modelfleet", "agent", "--backend", "simulated",
            "--node", self.node, "--host", "127.0.0.1", "--port", str(self.port), "--gpus", "8",
            *self.extra,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(30):
            while True:
                assert self.proc.returncode is None, "agent exited"
                try:
                    async with self.http.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)  # poll interval of the readiness wait

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None

    async def faults(self, **knobs: Any) -> None:
        async with self.http.post(self.url + "/sim/faults", json=knobs) as resp:
            assert resp.status == 200, await resp.text()

    async def sampled_at(self) -> datetime:
        async with self.http.get(self.url + "/v1/gpus") as resp:
            assert resp.status == 200, await resp.text()
            return GpuReport.model_validate_json(await resp.read()).sampled_at

    async def wait_for_sample_after(self, previous: datetime | None) -> datetime:
        """Wait (with a deadline) until the agent serves a sample other than `previous`."""
        async with asyncio.timeout(10):
            while True:
                current = await self.sampled_at()
                if current != previous:
                    return current
                await asyncio.sleep(0.02)  # poll interval of the wait; the agent samples at 20/s


@pytest.fixture
async def real_agents() -> AsyncIterator[Callable[..., Awaitable[list[RealAgent]]]]:
    started: list[RealAgent] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def factory(n: int, *extra: str) -> list[RealAgent]:
            new = [RealAgent(f"gpu-node-{len(started) + i}", http, *extra) for i in range(n)]
            await asyncio.gather(*(a.start() for a in new))
            started.extend(new)
            return new

        yield factory
        for agent in started:
            await agent.kill()


def by_url(snap: PoolSnapshot, url: str) -> EndpointSummary:
    return next(e for e in snap.endpoints if e.url == url)


async def test_kill_slow_garbage_flap_with_exact_backoff_and_recovery(real_agents: Any) -> None:
    killed, slow, garbage, flapping, steady = await real_agents(5)
    settings = OperatorSettings(
        node_stats_endpoints=[a.url for a in (killed, slow, garbage, flapping, steady)],
        poll_interval_s=INTERVAL,
        endpoint_timeout_s=0.3,
        endpoint_retries=0,
        breaker_failure_threshold=2,
        backoff_base_s=1.0,
        backoff_cap_s=4.0,
    )
    clock = FakeClock()
    # One draw per open, in order: killed, slow, garbage (round 2), then killed's failed probe.
    jitter = ScriptedJitter([0.5, 1.0, 0.25, 1.0])
    async with create_session(16) as session:
        pool = GpuPool(
            settings,
            session,
            metrics=PoolMetrics(CollectorRegistry()),
            clock=clock,
            jitter=jitter,
        )
        snap = await pool.poll_once()
        assert snap.totals.figures.gpus_total == 40
        await killed.kill()
        await slow.faults(delayS=1.0)
        await garbage.faults(garbage=True)

        def state(a: RealAgent) -> EndpointState:
            return by_url(pool.snapshot(), a.url).state

        for round_no in (1, 2):
            clock.advance(INTERVAL)
            await flapping.faults(failStatus=503 if round_no % 2 else None)
            snap = await pool.poll_once()
        # Two consecutive failures: killed, slow and garbage are down; the flapping one failed
        # once, then succeeded, so it is degraded and still counted.
        assert [state(a) for a in (killed, slow, garbage)] == [EndpointState.DOWN] * 3
        assert state(flapping) == EndpointState.DEGRADED
        assert state(steady) == EndpointState.HEALTHY
        assert snap.totals.figures.gpus_total == 16
        assert {g.node for g in snap.gpus.values()} == {flapping.node, steady.node}
        assert by_url(snap, killed.url).reason.startswith(f"cannot connect to {killed.url}")
        assert by_url(snap, slow.url).reason == "no reply within 0.3 s"
        assert by_url(snap, garbage.url).reason.startswith("reply is not JSON")
        opened = clock.now
        assert pool.breaker(killed.url).open_until == opened + 0.5 * 1.0
        assert pool.breaker(slow.url).open_until == opened + 1.0 * 1.0
        assert pool.breaker(garbage.url).open_until == opened + 0.25 * 1.0

        # The killed agent's probe at its backoff fails: open again for 1.0 * min(4, 2) s.
        clock.now = opened + 0.5
        await slow.faults(delayS=0)
        await garbage.faults(garbage=False)
        await pool.poll_once()
        assert pool.breaker(killed.url).state == BreakerState.OPEN
        assert pool.breaker(killed.url).opens == 1
        assert pool.breaker(killed.url).open_until == opened + 0.5 + 2.0
        # The garbage agent was due too (0.25 s): its probe succeeded, it is back.
        assert pool.breaker(garbage.url).state == BreakerState.CLOSED
        assert pool.breaker(slow.url).state == BreakerState.OPEN  # not due before 1.0 s

        clock.now = opened + 1.0
        snap = await pool.poll_once()
        assert pool.breaker(slow.url).state == BreakerState.CLOSED
        assert by_url(snap, slow.url).included

        # The killed agent restarts; the probe at the end of its backoff closes the breaker.
        await killed.start()
        clock.now = opened + 2.5
        snap = await pool.poll_once()
        assert pool.breaker(killed.url).state == BreakerState.CLOSED
        assert by_url(snap, killed.url).included
        assert snap.totals.figures.gpus_total == 40
        assert jitter.used == 4


async def test_agent_with_a_frozen_sample_goes_stale_and_comes_back(real_agents: Any) -> None:
    """The real agent's `freezeSample` knob: it answers every request, always with the same
    sample. The pool excludes it after 3 poll intervals without a new sample (on the pool's
    clock), and takes it back at the first new one. The agents sample every 50 ms; before each
    round the test waits until the steady one has a new sample, as 5 s of real time would."""
    stuck, steady = await real_agents(2, "--poll-interval", "0.05")
    settings = OperatorSettings(
        node_stats_endpoints=[stuck.url, steady.url],
        poll_interval_s=INTERVAL,
        endpoint_timeout_s=2.0,
        endpoint_retries=0,
    )
    clock = FakeClock()
    async with create_session(4) as session:
        pool = GpuPool(settings, session, metrics=PoolMetrics(CollectorRegistry()), clock=clock)

        async def next_round() -> PoolSnapshot:
            clock.advance(INTERVAL)
            await steady.wait_for_sample_after(by_url(pool.snapshot(), steady.url).sampled_at)
            return await pool.poll_once()

        await stuck.faults(freezeSample=True)
        frozen_at = await stuck.sampled_at()
        snap = await pool.poll_once()  # t=0: the pool sees the frozen sample for the first time
        assert by_url(snap, stuck.url).sampled_at == frozen_at
        seen = []
        for _ in range(3):  # t=5, 10, 15
            snap = await next_round()
            seen.append(by_url(snap, stuck.url).state)
        assert seen == [EndpointState.HEALTHY, EndpointState.HEALTHY, EndpointState.STALE]
        row = by_url(snap, stuck.url)
        assert not row.included
        assert row.breaker == BreakerState.CLOSED
        assert row.reason.startswith(
            f"the agent's sample has not changed for 15 s (sampledAt {format_time(frozen_at)}"
        )
        assert by_url(snap, steady.url).state == EndpointState.HEALTHY
        assert snap.totals.figures.gpus_total == 8

        await stuck.faults(freezeSample=False)
        await stuck.wait_for_sample_after(frozen_at)
        snap = await next_round()
        assert by_url(snap, stuck.url).state == EndpointState.HEALTHY
        assert by_url(snap, stuck.url).included
        assert snap.totals.figures.gpus_total == 16


async def modelfleet(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelfleet", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_status_cli_against_three_real_agents(real_agents: Any) -> None:
    a, b, c = await real_agents(3)
    urls = ",".join(x.url for x in (a, b, c))
    rc, out = await modelfleet("status", "--endpoints", urls)
    assert rc == 0
    assert "TOTAL  endpoints 3/3 usable (3 healthy)  nodes 3  GPUs free 24/24" in out
    for agent in (a, b, c):
        row = next(line for line in out.splitlines() if line.startswith(agent.url))
        assert row.split()[1:4] == [agent.node, "healthy", "8/8"]

    rc, out = await modelfleet("status", "--endpoints", urls, "--json")
    doc = json.loads(out)
    assert doc["totals"]["gpusTotal"] == 24
    before = doc["totals"]["memoryTotalMiB"]

    await b.kill()
    rc, out = await modelfleet("status", "--endpoints", urls, "--json")
    doc = json.loads(out)
    row = next(e for e in doc["endpoints"] if e["url"] == b.url)
    assert row["state"] == "down"
    assert doc["totals"]["gpusTotal"] == 16
    assert doc["totals"]["memoryTotalMiB"] == before * 2 // 3
    rc, out = await modelfleet("status", "--endpoints", urls)
    assert "GPUs free 16/16" in out
    assert "down (open)" in out

    await b.start()
    rc, out = await modelfleet("status", "--endpoints", urls, "--json")
    assert json.loads(out)["totals"]["gpusTotal"] == 24
