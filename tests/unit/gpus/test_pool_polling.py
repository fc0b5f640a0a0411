"""The pool against real HTTP servers on loopback: breakers, exclusion, recovery, reasons.

Rounds are driven one by one (`poll_once`) with a fake monotonic clock and a scripted jitter
source, so breaker timings are exact; every request is real HTTP to a `FakeAgent`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pool_fakes import FakeClock, ScriptedJitter, make_report
from prometheus_client import CollectorRegistry

from modelfleet.gpus import pool as pool_module
from modelfleet.gpus.breaker import BreakerState
from modelfleet.gpus.client import (
    FetchError,
    LastReply,
    build_target,
    create_session,
    fetch_report,
)
from modelfleet.gpus.health import EndpointState
from modelfleet.gpus.metrics import PoolMetrics
from modelfleet.gpus.pool import GpuPool
from modelfleet.gpus.snapshot import EndpointSummary, PoolSnapshot
from modelfleet.settings import OperatorSettings, load

INTERVAL = 5.0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with create_session(16) as s:
        yield s


@pytest.fixture
def make_pool(
    session: aiohttp.ClientSession, registry: CollectorRegistry
) -> Callable[..., tuple[GpuPool, FakeClock, ScriptedJitter]]:
    made: list[int] = []

    def factory(
        urls: list[str], jitter: list[float] | None = None, **overrides: Any
    ) -> tuple[GpuPool, FakeClock, ScriptedJitter]:
        params: dict[str, Any] = {
            "node_stats_endpoints": urls,
            "poll_interval_s": INTERVAL,
            "endpoint_timeout_s": 1.0,
            "endpoint_retries": 0,
            "breaker_failure_threshold": 3,
            "backoff_base_s": 1.0,
            "backoff_cap_s": 60.0,
        }
        params.update(overrides)
        clock = FakeClock()
        draws = ScriptedJitter(jitter or [])
        metrics = PoolMetrics(registry if not made else CollectorRegistry())
        made.append(1)
        pool = GpuPool(
            OperatorSettings(**params),
            session,
            # The first pool of a test reports to `registry`; more pools get their own.
            metrics=metrics,
            clock=clock,
            wall_clock=lambda: 1.7e9 + clock.now,
            jitter=draws,
        )
        return pool, clock, draws

    return factory


def by_url(snap: PoolSnapshot, url: str) -> EndpointSummary:
    return next(e for e in snap.endpoints if e.url == url)


def states(pool: GpuPool) -> dict[str, str]:
    return {e.node or e.url: e.state.value for e in pool.snapshot().endpoints}


async def test_three_agents_merge_into_one_pool(agents: Any, make_pool: Any) -> None:
    a, b, c = await agents(3)
    pool, _, _ = make_pool([a.url, b.url, c.url])
    snap = await pool.poll_once()
    assert snap.ready
    assert snap.totals.figures.gpus_total == 24
    assert snap.totals.figures.gpus_free == 24
    assert snap.totals.figures.memory_total_mib == 24 * 81559
    assert sorted(snap.gpus)[:2] == ["node-a:0", "node-a:1"]
    assert snap.gpus["node-c:7"].endpoint == c.url
    assert pool.endpoint_for_node("node-b") == b.url
    assert pool.node_for_endpoint(a.url) == "node-a"
    assert states(pool) == {"node-a": "healthy", "node-b": "healthy", "node-c": "healthy"}
    e = by_url(snap, a.url)
    assert e.latency_ewma_s is not None
    assert e.latency_ewma_s > 0
    assert e.success_rate == 1.0


async def test_killed_agent_degrades_then_goes_down_then_recovers_after_probe(
    agents: Any, make_pool: Any
) -> None:
    a, b, c = await agents(3)
    pool, clock, jitter = make_pool([a.url, b.url, c.url], jitter=[0.5, 1.0])
    await pool.poll_once()
    await b.stop()

    for round_no in (1, 2):
        clock.advance(INTERVAL)
        snap = await pool.poll_once()
        # Below the threshold the last good sample is still fresh: degraded, still counted.
        assert states(pool)["node-b"] == "degraded", round_no
        assert snap.totals.figures.gpus_total == 24
        assert "cannot connect" in by_url(snap, b.url).reason

    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    opened_at = clock.now
    assert states(pool)["node-b"] == "down"
    assert pool.breaker(b.url).state == BreakerState.OPEN
    assert pool.breaker(b.url).open_until == opened_at + 0.5 * 1.0
    assert snap.totals.figures.gpus_total == 16
    assert "node-b:0" not in snap.gpus
    assert by_url(snap, b.url).included is False
    assert by_url(snap, b.url).figures is None
    assert [e.state for e in snap.endpoints if e.url != b.url] == [EndpointState.HEALTHY] * 2

    # The agent comes back; before the backoff has passed no request is sent to it.
    await b.restart()
    before = b.requests
    clock.advance(0.4)
    await pool.poll_once()
    assert b.requests == before
    assert states(pool)["node-b"] == "down"

    clock.advance(0.1)  # the backoff has passed: this round probes (half-open) and closes
    snap = await pool.poll_once()
    assert b.requests == before + 1
    assert pool.breaker(b.url).state == BreakerState.CLOSED
    # Back in the pool; degraded (not healthy) while its recent success rate is below 90 %.
    assert states(pool)["node-b"] == "degraded"
    assert by_url(snap, b.url).included
    assert by_url(snap, b.url).reason == ""
    assert by_url(snap, b.url).success_rate == 2 / 5
    assert snap.totals.figures.gpus_total == 24
    assert jitter.used == 1


async def test_backoff_schedule_is_exact(agents: Any, make_pool: Any) -> None:
    (a,) = await agents(1)
    a.mode = "error"
    draws = [1.0, 0.5, 1.0, 1.0, 0.25, 1.0]
    pool, clock, jitter = make_pool(
        [a.url], jitter=draws, breaker_failure_threshold=2, backoff_base_s=1.0, backoff_cap_s=8.0
    )
    await pool.poll_once()
    assert pool.breaker(a.url).state == BreakerState.CLOSED
    clock.advance(1.0)
    await pool.poll_once()
    # Opens on the second failure: full jitter of min(cap, base * 2**n), n = opens so far.
    expected_backoffs = [1.0 * 1, 0.5 * 2, 1.0 * 4, 1.0 * 8, 0.25 * 8, 1.0 * 8]
    got = []
    for n, backoff in enumerate(expected_backoffs):
        b = pool.breaker(a.url)
        assert b.state == BreakerState.OPEN
        assert b.opens == n
        assert b.backoff_s == backoff
        got.append(b.backoff_s)
        requests = a.requests
        if backoff > 0.01:
            clock.now = b.open_until - 0.01
            await pool.poll_once()
            assert a.requests == requests, "no request while the breaker is open"
        clock.now = b.open_until
        if n == len(expected_backoffs) - 1:
            break
        await pool.poll_once()  # the probe: one request, fails, opens again
        assert a.requests == requests + 1
        assert pool.breaker(a.url).open_until == clock.now + expected_backoffs[n + 1]
    assert got == expected_backoffs
    assert jitter.used == len(draws)
    a.mode = "ok"
    await pool.poll_once()
    assert pool.breaker(a.url).state == BreakerState.CLOSED
    assert pool.breaker(a.url).opens == 0


async def test_slow_agent_times_out_and_the_others_are_untouched(
    agents: Any, make_pool: Any
) -> None:
    a, b, c = await agents(3)
    b.mode, b.delay_s = "delay", 5.0
    pool, _, _ = make_pool([a.url, b.url, c.url], endpoint_timeout_s=0.2, endpoint_retries=1)
    snap = await pool.poll_once()
    slow = by_url(snap, b.url)
    assert slow.reason == "no reply within 0.2 s"
    assert slow.state == EndpointState.STALE  # it never answered
    assert b.requests == 2  # one retry
    assert snap.totals.figures.gpus_total == 16
    assert [by_url(snap, x.url).state for x in (a, c)] == [EndpointState.HEALTHY] * 2


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("garbage", "reply is not JSON: Invalid JSON"),
        ("schema", "reply does not match GpuReport: backend: Field required"),
        ("error", 'HTTP 500 from /v1/gpus: {"error": "nvml failed"}'),
    ],
)
async def test_malformed_reply_marks_only_that_endpoint(
    agents: Any, make_pool: Any, mode: str, reason: str
) -> None:
    a, b, c = await agents(3)
    pool, clock, _ = make_pool([a.url, b.url, c.url], endpoint_retries=2)
    await pool.poll_once()
    b.mode = mode
    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    bad = by_url(snap, b.url)
    assert bad.reason.startswith(reason)
    assert bad.state == EndpointState.DEGRADED
    assert bad.consecutive_failures == 1
    # A malformed reply is not retried (it would be malformed again); a 500 is.
    assert b.requests == (1 + 3 if mode == "error" else 1 + 1)
    assert [by_url(snap, x.url).state for x in (a, c)] == [EndpointState.HEALTHY] * 2
    assert [by_url(snap, x.url).reason for x in (a, c)] == ["", ""]


def hostile_body(node: str, gpu: dict[str, object], **report: object) -> bytes:
    """A reply as JSON text, with numbers no float holds (`1e400`, a 400-digit integer)."""
    doc = {
        "node": node,
        "backend": "nvml",
        "sampledAt": "2025-01-01T00:00:00Z",
        "pollIntervalS": 5,
        "gpus": [
            {
                "index": 0,
                "gpuId": f"{node}:0",
                "uuid": f"GPU-{node}-hostile",
                "product": "NVIDIA-H100-80GB-HBM3",
                "memoryTotalMib": 81559,
                "memoryUsedMib": 0,
                "memoryFreeMib": 81559,
                **gpu,
            }
        ],
        **report,
    }
    huge = "1" + "0" * 400
    return json.dumps(doc).replace('"HUGE"', huge).replace('"E400"', "1e400").encode()


@pytest.mark.parametrize(
    ("name", "gpu", "report", "reason"),
    [
        ("huge integer memory", {"memoryTotalMib": "HUGE"}, {}, "gpus.0.memoryTotalMib"),
        ("1e400 memory", {"memoryUsedMib": "E400"}, {}, "gpus.0.memoryUsedMib"),
        (
            "used above total",
            {"memoryUsedMib": 90000, "memoryFreeMib": 0},
            {},
            "memoryUsedMib 90000 > memoryTotalMib 81559",
        ),
        ("negative free", {"memoryFreeMib": -5}, {}, "gpus.0.memoryFreeMib"),
        ("1e400 temperature", {"temperatureC": "E400"}, {}, "finite number"),
        ("poll interval 1e308", {}, {"pollIntervalS": 1e308}, "pollIntervalS"),
    ],
)
async def test_one_report_with_bad_numbers_fails_only_its_endpoint(
    agents: Any,
    make_pool: Any,
    name: str,
    gpu: dict[str, object],
    report: dict[str, object],
    reason: str,
) -> None:
    a, b, c = await agents(3)
    pool, clock, _ = make_pool([a.url, b.url, c.url], jitter=[0.5])
    await pool.poll_once()
    b.mode = "raw"
    b.raw_body = hostile_body(b.node, gpu, **report)
    clock.advance(INTERVAL)
    snap = await pool.poll_once()  # the round completes
    bad = by_url(snap, b.url)
    assert bad.reason.startswith("reply does not match GpuReport: ")
    assert reason in bad.reason
    assert bad.state == EndpointState.DEGRADED
    assert b.requests == 2  # not retried: it would be as bad again
    assert [by_url(snap, x.url).state for x in (a, c)] == [EndpointState.HEALTHY] * 2
    # Its last good sample still counts; nothing of the bad one reached the pool.
    assert snap.node(b.node) is not None
    assert snap.totals.figures.memory_total_mib == 3 * 8 * 81559
    # It stays refused round after round, and the others keep being polled.
    for _ in range(2):
        clock.advance(INTERVAL)
        snap = await pool.poll_once()
    assert by_url(snap, b.url).state == EndpointState.DOWN
    assert sorted(n.name for n in snap.nodes) == sorted([a.node, c.node])


async def test_an_unforeseen_error_fails_only_its_endpoint(
    agents: Any, make_pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await agents(2)
    pool, _, _ = make_pool([a.url, b.url])
    real = pool_module.fetch_with_retries

    async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> Any:
        if url == b.url:
            raise OverflowError("int too large to convert to float")
        return await real(session, url, **kwargs)

    monkeypatch.setattr(pool_module, "fetch_with_retries", fetch)
    snap = await pool.poll_once()
    assert by_url(snap, b.url).reason == (
        "unexpected error: OverflowError: int too large to convert to float"
    )
    assert by_url(snap, a.url).state == EndpointState.HEALTHY
    assert [n.name for n in snap.nodes] == [a.node]


async def test_flapping_agent_is_degraded_but_never_down(agents: Any, make_pool: Any) -> None:
    a, b = await agents(2)
    b.mode = "flap"
    pool, clock, _ = make_pool([a.url, b.url])
    seen = []
    for _ in range(10):
        snap = await pool.poll_once()
        seen.append(states(pool)["node-b"])
        clock.advance(INTERVAL)
    # The first reply succeeds; from then on odd requests succeed and even ones fail.
    assert seen[0] == "healthy"
    assert set(seen[1:]) == {"degraded"}
    assert pool.breaker(b.url).state == BreakerState.CLOSED
    assert by_url(snap, b.url).success_rate == 0.5
    assert by_url(snap, b.url).included


async def test_stale_before_down_with_a_high_threshold(agents: Any, make_pool: Any) -> None:
    a, b = await agents(2)
    pool, clock, _ = make_pool([a.url, b.url], breaker_failure_threshold=10)
    await pool.poll_once()
    b.mode = "error"
    seen = []
    for _ in range(3):
        clock.advance(INTERVAL)
        snap = await pool.poll_once()
        seen.append(states(pool)["node-b"])
    assert seen == ["degraded", "degraded", "stale"]
    assert snap.totals.figures.gpus_total == 8
    assert not by_url(snap, b.url).included


async def test_agent_serving_an_old_sample_goes_stale_and_comes_back(
    agents: Any, make_pool: Any
) -> None:
    """Every request succeeds, but one agent's `sampledAt` stops advancing (a stuck poll loop)."""
    a, b = await agents(2)
    # The agent samples every second; the pool polls every 5 s: 3 x 5 s counts.
    b.report = b.report.model_copy(update={"poll_interval_s": 1.0})
    pool, clock, _ = make_pool([a.url, b.url])
    await pool.poll_once()
    b.frozen = True
    seen = []
    for _ in range(3):
        clock.advance(INTERVAL)
        snap = await pool.poll_once()
        seen.append(states(pool)["node-b"])
    assert seen == ["healthy", "healthy", "stale"]
    stuck = by_url(snap, b.url)
    assert not stuck.included
    assert stuck.breaker == BreakerState.CLOSED
    assert stuck.consecutive_failures == 0
    assert stuck.reason.startswith(
        "the agent's sample has not changed for 15 s (sampledAt 2025-01-01T00:00:01"
    )
    assert "stale after 15 s = 3 x 5 s poll interval" in stuck.reason
    assert snap.totals.figures.gpus_total == 8
    assert {g.node for g in snap.gpus.values()} == {"node-a"}
    assert snap.ready

    b.frozen = False  # the loop recovers: the next reply is a new sample
    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    assert states(pool)["node-b"] == "healthy"
    assert by_url(snap, b.url).reason == ""
    assert snap.totals.figures.gpus_total == 16


async def test_slower_agent_interval_and_skewed_clock_are_not_stale(
    agents: Any, make_pool: Any
) -> None:
    """An agent that samples every 10 s repeats its sample for a round or two: 3 x 10 s counts.
    Its clock is decades off and steps back once: only changes matter, never the clock itself."""
    a, b = await agents(2)
    b.report = b.report.model_copy(
        update={"poll_interval_s": 10.0, "sampled_at": datetime(1999, 1, 1, tzinfo=UTC)}
    )
    pool, clock, _ = make_pool([a.url, b.url])
    await pool.poll_once()
    b.frozen = True
    seen = []
    for _ in range(6):
        clock.advance(INTERVAL)
        await pool.poll_once()
        seen.append(states(pool)["node-b"])
    assert seen == ["healthy"] * 5 + ["stale"]
    assert "stale after 30 s = 3 x 10 s poll interval" in by_url(pool.snapshot(), b.url).reason

    b.frozen = False
    b.report = b.report.model_copy(update={"sampled_at": datetime(1998, 1, 1, tzinfo=UTC)})
    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    assert states(pool)["node-b"] == "healthy"  # stepped back, but a new sample
    assert snap.totals.figures.gpus_total == 16
    # The pool never judged the agent's sample by the pool's own wall clock.
    assert by_url(snap, b.url).sampled_at is not None
    assert by_url(snap, b.url).sampled_at.year == 1998


async def test_an_unchanged_body_is_not_parsed_again(
    agents: Any, session: aiohttp.ClientSession
) -> None:
    (a,) = await agents(1)
    last = LastReply()
    target = build_target(a.url)
    first = await fetch_report(session, a.url, timeout_s=1.0, target=target, last=last)
    second = await fetch_report(session, a.url, timeout_s=1.0, target=target, last=last)
    assert second is not first  # a new sample: parsed
    assert second.sampled_at > first.sampled_at
    a.frozen = True
    third = await fetch_report(session, a.url, timeout_s=1.0, target=target, last=last)
    fourth = await fetch_report(session, a.url, timeout_s=1.0, target=target, last=last)
    assert fourth is third  # the same bytes: the same report, no second parse
    a.mode = "garbage"  # a bad reply is never served from the cache
    with pytest.raises(FetchError, match="reply is not JSON"):
        await fetch_report(session, a.url, timeout_s=1.0, target=target, last=last)
    assert last.report is third


async def test_all_down_waits_with_a_reason_and_recovers(agents: Any, make_pool: Any) -> None:
    a, b = await agents(2)
    pool, clock, _ = make_pool([a.url, b.url], breaker_failure_threshold=1, jitter=[0.0, 0.0])
    await a.stop()
    await b.stop()
    snap = await pool.poll_once()
    assert not snap.ready
    assert snap.gpus == {}
    assert snap.reason == "waiting for GPU stats: none of 2 agent endpoints is usable (2 down)"
    await a.restart()
    await b.restart()
    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    assert snap.ready
    assert snap.totals.figures.gpus_total == 16


async def test_duplicate_node_rejects_the_newcomer(agents: Any, make_pool: Any) -> None:
    a, b = await agents(2)
    pool, clock, _ = make_pool([b.url, a.url])
    await pool.poll_once()
    # b now claims node-a: node-a already belongs to a, so b is rejected, whatever the URLs.
    b.report = a.report.model_copy()
    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    rejected = next(e for e in snap.endpoints if e.url == b.url)
    assert rejected.reason.startswith("duplicate GPU IDs: node 'node-a'")
    assert not rejected.included
    assert {g.endpoint for g in snap.gpus.values()} == {a.url}


async def test_a_down_holder_keeps_its_node_against_a_newcomer(agents: Any, make_pool: Any) -> None:
    a, b = await agents(2)
    pool, clock, _ = make_pool([a.url, b.url], jitter=[0.0, 0.0])
    await pool.poll_once()
    a.mode = "error"
    for _ in range(3):  # a's breaker opens: a is down, its GPUs out of the pool
        clock.advance(INTERVAL)
        snap = await pool.poll_once()
    assert by_url(snap, a.url).state == EndpointState.DOWN
    # b now claims node-a: a still holds it, down or not.
    b.report = make_report("node-a", 8, uuid_prefix="impostor")
    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    refused = by_url(snap, b.url)
    assert refused.reason == (
        f"duplicate GPU IDs: node 'node-a' is already reported by {a.url}; each node must "
        "have exactly one agent endpoint"
    )
    assert not refused.included
    assert snap.node("node-a") is None
    assert pool.endpoint_for_node("node-a") == a.url
    # a comes back with its node; b is still refused.
    a.mode = "ok"
    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    assert snap.node("node-a") is not None
    assert {g.endpoint for g in snap.gpus.values()} == {a.url}
    assert by_url(snap, b.url).reason.startswith("duplicate GPU IDs: node 'node-a'")


async def test_an_endpoint_that_renames_its_node_lets_the_old_one_go(
    agents: Any, make_pool: Any
) -> None:
    a, b = await agents(2)
    pool, clock, _ = make_pool([a.url, b.url])
    await pool.poll_once()
    a.report = make_report("node-z", 8, uuid_prefix="node-a")
    b.report = make_report("node-a", 8, uuid_prefix="node-b")
    clock.advance(INTERVAL)
    snap = await pool.poll_once()
    assert [e.reason for e in snap.endpoints] == ["", ""]
    assert sorted(n.name for n in snap.nodes) == ["node-a", "node-z"]
    renamed = snap.node("node-a")
    assert renamed is not None
    assert renamed.endpoint == b.url


@pytest.mark.parametrize(
    ("node", "shown"),
    [
        ("node-a\x1b]0;pwned\x07", "'node-a\\x1b]0;pwned\\x07'"),
        ("Node-A", "'Node-A'"),
        ("node_a", "'node_a'"),
        ("a" * 254, "'" + "a" * 64 + "' (cut, 254 characters)"),
        ("", "''"),
    ],
)
async def test_a_node_name_that_is_no_kubernetes_node_name_is_refused(
    agents: Any, make_pool: Any, node: str, shown: str
) -> None:
    a, b = await agents(2)
    pool, _, _ = make_pool([a.url, b.url])
    doc = json.loads(b.report.model_dump_json(by_alias=True))
    doc["node"] = node
    doc["gpus"] = []  # the name is checked even with no GPU IDs to carry it
    b.mode, b.raw_body = "raw", json.dumps(doc).encode()
    snap = await pool.poll_once()
    refused = by_url(snap, b.url)
    assert refused.reason.startswith("reply does not match GpuReport: ")
    assert f"node name {shown} is not a DNS subdomain" in refused.reason
    assert not any(ch in refused.reason for ch in "\x1b\x07\n")
    assert not refused.included
    assert [n.name for n in snap.nodes] == [a.node]


async def test_discovered_endpoint_must_report_its_node(
    agents: Any, session: aiohttp.ClientSession, registry: CollectorRegistry
) -> None:
    a, b = await agents(2)
    pool = GpuPool(
        OperatorSettings(endpoint_retries=0),
        session,
        metrics=PoolMetrics(registry),
    )
    assert pool.discovery
    pool.set_endpoints({a.url: "node-a", b.url: "node-x"})
    snap = await pool.poll_once()
    bad = next(e for e in snap.endpoints if e.url == b.url)
    assert bad.reason == (
        "agent reports node 'node-b' but its pod runs on node 'node-x'; check the agent's "
        "MODELFLEET_AGENT_NODE / NODE_NAME"
    )
    assert not bad.included
    assert sorted({g.node for g in snap.gpus.values()}) == ["node-a"]
    # The pod moves: a new mapping for the URL starts a fresh record.
    pool.set_endpoints({a.url: "node-a"})
    assert pool.endpoint_urls == [a.url]


async def test_single_url_is_the_old_single_endpoint_setup(
    agents: Any,
    session: aiohttp.ClientSession,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One URL in MODELFLEET_NODE_STATS_ENDPOINTS: no discovery, no cluster, the agent's GPUs
    one to one, as the single-endpoint client had them."""
    (a,) = await agents(1)
    a.report = a.report.model_copy(
        update={
            "gpus": [
                g.model_copy(
                    update={
                        "memory_used_mib": 1000 * g.index,
                        "memory_free_mib": g.memory_total_mib - 1000 * g.index,
                    }
                )
                for g in a.report.gpus
            ]
        }
    )
    monkeypatch.setenv("MODELFLEET_NODE_STATS_ENDPOINTS", a.url + "/")
    settings = load(OperatorSettings)
    pool = GpuPool(settings, session, metrics=PoolMetrics(registry))
    assert not pool.discovery
    assert pool.endpoint_urls == [a.url]
    await pool.start()  # no Kubernetes client needed
    try:
        snap = await pool.wait_for_round(0, timeout_s=5)
    finally:
        await pool.close()
    assert snap.ready
    assert list(snap.gpus) == [g.gpu_id for g in a.report.gpus]
    for mine, theirs in zip(snap.gpus.values(), a.report.gpus, strict=True):
        assert (mine.index, mine.uuid, mine.product) == (theirs.index, theirs.uuid, theirs.product)
        assert (mine.memory_total_mib, mine.memory_used_mib, mine.memory_free_mib) == (
            theirs.memory_total_mib,
            theirs.memory_used_mib,
            theirs.memory_free_mib,
        )
    f = snap.totals.figures
    assert f.memory_used_mib == sum(g.memory_used_mib for g in a.report.gpus)
    assert f.memory_free_mib == sum(g.memory_free_mib for g in a.report.gpus)
    assert [n.name for n in snap.nodes] == ["node-a"]
    assert snap.endpoints[0].url == a.url


async def test_bearer_token_from_file(agents: Any, make_pool: Any, tmp_path: Path) -> None:
    (a,) = await agents(1, token="s3cret")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    pool, _, _ = make_pool([a.url], agent_token_file=str(token))
    assert (await pool.poll_once()).ready
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    pool, _, _ = make_pool([a.url], agent_token_file=str(wrong))
    snap = await pool.poll_once()
    assert snap.endpoints[0].reason.startswith("HTTP 401: the agent refused the request")
    missing, _, _ = make_pool([a.url], agent_token_file=str(tmp_path / "absent"))
    snap = await missing.poll_once()
    assert "cannot read the agent token file" in snap.endpoints[0].reason


async def test_metrics(agents: Any, make_pool: Any, registry: CollectorRegistry) -> None:
    a, b = await agents(2)
    pool, clock, _ = make_pool([a.url, b.url], breaker_failure_threshold=1, jitter=[1.0])
    await pool.poll_once()
    await b.stop()
    clock.advance(INTERVAL)
    await pool.poll_once()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("modelfleet_pool_endpoints", state="healthy") == 1
    assert value("modelfleet_pool_endpoints", state="down") == 1
    assert value("modelfleet_pool_gpus") == 8
    assert value("modelfleet_pool_gpus_free") == 8
    assert value("modelfleet_pool_memory_bytes") == 8 * 81559 * 1024 * 1024
    assert (
        value("modelfleet_pool_breaker_transitions_total", from_state="closed", to_state="open")
        == 1
    )
    assert value("modelfleet_pool_endpoint_failures_total", kind="connect") == 1
    assert value("modelfleet_pool_poll_round_duration_seconds_count") == 2
    assert value("modelfleet_pool_endpoint_request_duration_seconds_count", outcome="ok") == 3


async def test_run_loop_polls_on_its_own_and_stops(
    agents: Any, session: aiohttp.ClientSession, registry: CollectorRegistry
) -> None:
    (a,) = await agents(1)
    settings = OperatorSettings(node_stats_endpoints=[a.url], poll_interval_s=0.05)
    async with GpuPool(settings, session, metrics=PoolMetrics(registry)) as pool:
        await pool.wait_for_round(2, timeout_s=5)
        assert pool.snapshot().ready
    rounds = pool.rounds
    assert a.requests >= 3
    assert pool.rounds == rounds  # closed: no more rounds


async def test_discovery_without_a_cluster_says_what_to_set(
    session: aiohttp.ClientSession, registry: CollectorRegistry
) -> None:
    pool = GpuPool(OperatorSettings(), session, metrics=PoolMetrics(registry))
    with pytest.raises(RuntimeError, match="set MODELFLEET_NODE_STATS_ENDPOINTS"):
        await pool.start()
