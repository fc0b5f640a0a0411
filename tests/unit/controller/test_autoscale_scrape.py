"""The autoscaler's scraper and loop against real HTTP servers on loopback: the engines serve
the stand-in's metrics, the API server is the controller tests' small fake."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_api import serve_fake_api
from prometheus_client import CollectorRegistry, generate_latest

from modelfleet.controller.autoscale_loop import Autoscaler
from modelfleet.controller.autoscale_scrape import EngineScraper
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.observed import ObservedPod
from modelfleet.kube.paths import md_path
from modelfleet.sim.vllm.metrics import SimMetrics, build_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Engine:
    """One replica's /metrics: the stand-in's own registry, its gauges set by the test."""

    def __init__(self) -> None:
        self.metrics: SimMetrics = build_metrics("m")
        self.status = 200
        self.delay = 0.0
        self.in_flight = 0
        self.most_in_flight = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.status != 200:
                return web.Response(status=self.status, text="no")
            return web.Response(body=generate_latest(self.metrics.registry))
        finally:
            self.in_flight -= 1

    def set(self, running: int, waiting: int) -> None:
        self.metrics.running.labels(model_name="m").set(running)
        self.metrics.waiting.labels(model_name="m").set(waiting)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Engine, str]]:
    engine = Engine()
    app = web.Application()
    app.router.add_get("/metrics", engine.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield engine, f"http://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()


async def test_sums_running_and_waiting_over_replicas(served: tuple[Engine, str]) -> None:
    engine, url = served
    engine.set(running=16, waiting=25)
    async with aiohttp.ClientSession() as session:
        scraper = EngineScraper(session)
        await scraper.scrape({"m-instance-0": url, "m-instance-1": url})
        signal = scraper.signal(["m-instance-0", "m-instance-1"], held=3)
    assert (signal.running, signal.waiting, signal.reporting, signal.held) == (32, 50, 2, 3)


async def test_stale_figures_are_ignored(served: tuple[Engine, str]) -> None:
    engine, url = served
    engine.set(running=4, waiting=0)
    clock = Clock()
    async with aiohttp.ClientSession() as session:
        scraper = EngineScraper(session, max_age=30.0, clock=clock)
        await scraper.scrape({"a": url})
        engine.status = 500
        clock.now += 20
        await scraper.scrape({"a": url})  # fails: the last figures still count
        assert scraper.signal(["a"]).running == 4
        clock.now += 11
        await scraper.scrape({"a": url})
        assert scraper.signal(["a"]).reporting == 0
        assert scraper.failures == 2


async def test_a_replica_that_is_gone_is_forgotten(served: tuple[Engine, str]) -> None:
    engine, url = served
    engine.set(running=1, waiting=1)
    async with aiohttp.ClientSession() as session:
        scraper = EngineScraper(session)
        await scraper.scrape({"a": url})
        await scraper.scrape({})
        assert scraper.signal(["a"]).reporting == 0


async def test_not_an_engine_and_no_answer_count_as_no_figures(
    served: tuple[Engine, str],
) -> None:
    _, url = served
    async with aiohttp.ClientSession() as session:
        scraper = EngineScraper(session, timeout=0.5)
        # Port 9 on loopback: nothing listens (connection refused).
        await scraper.scrape({"a": url.replace("/metrics", "/nothing"), "b": "http://127.0.0.1:9/"})
        assert scraper.signal(["a", "b"]).reporting == 0
        assert scraper.failures == 2


async def test_concurrency_and_time_are_bounded(served: tuple[Engine, str]) -> None:
    engine, url = served
    engine.delay = 0.2
    async with aiohttp.ClientSession() as session:
        scraper = EngineScraper(session, concurrency=2, timeout=2.0)
        await scraper.scrape({f"r{i}": url for i in range(6)})
        assert engine.most_in_flight == 2
        assert scraper.signal([f"r{i}" for i in range(6)]).reporting == 6
        engine.delay = 1.0
        slow = EngineScraper(session, concurrency=6, timeout=0.2)
        started = asyncio.get_running_loop().time()
        await slow.scrape({f"r{i}": url for i in range(6)})
        assert asyncio.get_running_loop().time() - started < 0.9
        assert slow.failures == 6


def _deployment(port: int, *, enabled: bool = True, replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {
            "model": "org/m",
            "replicas": replicas,
            "engine": {"port": port},
            "autoscaling": {"enabled": enabled, "maxReplicas": 8, "targetPerReplica": 16},
        },
    }


def _replicas(count: int) -> list[ObservedPod]:
    return [
        ObservedPod(
            name=f"m-instance-{i}",
            namespace="ns",
            deployment="m",
            ordinal=i,
            ready=True,
            ip="127.0.0.1",
        )
        for i in range(count)
    ]


async def test_a_round_writes_the_decision_through_the_scale_subresource(
    served: tuple[Engine, str],
) -> None:
    engine, url = served
    engine.set(running=16, waiting=21)  # 74 over 2 replicas at target 16: 5
    port = int(url.split(":")[2].split("/")[0])
    key = ("ns", "m")
    async with serve_fake_api() as (fake, client), aiohttp.ClientSession() as session:
        fake.objects[md_path("ns", "m")] = _deployment(port)
        metrics = OperatorMetrics(CollectorRegistry())
        autoscaler = Autoscaler(client, EngineScraper(session), metrics)
        written = await autoscaler.round({key: _deployment(port)}, {key: _replicas(2)}, now=0.0)
        assert written == {key: 5}
        assert metrics.autoscaler_desired.labels("ns", "m")._value.get() == 5
        assert metrics.autoscaler_load.labels("ns", "m")._value.get() == 74
        assert metrics.autoscaler_scales.labels("up")._value.get() == 1
        assert fake.objects[md_path("ns", "m")]["spec"]["replicas"] == 5
        assert ("PATCH", md_path("ns", "m") + "/scale") in fake.requests
        assert autoscaler.decisions[key].reason == (
            "scaling up: 42 requests waiting and 32 requests running over 2 replicas, target 16"
        )
        # Same load on the count it chose: nothing more is written.
        engine.set(running=16, waiting=0)
        fake.requests.clear()
        stored = fake.objects[md_path("ns", "m")]
        assert stored["status"]["autoscaling"]["desiredReplicas"] == 5
        written = await autoscaler.round({key: stored}, {key: _replicas(5)}, now=10.0)
        assert written == {}
        # Only the figures changed, within STATUS_REFRESH_S of the last write: nothing written.
        assert not [r for r in fake.requests if r[0] == "PATCH"]


async def test_autoscaling_off_leaves_the_count_to_whoever_writes_scale(
    served: tuple[Engine, str],
) -> None:
    engine, url = served
    engine.set(running=256, waiting=256)
    port = int(url.split(":")[2].split("/")[0])
    key = ("ns", "m")
    async with serve_fake_api() as (fake, client), aiohttp.ClientSession() as session:
        fake.objects[md_path("ns", "m")] = _deployment(port, enabled=False)
        autoscaler = Autoscaler(client, EngineScraper(session))
        written = await autoscaler.round(
            {key: _deployment(port, enabled=False)}, {key: _replicas(2)}, now=0.0
        )
        assert written == {}
        assert engine.most_in_flight == 0  # not even scraped
        assert fake.requests == []
