"""The gateway over real HTTP against vLLM stand-ins: balancing, readiness, retries, ejection,
streaming, cold starts, limits and error bodies."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import openai
import pytest
from gwharness import FleetFactory, md_obj, pod_obj, wait_until

from modelfleet.api import labels
from modelfleet.api.headers import INSTANCE_HEADER
from modelfleet.gateway.app import build_app, start_gateway
from modelfleet.gateway.registry import Registry
from modelfleet.settings import GatewaySettings


async def test_round_robin_alternates_over_instances_in_order(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    for name in ("gemma3-4b-instance-1", "gemma3-4b-instance-2"):
        await fleet.add_sim(name)
        fleet.add_pod(name)
    served = []
    for _ in range(6):
        status, instance, data = await fleet.chat(text="one two")
        assert status == 200
        assert data["choices"][0]["message"]["content"] == "one two"
        served.append(instance)
    assert served == ["gemma3-4b-instance-1", "gemma3-4b-instance-2"] * 3


async def test_instances_sort_naturally(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    for n in (10, 2, 1):
        await fleet.add_sim(f"gemma3-4b-instance-{n}")
        fleet.add_pod(f"gemma3-4b-instance-{n}")
    served = [(await fleet.chat())[1] for _ in range(3)]
    assert served == [f"gemma3-4b-instance-{n}" for n in (1, 2, 10)]


async def test_instance_header_names_the_pod_the_gateway_chose(make_fleet: FleetFactory) -> None:
    # A real vLLM names no instance, and a replica's own claim is not the gateway's routing
    # decision: the header is the Pod's name, whatever the replica answers.
    fleet = await make_fleet()
    await fleet.add_sim("gemma3-4b-instance-1", instance="127.0.0.1:8000")
    fleet.add_pod("gemma3-4b-instance-1")
    status, instance, _ = await fleet.chat()
    assert (status, instance) == (200, "gemma3-4b-instance-1")


async def test_least_outstanding_avoids_the_busy_replica(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([md_obj("gemma3-4b", balancing="LeastOutstanding")])
    for name in ("a", "b"):
        await fleet.add_sim(name, token_latency_s=0.1)
        fleet.add_pod(name)
    body = {"model": "gemma3-4b", "prompt": " ".join(["w"] * 10), "stream": True}
    async with fleet.http.post(fleet.url + "/v1/completions", json=body) as stream:
        busy = stream.headers[INSTANCE_HEADER]
        await stream.content.readline()
        # While the stream is open, every short request goes to the other replica.
        served = {(await fleet.chat())[1] for _ in range(5)}
        assert served == ({"a", "b"} - {busy})
        await stream.read()
    await wait_until(lambda: all(s.state.running == 0 for s in fleet.sims.values()))
    served_after = Counter([(await fleet.chat())[1] for _ in range(4)])
    assert served_after == {"a": 2, "b": 2}


async def test_round_robin_ignores_load(make_fleet: FleetFactory) -> None:
    """The contrast to least-outstanding: round-robin keeps alternating under a long stream."""
    fleet = await make_fleet()
    for name in ("a", "b"):
        await fleet.add_sim(name, token_latency_s=0.1)
        fleet.add_pod(name)
    body = {"model": "gemma3-4b", "prompt": "w w w w w", "stream": True}
    async with fleet.http.post(fleet.url + "/v1/completions", json=body) as stream:
        await stream.content.readline()
        served = Counter([(await fleet.chat())[1] for _ in range(4)])
        await stream.read()
    assert served == {"a": 2, "b": 2}


async def test_unready_and_terminating_pods_get_no_traffic(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    for name in ("a", "b", "c"):
        await fleet.add_sim(name)
        fleet.add_pod(name)
    port_a = fleet.sims["a"].state.config.port
    port_c = fleet.sims["c"].state.config.port
    fleet.registry.apply_pod("MODIFIED", pod_obj("a", "gemma3-4b", port_a, ready=False))
    fleet.registry.apply_pod("MODIFIED", pod_obj("c", "gemma3-4b", port_c, deleting=True))
    served = {(await fleet.chat())[1] for _ in range(6)}
    assert served == {"b"}
    fleet.registry.apply_pod("MODIFIED", pod_obj("a", "gemma3-4b", port_a))
    served = {(await fleet.chat())[1] for _ in range(6)}
    assert served == {"a", "b"}
    fleet.registry.apply_pod("DELETED", pod_obj("b", "gemma3-4b", 1))
    served = {(await fleet.chat())[1] for _ in range(4)}
    assert served == {"a"}


async def test_connect_error_is_retried_on_another_replica(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    await fleet.add_sim("b")
    dead = await fleet.add_sim("dead")
    dead_port = dead.state.config.port
    await dead.stop()  # nothing listens on its port any more
    fleet.add_pod("dead", port=dead_port)
    fleet.add_pod("b")
    results = [await fleet.chat() for _ in range(4)]
    assert [(s, i) for s, i, _ in results] == [(200, "b")] * 4
    async with fleet.http.get(fleet.url + "/metrics") as resp:
        text = await resp.text()
    assert 'modelfleet_gateway_upstream_errors_total{model="gemma3-4b",reason="connect"}' in text
    assert 'modelfleet_gateway_retries_total{model="gemma3-4b"}' in text


async def test_bodiless_503_is_retried_but_errors_with_a_body_are_not(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(eject_after_failures=100)
    for name in ("a", "b"):
        await fleet.add_sim(name)
        fleet.add_pod(name)
    fleet.sims["a"].state.config.fail_rate = 1.0  # bodiless 503: an overloaded server
    results = [await fleet.chat() for _ in range(4)]
    assert [(s, i) for s, i, _ in results] == [(200, "b")] * 4

    cfg = fleet.sims["a"].state.config
    cfg.fail_body = True  # a 503 with an error body is the replica's answer: passed on
    statuses = Counter([(await fleet.chat())[0] for _ in range(4)])
    assert statuses == {200: 2, 503: 2}
    cfg.fail_status = 500
    answers = {instance: (status, data) for status, instance, data in [await fleet.chat()] * 1}
    answers.update({i: (s, d) for s, i, d in [await fleet.chat()]})
    assert answers["a"][0] == 500  # not retried on b
    assert answers["a"][1]["error"]["message"] == "simulated failure"


async def test_at_most_two_retries(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(eject_after_failures=100)
    for name in ("a", "b", "c", "d"):
        await fleet.add_sim(name, fail_rate=1.0)
        fleet.add_pod(name)
    status, headers, data = await fleet.post(
        "/v1/chat/completions",
        {"model": "gemma3-4b", "messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 503
    assert headers["Retry-After"]
    assert data["error"]["code"] == "upstream_unavailable"
    assert "gemma3-4b" in data["error"]["message"]
    tries = sum(r.requests for r in fleet.registry.routes["gemma3-4b"].replicas)
    assert tries == 3


async def test_failing_replica_is_ejected_then_returns(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(eject_base_s=0.5)
    for name in ("a", "b"):
        await fleet.add_sim(name)
        fleet.add_pod(name)
    fleet.sims["a"].state.config.fail_rate = 1.0
    replica_a = next(r for r in fleet.registry.routes["gemma3-4b"].replicas if r.name == "a")
    for _ in range(6):
        assert (await fleet.chat())[0] == 200
    # Three failures in a row: a is skipped now, so its try count stops growing.
    assert replica_a.ejected_until > time.monotonic()
    tries = replica_a.requests
    assert {(await fleet.chat())[1] for _ in range(6)} == {"b"}
    assert replica_a.requests == tries
    async with fleet.http.get(fleet.url + "/gateway/status") as resp:
        status = await resp.json()
    assert status["active_containers_by_name"]["a"]["ejected"] is True
    fleet.sims["a"].state.config.fail_rate = 0.0
    await wait_until(lambda: replica_a.ejected_until <= time.monotonic())
    assert "a" in {(await fleet.chat())[1] for _ in range(4)}
    async with fleet.http.get(fleet.url + "/metrics") as resp:
        assert 'modelfleet_gateway_ejections_total{model="gemma3-4b"} 1.0' in await resp.text()


async def test_stream_is_passed_through_chunk_by_chunk(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    await fleet.add_sim("a", token_latency_s=0.05)
    fleet.add_pod("a")
    body = {
        "model": "gemma3-4b",
        "messages": [{"role": "user", "content": "a b c d e f"}],
        "stream": True,
    }
    arrivals: list[float] = []
    events: list[str] = []
    async with fleet.http.post(fleet.url + "/v1/chat/completions", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.strip():
                arrivals.append(time.monotonic())
                events.append(line.decode().strip().removeprefix("data: "))
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "a b c d e f"
    # Not buffered: the first token arrived well before the last one was generated.
    assert arrivals[-1] - arrivals[1] >= 0.2


async def test_client_disconnect_cancels_the_upstream_request(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    sim = await fleet.add_sim("a", token_latency_s=0.1)
    fleet.add_pod("a")
    body = {"model": "gemma3-4b", "prompt": " ".join(["w"] * 200), "stream": True}
    session = aiohttp.ClientSession()
    resp = await session.post(fleet.url + "/v1/completions", json=body)
    await resp.content.readline()
    assert sim.state.running == 1
    resp.close()
    await session.close()
    # The stream would run 20 s; the replica sees the disconnect at once.
    await wait_until(lambda: sim.state.running == 0, timeout_s=3)


async def test_cold_start_holds_the_request_until_a_replica_is_ready(
    make_fleet: FleetFactory,
) -> None:
    # At zero by idling: spec.replicas stays above 0 (minReplicas 0), no replica is ready.
    fleet = await make_fleet([md_obj("gemma3-4b", replicas=1)], cold_start_timeout_s=10)
    pending = asyncio.create_task(fleet.chat(text="held"))
    await wait_until(lambda: fleet.registry.queued("gemma3-4b") == 1)
    async with fleet.http.get(fleet.url + "/gateway/status") as resp:
        assert (await resp.json())["queue_depth"] == {"gemma3-4b": 1}
    # Demand is recorded on the ModelDeployment for the operator to scale up.
    await wait_until(lambda: bool(fleet.writer.writes))
    namespace, name, values = fleet.writer.writes[0]
    assert (namespace, name) == ("default", "gemma3-4b")
    assert labels.ANN_DEMAND in values
    await fleet.add_sim("gemma3-4b-instance-1")
    fleet.add_pod("gemma3-4b-instance-1")
    status, instance, data = await asyncio.wait_for(pending, 5)
    assert (status, instance) == (200, "gemma3-4b-instance-1")
    assert data["choices"][0]["message"]["content"] == "held"


async def test_cold_start_timeout_and_full_queue_answer_503(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        [md_obj("gemma3-4b", replicas=1)], cold_start_timeout_s=0.5, queue_size=1
    )
    first = asyncio.create_task(
        fleet.post("/v1/completions", {"model": "gemma3-4b", "prompt": "x"})
    )
    await wait_until(lambda: fleet.registry.queued("gemma3-4b") == 1)
    status, headers, data = await fleet.post(
        "/v1/completions", {"model": "gemma3-4b", "prompt": "x"}
    )
    assert status == 503
    assert int(headers["Retry-After"]) > 0
    assert data["error"]["code"] == "model_queue_full"
    assert "gemma3-4b" in data["error"]["message"]
    status, headers, data = await first
    assert status == 503
    assert headers["Retry-After"]
    assert data["error"]["code"] == "model_not_ready"
    assert "gemma3-4b" in data["error"]["message"]
    # Demand was recorded once for the burst, not per request.
    demand = [w for w in fleet.writer.writes if labels.ANN_DEMAND in w[2]]
    assert len(demand) == 1


async def test_a_models_own_hold_timeout_replaces_the_gateways(make_fleet: FleetFactory) -> None:
    # A first start that pulls the image and downloads the weights may outlast the gateway's
    # default hold: the ModelDeployment says how long its requests wait.
    patient = md_obj("llama-70b", replicas=1)
    patient["spec"]["routing"] = {"holdTimeout": "30s"}
    fleet = await make_fleet([md_obj("gemma3-4b", replicas=1), patient], cold_start_timeout_s=0.3)
    assert fleet.registry.hold_timeout_s("llama-70b", 0.3) == 30.0
    assert fleet.registry.hold_timeout_s("gemma3-4b", 0.3) == 0.3
    held = asyncio.create_task(fleet.post("/v1/completions", {"model": "llama-70b", "prompt": "x"}))
    status, _, data = await fleet.post("/v1/completions", {"model": "gemma3-4b", "prompt": "x"})
    assert (status, data["error"]["code"]) == (503, "model_not_ready")
    assert "held 0.3 s" in data["error"]["message"]
    assert not held.done()  # past the gateway's 0.3 s, still held for its own 30 s
    await fleet.add_sim("llama-70b-instance-1", served="llama-70b")
    fleet.add_pod("llama-70b-instance-1", deployment="llama-70b")
    status, headers, _ = await asyncio.wait_for(held, 5)
    assert (status, headers["x-modelfleet-instance"]) == (200, "llama-70b-instance-1")


async def test_model_switched_off_by_its_spec_is_refused_at_once_then_served_once_scaled_up(
    make_fleet: FleetFactory,
) -> None:
    # spec.replicas: 0 means off: nothing will start a replica, so the gateway does not hold.
    fleet = await make_fleet(
        [md_obj("gemma3-4b", replicas=0, namespace="ml")], cold_start_timeout_s=30
    )
    started = time.monotonic()
    status, headers, data = await asyncio.wait_for(
        fleet.post("/v1/completions", {"model": "gemma3-4b", "prompt": "x"}), 5
    )
    assert time.monotonic() - started < 2  # at once, not after the 30 s cold-start timeout
    assert status == 503
    error = data["error"]
    assert error["code"] == "model_scaled_to_zero"
    assert error["param"] == "model"
    message = error["message"]
    assert "model gemma3-4b is scaled to zero by its spec (spec.replicas: 0)" in message
    assert "kubectl scale modeldeployment/gemma3-4b --replicas=1 -n ml" in message
    assert "Retry-After" not in headers  # no wait helps
    assert headers["x-should-retry"] == "false"  # the OpenAI SDKs do not retry it
    assert fleet.registry.queued("gemma3-4b") == 0
    assert fleet.writer.writes == []  # no demand, no last use: nothing was served
    async with fleet.http.get(fleet.url + "/v1/models") as resp:
        listed = (await resp.json())["data"]
    assert [(m["id"], m["desired_replicas"], m["state"]) for m in listed] == [
        ("gemma3-4b", 0, "off")
    ]
    async with fleet.http.get(fleet.url + "/gateway/status") as resp:
        assert (await resp.json())["switched_off"] == ["gemma3-4b"]

    # Scaled up (kubectl scale --replicas=1): requests are held until a replica is ready.
    fleet.registry.apply_deployment("MODIFIED", md_obj("gemma3-4b", replicas=1, namespace="ml"))
    pending = asyncio.create_task(fleet.chat(text="now on"))
    await wait_until(lambda: fleet.registry.queued("gemma3-4b") == 1)
    await fleet.add_sim("gemma3-4b-instance-1")
    fleet.add_pod("gemma3-4b-instance-1", namespace="ml")
    status, instance, data = await asyncio.wait_for(pending, 5)
    assert (status, instance) == (200, "gemma3-4b-instance-1")
    assert data["choices"][0]["message"]["content"] == "now on"
    async with fleet.http.get(fleet.url + "/v1/models") as resp:
        assert [m["state"] for m in (await resp.json())["data"]] == ["ready"]


async def test_a_switched_off_model_with_a_replica_still_ready_is_served(
    make_fleet: FleetFactory,
) -> None:
    # Scaled to 0 a moment ago: the last replica is still Ready until the operator deletes it.
    fleet = await make_fleet([md_obj("gemma3-4b", replicas=0)])
    await fleet.add_sim("gemma3-4b-instance-1")
    fleet.add_pod("gemma3-4b-instance-1")
    assert (await fleet.chat())[:2] == (200, "gemma3-4b-instance-1")


async def test_held_requests_get_the_clear_error_when_the_model_is_switched_off(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet([md_obj("gemma3-4b", replicas=1)], cold_start_timeout_s=30)
    pending = asyncio.create_task(
        fleet.post("/v1/completions", {"model": "gemma3-4b", "prompt": "x"})
    )
    await wait_until(lambda: fleet.registry.queued("gemma3-4b") == 1)
    fleet.registry.apply_deployment("MODIFIED", md_obj("gemma3-4b", replicas=0))
    status, _, data = await asyncio.wait_for(pending, 5)
    assert status == 503
    assert data["error"]["code"] == "model_scaled_to_zero"
    assert fleet.registry.queued("gemma3-4b") == 0


async def test_held_requests_get_404_when_the_model_is_deleted(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([md_obj("gemma3-4b", replicas=1)], cold_start_timeout_s=30)
    pending = asyncio.create_task(
        fleet.post("/v1/completions", {"model": "gemma3-4b", "prompt": "x"})
    )
    await wait_until(lambda: fleet.registry.queued("gemma3-4b") == 1)
    fleet.registry.apply_deployment("DELETED", md_obj("gemma3-4b"))
    status, _, data = await asyncio.wait_for(pending, 5)
    assert status == 404
    assert data["error"]["code"] == "model_not_found"


async def test_openai_client_does_not_retry_a_switched_off_model(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet([md_obj("gemma3-4b", replicas=0)])
    # The SDK's default: 2 retries of every 5xx, unless the answer says x-should-retry: false.
    async with openai.AsyncOpenAI(
        base_url=fleet.url + "/v1", api_key="unused", max_retries=2
    ) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.completions.create(model="gemma3-4b", prompt="x")
    assert caught.value.status_code == 503
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_scaled_to_zero"
    async with fleet.http.get(fleet.url + "/metrics") as resp:
        text = await resp.text()
    assert 'modelfleet_gateway_requests_total{code="503",model="gemma3-4b"} 1.0' in text


async def test_unknown_model_404_lists_known_models_without_echoing(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet([md_obj("gemma3-4b"), md_obj("llama", served="llama-3-8b")])
    status, _, data = await fleet.post(
        "/v1/chat/completions", {"model": "secret-<script>", "messages": []}
    )
    assert status == 404
    error = data["error"]
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert "gemma3-4b" in error["message"]
    assert "llama-3-8b" in error["message"]
    assert "secret" not in json.dumps(data)


async def test_body_over_the_cap_is_413(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_body_bytes=4096)
    await fleet.add_sim("a")
    fleet.add_pod("a")
    big = {"model": "gemma3-4b", "prompt": "word " * 2000}
    status, _, data = await fleet.post("/v1/completions", big)
    assert status == 413
    assert data["error"]["code"] == "request_too_large"
    assert "word" not in json.dumps(data)

    async def chunks():  # no Content-Length: the cap holds for chunked bodies too
        for _ in range(10):
            yield b"x" * 1000

    async with fleet.http.post(fleet.url + "/v1/completions", data=chunks()) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"
    assert fleet.sims["a"].state.served == 0


async def test_bad_bodies_are_400(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    async with fleet.http.post(fleet.url + "/v1/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert "not valid JSON" in (await resp.json())["error"]["message"]
    status, _, data = await fleet.post("/v1/completions", {"prompt": "x"})
    assert status == 400
    assert "no model" in data["error"]["message"]


async def test_oversized_headers_are_refused(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_header_bytes=1024)
    async with fleet.http.post(
        fleet.url + "/v1/completions",
        json={"model": "gemma3-4b", "prompt": "x"},
        headers={"X-Big": "y" * 4000},
    ) as resp:
        assert resp.status in (400, 431)


async def test_models_status_and_metrics(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([md_obj("gemma3-4b", replicas=2), md_obj("idle", replicas=0)])
    await fleet.add_sim("gemma3-4b-instance-1")
    fleet.add_pod("gemma3-4b-instance-1")
    assert (await fleet.chat())[0] == 200
    async with fleet.http.get(fleet.url + "/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == ["gemma3-4b", "idle"]
    assert models["data"][1]["ready_replicas"] == 0
    async with fleet.http.get(fleet.url + "/gateway/status") as resp:
        status = await resp.json()
    assert status["healthy"] is True
    assert status["parallel_model_config"] == {"gemma3-4b": 2, "idle": 0}
    assert [i["name"] for i in status["active_models_by_id"]["gemma3-4b"]] == [
        "gemma3-4b-instance-1"
    ]
    assert "idle" not in status["active_models_by_id"]
    instance = status["active_containers_by_name"]["gemma3-4b-instance-1"]
    assert instance["model"] == "gemma3-4b"
    assert instance["requests"] == 1
    async with fleet.http.get(fleet.url + "/metrics") as resp:
        text = await resp.text()
    assert 'modelfleet_gateway_requests_total{code="200",model="gemma3-4b"} 1.0' in text
    assert 'modelfleet_gateway_request_duration_seconds_count{model="gemma3-4b"} 1.0' in text
    assert 'modelfleet_gateway_ready_replicas{model="gemma3-4b"} 1.0' in text
    async with fleet.http.get(fleet.url + "/healthz") as resp:
        assert (await resp.json())["status"] == "ok"


async def test_last_use_is_written_in_the_background(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(last_use_interval_s=30)
    await fleet.add_sim("a")
    fleet.add_pod("a")
    assert (await fleet.chat())[0] == 200
    assert (await fleet.chat())[0] == 200
    await wait_until(lambda: any(labels.ANN_LAST_REQUEST in w[2] for w in fleet.writer.writes))
    last = [w for w in fleet.writer.writes if labels.ANN_LAST_REQUEST in w[2]]
    assert len(last) == 1  # rate-limited: one write for both requests
    assert last[0][2][labels.ANN_LAST_REQUEST].endswith("Z")


async def test_openai_client_through_the_gateway(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    for name in ("a", "b"):
        await fleet.add_sim(name)
        fleet.add_pod(name)
    client = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="unused")
    try:
        instances = set()
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(
                model="gemma3-4b", messages=[{"role": "user", "content": "hi there"}]
            )
            instances.add(raw.headers[INSTANCE_HEADER])
            assert raw.parse().choices[0].message.content == "hi there"
        assert instances == {"a", "b"}
        stream = await client.completions.create(model="gemma3-4b", prompt="x y z", stream=True)
        assert "".join([c.choices[0].text async for c in stream if c.choices]) == "x y z"
        vectors = await client.embeddings.create(model="gemma3-4b", input=["p", "q"])
        assert len(vectors.data) == 2
        listed = await client.models.list()
        assert [m.id for m in listed.data] == ["gemma3-4b"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="missing", messages=[{"role": "user", "content": "x"}]
            )
    finally:
        await client.close()


async def test_readyz_waits_for_the_first_listing() -> None:
    settings = GatewaySettings(host="127.0.0.1")
    registry = Registry(settings.balancing)
    running = await start_gateway(build_app(settings, registry=registry), settings, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(running.url + "/readyz") as resp:
                assert resp.status == 503
                assert await resp.json() == {
                    "status": "syncing",
                    "waitingFor": ["deployments", "pods"],
                }
            registry.replace_deployments([md_obj("gemma3-4b")])
            async with http.get(running.url + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["waitingFor"] == ["pods"]
            registry.replace_pods([])
            async with http.get(running.url + "/readyz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ready"}
            async with http.get(running.url + "/healthz") as resp:
                assert resp.status == 200
    finally:
        await running.stop()
