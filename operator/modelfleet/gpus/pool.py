"""The GPU pool: polls every agent endpoint each round and keeps the latest `PoolSnapshot`.

Usage (the operator's composition root owns the session and the Kubernetes client):

    session = create_session(settings.poll_concurrency)
    pool = GpuPool(settings, session, kube=kube)   # kube only needed for discovery
    await pool.start()
    snapshot = pool.snapshot()                      # never blocks, never raises
    ...
    await pool.close()
    await session.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
from yarl import URL

from modelfleet.api.gpustats import GpuReport
from modelfleet.gpus.breaker import (
    Breaker,
    BreakerPolicy,
    BreakerState,
    breaker_before_request,
    breaker_due,
    breaker_on_failure,
    breaker_on_success,
)
from modelfleet.gpus.client import (
    FailureKind,
    Fetched,
    FetchError,
    LastReply,
    TokenSource,
    build_target,
    fetch_with_retries,
)
from modelfleet.gpus.discovery import watch_agent_pods
from modelfleet.gpus.health import EndpointState, HealthRecord
from modelfleet.gpus.metrics import PoolMetrics, default_metrics
from modelfleet.gpus.snapshot import (
    EndpointSample,
    PoolSnapshot,
    build_snapshot,
    compute_conflicts,
    empty_snapshot,
)
from modelfleet.kube import KubeClient
from modelfleet.settings import OperatorSettings

log = logging.getLogger(__name__)


@dataclass
class _Endpoint:
    url: str
    #: The node the endpoint must report: the pod's node for discovered endpoints; for static
    #: ones None until the first reply names it.
    node: str | None
    discovered: bool
    health: HealthRecord = field(default_factory=HealthRecord)
    report: GpuReport | None = None
    state: EndpointState = EndpointState.STALE
    target: URL = field(init=False)
    last_reply: LastReply = field(default_factory=LastReply)

    def __post_init__(self) -> None:
        self.target = build_target(self.url)


class GpuPool:
    """Endpoints, their breakers and health, and the latest snapshot."""

    def __init__(
        self,
        settings: OperatorSettings,
        session: aiohttp.ClientSession,
        *,
        kube: KubeClient | None = None,
        metrics: PoolMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self._session = session
        self._kube = kube
        self._metrics = metrics if metrics is not None else default_metrics()
        self._clock = clock
        self._wall = wall_clock
        self._jitter = jitter
        self._policy = BreakerPolicy(
            failure_threshold=settings.breaker_failure_threshold,
            backoff_base_s=settings.backoff_base_s,
            backoff_cap_s=settings.backoff_cap_s,
        )
        self._token = TokenSource(settings.agent_token_file, clock)
        # Built once: every request of every round uses the same timeout.
        self._timeout = aiohttp.ClientTimeout(total=settings.endpoint_timeout_s)
        self._request_metric = {
            outcome: self._metrics.request_duration.labels(outcome=outcome)
            for outcome in ("ok", *(k.value for k in FailureKind))
        }
        self._endpoints: dict[str, _Endpoint] = {}
        #: node -> the url that holds it: the last to report it successfully, for as long as
        #: that endpoint is configured or discovered and reports no other node.
        self._owners: dict[str, str] = {}
        self._replicas: Mapping[str, int] | None = None
        self._snapshot = empty_snapshot(self._now_wall())
        self._rounds = 0
        self._round_done = asyncio.Condition()
        self._round_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.discovery = not settings.node_stats_endpoints
        if not self.discovery:
            self.set_endpoints(dict.fromkeys(settings.node_stats_endpoints))

    # -- endpoints -------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Mapping[str, str | None]) -> None:
        """Replace the endpoint set ({url: node or None}); kept endpoints keep their history."""
        discovered = self.discovery
        for url in list(self._endpoints):
            if url not in endpoints:
                log.info("Removed agent endpoint url=%s", url)
                del self._endpoints[url]
        for url, node in endpoints.items():
            current = self._endpoints.get(url)
            if current is not None and current.node == node:
                continue
            if current is not None:
                # A pod IP handed to a pod on another node: a different agent, start afresh.
                log.info("Replaced agent endpoint url=%s node=%s (was %s)", url, node, current.node)
            else:
                log.info("Added agent endpoint url=%s node=%s", url, node or "(from its reply)")
            self._endpoints[url] = _Endpoint(url, node, discovered)
        self._owners = {n: u for n, u in self._owners.items() if u in self._endpoints}

    def endpoint_for_node(self, node: str) -> str | None:
        """The URL of the agent that reports `node`, if known."""
        for ep in self._endpoints.values():
            known = ep.node or (ep.report.node if ep.report else None)
            if known == node:
                return ep.url
        return None

    def node_for_endpoint(self, url: str) -> str | None:
        ep = self._endpoints.get(url)
        if ep is None:
            return None
        return ep.node or (ep.report.node if ep.report else None)

    @property
    def endpoint_urls(self) -> list[str]:
        return sorted(self._endpoints)

    def breaker(self, url: str) -> Breaker:
        return self._endpoints[url].health.breaker

    def set_replica_counts(self, counts: Mapping[str, int] | None) -> None:
        """Replicas per node, for the balance figures of the next snapshots."""
        self._replicas = dict(counts) if counts is not None else None

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        """The latest snapshot; before the first round it is empty with a reason."""
        return self._snapshot

    @property
    def rounds(self) -> int:
        return self._rounds

    async def wait_for_round(self, after: int, timeout_s: float) -> PoolSnapshot:
        """Wait until round number `after` + 1 or later has finished; return its snapshot."""
        async with asyncio.timeout(timeout_s), self._round_done:
            await self._round_done.wait_for(lambda: self._rounds > after)
        return self._snapshot

    def _now_wall(self) -> datetime:
        return datetime.fromtimestamp(self._wall(), UTC)

    def build_samples(self, now: float) -> list[EndpointSample]:
        samples = []
        interval = self.settings.poll_interval_s
        for ep in self._endpoints.values():
            h = ep.health
            state = h.state(now, interval)
            reason = h.last_error
            if state == EndpointState.STALE:
                frozen = h.stale_sample_reason(now, interval)
                if frozen:
                    reason = f"{frozen}; last error: {reason}" if reason else frozen
                elif not reason:
                    reason = "no reply yet"
            ep.state = self._update_state(ep, state, reason)
            b = h.breaker
            samples.append(
                EndpointSample(
                    url=ep.url,
                    node=ep.node,
                    state=ep.state,
                    breaker=b.state,
                    report=ep.report,
                    reason=reason,
                    last_success_at=(
                        datetime.fromtimestamp(h.last_success_wall, UTC)
                        if h.last_success_wall is not None
                        else None
                    ),
                    consecutive_failures=b.consecutive_failures,
                    latency_ewma_s=h.latency_ewma_s,
                    latency_p95_s=h.latency_p95_s,
                    success_rate=h.success_rate,
                    next_probe_in_s=(
                        max(0.0, b.open_until - now) if b.state == BreakerState.OPEN else None
                    ),
                )
            )
        return samples

    def _update_state(self, ep: _Endpoint, state: EndpointState, reason: str) -> EndpointState:
        if state != ep.state:
            level = logging.INFO if state.usable else logging.WARNING
            log.log(
                level,
                "Agent endpoint became %s url=%s node=%s reason=%s",
                state.value,
                ep.url,
                ep.node or (ep.report.node if ep.report else "?"),
                reason or "-",
            )
        return state

    # -- polling ---------------------------------------------------------------------------

    def _set_breaker(self, ep: _Endpoint, new: Breaker) -> None:
        old = ep.health.breaker
        if old.state != new.state:
            self._metrics.breaker_transitions.labels(
                from_state=old.state.value, to_state=new.state.value
            ).inc()
        ep.health.breaker = new

    def _observe_request(self, latency_s: float, kind: FailureKind | None) -> None:
        self._request_metric["ok" if kind is None else kind.value].observe(latency_s)

    async def _poll_endpoint(
        self, ep: _Endpoint, sem: asyncio.Semaphore, headers: dict[str, str] | None
    ) -> Fetched | FetchError:
        # A half-open breaker lets exactly one probe through: no retries.
        half_open = ep.health.breaker.state == BreakerState.HALF_OPEN
        async with sem:
            try:
                return await fetch_with_retries(
                    self._session,
                    ep.url,
                    timeout_s=self.settings.endpoint_timeout_s,
                    retries=0 if half_open else self.settings.endpoint_retries,
                    headers=headers,
                    expected_node=ep.node if ep.discovered else None,
                    target=ep.target,
                    client_timeout=self._timeout,
                    last=ep.last_reply,
                    on_attempt=self._observe_request,
                )
            except FetchError as exc:
                return exc
            except Exception as exc:
                # One endpoint's surprise must not fail the gather, and with it every
                # endpoint's round: it becomes that endpoint's failure.
                log.exception("Polling failed unexpectedly url=%s", ep.url)
                return FetchError(
                    FailureKind.UNEXPECTED,
                    f"unexpected error: {type(exc).__name__}: {exc}",
                    retryable=False,
                )

    async def poll_once(self) -> PoolSnapshot:
        """One round: poll every endpoint whose breaker allows it, then rebuild the snapshot."""
        async with self._round_lock:
            started = time.perf_counter()
            now = self._clock()
            due = [ep for ep in self._endpoints.values() if breaker_due(ep.health.breaker, now)]
            for ep in due:
                self._set_breaker(ep, breaker_before_request(ep.health.breaker, now))
            results: list[Fetched | FetchError]
            try:
                headers = await self._token.header()
            except FetchError as exc:
                results = [exc] * len(due)
            else:
                sem = asyncio.Semaphore(self.settings.poll_concurrency)
                results = await asyncio.gather(
                    *(self._poll_endpoint(ep, sem, headers or None) for ep in due)
                )
            self._apply_results(due, results)
            snapshot = build_snapshot(
                self.build_samples(self._clock()),
                taken_at=self._now_wall(),
                replicas_by_node=self._replicas,
                previous=self._snapshot,
            )
            self._snapshot = snapshot
            self._metrics.observe_snapshot(snapshot)
            self._metrics.round_duration.observe(time.perf_counter() - started)
        async with self._round_done:
            self._rounds += 1
            self._round_done.notify_all()
        return snapshot

    def _apply_results(self, due: list[_Endpoint], results: list[Fetched | FetchError]) -> None:
        done = self._clock()
        wall = self._wall()
        current = [
            (ep, res)
            for ep, res in zip(due, results, strict=True)
            if self._endpoints.get(ep.url) is ep
        ]
        claims: dict[str, GpuReport] = {
            ep.url: res.report for ep, res in current if isinstance(res, Fetched)
        }
        fresh = set(claims)
        for ep in self._endpoints.values():
            # Degraded endpoints that failed this round still contribute their last sample.
            if ep.url not in fresh and ep.report is not None and ep.state.usable:
                claims[ep.url] = ep.report
        # An endpoint that now reports another node lets go of the one it held.
        held = {
            node: url
            for node, url in self._owners.items()
            if url not in fresh or claims[url].node == node
        }
        conflicts = compute_conflicts(claims, held)
        for ep, res in current:
            if isinstance(res, Fetched) and ep.url in conflicts:
                res = FetchError(FailureKind.DUPLICATE, conflicts[ep.url], retryable=False)
            h = ep.health
            if isinstance(res, Fetched):
                self._set_breaker(ep, breaker_on_success(h.breaker))
                h.record_success(done, wall, res.latency_s)
                h.record_sample(done, res.report.sampled_at, res.report.poll_interval_s)
                ep.report = res.report
                if self._owners.get(res.report.node) != ep.url:
                    self._owners = {n: u for n, u in self._owners.items() if u != ep.url}
                    self._owners[res.report.node] = ep.url
            else:
                self._set_breaker(
                    ep, breaker_on_failure(h.breaker, done, self._policy, self._jitter)
                )
                h.record_failure(done, res.reason)
                self._metrics.failures.labels(kind=res.kind.value).inc()
                if res.kind == FailureKind.DUPLICATE:
                    # Its GPUs belong to another endpoint: never show them from this one.
                    ep.report = None

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll forever, one round every poll interval; a failing round never stops the loop."""
        interval = self.settings.poll_interval_s
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:
                log.exception("Poll round failed; retrying next interval")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def discover(self) -> None:
        """Follow the agent pods; needs a Kubernetes client."""
        if self._kube is None:
            raise RuntimeError(
                "no agent endpoints: set MODELFLEET_NODE_STATS_ENDPOINTS or run in a cluster "
                "so the agent pods can be discovered"
            )
        namespace = self.settings.agent_namespace or self._kube.config.namespace
        await watch_agent_pods(
            self._kube,
            namespace=namespace,
            selector=self.settings.agent_selector,
            port=self.settings.agent_port,
            on_change=self.set_endpoints,
        )

    async def start(self) -> None:
        """Start the poll loop (and discovery when no static endpoints are set)."""
        if self._tasks:
            return
        if self.discovery:
            if self._kube is None:
                await self.discover()  # raises the clear error
            self._tasks.append(asyncio.create_task(self.discover(), name="gpu-pool-discovery"))
        self._tasks.append(asyncio.create_task(self.run(), name="gpu-pool-poll"))

    async def close(self) -> None:
        """Stop polling and discovery; the session stays open (its owner closes it)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> GpuPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
