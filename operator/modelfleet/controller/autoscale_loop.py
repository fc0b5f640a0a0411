"""The autoscaler's loop: scrape, decide, write spec.replicas through the scale subresource.

Every round it takes the ModelDeployments with `spec.autoscaling.enabled`, scrapes their Ready
replicas' engines (autoscale_scrape.py), runs the pure decision (autoscale.py) and, only when it
changes the count, writes spec.replicas through `/scale`, the way `kubectl scale`, HPA or KEDA
do. Its decision, figures and ScalingLimited condition go to status.autoscaling, a sub-object
only it writes (a merge patch of that sub-object alone; the reconcile's status patch leaves it
out, controller/status.py). A model with autoscaling off keeps whatever count its /scale was
given; the autoscaler only clears its old status.autoscaling. The reconcile then places the new
replicas like any others (eviction by priority and LRU within floors, docs/operator.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from modelfleet.api import labels as L
from modelfleet.api.held import stale_held_keys, sum_held
from modelfleet.api.times import parse_time
from modelfleet.api.v1alpha1 import AutoscalingStatus, ConditionStatus, ModelDeployment
from modelfleet.controller.autoscale import (
    Decision,
    Policy,
    Recommendation,
    Signal,
    compute_autoscaling_status,
    compute_limited_event,
    compute_unplaced,
    decide,
)
from modelfleet.controller.autoscale_scrape import EngineScraper
from modelfleet.controller.execute import EventRecorder
from modelfleet.controller.inflight import Key
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.observed import ObservedPod
from modelfleet.controller.runtime import ClusterState
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import md_path

log = logging.getLogger(__name__)

# How often the replicas are scraped and the decisions made.
INTERVAL_S = 5.0
# A held count (or a demand-time annotation) younger than this counts as requests the gateway
# holds; the gateway refreshes its count well within it (gateway/usage.py).
DEMAND_FRESH_S = 30.0
# A held count older than this was left by a gateway that stopped: the autoscaler removes it.
HELD_STALE_S = 600.0
# status.autoscaling's figures alone are rewritten at most this often (a new count, last scale
# or condition goes at once).
STATUS_REFRESH_S = 15.0


class Autoscaler:
    """The windows' history and the last decision of every autoscaled model."""

    def __init__(
        self,
        client: KubeClient,
        scraper: EngineScraper,
        metrics: OperatorMetrics | None = None,
        events: EventRecorder | None = None,
    ) -> None:
        self.client = client
        self.scraper = scraper
        self.metrics = metrics
        self.events = events
        self.history: dict[Key, tuple[Recommendation, ...]] = {}
        self.decisions: dict[Key, Decision] = {}
        self.signals: dict[Key, Signal] = {}
        self.status_written_at: dict[Key, float] = {}
        # The ScalingLimited Event last posted per model (its message): a status read back from a
        # watch that lags a round behind does not post it again.
        self.limited_posted: dict[Key, str] = {}

    def _forget(self, key: Key) -> None:
        if self.metrics is not None:
            for gauge in (
                self.metrics.autoscaler_desired,
                self.metrics.autoscaler_load,
                self.metrics.autoscaler_limited,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(*key)
        self.history.pop(key, None)
        self.decisions.pop(key, None)
        self.signals.pop(key, None)
        self.status_written_at.pop(key, None)
        self.limited_posted.pop(key, None)

    async def round(
        self,
        deployments: Mapping[Key, Mapping[str, Any]],
        pods: Mapping[Key, list[ObservedPod]],
        *,
        now: float | None = None,
    ) -> dict[Key, int]:
        """One round over `deployments` (bodies); the counts written through /scale."""
        now = time.monotonic() if now is None else now
        wall = datetime.now(UTC)
        models, targets, off = _autoscaled(deployments, pods)
        for gone in self.history.keys() - models.keys():
            self._forget(gone)
        for key in off:
            await self._clear_status(key)
        await self.scraper.scrape(targets)
        written: dict[Key, int] = {}
        for key, md in models.items():
            live = [p for p in pods.get(key, []) if p.ready and not p.deleting]
            held = 0 if live else compute_held(md, wall)
            signal = self.scraper.signal([p.name for p in live], held=held)
            policy = Policy.from_spec(md.spec)
            unplaced = compute_unplaced(md)
            decision = decide(
                signal=signal,
                current=md.spec.replicas,
                policy=policy,
                history=self.history.get(key, ()),
                now=now,
                unplaced=unplaced,
            )
            self.history[key] = decision.history
            self.signals[key] = signal
            previous = self.decisions.get(key)
            self.decisions[key] = decision
            if self.metrics is not None:
                self.metrics.autoscaler_desired.labels(*key).set(decision.desired)
                self.metrics.autoscaler_load.labels(*key).set(signal.load)
            if previous is None or previous.reason != decision.reason:
                log.info("autoscaler %s/%s: %s", *key, decision.reason)
            scaled = False
            if decision.desired != md.spec.replicas:
                scaled = await self._scale(key, md, decision.desired)
                if scaled:
                    written[key] = decision.desired
            status = compute_autoscaling_status(
                decision=decision,
                signal=signal,
                policy=policy,
                current=md.spec.replicas,
                unplaced=unplaced,
                previous=md.status.autoscaling,
                now=wall,
                scaled=scaled,
            )
            if self.metrics is not None:
                self.metrics.autoscaler_limited.labels(*key).set(1 if _is_limited(status) else 0)
            await self._report(key, md, status, now)
            await self._remove_stale_held(md, wall)
        if self.metrics is not None:
            self.metrics.autoscaler_rounds.inc()
        return written

    async def _scale(self, key: Key, md: ModelDeployment, replicas: int) -> bool:
        try:
            await self.client.patch(
                md_path(key[0], key[1]) + "/scale", {"spec": {"replicas": replicas}}
            )
        except ApiError as exc:
            log.warning("autoscaler could not scale %s/%s: %s", *key, exc)
            return False
        if self.metrics is not None:
            up = replicas > md.spec.replicas
            self.metrics.autoscaler_scales.labels("up" if up else "down").inc()
        return True

    async def _report(
        self, key: Key, md: ModelDeployment, status: AutoscalingStatus, now: float
    ) -> None:
        """Write status.autoscaling (and the ScalingLimited Event) when it changed.

        Only the autoscaler's own sub-object goes in the merge patch, so the reconcile's part of
        the status is never touched. A change of the count, the last scale or a condition is
        written at once; the figures alone at most every STATUS_REFRESH_S.
        """
        previous = md.status.autoscaling
        if previous is not None and _dump(previous) == _dump(status):
            return
        material = previous is None or _dump(previous, figures=False) != _dump(
            status, figures=False
        )
        last = self.status_written_at.get(key)
        if not material and last is not None and now - last < STATUS_REFRESH_S:
            return
        event = compute_limited_event(md, status, previous)
        try:
            await self.client.patch(
                md_path(key[0], key[1]) + "/status", {"status": {"autoscaling": _dump(status)}}
            )
        except ApiError as exc:
            log.warning("autoscaler could not write the status of %s/%s: %s", *key, exc)
            return
        self.status_written_at[key] = now
        if event is None:
            if not _is_limited(status):
                self.limited_posted.pop(key, None)
            return
        if self.limited_posted.get(key) != event.message and self.events is not None:
            self.limited_posted[key] = event.message
            await self.events.post(event, md.metadata.uid, datetime.now(UTC))

    async def _clear_status(self, key: Key) -> None:
        """Autoscaling was switched off: its last decision no longer describes anything."""
        try:
            await self.client.patch(
                md_path(key[0], key[1]) + "/status", {"status": {"autoscaling": None}}
            )
        except ApiError as exc:
            log.warning("could not clear status.autoscaling of %s/%s: %s", *key, exc)

    async def _remove_stale_held(self, md: ModelDeployment, wall: datetime) -> None:
        """Drop held counts a gateway that stopped left behind (one patch, only when any)."""
        stale = stale_held_keys(md.metadata.annotations, wall, HELD_STALE_S)
        if not stale:
            return
        path = md_path(md.metadata.namespace, md.metadata.name)
        try:
            await self.client.patch(path, {"metadata": {"annotations": dict.fromkeys(stale)}})
        except ApiError as exc:
            log.warning("could not remove stale held counts of %s: %s", md.metadata.name, exc)


def _is_limited(status: AutoscalingStatus) -> bool:
    return any(c.status == ConditionStatus.TRUE for c in status.conditions)


def _dump(status: AutoscalingStatus, *, figures: bool = True) -> dict[str, Any]:
    out = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not figures:
        out.pop("signal", None)
        out.pop("reason", None)
    return out


def _autoscaled(
    deployments: Mapping[Key, Mapping[str, Any]], pods: Mapping[Key, list[ObservedPod]]
) -> tuple[dict[Key, ModelDeployment], dict[str, str], list[Key]]:
    """The models with autoscaling on, their Ready replicas' metrics URLs by Pod name, and the
    models with autoscaling off that still carry an autoscaler status."""
    models: dict[Key, ModelDeployment] = {}
    targets: dict[str, str] = {}
    off: list[Key] = []
    for key, body in deployments.items():
        try:
            md = ModelDeployment.model_validate(body)
        except ValidationError:
            continue  # the reconcile reports an invalid spec
        if not md.spec.autoscaling.enabled:
            if md.status.autoscaling is not None:
                off.append(key)
            continue
        models[key] = md
        for pod in pods.get(key, []):
            if pod.ready and not pod.deleting and pod.ip:
                targets[pod.name] = f"http://{pod.ip}:{md.spec.engine.port}/metrics"
    return models, targets, off


def compute_held(md: ModelDeployment, now: datetime) -> int:
    """Requests the gateways hold for a model with no ready replica: their fresh counts summed,
    else 1 for a fresh demand-time alone (a gateway that does not publish counts)."""
    annotations = md.metadata.annotations
    held = sum_held(annotations, now, DEMAND_FRESH_S)
    if held:
        return held
    demand = parse_time(annotations.get(L.ANN_DEMAND))
    return 1 if demand is not None and (now - demand).total_seconds() <= DEMAND_FRESH_S else 0


async def autoscale_forever(
    autoscaler: Autoscaler,
    cluster: Callable[[], ClusterState | None],
    interval_s: float = INTERVAL_S,
) -> None:
    """Run a round over the operator's live indices every `interval_s`; forever."""
    while True:
        started = time.monotonic()
        state = cluster()
        if state is not None:
            bodies = {key: body for key in state.deployments if (body := state.body(key))}
            pods = {key: list(state.pods.get(key, ())) for key in bodies}
            try:
                await autoscaler.round(bodies, pods)
            except Exception:  # one bad round must not stop the loop
                log.exception("autoscaler round failed")
        await asyncio.sleep(max(0.5, interval_s - (time.monotonic() - started)))
