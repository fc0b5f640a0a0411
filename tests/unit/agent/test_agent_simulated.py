"""Simulated backend: pods to memory (pure), the pod watch against a real HTTP API stand-in,
every endpoint over real HTTP, the fault knobs, and the dcgm metric names and labels."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import aiohttp
import pytest
from agent_testlib import wait_for
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from modelfleet.agent.metrics import DCGM_LABELS, AgentMetrics
from modelfleet.agent.server import build_app
from modelfleet.agent.simulated import (
    Faults,
    GpuFileError,
    SimulatedBackend,
    build_sim_gpus,
    compute_sim_stats,
    parse_gpu_file,
    parse_replica_pod,
)
from modelfleet.agent.state import AgentState, poll_once, run_poll_loop
from modelfleet.api.gpustats import GpuReport
from modelfleet.api.times import parse_time
from modelfleet.kube import ClusterConfig, KubeClient

NODE = "sim-node-a"


def replica(
    name: str,
    gpus: str,
    footprint: str | None = None,
    *,
    phase: str = "Running",
    deleting: bool = False,
    uid: str | None = None,
) -> dict[str, Any]:
    annotations = {"modelfleet.io/gpus": gpus}
    if footprint is not None:
        annotations["modelfleet.io/footprint-mib"] = footprint
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ml",
        "uid": uid or name,
        "annotations": annotations,
        "labels": {"app.kubernetes.io/component": "replica"},
    }
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"nodeName": NODE, "containers": [{"name": "vllm"}]},
        "status": {"phase": phase},
    }


# --- pure --------------------------------------------------------------------------------


def test_footprint_and_default_share() -> None:
    gpus = build_sim_gpus(NODE, 2, 80000, "NVIDIA-H100-80GB-HBM3")
    pods = [
        parse_replica_pod(replica("a", f"{NODE}:0", "20000"), NODE),
        parse_replica_pod(replica("b", f"{NODE}:0,{NODE}:1", "10000"), NODE),
        parse_replica_pod(replica("c", f"{NODE}:1", ""), NODE),  # empty: vLLM's 90%
    ]
    stats = compute_sim_stats(NODE, gpus, [p for p in pods if p], Faults())
    assert [g.memory_used_mib for g in stats] == [30000, 80000]  # 10000 + 72000 capped at 80000
    assert stats[0].memory_free_mib == 50000
    assert [p.name for p in stats[0].pods] == ["a", "b"]
    assert stats[0].pods[0].container == "vllm"
    assert stats[0].pods[0].memory_used_mib == 20000


def test_pending_and_terminating_pods_take_no_memory_but_are_listed() -> None:
    gpus = build_sim_gpus(NODE, 1, 80000, "X")
    pods = [
        parse_replica_pod(replica("p", f"{NODE}:0", "30000", phase="Pending"), NODE),
        parse_replica_pod(replica("t", f"{NODE}:0", "30000", deleting=True), NODE),
    ]
    (gpu,) = compute_sim_stats(NODE, gpus, [p for p in pods if p], Faults())
    assert gpu.memory_used_mib == 0
    assert [p.name for p in gpu.pods] == ["p", "t"]
    assert all(p.memory_used_mib == 0 for p in gpu.pods)


def test_pods_for_other_nodes_or_bad_ids_are_ignored() -> None:
    assert parse_replica_pod(replica("x", "other-node:0"), NODE) is None
    assert parse_replica_pod(replica("y", "not-an-id"), NODE) is None
    use = parse_replica_pod(replica("z", f"other:1,{NODE}:3,{NODE}:3"), NODE)
    assert use is not None
    assert use.gpu_indexes == (3,)


def test_derived_values_are_deterministic_and_plausible() -> None:
    gpus = build_sim_gpus(NODE, 1, 80000, "X")
    pod = parse_replica_pod(replica("a", f"{NODE}:0", "40000"), NODE)
    assert pod is not None
    one = compute_sim_stats(NODE, gpus, [pod], Faults())
    two = compute_sim_stats(NODE, gpus, [pod], Faults())
    assert one == two
    idle = compute_sim_stats(NODE, gpus, [], Faults())[0]
    busy = one[0]
    assert 0 < busy.utilization_percent <= 100
    assert busy.temperature_c is not None
    assert idle.temperature_c is not None
    assert busy.temperature_c > idle.temperature_c
    assert busy.power_w is not None
    assert idle.power_w is not None
    assert busy.power_w > idle.power_w


def test_uuids_are_stable_and_distinct() -> None:
    a = build_sim_gpus(NODE, 8, 1, "X")
    b = build_sim_gpus(NODE, 8, 1, "X")
    assert [g.uuid for g in a] == [g.uuid for g in b]
    assert len({g.uuid for g in a}) == 8
    assert a[0].uuid != build_sim_gpus("sim-node-b", 1, 1, "X")[0].uuid


def test_gpu_file_heterogeneous() -> None:
    gpus = parse_gpu_file(
        """
        - {product: NVIDIA-H100-80GB-HBM3, memoryMib: 81559}
        - {product: NVIDIA-L4, memoryMib: 23034, maxPowerW: 72, uuid: GPU-l4}
        """,
        NODE,
    )
    assert [(g.index, g.product, g.memory_mib) for g in gpus] == [
        (0, "NVIDIA-H100-80GB-HBM3", 81559),
        (1, "NVIDIA-L4", 23034),
    ]
    assert gpus[1].uuid == "GPU-l4"
    # JSON is YAML: the same parser takes both.
    (only,) = parse_gpu_file('[{"memoryMib": 1024}]', NODE)
    assert (only.index, only.memory_mib, only.product) == (0, 1024, "NVIDIA-H100-80GB-HBM3")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "non-empty list"),
        ("- 5", "must be a mapping"),
        ("- {memoryMib: 0}", "GPU #0"),
        ("- {memoryMib: 1, colour: red}", "colour"),
        ("- {memoryMib: 1, index: 1}\n- {memoryMib: 1, index: 1}", "repeat"),
        ("[: bad", "not valid YAML"),
    ],
)
def test_gpu_file_errors_say_what(text: str, message: str) -> None:
    with pytest.raises(GpuFileError, match=message):
        parse_gpu_file(text, NODE, source="gpus.yaml")


def test_fault_knobs_mark_gpus() -> None:
    gpus = build_sim_gpus(NODE, 2, 1000, "X")
    faults = Faults.model_validate({"unhealthy": {"1": "fan failure"}, "xid": {"0": 79}})
    stats = compute_sim_stats(NODE, gpus, [], faults)
    assert (stats[0].health.healthy, stats[0].health.reason, stats[0].health.last_xid) == (
        False,
        "XID 79",
        79,
    )
    assert (stats[1].health.healthy, stats[1].health.reason) == (False, "fan failure")


# --- the pod watch, against a small real HTTP server playing the API ----------------------


class FakePodsApi:
    """Serves LIST and WATCH of pods like the API server; events are pushed by the test."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queries: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self.pods)
        return app

    async def pods(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        if request.query.get("watch") != "true":
            return web.json_response({"items": self.items, "metadata": {"resourceVersion": "1"}})
        resp = web.StreamResponse()
        await resp.prepare(request)
        while True:
            event = await self.events.get()
            await resp.write(json.dumps(event).encode() + b"\n")


async def test_pod_watch_drives_reported_memory(serve) -> None:  # type: ignore[no-untyped-def]
    from modelfleet.agent.app import watch_node_pods

    api = FakePodsApi()
    api.items = [replica("a", f"{NODE}:0", "20000")]
    url = await serve(api.app())
    client = KubeClient(ClusterConfig(server=url, ssl_context=False), timeout_s=5)
    backend = SimulatedBackend(NODE, build_sim_gpus(NODE, 2, 80000, "X"))
    metrics = AgentMetrics()
    state = AgentState(node=NODE, backend="simulated", poll_interval_s=300, metrics=metrics)
    tasks = [
        asyncio.create_task(run_poll_loop(backend, state)),
        asyncio.create_task(watch_node_pods(client, backend, state)),
    ]

    def used() -> list[int]:
        return [g.memory_used_mib for g in state.latest.report.gpus] if state.latest else []

    try:
        await wait_for(lambda: used() == [20000, 0], what="the listed pod to count")
        new = replica("b", f"{NODE}:1", "", phase="Pending")
        await api.events.put({"type": "ADDED", "object": new})
        await wait_for(lambda: len(state.latest.report.gpus[1].pods) == 1, what="pending pod")
        assert used() == [20000, 0]
        new["status"]["phase"] = "Running"
        await api.events.put({"type": "MODIFIED", "object": new})
        # The poll interval is 300 s: only the wake-up on a pod change can explain this.
        await wait_for(lambda: used() == [20000, 72000], what="running pod to reserve 90%")
        await api.events.put({"type": "DELETED", "object": api.items[0]})
        await wait_for(lambda: used() == [0, 72000], what="deleted pod to free memory")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    assert api.queries[0]["fieldSelector"] == f"spec.nodeName={NODE}"
    # Every pod of the node, not only replicas: a foreign pod may hold a GPU too.
    assert "labelSelector" not in api.queries[0]


# --- every endpoint over real HTTP --------------------------------------------------------


@pytest.fixture
async def sim_agent(serve):  # type: ignore[no-untyped-def]
    backend = SimulatedBackend(NODE, build_sim_gpus(NODE, 8, 81559, "NVIDIA-H100-80GB-HBM3"))
    backend.apply_pod_event("SYNC", {"items": [replica("gemma-instance-1", f"{NODE}:2", "30000")]})
    metrics = AgentMetrics()
    state = AgentState(node=NODE, backend="simulated", poll_interval_s=300, metrics=metrics)
    metrics.attach(lambda: state.latest)
    base = await serve(build_app(state, sim=backend))
    task = asyncio.create_task(run_poll_loop(backend, state))
    async with aiohttp.ClientSession() as http:
        yield base, http, state, backend
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_endpoints(sim_agent) -> None:  # type: ignore[no-untyped-def]
    base, http, state, _ = sim_agent
    await wait_for(lambda: state.latest is not None, what="first sample")
    async with http.get(f"{base}/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 200
    async with http.get(f"{base}/v1/gpus") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        report = GpuReport.model_validate_json(await resp.read())
    assert report.node == NODE
    assert report.backend == "simulated"
    assert len(report.gpus) == 8
    assert report.gpus[2].memory_used_mib == 30000
    assert report.gpus[2].pods[0].name == "gemma-instance-1"
    async with http.get(f"{base}/no/such/path") as resp:
        assert resp.status == 404
        body = await resp.json()
        assert "/no/such/path" in body["error"]
    async with http.post(f"{base}/v1/gpus") as resp:
        assert resp.status == 405
        assert "POST" in (await resp.json())["error"]


async def test_metrics_have_dcgm_names_and_labels(sim_agent) -> None:  # type: ignore[no-untyped-def]
    base, http, state, _ = sim_agent
    await wait_for(lambda: state.latest is not None, what="first sample")
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_XID_ERRORS",
    ):
        assert families[name].type == "gauge", name
        assert len(families[name].samples) == 8, name
        for sample in families[name].samples:
            assert set(sample.labels) == set(DCGM_LABELS)
    used = {s.labels["gpu"]: s for s in families["DCGM_FI_DEV_FB_USED"].samples}
    assert used["2"].value == 30000
    assert used["2"].labels["pod"] == "gemma-instance-1"
    assert used["2"].labels["namespace"] == "ml"
    assert used["2"].labels["container"] == "vllm"
    assert used["2"].labels["device"] == "nvidia2"
    assert used["2"].labels["modelName"] == "NVIDIA-H100-80GB-HBM3"
    assert used["2"].labels["Hostname"] == NODE
    assert used["0"].labels["pod"] == ""
    assert families["modelfleet_agent_gpus"].samples[0].value == 8
    assert families["modelfleet_agent_poll_duration_seconds"].type == "histogram"
    assert families["modelfleet_agent_poll_errors"].type == "counter"
    stamp = families["modelfleet_agent_last_sample_timestamp_seconds"].samples[0].value
    assert abs(stamp - time.time()) < 60


async def test_fault_knobs_over_http(sim_agent) -> None:  # type: ignore[no-untyped-def]
    base, http, state, backend = sim_agent
    await wait_for(lambda: state.latest is not None, what="first sample")

    async def gpus_status() -> int:
        async with http.get(f"{base}/v1/gpus") as resp:
            await resp.read()
            return resp.status

    async with http.post(f"{base}/sim/faults", json={"unhealthy": {"3": "XID 79"}}) as resp:
        assert resp.status == 200
    await wait_for(
        lambda: not state.latest.report.gpus[3].health.healthy, what="GPU 3 to turn unhealthy"
    )
    async with http.get(f"{base}/v1/gpus") as resp:
        assert GpuReport.model_validate_json(await resp.read()).gpus[3].health.reason == "XID 79"

    async with http.post(f"{base}/sim/faults", json={"failStatus": 500}) as resp:
        assert (await resp.json())["unhealthy"] == {"3": "XID 79"}  # knobs merge
    assert await gpus_status() == 500
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 500
    async with http.get(f"{base}/healthz") as resp:
        assert resp.status == 200  # probes are never faulted

    async with http.post(f"{base}/sim/faults", json={"failStatus": None, "garbage": True}) as r:
        assert r.status == 200
    async with http.get(f"{base}/v1/gpus") as resp:
        assert resp.status == 200
        with pytest.raises(ValidationError):
            GpuReport.model_validate_json(await resp.read())

    async with http.post(f"{base}/sim/faults", json={"garbage": False, "delayS": 0.3}) as r:
        assert r.status == 200
    started = time.monotonic()
    assert await gpus_status() == 200
    assert time.monotonic() - started >= 0.3

    async with http.post(f"{base}/sim/faults", json={"delayS": -1}) as resp:
        assert resp.status == 400
        assert "delayS" in (await resp.json())["error"] or "delay" in (await resp.json())["error"]
    async with http.post(f"{base}/sim/faults", data=b"not json") as resp:
        assert resp.status == 400

    async with http.delete(f"{base}/sim/faults") as resp:
        assert resp.status == 200
    assert backend.faults == Faults()
    await wait_for(lambda: state.latest.report.gpus[3].health.healthy, what="GPU 3 healthy")


async def test_readyz_waits_for_first_sample(serve) -> None:  # type: ignore[no-untyped-def]
    backend = SimulatedBackend(NODE, build_sim_gpus(NODE, 1, 1000, "X"))
    metrics = AgentMetrics()
    state = AgentState(node=NODE, backend="simulated", poll_interval_s=5, metrics=metrics)
    metrics.attach(lambda: state.latest)
    base = await serve(build_app(state, sim=backend))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503
        async with http.get(f"{base}/v1/gpus") as resp:
            assert resp.status == 503
            assert "no sample yet" in (await resp.json())["error"]
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200  # own metrics still scrape before the first sample
        assert await poll_once(backend, state)
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
            sampled_at = (await resp.json())["sampledAt"]
    assert state.latest is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", sampled_at)
    assert parse_time(sampled_at) == state.latest.report.sampled_at


async def test_freeze_sample_knob_hangs_the_poll_loop(sim_agent) -> None:  # type: ignore[no-untyped-def]
    """`freezeSample`: the agent keeps serving its last sample, as one with a stuck poll loop."""
    base, http, state, backend = sim_agent
    await wait_for(lambda: state.latest is not None, what="first sample")

    async def served() -> GpuReport:
        async with http.get(f"{base}/v1/gpus") as resp:
            assert resp.status == 200
            return GpuReport.model_validate_json(await resp.read())

    async with http.post(f"{base}/sim/faults", json={"freezeSample": True}) as resp:
        assert resp.status == 200
        assert (await resp.json())["freezeSample"] is True
    frozen = state.latest
    # A GPU fault asks for a new sample at once; the loop cannot take it.
    async with http.post(f"{base}/sim/faults", json={"unhealthy": {"3": "XID 79"}}) as resp:
        assert resp.status == 200
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(backend.sample(), 0.2)
    assert state.latest is frozen
    report = await served()
    assert report.sampled_at == frozen.report.sampled_at
    assert report.gpus[3].health.healthy

    async with http.post(f"{base}/sim/faults", json={"freezeSample": False}) as resp:
        assert resp.status == 200
    await wait_for(lambda: state.latest is not frozen, what="a new sample after the thaw")
    report = await served()
    assert report.sampled_at > frozen.report.sampled_at
    assert report.gpus[3].health.reason == "XID 79"
