"""The autoscaler's loop: scrape, decide, write spec.replicas through the scale subresource.

Every round it takes the ModelDeployments with `spec.autoscaling.enabled`, scrapes their Ready
replicas' engines (autoscale_scrape.py), runs the pure decision (autoscale.py) and, only when it
changes the count, writes spec.replicas through `/scale`, the way `kubectl scale`, HPA or KEDA
do. A model with autoscaling off is left alone entirely: whatever writes its /scale decides.
The reconcile then places the new replicas like any others (eviction by priority and LRU within
floors, docs/operator.md).
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
from modelfleet.api.times import parse_time
from modelfleet.api.v1alpha1 import ModelDeployment
from modelfleet.controller.autoscale import Decision, Policy, Recommendation, Signal, decide
from modelfleet.controller.autoscale_scrape import EngineScraper
from modelfleet.controller.inflight import Key
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.observed import ObservedPod
from modelfleet.controller.runtime import ClusterState
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import md_path

log = logging.getLogger(__name__)

# How often the replicas are scraped and the decisions made.
INTERVAL_S = 5.0
# A demand-time annotation younger than this counts as a request the gateway holds.
DEMAND_FRESH_S = 30.0


class Autoscaler:
    """The windows' history and the last decision of every autoscaled model."""

    def __init__(
        self, client: KubeClient, scraper: EngineScraper, metrics: OperatorMetrics | None = None
    ) -> None:
        self.client = client
        self.scraper = scraper
        self.metrics = metrics
        self.history: dict[Key, tuple[Recommendation, ...]] = {}
        self.decisions: dict[Key, Decision] = {}
        self.signals: dict[Key, Signal] = {}

    def _forget(self, key: Key) -> None:
        if self.metrics is not None:
            for gauge in (self.metrics.autoscaler_desired, self.metrics.autoscaler_load):
                with contextlib.suppress(KeyError):
                    gauge.remove(*key)
        self.history.pop(key, None)
        self.decisions.pop(key, None)
        self.signals.pop(key, None)

    async def round(
        self,
        deployments: Mapping[Key, Mapping[str, Any]],
        pods: Mapping[Key, list[ObservedPod]],
        *,
        now: float | None = None,
    ) -> dict[Key, int]:
        """One round over `deployments` (bodies); the counts written through /scale."""
        now = time.monotonic() if now is None else now
        models, targets = _autoscaled(deployments, pods)
        for gone in self.history.keys() - models.keys():
            self._forget(gone)
        await self.scraper.scrape(targets)
        written: dict[Key, int] = {}
        for key, md in models.items():
            live = [p for p in pods.get(key, []) if p.ready and not p.deleting]
            held = 1 if not live and _demand_is_fresh(md) else 0
            signal = self.scraper.signal([p.name for p in live], held=held)
            decision = decide(
                signal=signal,
                current=md.spec.replicas,
                policy=Policy.from_spec(md.spec),
                history=self.history.get(key, ()),
                now=now,
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
            if decision.desired != md.spec.replicas:
                try:
                    await self.client.patch(
                        md_path(key[0], key[1]) + "/scale",
                        {"spec": {"replicas": decision.desired}},
                    )
                except ApiError as exc:
                    log.warning("autoscaler could not scale %s/%s: %s", *key, exc)
                    continue
                written[key] = decision.desired
                if self.metrics is not None:
                    up = decision.desired > md.spec.replicas
                    self.metrics.autoscaler_scales.labels("up" if up else "down").inc()
        return written


def _autoscaled(
    deployments: Mapping[Key, Mapping[str, Any]], pods: Mapping[Key, list[ObservedPod]]
) -> tuple[dict[Key, ModelDeployment], dict[str, str]]:
    """The models with autoscaling on, and their Ready replicas' metrics URLs by Pod name."""
    models: dict[Key, ModelDeployment] = {}
    targets: dict[str, str] = {}
    for key, body in deployments.items():
        try:
            md = ModelDeployment.model_validate(body)
        except ValidationError:
            continue  # the reconcile reports an invalid spec
        if not md.spec.autoscaling.enabled:
            continue
        models[key] = md
        for pod in pods.get(key, []):
            if pod.ready and not pod.deleting and pod.ip:
                targets[pod.name] = f"http://{pod.ip}:{md.spec.engine.port}/metrics"
    return models, targets


def _demand_is_fresh(md: ModelDeployment) -> bool:
    demand = parse_time(md.metadata.annotations.get(L.ANN_DEMAND))
    if demand is None:
        return False
    return (datetime.now(UTC) - demand).total_seconds() <= DEMAND_FRESH_S


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
