"""Helpers shared by the autoscaler's integration tests and `bench-autoscaling-cluster`: the
gateway routing to a model, one request through it, the operator's eviction Events, and the
autoscaler's rounds (its own counter on the operator's /metrics)."""

from __future__ import annotations

import re

import httpx
from clusterkit import wait_for

from modelfleet.kube.client import KubeClient

# The operator's Evicted Event: "<pod> evicted to make room for <namespace>/<deployment>: ...".
EVICTED = re.compile(r"^(?P<pod>\S+) evicted to make room for (?P<ns>[^/]+)/(?P<by>\S+?):")
# The operator's count of finished autoscaler rounds.
ROUNDS = "modelfleet_autoscaler_rounds_total"

# Event name -> (victim deployment, victim Pod, evictor deployment, the Event's count).
Evictions = dict[str, tuple[str, str, str, int]]


async def wait_routed(http: httpx.AsyncClient, *models: str, deadline_s: float = 30) -> None:
    """Until the gateway at `http`'s base URL routes to every one of `models`."""

    async def routed() -> bool:
        active = (await http.get("/gateway/status")).json()["active_models_by_id"]
        return all(active.get(model) for model in models)

    await wait_for(routed, timeout=deadline_s, what=f"the gateway routing to {', '.join(models)}")


async def complete(http: httpx.AsyncClient, model: str, prompt: str) -> int:
    """One short completion through the gateway; its status code."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4}
    return (await http.post("/v1/completions", json=body)).status_code


async def evictions(kube: KubeClient, namespace: str) -> Evictions:
    """Every eviction Event the operator posted in `namespace`."""
    listing = await kube.list(
        f"/api/v1/namespaces/{namespace}/events", fieldSelector="reason=Evicted"
    )
    out: Evictions = {}
    for event in listing["items"]:
        found = EVICTED.match(event.get("message") or "")
        if found and event.get("type") == "Warning":
            victim = event["involvedObject"]["name"]
            count = int(event.get("count") or 1)
            out[event["metadata"]["name"]] = (victim, found["pod"], found["by"], count)
    return out


def evictions_since(before: Evictions, after: Evictions) -> list[tuple[str, str, str, int]]:
    """(victim deployment, victim Pod, evictor, new Events) posted between the two listings."""
    return [
        (victim, pod, by, count - (before[name][3] if name in before else 0))
        for name, (victim, pod, by, count) in after.items()
        if name not in before or count > before[name][3]
    ]


def evicted_between(before: Evictions, after: Evictions) -> dict[tuple[str, str], int]:
    """(victim deployment, evictor) -> replica Pods evicted between the two listings.

    Pods, not Events: a victim still terminating may be named by a second eviction decision
    of the same evictor (a repeat, not a new eviction), which posts its Event again.
    """
    pods: dict[tuple[str, str], set[str]] = {}
    for victim, pod, by, _ in evictions_since(before, after):
        pods.setdefault((victim, by), set()).add(pod)
    return {key: len(names) for key, names in pods.items()}


async def wait_autoscaler_rounds(metrics_port: int, more: int, deadline_s: float = 30) -> None:
    """Until the operator serving /metrics on `metrics_port` finishes `more` autoscaler rounds."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with httpx.AsyncClient(timeout=5) as http:

        async def rounds() -> float:
            text = (await http.get(url)).text
            line = next(x for x in text.splitlines() if x.startswith(ROUNDS + " "))
            return float(line.split()[1])

        start = await rounds()

        async def done() -> bool:
            return await rounds() >= start + more

        await wait_for(done, timeout=deadline_s, interval=0.5, what=f"{more} autoscaler rounds")
