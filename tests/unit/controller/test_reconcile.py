"""reconcile() itself, end to end against an in-memory API (fake_api.py, real HTTP on 127.0.0.1).

The watches are played by the test: `World.index()` builds the indices from what the fake API
holds, and a test that wants the watch to lag passes an older index (or an older body) on
purpose. The GPU pool is a fixed snapshot. Everything between (plan, place, the in-flight book,
reservations, execute) is the real code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from controller_helpers import facts, report, snapshot
from fake_api import FakeApi, serve_fake_api
from prometheus_client import CollectorRegistry

from modelfleet.api import API_GROUP, API_VERSION, KIND
from modelfleet.api import labels as L
from modelfleet.api.times import format_time
from modelfleet.controller.builders import compute_template_hash
from modelfleet.controller.execute import EventRecorder
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.observed import parse_deployment, parse_pod
from modelfleet.controller.plan import Plan
from modelfleet.controller.reconcile import CreateFailed, reconcile
from modelfleet.controller.runtime import ClusterState, Runtime
from modelfleet.gpus.snapshot import PoolSnapshot
from modelfleet.kube.client import KubeClient
from modelfleet.kube.paths import md_path, pods_path
from modelfleet.settings import OperatorSettings

NS = "ns"
CREATED = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


class World:
    """A fake API, a runtime over it, and the cluster as the watches would show it."""

    def __init__(self, fake: FakeApi, client: KubeClient, pool: PoolSnapshot) -> None:
        self.fake = fake
        self.client = client
        self.pool = pool
        self.nodes = facts(*sorted(n.name for n in pool.nodes))
        self.settings = OperatorSettings()
        self.rt = self.new_runtime()

    def new_runtime(self) -> Runtime:
        """A fresh operator process: nothing remembered but what the API holds."""
        return Runtime(
            client=self.client,
            settings=self.settings,
            events=EventRecorder(self.client, reporting_instance="test"),
            metrics=OperatorMetrics(CollectorRegistry()),
            snapshot=lambda: self.pool,
        )

    def add_md(self, name: str, *, last_used_h: float = 5, **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"uid-{name}",
                "generation": 1,
                "creationTimestamp": format_time(CREATED),
                "annotations": {
                    L.ANN_LAST_REQUEST: format_time(CREATED + timedelta(hours=last_used_h))
                },
            },
            "spec": {"model": f"org/{name}", **spec},
        }
        self.fake.objects[md_path(NS, name)] = body
        return body

    def add_ready_pod(self, md: dict[str, Any], n: int, gpus: list[str]) -> None:
        """A replica Pod that was created by an earlier operator and is serving."""
        from modelfleet.api import ModelDeployment

        spec = md["spec"]
        name = md["metadata"]["name"]
        model = ModelDeployment.model_validate(md)
        self.fake.objects[pods_path(NS, f"{name}-instance-{n}")] = {
            "metadata": {
                "name": f"{name}-instance-{n}",
                "namespace": NS,
                "uid": f"pod-{name}-{n}",
                "labels": {
                    L.LABEL_COMPONENT: L.COMPONENT_REPLICA,
                    L.LABEL_NAME: L.NAME_VALUE,
                    L.LABEL_DEPLOYMENT: name,
                },
                "annotations": {
                    L.ANN_GPUS: ",".join(gpus),
                    L.ANN_FOOTPRINT_MIB: "",
                    L.ANN_PRIORITY: str(spec.get("priority", 0)),
                    L.ANN_MIN_REPLICAS: str(spec.get("minReplicas", 0)),
                    L.ANN_TEMPLATE_HASH: compute_template_hash(model, self.settings.default_image),
                },
                "ownerReferences": [
                    {
                        "apiVersion": f"{API_GROUP}/{API_VERSION}",
                        "kind": KIND,
                        "name": name,
                        "uid": md["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": {"nodeName": gpus[0].rsplit(":", 1)[0]},
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": format_time(CREATED)}
                ],
            },
        }

    def index(self) -> ClusterState:
        """The cluster as up-to-date watches show it now."""
        pods: dict[tuple[str, str], list[Any]] = {}
        deployments: dict[tuple[str, str], list[Any]] = {}
        for path, body in self.fake.objects.items():
            if "/pods/" in path:
                pod = parse_pod(body)
                if pod is not None:
                    pods.setdefault((pod.namespace, pod.deployment), []).append(pod)
            elif "/modeldeployments/" in path:
                meta = body["metadata"]
                deployments[(meta["namespace"], meta["name"])] = [parse_deployment(body)]
        return ClusterState(
            pods=pods,
            nodes={n: [f] for n, f in self.nodes.items()},
            deployments=deployments,
            services=None,
        )

    async def reconcile(
        self, name: str, cluster: ClusterState | None = None, rt: Runtime | None = None
    ) -> Plan:
        cluster = cluster or self.index()
        rt = rt or self.rt
        rt.attach(cluster, datetime.now(UTC))
        body = cluster.body((NS, name))
        assert body is not None
        plan = await reconcile(rt, body, cluster)
        assert plan is not None
        return plan

    def pods(self, deployment: str) -> dict[str, dict[str, Any]]:
        return {
            body["metadata"]["name"]: body
            for path, body in self.fake.objects.items()
            if "/pods/" in path
            and body["metadata"].get("labels", {}).get(L.LABEL_DEPLOYMENT) == deployment
        }

    def gpus(self, deployment: str) -> list[str]:
        return sorted(
            g
            for body in self.pods(deployment).values()
            for g in body["metadata"]["annotations"][L.ANN_GPUS].split(",")
        )

    def writes(self, method: str, kind: str = "pods") -> list[str]:
        return [path for m, path in self.fake.requests if m == method and f"/{kind}" in path]

    def annotations(self, name: str) -> dict[str, str]:
        return dict(self.fake.objects[md_path(NS, name)]["metadata"].get("annotations") or {})


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with serve_fake_api() as (fake, client):
        yield World(fake, client, snapshot(report("a", 2)))


async def test_two_quick_placements_never_take_the_same_gpus(world: World) -> None:
    world.add_md("x", replicas=1)
    world.add_md("y", replicas=1)
    stale = world.index()  # neither reconcile sees the other's Pod in its index
    await asyncio.gather(world.reconcile("x", stale), world.reconcile("y", stale))
    assert world.gpus("x") + world.gpus("y") in (["a:0", "a:1"], ["a:1", "a:0"])


async def test_a_created_pod_is_not_planned_twice_before_the_watch_shows_it(world: World) -> None:
    world.add_md("x", replicas=1)
    stale = world.index()
    first = await world.reconcile("x", stale)
    second = await world.reconcile("x", stale)
    assert [c.name for c in first.to_create] == ["x-instance-1"]
    assert second.to_create == []
    assert second.to_place == []
    assert len(world.writes("POST")) == 1


async def test_a_failed_create_is_retried_on_the_next_pass(world: World) -> None:
    world.add_md("x", replicas=1)
    stale = world.index()
    world.fake.fail_next("pods")
    with pytest.raises(CreateFailed, match="x-instance-1"):
        await world.reconcile("x", stale)
    assert world.pods("x") == {}
    events = [b for p, b in world.fake.objects.items() if "/events/" in p]
    assert any(e["reason"] == "CreateFailed" for e in events)
    await world.reconcile("x", stale)  # the watch still shows nothing: the promise was dropped
    assert list(world.pods("x")) == ["x-instance-1"]


def _full_node(world: World) -> None:
    """Node a's two GPUs serve `old` (priority 0); `new` (priority 10) wants one GPU."""
    old = world.add_md("old", replicas=2, priority=0)
    world.add_ready_pod(old, 1, ["a:0"])
    world.add_ready_pod(old, 2, ["a:1"])
    world.add_md("new", replicas=1, priority=10, last_used_h=6)


async def test_an_eviction_reserves_the_freed_gpus_for_the_evictor(world: World) -> None:
    _full_node(world)
    plan = await world.reconcile("new")
    assert [v.pod for v in plan.victims] == ["old-instance-1"]
    assert world.writes("DELETE") == [pods_path(NS, "old-instance-1")]
    assert world.annotations("old")[L.ANN_EVICTED_BY] == f"{NS}/new"
    held = json.loads(world.annotations("new")[L.ANN_RESERVATION])
    assert held["gpus"] == ["a:0"]
    # The victim's Pod is gone; its deployment's reconcile runs first, and its watch has not
    # delivered the evicted-at annotation yet: it must neither take a:0 back nor evict.
    stale_old = world.index()
    stale_old.deployments[(NS, "old")] = [
        parse_deployment(
            {
                **world.fake.objects[md_path(NS, "old")],
                "metadata": {
                    **world.fake.objects[md_path(NS, "old")]["metadata"],
                    "annotations": {},
                },
            }
        )
    ]
    victim = await world.reconcile("old", stale_old)
    assert victim.blocker is not None
    assert victim.blocker.reason == "Evicted"
    assert "new" in victim.blocker.message
    assert world.writes("POST") == []
    assert len(world.writes("DELETE")) == 1
    # The evictor takes exactly the GPU it reserved, and lets the reservation go.
    await world.reconcile("new")
    assert world.gpus("new") == ["a:0"]
    assert L.ANN_RESERVATION not in world.annotations("new")


async def test_a_restarted_operator_keeps_the_reservation(world: World) -> None:
    _full_node(world)
    await world.reconcile("new")
    # A new operator process: only the API remembers the eviction.
    world.rt = world.new_runtime()
    victim = await world.reconcile("old")
    assert victim.blocker is not None
    assert victim.blocker.reason == "Evicted"
    assert world.writes("POST") == []
    await world.reconcile("new")
    assert world.gpus("new") == ["a:0"]
    assert world.gpus("old") == ["a:1"]
    assert len(world.writes("DELETE")) == 1


async def test_evictions_decided_in_one_round_respect_the_floor(world: World) -> None:
    # `old` may lose one of its two Ready replicas (minReplicas 1), not both, even when two
    # evictors decide before the watches show the first eviction.
    old = world.add_md("old", replicas=2, minReplicas=1, priority=0)
    world.add_ready_pod(old, 1, ["a:0"])
    world.add_ready_pod(old, 2, ["a:1"])
    world.add_md("p", replicas=1, priority=10)
    world.add_md("q", replicas=1, priority=10)
    stale = world.index()
    first = await world.reconcile("p", stale)
    second = await world.reconcile("q", stale)
    assert len(first.victims) == 1
    assert second.victims == []
    assert second.blocker is not None
    assert second.blocker.reason == "NoCapacity"
    assert "minReplicas" in second.blocker.message
    assert len(world.writes("DELETE")) == 1


async def test_an_invalid_spec_is_reported_in_status_once(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # The API server let it in (an older CRD); the operator reports it instead of looping.
    world.add_md("bad", replicas=1, gpu={"memory": "-5Gi"})
    cluster = world.index()
    body = cluster.body((NS, "bad"))
    assert body is not None
    assert await reconcile(world.rt, body, cluster) is None
    status = world.fake.objects[md_path(NS, "bad")]["status"]
    assert status["phase"] == "Invalid"
    available = next(c for c in status["conditions"] if c["type"] == "Available")
    assert available["reason"] == "InvalidSpec"
    assert available["message"].startswith("spec.gpu.memory: '-5Gi' is negative")
    assert world.writes("POST") == []
    writes = len(world.fake.requests)
    cluster = world.index()  # the watch now shows the status
    body = cluster.body((NS, "bad"))
    assert body is not None
    assert await reconcile(world.rt, body, cluster) is None
    assert len(world.fake.requests) == writes  # nothing new to say: no request at all
    lines = [r for r in caplog.records if "ModelDeployment not reconciled" in r.getMessage()]
    assert len(lines) == 1
    assert not any(r.exc_info for r in caplog.records)


async def test_shared_mode_is_refused_unless_the_operator_allows_it(world: World) -> None:
    # Shared replicas ask for no GPU and rely on NVIDIA_VISIBLE_DEVICES: off unless allowed.
    world.add_md("shared", replicas=1, gpu={"sharing": "Shared", "memory": "8Gi"})
    cluster = world.index()
    body = cluster.body((NS, "shared"))
    assert body is not None
    assert await reconcile(world.rt, body, cluster) is None
    status = world.fake.objects[md_path(NS, "shared")]["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "SharedModeDisabled"
    assert "MODELFLEET_SHARED_MODE" in degraded["message"]
    assert "sharing: Exclusive" in degraded["message"]
    assert world.writes("POST") == []  # no Pod
    assert world.writes("POST", "events")  # the Warning
    # Allowed, the same deployment is placed.
    world.settings = world.settings.model_copy(update={"shared_mode": True})
    world.rt = world.new_runtime()
    cluster = world.index()
    body = cluster.body((NS, "shared"))
    assert body is not None
    await reconcile(world.rt, body, cluster)
    assert len(world.writes("POST")) == 1


async def test_a_deployment_that_waits_logs_once_not_per_re_check(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.add_md("big", replicas=1, gpu={"count": 4})  # node a has 2 GPUs
    caplog.set_level("INFO", logger="modelfleet.controller.reconcile")
    for _ in range(3):
        plan = await world.reconcile("big")
        assert plan.blocker is not None
    lines = [r for r in caplog.records if "blocked at big-instance-1" in r.getMessage()]
    assert len(lines) == 1


# ---- trust: only Pods a ModelDeployment controls are replicas ----------------------------------


def add_look_alike(world: World, md: dict[str, Any], n: int, gpus: list[str]) -> str:
    """A Pod someone else made with a replica's labels, name and annotations, but no owner."""
    world.add_ready_pod(md, n, gpus)
    name = f"{md['metadata']['name']}-instance-{n}"
    body = world.fake.objects[pods_path(NS, name)]
    body["metadata"]["uid"] = f"foreign-{name}"
    body["metadata"].pop("ownerReferences")
    return name


async def test_a_restarted_operator_adopts_its_replica_and_leaves_a_look_alike_alone(
    world: World,
) -> None:
    md = world.add_md("x", replicas=1)
    world.add_ready_pod(md, 1, ["a:0"])
    look_alike = add_look_alike(world, md, 2, ["a:1"])
    world.rt = world.new_runtime()  # a fresh process: nothing remembered
    plan = await world.reconcile("x")
    assert plan.to_create == []
    assert plan.to_delete == []
    assert world.writes("POST") == []
    assert world.writes("DELETE") == []
    assert set(world.pods("x")) == {"x-instance-1", look_alike}
    status = world.fake.objects[md_path(NS, "x")]["status"]
    assert [i["name"] for i in status["instances"]] == ["x-instance-1"]


async def test_a_look_alike_is_not_counted_as_a_replica_and_keeps_its_name(world: World) -> None:
    md = world.add_md("x", replicas=1)
    add_look_alike(world, md, 1, ["a:0"])
    plan = await world.reconcile("x")
    assert [c.name for c in plan.to_create] == ["x-instance-2"]
    assert world.writes("DELETE") == []


async def test_a_look_alike_holds_its_gpus_as_a_foreign_pod(world: World) -> None:
    md = world.add_md("x", replicas=1)
    add_look_alike(world, md, 1, ["a:0"])
    cluster = world.index()
    assert world.rt.all_pods(cluster) == []
    assert cluster.ignored_pods() == {"not_controlled": 1}


async def test_a_newer_deployment_with_a_taken_served_name_is_told_once(world: World) -> None:
    world.add_md("older", replicas=0, servedModelName="m")
    newer = world.add_md("aaa-newer", replicas=0, servedModelName="m")
    newer["metadata"]["creationTimestamp"] = format_time(CREATED + timedelta(minutes=1))
    await world.reconcile("older")
    await world.reconcile("aaa-newer")
    events = [body for path, body in world.fake.objects.items() if "/events/" in path]
    assert [(e["reason"], e["type"]) for e in events] == [("ServedNameTaken", "Warning")]
    assert "held by ModelDeployment ns/older" in events[0]["message"]
    routed = {
        name: next(
            c
            for c in world.fake.objects[md_path(NS, name)]["status"]["conditions"]
            if c["type"] == "Routed"
        )
        for name in ("older", "aaa-newer")
    }
    assert (routed["older"]["status"], routed["older"]["reason"]) == ("True", "ServedNameHeld")
    assert (routed["aaa-newer"]["status"], routed["aaa-newer"]["reason"]) == (
        "False",
        "ServedNameTaken",
    )
    await world.reconcile("aaa-newer")  # the status says so already: no second Event
    assert len([p for m, p in world.fake.requests if m == "POST" and "/events" in p]) == 1
