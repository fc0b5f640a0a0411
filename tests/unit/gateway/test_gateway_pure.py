"""Pure gateway parts: the model field, Pods to endpoints, balancing decisions, static upstreams,
the last-use rate limit and the annotation patch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from gwharness import RecordingWriter, md_obj, pod_obj
from hypothesis import given
from hypothesis import strategies as st

from modelfleet.api import labels
from modelfleet.api.times import format_time_ms
from modelfleet.api.v1alpha1 import Balancing
from modelfleet.gateway.balancer import (
    EjectionPolicy,
    Replica,
    Route,
    pick_replica,
    record_failure,
    record_success,
)
from modelfleet.gateway.documents import (
    ModelList,
    build_models_document,
    build_status_document,
)
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.model import (
    BodyError,
    build_switched_off_message,
    extract_model,
    parse_deployment,
    parse_replica_pod,
)
from modelfleet.gateway.registry import Registry
from modelfleet.gateway.routing import RoutingConfig
from modelfleet.gateway.sources import StaticUpstreamsError, parse_static_upstreams
from modelfleet.gateway.usage import KubeAnnotationWriter, UsageRecorder
from modelfleet.kube.client import ClusterConfig, KubeClient

# ---- the model field ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "gemma3-4b", "messages": []}', "gemma3-4b"),
        (b'{"messages": [{"role": "user", "content": "say \\"model\\": x"}], "model":"m"}', "m"),
        # A nested key named model: the full parse finds the top-level one.
        (b'{"tools": [{"model": "inner"}], "model": "outer"}', "outer"),
        (b'{"model": "g\\u0065mma"}', "gemma"),
        (b'{"model":"a/b:c"}', "a/b:c"),
    ],
)
def test_extract_model(body: bytes, model: str) -> None:
    assert extract_model(body) == model


@pytest.mark.parametrize(
    "body",
    [
        b'{"x": {"model": "a"}}',
        b'{"messages": [{"role": "user", "model": "a"}]}',
        b'  {"x": {"y": 1, "model": "a"}, "prompt": "p"}',
    ],
)
def test_extract_model_never_routes_by_a_nested_model_key(body: bytes) -> None:
    with pytest.raises(BodyError, match="no model field"):
        extract_model(body)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompt": "x"}', "no model field"),
        (b'{"model": 3}', "no model field"),
        (b"", "not valid JSON"),
    ],
)
def test_extract_model_errors_do_not_echo(body: bytes, words: str) -> None:
    with pytest.raises(BodyError, match=words) as info:
        extract_model(body)
    assert "prompt" not in str(info.value)


@given(
    model=st.text(min_size=1, max_size=40),
    content=st.text(max_size=60),
    nested=st.booleans(),
)
def test_extract_model_agrees_with_json(model: str, content: str, nested: bool) -> None:
    doc: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "model": model}
    if nested:
        doc["tools"] = [{"model": content}]
    for ascii_only in (True, False):
        assert extract_model(json.dumps(doc, ensure_ascii=ascii_only).encode()) == model


# ---- Pods and deployments ----------------------------------------------------------------------


def test_ready_pod_becomes_an_endpoint() -> None:
    pod = parse_replica_pod(pod_obj("g-instance-1", "g", 8000, served="gemma3-4B"))
    assert pod is not None
    assert (pod.address, pod.deployment, pod.served_name) == ("127.0.0.1:8000", "g", "gemma3-4B")


@pytest.mark.parametrize(
    "change",
    [
        {"ready": False},
        {"deleting": True},
        {"ip": ""},
    ],
)
def test_pods_that_may_not_take_traffic(change: dict[str, Any]) -> None:
    assert parse_replica_pod(pod_obj("p", "g", 8000, **change)) is None


def test_pod_phase_labels_and_ports() -> None:
    pending = pod_obj("p", "g", 8000)
    pending["status"]["phase"] = "Pending"
    assert parse_replica_pod(pending) is None
    agent = pod_obj("p", "g", 8000)
    agent["metadata"]["labels"][labels.LABEL_COMPONENT] = labels.COMPONENT_AGENT
    assert parse_replica_pod(agent) is None
    unnamed = pod_obj("p", "g", 8000)
    unnamed["spec"]["containers"][0]["ports"] = [{"containerPort": 9000}]
    assert parse_replica_pod(unnamed).port == 9000  # type: ignore[union-attr]
    portless = pod_obj("p", "g", 8000)
    portless["spec"]["containers"][0]["ports"] = []
    assert parse_replica_pod(portless, default_port=8123).port == 8123  # type: ignore[union-attr]
    ipv6 = parse_replica_pod(pod_obj("p", "g", 8000, ip="fd00::5"))
    assert ipv6 is not None
    assert ipv6.address == "[fd00::5]:8000"


def test_deployment_served_name_and_balancing() -> None:
    info = parse_deployment(md_obj("gemma3-4b", served="gemma3-4B", balancing="LeastOutstanding"))
    assert info is not None
    assert (info.served_name, info.balancing, info.replicas) == (
        "gemma3-4B",
        "LeastOutstanding",
        2,
    )
    plain = parse_deployment(md_obj("llama", balancing="Random"))
    assert plain is not None
    assert (plain.served_name, plain.balancing) == ("llama", None)


def test_registry_routes_pods_by_served_name_and_resyncs() -> None:
    registry = Registry()
    registry.replace_deployments([md_obj("g", served="gemma3-4B")])
    registry.replace_pods([pod_obj("g-instance-1", "g", 8001), pod_obj("g-instance-2", "g", 8002)])
    route = registry.routes["gemma3-4B"]
    assert [r.name for r in route.replicas] == ["g-instance-1", "g-instance-2"]
    route.replicas[0].outstanding = 3
    # A re-list after a reconnect keeps per-replica state and drops what vanished.
    registry.replace_pods([pod_obj("g-instance-1", "g", 8001)])
    route = registry.routes["gemma3-4B"]
    assert [(r.name, r.outstanding) for r in route.replicas] == [("g-instance-1", 3)]
    registry.replace_deployments([])
    assert registry.routes == {}


async def test_registry_queue_hold_release_and_limit() -> None:
    registry = Registry()
    registry.replace_deployments([md_obj("g")])
    registry.replace_pods([])
    assert registry.hold("g", 2)
    assert registry.hold("g", 2)
    assert not registry.hold("g", 2)  # full: no place taken
    assert registry.queued("g") == 2
    assert registry.queue_depths() == {"g": 2}
    registry.release("g")
    registry.release("g")
    assert registry.queued("g") == 0
    assert registry.queue_depths() == {}
    assert not registry.hold("g", 0)  # queue_size 0: nothing is ever held


async def test_registry_wait_wakes_on_ready_switch_off_and_times_out() -> None:
    registry = Registry()
    registry.replace_deployments([md_obj("g", replicas=1)])
    registry.replace_pods([])
    assert await registry.wait_for_replica("g", 0.05) is None  # timed out
    waiter = asyncio.ensure_future(registry.wait_for_replica("g", 5))
    await asyncio.sleep(0)
    registry.apply_pod("ADDED", pod_obj("g-instance-1", "g", 8001))
    route = await asyncio.wait_for(waiter, 1)
    assert route is not None
    assert [r.name for r in route.replicas] == ["g-instance-1"]
    registry.apply_pod("DELETED", pod_obj("g-instance-1", "g", 8001))
    waiter = asyncio.ensure_future(registry.wait_for_replica("g", 5))
    await asyncio.sleep(0)
    assert not registry.is_switched_off("g")
    registry.apply_deployment("MODIFIED", md_obj("g", replicas=0))
    assert registry.is_switched_off("g")
    assert await asyncio.wait_for(waiter, 1) is None  # at once, not after 5 s


def test_switched_off_follows_the_deployment_that_holds_the_name() -> None:
    registry = Registry()
    registry.replace_deployments(
        [md_obj("a", served="m", replicas=0), md_obj("b", served="m", replicas=1, namespace="x")]
    )
    assert registry.is_switched_off("m")  # a holds m (same age, default/a sorts first)
    registry.apply_deployment("MODIFIED", md_obj("a", served="m", replicas=1))
    assert not registry.is_switched_off("m")
    assert not registry.is_switched_off("unknown")


def test_switched_off_message_names_the_model_and_the_command() -> None:
    registry = Registry()
    registry.replace_deployments([md_obj("gemma", served="gemma3-4B", replicas=0, namespace="ml")])
    message = build_switched_off_message("gemma3-4B", registry.models["gemma3-4B"])
    assert message == (
        "model gemma3-4B is scaled to zero by its spec (spec.replicas: 0), so nothing will start "
        "it for this request; start it with `kubectl scale modeldeployment/gemma --replicas=1 "
        "-n ml`, or set spec.replicas above 0"
    )
    registry.replace_deployments(
        [md_obj("a", served="m", replicas=0), md_obj("b", served="m", replicas=0, namespace="x")]
    )
    message = build_switched_off_message("m", registry.models["m"])
    assert "`kubectl scale modeldeployment/a --replicas=1 -n default`" in message
    assert message.endswith("or set spec.replicas above 0")  # b does not hold the name
    registry.set_static({"m": []})
    assert build_switched_off_message("m", registry.models["m"]) == (
        "model m has no upstream: --static-upstreams lists none for it; add one as "
        "m=http://HOST:PORT"
    )


def test_models_document_states_and_cache() -> None:
    registry = Registry()
    registry.replace_deployments(
        [md_obj("off", replicas=0), md_obj("cold", replicas=2), md_obj("up", replicas=1)]
    )
    registry.replace_pods([pod_obj("up-instance-1", "up", 8001)])
    document = build_models_document(registry)
    assert [(m["id"], m["ready_replicas"], m["desired_replicas"], m["state"]) for m in
            document["data"]] == [
        ("cold", 0, 2, "cold"),
        ("off", 0, 0, "off"),
        ("up", 1, 1, "ready"),
    ]  # fmt: skip
    models = ModelList(registry)
    first = models.body()
    assert json.loads(first) == document
    assert models.body() is first  # unchanged registry: not rebuilt
    registry.apply_pod("ADDED", pod_obj("cold-instance-1", "cold", 8002))
    rebuilt = models.body()
    assert rebuilt is not first
    assert json.loads(rebuilt)["data"][0]["state"] == "ready"


def test_status_document_reports_queues_ejections_and_switched_off() -> None:
    registry = Registry()
    registry.replace_deployments([md_obj("g", replicas=1), md_obj("off", replicas=0)])
    registry.replace_pods([pod_obj("g-instance-1", "g", 8001)])
    registry.routes["g"].replicas[0].ejected_until = 12.5
    assert registry.hold("off", 5)
    status = build_status_document(registry, now=10.0)
    instance = status["active_containers_by_name"]["g-instance-1"]
    assert (instance["ejected"], instance["ejected_for_s"]) == (True, 2.5)
    assert status["queue_depth"] == {"off": 1}
    assert status["switched_off"] == ["off"]
    assert status["parallel_model_config"] == {"g": 1, "off": 0}
    assert status["deployments"] == {"g": ["default/g"], "off": ["default/off"]}


# ---- balancing ---------------------------------------------------------------------------------


def _route(n: int, balancing: str = "RoundRobin") -> Route:
    replicas = [Replica(f"r{i}", f"127.0.0.1:{8000 + i}") for i in range(n)]
    return Route("m", replicas, RoutingConfig(Balancing(balancing)))


def test_round_robin_and_skipping_ejected() -> None:
    route = _route(3)
    assert [pick_replica(route, 0.0).name for _ in range(4)] == ["r0", "r1", "r2", "r0"]  # type: ignore[union-attr]
    route.replicas[1].ejected_until = 10.0
    assert [pick_replica(route, 5.0).name for _ in range(4)] == ["r2", "r0", "r2", "r0"]  # type: ignore[union-attr]
    assert pick_replica(route, 11.0).name == "r1"  # type: ignore[union-attr]


def test_least_outstanding_and_exclusion() -> None:
    route = _route(3, Balancing.LEAST_OUTSTANDING)
    route.replicas[0].outstanding = 2
    route.replicas[1].outstanding = 1
    route.replicas[2].outstanding = 5
    assert pick_replica(route, 0.0).name == "r1"  # type: ignore[union-attr]
    assert pick_replica(route, 0.0, exclude=(route.replicas[1],)).name == "r0"  # type: ignore[union-attr]


def test_all_ejected_still_routes_and_empty_route_gives_none() -> None:
    route = _route(2)
    for replica in route.replicas:
        replica.ejected_until = 100.0
    route.replicas[1].ejected_until = 50.0
    assert pick_replica(route, 0.0).name == "r1"  # type: ignore[union-attr]
    assert pick_replica(_route(0), 0.0) is None


def test_ejection_grows_and_success_resets() -> None:
    policy = EjectionPolicy(failures=3, base_s=2.0, max_s=5.0)
    replica = Replica("r", "127.0.0.1:1")
    assert [record_failure(replica, 0.0, policy) for _ in range(3)] == [False, False, True]
    assert replica.ejected_until == 2.0
    for _ in range(3):
        record_failure(replica, 10.0, policy)
    assert replica.ejected_until == 14.0
    for _ in range(3):
        record_failure(replica, 20.0, policy)
    assert replica.ejected_until == 25.0  # capped
    record_success(replica)
    assert (replica.ejections, replica.consecutive_failures) == (0, 0)


# ---- static upstreams --------------------------------------------------------------------------


def test_static_upstreams() -> None:
    assert parse_static_upstreams(
        "gemma3-4B=http://127.0.0.1:8001,http://127.0.0.1:8002; qwen=http://[::1]:9000"
    ) == {"gemma3-4B": ["127.0.0.1:8001", "127.0.0.1:8002"], "qwen": ["[::1]:9000"]}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("http://127.0.0.1:8001", "MODEL=URL"),
        ("m=https://h:1", "http://HOST:PORT"),
        ("m=http://h:1/v1", "http://HOST:PORT"),
        ("m=http://h:port", "port is not a number"),
        ("", "no upstreams"),
    ],
)
def test_static_upstreams_errors(text: str, words: str) -> None:
    with pytest.raises(StaticUpstreamsError, match=words):
        parse_static_upstreams(text)


# ---- last use ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_last_use_is_rate_limited_per_model() -> None:
    registry = Registry()
    registry.replace_deployments([md_obj("a"), md_obj("b")])
    writer = RecordingWriter()
    clock = FakeClock()
    usage = UsageRecorder(registry, writer, GatewayMetrics(), interval_s=30, clock=clock)
    usage.touch("a")
    usage.touch("b")
    await usage.flush()
    assert sorted(w[1] for w in writer.writes) == ["a", "b"]
    clock.now += 10
    usage.touch("a")
    await usage.flush()
    assert len(writer.writes) == 2  # within the interval: not yet
    clock.now += 25
    await usage.flush()
    assert len(writer.writes) == 3
    assert writer.writes[-1][2] == {labels.ANN_LAST_REQUEST: format_time_ms(clock.now - 25)}
    clock.now += 60
    await usage.flush()
    assert len(writer.writes) == 3  # nothing new to say


def test_rfc3339() -> None:
    assert format_time_ms(0.5) == "1970-01-01T00:00:00.500Z"


@pytest.fixture
async def patch_server() -> AsyncIterator[tuple[str, list[tuple[str, str, Any]]]]:
    """Records PATCH calls as the API server would receive them (adapter test, no cluster)."""
    seen: list[tuple[str, str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.path, request.content_type, await request.json()))
        return web.json_response({"metadata": {"name": "x"}})

    app = web.Application()
    app.router.add_patch("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    await runner.cleanup()


async def test_kube_writer_merge_patches_the_annotation(
    patch_server: tuple[str, list[tuple[str, str, Any]]],
) -> None:
    url, seen = patch_server
    async with KubeClient(ClusterConfig(server=url)) as kube:
        await KubeAnnotationWriter(kube).annotate(
            "ml", "gemma3-4b", {labels.ANN_LAST_REQUEST: "2026-01-01T00:00:00.000Z"}
        )
    assert seen == [
        (
            "/apis/modelfleet.io/v1alpha1/namespaces/ml/modeldeployments/gemma3-4b",
            "application/merge-patch+json",
            {"metadata": {"annotations": {labels.ANN_LAST_REQUEST: "2026-01-01T00:00:00.000Z"}}},
        )
    ]
