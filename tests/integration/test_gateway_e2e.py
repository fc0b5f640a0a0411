"""The gateway and the operator together, end to end: real control plane, real operator and
gateway processes, real agents and vLLM stand-ins started by the pod runner on simulated GPU
nodes private to each test. The caller is the official `openai` client."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from clusterkit import Cluster, wait_for
from operator_kit import (
    GatewayProcess,
    OperatorProcess,
    Operators,
    conditions,
    md,
    replica_pods,
    start_gateway,
    wait_ready,
)

from modelfleet.api import labels as L
from modelfleet.api.headers import INSTANCE_HEADER
from modelfleet.gateway.routing import DEFAULT_PREFIX_CHARS, Ring, extract_prefix, hash_key
from modelfleet.kube.client import KubeClient
from modelfleet.kube.paths import md_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# How long the gateway holds a request for a model scaled to zero; the cold start below must
# finish well inside it.
HOLD_TIMEOUT_S = 60
# The operator's replica count per node, from its metrics.
_NODE_REPLICAS = re.compile(r'^modelfleet_pool_node_replicas\{node="([^"]+)"\} (\S+)$', re.M)


@pytest.fixture
def gateway(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        cluster,
        namespace,
        tmp_path,
        MODELFLEET_GATEWAY_COLD_START_TIMEOUT_S=str(HOLD_TIMEOUT_S),
    )
    try:
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, f"the gateway exited {code}:\n{gw.output()[-3000:]}"


@pytest.fixture
async def http(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:

        async def synced() -> bool:
            if gateway.process.poll() is not None:
                raise AssertionError(f"the gateway exited:\n{gateway.output()}")
            try:
                reply = await client.get("/healthz")
            except httpx.TransportError:
                return False
            return reply.status_code == 200 and reply.json().get("synced") is True

        await wait_for(synced, timeout=30, what="the gateway's first full listing")
        yield client


@pytest.fixture
async def ai(gateway: GatewayProcess, http: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    # No client retries: the test must see exactly what the gateway answers.
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=HOLD_TIMEOUT_S + 30
    ) as client:
        yield client


async def gateway_instances(http: httpx.AsyncClient, model: str) -> list[str]:
    """The replicas the gateway routes `model` to, by Pod name."""
    status = (await http.get("/gateway/status")).json()
    return sorted(i["name"] for i in status["active_models_by_id"].get(model, []))


async def chat(ai: openai.AsyncOpenAI, model: str, text: str) -> tuple[str, str]:
    """One chat completion through the gateway: (instance that served it, answer text)."""
    raw = await ai.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=8
    )
    completion = raw.parse()
    return raw.headers[INSTANCE_HEADER], completion.choices[0].message.content or ""


async def test_openai_client_reaches_both_replicas_through_the_gateway(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    http: httpx.AsyncClient,
    ai: openai.AsyncOpenAI,
) -> None:
    await gpus(2, 1)
    operators.start()
    await kube.create(md_path(namespace), md("gemma", replicas=2, servedModelName="gemma3-4B"))
    await wait_ready(kube, namespace, "gemma", 2)
    names = ["gemma-instance-1", "gemma-instance-2"]

    async def routed() -> bool:
        return await gateway_instances(http, "gemma3-4B") == names

    await wait_for(routed, timeout=15, what="the gateway routing to both ready replicas")

    # Plain requests: round-robin over both instances, answered by the stand-in.
    served = Counter()
    for i in range(6):
        instance, text = await chat(ai, "gemma3-4B", f"hello number {i} from the test")
        served[instance] += 1
        assert text.startswith("hello number")
    assert served == Counter(dict.fromkeys(names, 3))

    # Streaming, chunk by chunk, also over both instances.
    streamed = Counter()
    for i in range(2):
        raw = await ai.chat.completions.with_raw_response.create(
            model="gemma3-4B",
            messages=[{"role": "user", "content": f"stream {i} of these words please"}],
            max_tokens=5,
            stream=True,
        )
        assert raw.headers["content-type"].startswith("text/event-stream")
        streamed[raw.headers[INSTANCE_HEADER]] += 1
        pieces = [c.choices[0].delta.content or "" async for c in raw.parse() if c.choices]
        assert len([p for p in pieces if p]) == 5  # one token per chunk, cut at max_tokens
        assert "".join(pieces).split()[0] == "stream"
    assert set(streamed) == set(names)

    models = await ai.models.list()
    assert [m.id for m in models.data] == ["gemma3-4B"]

    status = (await http.get("/gateway/status")).json()
    assert status["healthy"] is True
    assert status["parallel_model_config"] == {"gemma3-4B": 2}
    assert status["deployments"] == {"gemma3-4B": [f"{namespace}/gemma"]}
    assert sorted(status["active_containers_by_name"]) == names
    assert sum(i["requests"] for i in status["active_models_by_id"]["gemma3-4B"]) == 8

    # An unknown model: 404 in the OpenAI shape, listing the known ones, not echoing the name.
    with pytest.raises(openai.NotFoundError) as caught:
        await chat(ai, "no-such-model", "hi")
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found"
    assert "gemma3-4B" in error["message"]
    assert "no-such-model" not in error["message"]

    # Last use reaches the ModelDeployment, for the operator's LRU and idle clock.
    async def last_request() -> str:
        obj = await kube.get(md_path(namespace, "gemma"))
        return str(obj["metadata"].get("annotations", {}).get(L.ANN_LAST_REQUEST, ""))

    await wait_for(last_request, timeout=15, what="the last-request-time annotation")


async def test_scale_from_zero_holds_the_request_until_a_replica_is_ready(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    http: httpx.AsyncClient,
    ai: openai.AsyncOpenAI,
) -> None:
    await gpus(1, 1)
    operators.start()
    startup_s = 3.0
    spec = md(
        "cold",
        replicas=1,
        minReplicas=0,
        idleTimeout="5s",
        engine={"env": [{"name": "MODELFLEET_SIM_STARTUP_DELAY_S", "value": str(startup_s)}]},
    )
    await kube.create(md_path(namespace), spec)
    await wait_ready(kube, namespace, "cold", 1)

    # No requests: the operator scales it to zero once idle.
    async def scaled_to_zero() -> dict[str, Any] | None:
        obj = await kube.get(md_path(namespace, "cold"))
        if not (obj.get("status") or {}).get("conditions"):
            return None
        idle = conditions(obj)["Available"] == ("False", "ScaledToZero")
        return obj if idle and not await replica_pods(kube, namespace, "cold") else None

    obj = await wait_for(scaled_to_zero, timeout=40, interval=0.2, what="cold scaled to zero")
    assert obj["status"]["readyReplicas"] == 0
    assert L.ANN_DEMAND not in obj["metadata"].get("annotations", {})

    async def unrouted() -> bool:
        return not await gateway_instances(http, "cold")

    await wait_for(unrouted, timeout=10, what="the gateway dropping the deleted replica")
    listed = (await http.get("/v1/models")).json()["data"]
    assert [(m["id"], m["ready_replicas"]) for m in listed] == [("cold", 0)]

    # A request now is held while the operator brings a replica back, then answered.
    started = time.monotonic()
    held = asyncio.create_task(chat(ai, "cold", "wake up little model"))

    async def queued() -> bool:
        status = (await http.get("/gateway/status")).json()
        return bool(status["queue_depth"].get("cold") == 1)

    await wait_for(queued, timeout=10, what="the request waiting in the gateway's queue")

    async def demand() -> str:
        obj = await kube.get(md_path(namespace, "cold"))
        return str(obj["metadata"].get("annotations", {}).get(L.ANN_DEMAND, ""))

    await wait_for(demand, timeout=10, what="the demand-time annotation")
    assert not held.done()

    instance, text = await asyncio.wait_for(held, HOLD_TIMEOUT_S)
    waited = time.monotonic() - started
    assert instance == "cold-instance-1"
    assert text.startswith("wake up")
    assert startup_s <= waited < HOLD_TIMEOUT_S  # held through the stand-in's startup
    await wait_ready(kube, namespace, "cold", 1)
    assert await gateway_instances(http, "cold") == ["cold-instance-1"]


async def test_a_model_switched_off_by_its_spec_is_refused_at_once_and_serves_once_scaled_up(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    http: httpx.AsyncClient,
    ai: openai.AsyncOpenAI,
) -> None:
    await gpus(1, 1)
    operators.start()
    await kube.create(md_path(namespace), md("dormant", replicas=0))

    async def listed_off() -> bool:
        listed = (await http.get("/v1/models")).json()["data"]
        return [(m["id"], m["state"]) for m in listed] == [("dormant", "off")]

    await wait_for(listed_off, timeout=15, what="the gateway listing dormant as off")

    async def reported_scaled_to_zero() -> bool:
        obj = await kube.get(md_path(namespace, "dormant"))
        if not (obj.get("status") or {}).get("conditions"):
            return False
        return conditions(obj)["Available"] == ("False", "ScaledToZero")

    await wait_for(reported_scaled_to_zero, timeout=15, what="dormant reported ScaledToZero")

    # spec.replicas: 0 means off: the answer comes at once (not after the 60 s hold), says why
    # and how to start the model, and nothing starts.
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        await chat(ai, "dormant", "anyone there")
    assert time.monotonic() - started < 5
    assert caught.value.status_code == 503
    assert caught.value.response.headers["x-should-retry"] == "false"
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_scaled_to_zero"
    assert "scaled to zero by its spec (spec.replicas: 0)" in error["message"]
    assert f"kubectl scale modeldeployment/dormant --replicas=1 -n {namespace}" in error["message"]
    assert (await http.get("/gateway/status")).json()["queue_depth"] == {}
    obj = await kube.get(md_path(namespace, "dormant"))
    assert L.ANN_DEMAND not in obj["metadata"].get("annotations", {})
    assert not await replica_pods(kube, namespace, "dormant")

    # Scaled up as the message says (the scale subresource is what `kubectl scale` patches):
    # a request is held until the replica is ready, then served.
    await kube.patch(md_path(namespace, "dormant") + "/scale", {"spec": {"replicas": 1}})

    async def switched_on() -> bool:
        listed = (await http.get("/v1/models")).json()["data"]
        return [m["state"] for m in listed] != ["off"]

    await wait_for(switched_on, timeout=15, what="the gateway seeing spec.replicas: 1")
    instance, text = await asyncio.wait_for(chat(ai, "dormant", "good morning"), HOLD_TIMEOUT_S)
    assert instance == "dormant-instance-1"
    assert text.startswith("good morning")
    await wait_ready(kube, namespace, "dormant", 1)


async def pool_replicas(
    operator: OperatorProcess, nodes: list[str], expected: list[int] | None, total: int = 0
) -> bool:
    """Whether the operator's pool metrics count `expected` replicas on `nodes` (in order),
    or with `expected` None, `total` of them over the nodes, none with more than one."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{operator.metrics_port}/metrics")).text
    counts = {node: float(value) for node, value in _NODE_REPLICAS.findall(text) if node in nodes}
    got = [round(counts.get(node, 0.0)) for node in nodes]
    if expected is not None:
        return got == expected
    return sum(got) == total and max(got) <= 1


def conversation_for(owner: str, names: list[str], avoid: str = "") -> str:
    """A system prompt whose prefix the ring gives to `owner` among `names` (and, with
    `avoid`, never to `avoid` once `owner` is gone): what any gateway computes alone."""
    for i in range(10_000):
        # Longer than the prefix the gateway hashes, so every turn hashes the same text.
        system = f"You are assistant number {i} of the support desk. " + "Answer briefly. " * 20
        key = hash_key((extract_prefix({"prompt": system}, DEFAULT_PREFIX_CHARS) or "").encode())
        ring = Ring(names)
        if ring.names[ring.owner(key) or 0] == owner:
            return system
    raise AssertionError(f"no prompt found for {owner}")


async def test_prefix_routing_keeps_conversations_on_their_replicas_and_moves_only_the_lost_one(
    kube: KubeClient,
    namespace: str,
    gpus: Any,
    operators: Operators,
    http: httpx.AsyncClient,
    ai: openai.AsyncOpenAI,
) -> None:
    nodes = await gpus(3, 1)
    operator = operators.start()
    await kube.create(md_path(namespace), md("chat", replicas=3, routing={"policy": "PrefixHash"}))
    await wait_ready(kube, namespace, "chat", 3)
    names = ["chat-instance-1", "chat-instance-2", "chat-instance-3"]
    # The operator counts its replicas per node for the pool's balance figures: one on each.
    await wait_for(
        lambda: pool_replicas(operator, nodes, [1, 1, 1]),
        timeout=15,
        what="the operator's pool counting one replica on each node",
    )

    async def routed() -> bool:
        return await gateway_instances(http, "chat") == names

    await wait_for(routed, timeout=15, what="the gateway routing to the three replicas")
    status = (await http.get("/gateway/status")).json()
    assert status["balancing"] == {"chat": "PrefixHash"}

    # Conversation A belongs to instance-3 (the one scaling down removes), B to instance-1.
    systems = {"A": conversation_for(names[2], names), "B": conversation_for(names[0], names)}
    histories: dict[str, list[dict[str, str]]] = {k: [] for k in systems}

    async def turn(name: str, text: str) -> str:
        history = histories[name]
        history.append({"role": "user", "content": text})
        messages = [{"role": "system", "content": systems[name]}, *history]
        raw = await ai.chat.completions.with_raw_response.create(
            model="chat",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
        )
        answer = raw.parse().choices[0].message.content or ""
        history.append({"role": "assistant", "content": answer})
        return raw.headers[INSTANCE_HEADER]

    for i in range(4):  # the conversations grow; each stays where its prefix lives
        assert await turn("A", f"question {i} about my order") == names[2]
        assert await turn("B", f"question {i} about my invoice") == names[0]

    # One replica goes away: only the conversation it held moves, to the next replica on the
    # ring, and stays there; the other never moves.
    await kube.patch(md_path(namespace, "chat"), {"spec": {"replicas": 2}})

    async def shrunk() -> bool:
        return await gateway_instances(http, "chat") == names[:2]

    await wait_for(shrunk, timeout=30, what="the gateway dropping chat-instance-3")
    await wait_for(
        lambda: pool_replicas(operator, nodes, None, total=2),
        timeout=15,
        what="the operator's pool counting the two replicas left",
    )
    ring = Ring(names[:2])
    key = hash_key((extract_prefix({"prompt": systems["A"]}, DEFAULT_PREFIX_CHARS) or "").encode())
    moved_to = ring.names[ring.owner(key) or 0]
    for i in range(3):
        assert await turn("A", f"follow-up {i}") == moved_to
        assert await turn("B", f"follow-up {i}") == names[0]

    metrics = (await http.get("/metrics")).text
    moved = '{choice="owner",model="chat",result="moved"} 1.0'  # the new owner on the ring
    assert f"modelfleet_gateway_affinity_requests_total{moved}" in metrics
    assert f'modelfleet_gateway_replica_requests_total{{model="chat",replica="{names[0]}"}}' in (
        metrics
    )
