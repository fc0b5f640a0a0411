"""Two autoscaled models under alternating load on a cluster that cannot hold both at peak.

Real control plane, operator and gateway processes, vLLM stand-ins on simulated GPU nodes. Four
one-GPU nodes; two models that each grow to 3 replicas under load (1 at rest, floor 1). Load
goes through the gateway in waves, one model at a time. Per wave the test proves:

- evictions go only towards the loaded model (its idle peer's replicas, never the other way);
- no replica is evicted and then its evictor evicted back within the wave;
- no model ever has fewer Ready replicas than its spec.minReplicas (sampled continually);
- with equal priority the loaded model gets its replicas in every wave; with a higher-priority
  peer idle, the lower one waits (it never takes a higher priority's replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from autoscale_kit import evicted_between, evictions, wait_autoscaler_rounds, wait_routed
from clusterkit import Cluster
from operator_kit import (
    GatewayProcess,
    Operators,
    md,
    pod_ready,
    replica_pods,
    start_gateway,
    wait_ready,
)

from modelfleet.kube.client import KubeClient
from modelfleet.kube.paths import md_path, pods_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

# Each request keeps a replica's engine busy this long: what the autoscaler sees as load.
REQUEST_S = 8
# Requests kept in flight during a wave: 3 replicas' worth at target 2.
IN_FLIGHT = 6
# The most requests one wave sends, whatever happens (bounded load).
WAVE_MAX_REQUESTS = 120
# How long a wave may take to give the loaded model its replicas (the 30 s load hold of the
# idle peer, an eviction, a start).
WAVE_GROW_S = 100


@pytest.fixture
def gateway(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway(cluster, namespace, tmp_path)
    try:
        yield gw
    finally:
        gw.stop()


def model(name: str, priority: int) -> dict[str, Any]:
    slow = [{"name": "MODELFLEET_SIM_REQUEST_LATENCY_S", "value": str(REQUEST_S)}]
    return md(
        name,
        replicas=1,
        minReplicas=1,
        priority=priority,
        engine={"env": slow},
        autoscaling={
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 3,
            "targetPerReplica": 2,
            # Long enough that an idle model keeps its count through the next wave: what its
            # peer gets, it gets by eviction, not because the idle one scaled itself down.
            "scaleDownWindow": "10m",
        },
    )


@dataclass
class Sampler:
    """Samples both models' replica Pods every 0.3 s; records every Ready count seen."""

    kube: KubeClient
    namespace: str
    names: tuple[str, ...]
    lowest: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    async def run(self) -> None:
        while True:
            listing = await self.kube.list(pods_path(self.namespace))
            ready: dict[str, int] = dict.fromkeys(self.names, 0)
            for pod in listing["items"]:
                dep = (pod["metadata"].get("labels") or {}).get("modelfleet.io/deployment")
                if dep in ready and pod_ready(pod) and not pod["metadata"].get("deletionTimestamp"):
                    ready[dep] += 1
            for name, count in ready.items():
                self.lowest[name] = min(self.lowest.get(name, count), count)
            self.samples += 1
            await asyncio.sleep(0.3)


async def load_wave(http: httpx.AsyncClient, name: str, stop: asyncio.Event) -> int:
    """IN_FLIGHT requests to `name` in flight until `stop` (at most WAVE_MAX_REQUESTS)."""
    sent = 0
    ok = 0

    async def worker() -> None:
        nonlocal sent, ok
        while not stop.is_set() and sent < WAVE_MAX_REQUESTS:
            sent += 1
            body = {"model": name, "prompt": f"wave {sent}", "max_tokens": 4}
            with contextlib.suppress(httpx.HTTPError):
                ok += (await http.post("/v1/completions", json=body)).status_code == 200

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return ok


async def ready_count(kube: KubeClient, namespace: str, name: str) -> int:
    return sum(pod_ready(p) for p in await replica_pods(kube, namespace, name))


@pytest.mark.parametrize(
    ("priority_a", "priority_b"), [(0, 0), (10, 0)], ids=["same-priority", "a-higher"]
)
async def test_alternating_waves_never_evict_back_and_forth(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    gateway: GatewayProcess,
    priority_a: int,
    priority_b: int,
) -> None:
    await gpus(4, 1)
    operator = operators.start()
    await kube.create(md_path(namespace), model("alpha", priority_a))
    await kube.create(md_path(namespace), model("beta", priority_b))
    await wait_ready(kube, namespace, "alpha", 1)
    await wait_ready(kube, namespace, "beta", 1)
    sampler = Sampler(kube, namespace, ("alpha", "beta"))
    sampling = asyncio.create_task(sampler.run())

    async with httpx.AsyncClient(base_url=gateway.url, timeout=REQUEST_S + 120) as http:
        await wait_routed(http, "alpha", "beta")

        async def wave(loaded: str, grows: bool) -> dict[tuple[str, str], int]:
            """Load `loaded`; returns the evictions this wave made."""
            before = await evictions(kube, namespace)
            stop = asyncio.Event()
            load = asyncio.create_task(load_wave(http, loaded, stop))
            try:
                if grows:
                    await wait_ready(kube, namespace, loaded, 3, deadline_s=WAVE_GROW_S)
                    # Load stays on for two more autoscaler rounds: nothing may go back.
                    await wait_autoscaler_rounds(operator.metrics_port, 2)
                    assert await ready_count(kube, namespace, loaded) == 3
                else:
                    # It cannot grow: give it the time a same-priority wave needs, then check.
                    deadline = time.monotonic() + WAVE_GROW_S / 2
                    while time.monotonic() < deadline:
                        assert await ready_count(kube, namespace, loaded) <= 1
                        await asyncio.sleep(1)
            finally:
                stop.set()
                served = await load
            assert served > 0, f"no request to {loaded} succeeded in its wave"
            return evicted_between(before, await evictions(kube, namespace))

        # Wave 1: beta grows into the two free GPUs (the cluster is full after it).
        first = await wave("beta", grows=True)
        assert first == {}, f"nothing needed evicting in the first wave: {first}"
        # Wave 2: alpha is loaded, beta idle: alpha takes beta's two spare replicas.
        second = await wave("alpha", grows=True)
        assert second == {("beta", "alpha"): 2}, f"wave 2 evictions: {second}"
        # Wave 3: beta is loaded, alpha idle. Same priority: beta takes alpha's spare replicas
        # back, one wave later, never within the wave. Alpha of a higher priority: beta waits.
        same = priority_a == priority_b
        third = await wave("beta", grows=same)
        expected = {("alpha", "beta"): 2} if same else {}
        assert third == expected, f"wave 3 evictions: {third}"

    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    assert sampler.samples > 100, f"only {sampler.samples} samples of the replica Pods"
    # spec.minReplicas is 1 for both: never fewer Ready replicas, at any sample.
    assert sampler.lowest == {"alpha": 1, "beta": 1}, f"lowest Ready counts: {sampler.lowest}"
