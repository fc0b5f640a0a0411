"""The autoscaler's status, its ScalingLimited Event and the gateway's held counts, through the
loop against the controller tests' fake API server (real HTTP on loopback)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from fake_api import serve_fake_api
from prometheus_client import CollectorRegistry

from modelfleet.api.held import format_held, held_key
from modelfleet.api.labels import ANN_DEMAND
from modelfleet.api.times import format_time_ms
from modelfleet.api.v1alpha1 import ModelDeployment
from modelfleet.controller.autoscale_loop import Autoscaler, compute_held
from modelfleet.controller.autoscale_scrape import EngineScraper
from modelfleet.controller.execute import EventRecorder, apply_status
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.status import status_changed
from modelfleet.kube.paths import md_path

KEY = ("ns", "chat")
PATH = md_path("ns", "chat")
# The reconcile's status of a model that idled to zero: nothing left to do.
IDLE = {
    "replicas": 0,
    "observedGeneration": 2,
    "phase": "ScaledToZero",
    "conditions": [
        {"type": "Progressing", "status": "False", "reason": "Complete", "message": "0/0 ready"}
    ],
}


def _body(
    *,
    replicas: int = 1,
    annotations: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "chat",
            "namespace": "ns",
            "uid": "uid-chat",
            "generation": 2,
            "annotations": copy.deepcopy(annotations or {}),
        },
        "spec": {
            "model": "org/chat",
            "replicas": replicas,
            "autoscaling": {"enabled": True, "maxReplicas": 8, "targetPerReplica": 16},
        },
        "status": copy.deepcopy(status or {}),  # the fake API merges into what it holds
    }


def _events(fake: Any) -> list[dict[str, Any]]:
    return [obj for path, obj in fake.objects.items() if "/events/" in path]


async def test_a_model_that_cannot_grow_says_so_once_and_stops_asking() -> None:
    # The reconcile placed 1 of 2: the second replica has no room (its status says so).
    blocked = {
        "replicas": 1,
        "observedGeneration": 2,
        "conditions": [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "NoCapacity",
                "message": "no node has a free GPU",
            }
        ],
    }
    # No replica is Ready yet, so the requests the gateway holds are the load: 7 replicas' worth.
    held = {held_key("gw-a"): format_held(100, datetime.now(UTC))}
    async with serve_fake_api() as (fake, client), aiohttp.ClientSession() as session:
        fake.objects[PATH] = _body(replicas=2, annotations=held, status=blocked)
        metrics = OperatorMetrics(CollectorRegistry())
        autoscaler = Autoscaler(
            client, EngineScraper(session), metrics, events=EventRecorder(client)
        )
        for now in (0.0, 5.0, 10.0, 60.0):
            written = await autoscaler.round({KEY: fake.objects[PATH]}, {KEY: []}, now=now)
            assert written == {}
        stored = fake.objects[PATH]
        assert stored["spec"]["replicas"] == 2
        assert not [r for r in fake.requests if r[1].endswith("/scale")]
        auto = stored["status"]["autoscaling"]
        assert auto["desiredReplicas"] == 2
        assert auto["reason"].startswith("limited at 2: 100 requests held by the gateway")
        [cond] = auto["conditions"]
        assert (cond["type"], cond["status"], cond["reason"]) == (
            "ScalingLimited",
            "True",
            "NoCapacity",
        )
        assert metrics.autoscaler_limited.labels(*KEY)._value.get() == 1
        assert metrics.autoscaler_rounds._value.get() == 4
        # The reconcile's part of the status is untouched by the autoscaler's writes.
        assert stored["status"]["conditions"] == blocked["conditions"]
        [event] = _events(fake)
        assert (event["reason"], event["type"], event["count"]) == (
            "ScalingLimited",
            "Warning",
            1,
        )
        assert event["message"].startswith("1 of 2 replicas cannot be placed: no node has")
        # A watch that lags behind shows the object without the status just written: the status
        # is written again, the Event is not.
        lagging = _body(replicas=2, annotations=held, status=blocked)
        await autoscaler.round({KEY: lagging}, {KEY: []}, now=65.0)
        [event] = _events(fake)
        assert event["count"] == 1


async def test_the_reconciles_status_write_never_drops_or_rewinds_the_autoscalers() -> None:
    async with serve_fake_api() as (fake, client), aiohttp.ClientSession() as session:
        fake.objects[PATH] = _body(
            annotations={held_key("gw-a"): format_held(40, datetime.now(UTC))},
            status={**IDLE, "autoscaling": {"desiredReplicas": 1, "reason": "an older round"}},
        )
        # The reconcile read the object before the autoscaler's round...
        stale = ModelDeployment.model_validate(fake.objects[PATH])
        autoscaler = Autoscaler(client, EngineScraper(session))
        assert await autoscaler.round({KEY: fake.objects[PATH]}, {KEY: []}, now=0.0) == {KEY: 3}
        decided = fake.objects[PATH]["status"]["autoscaling"]
        assert decided["desiredReplicas"] == 3
        assert decided["signal"]["held"] == 40
        # ...and writes its own status after it: the autoscaler's sub-object stays as written.
        assert stale.status.autoscaling is not None
        assert stale.status.autoscaling.desired_replicas == 1
        mine = stale.status.model_copy(update={"replicas": 1, "phase": "Progressing"})
        await apply_status(client, stale, mine)
        assert fake.objects[PATH]["status"]["autoscaling"] == decided
        assert fake.objects[PATH]["status"]["phase"] == "Progressing"
        # A status that differs only in the autoscaler's part is no change for the reconcile.
        read = ModelDeployment.model_validate(fake.objects[PATH]).status
        assert read.autoscaling is not None
        assert not status_changed(read, read.model_copy(update={"autoscaling": None}))


def test_held_counts_of_every_fresh_gateway_add_up() -> None:
    now = datetime.now(UTC)
    annotations = {
        held_key("gw-a"): format_held(30, now - timedelta(seconds=2)),
        held_key("gw-b"): format_held(12, now - timedelta(seconds=20)),
        held_key("gw-gone"): format_held(500, now - timedelta(minutes=5)),  # stale: ignored
        ANN_DEMAND: format_time_ms(now),
    }
    md = ModelDeployment.model_validate(_body(annotations=annotations))
    assert compute_held(md, now) == 42
    # An older gateway that writes only demand-time still wakes the model with one replica.
    only_demand = ModelDeployment.model_validate(
        _body(annotations={ANN_DEMAND: format_time_ms(now)})
    )
    assert compute_held(only_demand, now) == 1
    assert compute_held(ModelDeployment.model_validate(_body()), now) == 0


async def test_stale_held_counts_are_removed() -> None:
    now = datetime.now(UTC)
    fresh, gone = held_key("gw-a"), held_key("gw-gone")
    annotations = {
        fresh: format_held(1, now),
        gone: format_held(3, now - timedelta(hours=1)),
        "other": "kept",
    }
    async with serve_fake_api() as (fake, client), aiohttp.ClientSession() as session:
        fake.objects[PATH] = _body(annotations=annotations)
        await Autoscaler(client, EngineScraper(session)).round(
            {KEY: fake.objects[PATH]}, {KEY: []}, now=0.0
        )
        assert fake.objects[PATH]["metadata"]["annotations"] == {
            fresh: annotations[fresh],
            "other": "kept",
        }


async def test_switching_autoscaling_off_clears_its_status() -> None:
    body = _body(status={"autoscaling": {"desiredReplicas": 3, "reason": "steady"}})
    body["spec"]["autoscaling"]["enabled"] = False
    async with serve_fake_api() as (fake, client), aiohttp.ClientSession() as session:
        fake.objects[PATH] = body
        await Autoscaler(client, EngineScraper(session)).round({KEY: body}, {KEY: []}, now=0.0)
        assert "autoscaling" not in fake.objects[PATH]["status"]
