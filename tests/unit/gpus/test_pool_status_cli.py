"""`modelfleet status` and `GET /status`: real agents on loopback, the CLI as a real process."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from modelfleet.gpus import http as pool_http
from modelfleet.gpus.client import create_session
from modelfleet.gpus.metrics import PoolMetrics
from modelfleet.gpus.pool import GpuPool
from modelfleet.gpus.status import PoolStatus
from modelfleet.settings import OperatorSettings


async def modelfleet(*args: str) -> tuple[int, str, str]:
    """Run the CLI as a child process while this event loop keeps serving the agents."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modelfleet",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_from_endpoints_table_json_kill_and_restart(agents: Any) -> None:
    a, b, c = await agents(3)
    urls = ",".join(x.url for x in (a, b, c))

    rc, out, err = await modelfleet("status", "--endpoints", urls)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "ENDPOINT", "NODE", "STATE", "GPUS", "FREE/TOTAL", "MEMORY", "FREE/TOTAL", "GiB", "LATENCY",
    ]  # fmt: skip
    row_b = next(line for line in lines if line.startswith(b.url))
    assert row_b.split()[1:5] == ["node-b", "healthy", "8/8", "637.2/637.2"]
    assert (
        "TOTAL  endpoints 3/3 usable (3 healthy)  nodes 3  GPUs free 24/24  "
        "memory free 1911.5/1911.5 GiB"
    ) in out

    rc, out, _ = await modelfleet("status", "--endpoints", urls, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["source"] == "endpoints"
    assert doc["totals"]["gpusTotal"] == 24
    assert doc["totals"]["gpusFree"] == 24
    assert doc["totals"]["memoryTotalMiB"] == 24 * 81559
    assert doc["totals"]["memoryFreeMiB"] == 24 * 81559
    ep = next(e for e in doc["endpoints"] if e["url"] == b.url)
    assert (ep["node"], ep["state"], ep["gpusTotal"], ep["memoryFreeMiB"]) == (
        "node-b",
        "healthy",
        8,
        8 * 81559,
    )
    assert PoolStatus.model_validate(doc).totals.gpus_total == 24

    await b.stop()
    rc, out, _ = await modelfleet("status", "--endpoints", urls, "--json")
    doc = json.loads(out)
    ep = next(e for e in doc["endpoints"] if e["url"] == b.url)
    assert ep["state"] == "down"
    assert ep["gpusTotal"] is None
    assert "cannot connect" in ep["reason"]
    assert doc["totals"]["gpusTotal"] == 16
    assert doc["totals"]["memoryTotalMiB"] == 16 * 81559
    assert rc == 0  # two endpoints are still usable
    rc, out, _ = await modelfleet("status", "--endpoints", urls)
    assert f"{b.url}  node-b" not in out  # a node is known only from a reply
    assert "down (open)" in out
    assert "GPUs free 16/24" not in out
    assert "GPUs free 16/16" in out
    assert f"  {b.url}: cannot connect to {b.url}" in out

    await b.restart()
    rc, out, _ = await modelfleet("status", "--endpoints", urls, "--json")
    assert json.loads(out)["totals"]["gpusTotal"] == 24


async def test_status_exit_codes_and_errors(agents: Any) -> None:
    (a,) = await agents(1)
    await a.stop()
    rc, out, _ = await modelfleet("status", "--endpoints", a.url)
    assert rc == 1
    assert "NOT READY  waiting for GPU stats: none of 1 agent endpoints is usable (1 down)" in out
    rc, _, err = await modelfleet("status", "--endpoints", "ftp://x:1")
    assert rc == 2
    assert "--endpoints: 'ftp://x:1' must start with http:// or https://" in err
    rc, _, err = await modelfleet("status")
    assert rc == 2
    assert "no endpoints: pass --endpoints URL[,URL...] or --operator URL" in err
    rc, _, err = await modelfleet("status", "--operator", a.url)
    assert rc == 2
    assert f"cannot read {a.url}/status" in err


@pytest.fixture
async def operator_status(
    agents: Any, registry: CollectorRegistry
) -> AsyncIterator[tuple[GpuPool, str, list[Any]]]:
    """A running pool behind GET /status, as the operator mounts it on its metrics port."""
    started = await agents(3)
    settings = OperatorSettings(
        node_stats_endpoints=[x.url for x in started],
        poll_interval_s=0.05,
        endpoint_timeout_s=0.5,
        endpoint_retries=0,
        breaker_failure_threshold=2,
        backoff_base_s=0.1,
        backoff_cap_s=0.4,
    )
    async with create_session(settings.poll_concurrency) as session:
        pool = GpuPool(settings, session, metrics=PoolMetrics(registry))
        app = web.Application()
        pool_http.add_routes(app, pool)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        await pool.start()
        try:
            yield pool, f"http://127.0.0.1:{port}", started
        finally:
            await pool.close()
            await runner.cleanup()


async def wait_until(pool: GpuPool, predicate: Any, timeout_s: float = 10.0) -> None:
    """Wait, round by round, until `predicate(snapshot)` holds."""
    async with asyncio.timeout(timeout_s):
        while not predicate(pool.snapshot()):
            await pool.wait_for_round(pool.rounds, timeout_s)


async def test_operator_status_follows_kill_and_recovery_after_probe(
    operator_status: tuple[GpuPool, str, list[Any]], registry: CollectorRegistry
) -> None:
    pool, base, (_, b, _) = operator_status
    await wait_until(pool, lambda s: s.totals.figures.gpus_total == 24)
    rc, out, err = await modelfleet("status", "--operator", base, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["source"] == "operator"
    assert doc["totals"]["gpusTotal"] == 24
    assert len(doc["nodes"]) == 3
    assert len(doc["nodes"][0]["gpus"]) == 8

    await b.stop()
    await wait_until(pool, lambda s: s.totals.figures.gpus_total == 16)
    rc, out, _ = await modelfleet("status", "--operator", base, "--json")
    ep = next(e for e in json.loads(out)["endpoints"] if e["url"] == b.url)
    assert ep["state"] == "down"
    assert ep["breaker"] in ("open", "half_open")
    assert json.loads(out)["totals"]["gpusTotal"] == 16

    await b.restart()
    await wait_until(pool, lambda s: s.totals.figures.gpus_total == 24)
    # It came back through the breaker's probe: open -> half-open -> closed.
    assert pool.breaker(b.url).state.value == "closed"
    assert (
        registry.get_sample_value(
            "modelfleet_pool_breaker_transitions_total",
            {"from_state": "half_open", "to_state": "closed"},
        )
        == 1
    )
    rc, out, _ = await modelfleet("status", "--operator", base)
    assert rc == 0
    assert "GPUs free 24/24" in out


async def test_status_route_without_gpus_and_bad_flag(
    operator_status: tuple[GpuPool, str, list[Any]],
) -> None:
    pool, base, _ = operator_status
    await wait_until(pool, lambda s: s.ready)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/status", params={"gpus": "false"}) as resp:
            assert resp.status == 200
            doc = PoolStatus.model_validate_json(await resp.read())
        assert doc.nodes == []
        assert doc.totals.gpus_total == 24
        async with http.get(base + "/status", params={"gpus": "maybe"}) as resp:
            assert resp.status == 400
            assert "gpus='maybe': expected true or false" in await resp.text()


ESC = "\x1b]0;owned\x07\x1b[2J"  # set the window title, clear the screen
C1 = "\x9b31m"  # the one-byte CSI of 8-bit terminals


def hostile_status() -> dict[str, Any]:
    """A status document whose every agent-made string carries terminal escapes."""
    gpu = {
        "gpuId": f"node{ESC}:0",
        "index": 0,
        "uuid": f"GPU-{ESC}",
        "product": f"H100{C1}",
        "memoryTotalMiB": 81559,
        "memoryUsedMiB": 0,
        "memoryFreeMiB": 81559,
        "healthy": False,
        "reason": f"XID 79{ESC}",
        "free": False,
    }
    figures = {
        "gpusTotal": 1,
        "gpusHealthy": 0,
        "gpusFree": 0,
        "memoryTotalMiB": 81559,
        "memoryUsedMiB": 0,
        "memoryFreeMiB": 81559,
    }
    return {
        "source": "operator",
        "takenAt": "2025-01-01T00:00:00Z",
        "ready": False,
        "reason": f"waiting{ESC}\nsecond line",
        "totals": {
            **figures,
            "endpoints": 1,
            "endpointsUsable": 0,
            "endpointsByState": {f"down{ESC}": 1},
            "nodes": 1,
        },
        "endpoints": [
            {
                **figures,
                "url": f"http://127.0.0.5:9400/{ESC}",
                "node": f"gpu-node{ESC}{C1}",
                "state": "down",
                "breaker": "open",
                "included": False,
                "reason": f"cannot connect{ESC}\r\n{C1}",
            }
        ],
        "nodes": [
            {
                **figures,
                "name": f"gpu-node{ESC}",
                "endpoint": "http://127.0.0.5:9400",
                "state": "healthy",
                "sampledAt": "2025-01-01T00:00:00Z",
                "notReady": ESC,
                "gpus": [gpu],
            }
        ],
        "balance": {"memoryUsedFractionByNode": {}, "memoryUsedCv": 0, "memoryUsedSpread": 0},
        "gpuNodesWithoutAgent": ["gpu-node-2", f"gpu-node-3{ESC}"],
    }


def no_control_characters(text: str) -> bool:
    return not any(not ch.isprintable() and ch not in "\n" for ch in text)


async def test_status_prints_no_terminal_escapes_from_the_operator() -> None:
    async def status(request: web.Request) -> web.Response:
        return web.json_response(hostile_status())

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text=f"boom{ESC}{C1}")

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_get("/broken/status", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        rc, out, err = await modelfleet("status", "--operator", base)
        assert rc == 1, err
        assert no_control_characters(out), out
        assert "gpu-node\\x1b]0;owned\\x07\\x1b[2J\\x9b31m" in out  # shown, defused
        assert "cannot connect\\x1b]0;owned\\x07\\x1b[2J  \\x9b31m" in out  # one line per reason
        # GPU nodes no agent reports: placement cannot use them, and the table says so.
        assert (
            "NO AGENT  2 GPU node(s) that placement cannot use: gpu-node-2, gpu-node-3\\x1b" in out
        )
        rc, out, err = await modelfleet("status", "--operator", base, "--json")
        assert rc == 1, err
        assert no_control_characters(out), out
        assert json.loads(out)["endpoints"][0]["node"] == f"gpu-node{ESC}{C1}"  # same data
        rc, out, err = await modelfleet("status", "--operator", base + "/broken")
        assert rc == 2
        assert no_control_characters(err), err
        assert "answered HTTP 500: boom\\x1b]0;owned" in err
    finally:
        await runner.cleanup()
