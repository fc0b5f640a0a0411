"""Helpers for the pool tests: small real HTTP servers that speak the agent's `GET /v1/gpus`.

Each `FakeAgent` is a real aiohttp server on an ephemeral 127.0.0.1 port serving valid
`GpuReport` JSON, with fault knobs (delay, HTTP error, garbage, wrong schema, flapping, a
frozen sample) and a request counter, so breaker and retry behaviour is asserted against real
sockets. A fake clock and a scripted jitter source make the backoff schedule exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from aiohttp import web

from modelfleet.api.gpustats import GpuHealth, GpuReport, GpuStats, PodRef
from modelfleet.gpuid import format_gpu_id


def make_report(
    node: str,
    gpus: int = 8,
    memory_mib: int = 81559,
    used_mib: Iterable[int] | None = None,
    *,
    unhealthy: Iterable[int] = (),
    pods: dict[int, list[str]] | None = None,
    uuid_prefix: str | None = None,
) -> GpuReport:
    used = list(used_mib) if used_mib is not None else [0] * gpus
    bad = set(unhealthy)
    prefix = uuid_prefix or node
    return GpuReport(
        node=node,
        backend="simulated",
        sampled_at=datetime(2025, 1, 1, tzinfo=UTC),
        poll_interval_s=5.0,
        gpus=[
            GpuStats(
                index=i,
                gpu_id=format_gpu_id(node, i),
                uuid=f"GPU-{prefix}-{i}",
                product="NVIDIA-H100-80GB-HBM3",
                memory_total_mib=memory_mib,
                memory_used_mib=used[i],
                memory_free_mib=memory_mib - used[i],
                health=GpuHealth(healthy=i not in bad, reason="XID 79" if i in bad else ""),
                pods=[
                    PodRef(namespace=p.split("/")[0], name=p.split("/")[1])
                    for p in (pods or {}).get(i, [])
                ],
            )
            for i in range(gpus)
        ],
    )


class FakeAgent:
    """A real HTTP server answering `GET /v1/gpus` like the node-stats agent.

    mode: ok | error (HTTP 500) | garbage (not JSON) | schema (JSON, wrong shape) | delay
    (sleeps `delay_s` before answering) | flap (ok and error, alternating per request) | raw
    (serves `raw_body` as it is, for replies no `GpuReport` can hold).

    Like a real agent, every reply is a new sample: `sampledAt` is the report's plus one second
    per request. `frozen = True` keeps serving the last sample, as an agent whose poll loop is
    stuck does.
    """

    def __init__(
        self,
        node: str,
        gpus: int = 8,
        *,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host = host
        self.report = make_report(node, gpus)
        self.mode = "ok"
        self.delay_s = 0.0
        self.token = token
        self.frozen = False
        self.raw_body = b""
        self.requests = 0
        self._body = b""
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def node(self) -> str:
        return self.report.node

    async def _gpus(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return web.json_response({"error": "unauthorized"}, status=401)
        mode = self.mode
        if mode == "flap":
            mode = "ok" if self.requests % 2 else "error"
        if mode == "delay":
            await asyncio.sleep(self.delay_s)  # the fault knob: a slow agent
        if mode == "error":
            return web.json_response({"error": "nvml failed"}, status=500)
        if mode == "garbage":
            return web.Response(body=b"\x00<html>not json", content_type="text/html")
        if mode == "raw":
            return web.Response(body=self.raw_body, content_type="application/json")
        if mode == "schema":
            return web.json_response({"node": self.node, "gpus": "eight"})
        if not self.frozen or not self._body:
            sample = self.report.model_copy(
                update={"sampled_at": self.report.sampled_at + timedelta(seconds=self.requests)}
            )
            self._body = sample.model_dump_json(by_alias=True).encode()
        return web.Response(body=self._body, content_type="application/json")

    async def start(self) -> FakeAgent:
        app = web.Application()
        app.router.add_get("/v1/gpus", self._gpus)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Kill it: close the listening socket and every open connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Start again on the same port, as a restarted agent pod with the same IP."""
        await self.stop()
        await self.start()


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedJitter:
    """Returns the given draws in order; fails the test if asked for more."""

    def __init__(self, draws: Iterable[float]) -> None:
        self.draws = list(draws)
        self.used = 0

    def __call__(self) -> float:
        if self.used >= len(self.draws):
            raise AssertionError("jitter drawn more often than the test scripted")
        self.used += 1
        return self.draws[self.used - 1]
