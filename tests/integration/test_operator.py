"""The operator end to end: real control plane, real operator processes, real agents and vLLM
stand-ins started by the pod runner on simulated GPU nodes private to each test."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clusterkit import Cluster, kubectl, wait_for
from operator_kit import (
    Operators,
    conditions,
    events_of,
    md,
    pod_ready,
    replica_pods,
    wait_ready,
)

from modelfleet.api import labels as L
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import md_path, pods_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def test_apply_places_replicas_on_distinct_nodes(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    nodes = await gpus(3, 2)
    operators.start()
    await kube.create(md_path(namespace), md("gemma", replicas=2, servedModelName="gemma3-4B"))
    obj = await wait_ready(kube, namespace, "gemma", 2)

    pods = sorted(await replica_pods(kube, namespace, "gemma"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in pods] == ["gemma-instance-1", "gemma-instance-2"]
    used_nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(used_nodes) == 2
    assert used_nodes <= set(nodes)
    for pod in pods:
        ann = pod["metadata"]["annotations"]
        node = pod["spec"]["nodeName"]
        assert ann[L.ANN_GPUS].startswith(f"{node}:")
        assert ann[L.ANN_SERVED_MODEL] == "gemma3-4B"
        assert ann[L.ANN_PLACEMENT_REASON]
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"]) == ("ModelDeployment", obj["metadata"]["uid"])

    # Status: instances with their global GPU IDs, conditions, generation, selector.
    status = obj["status"]
    assert {(i["name"], i["node"], tuple(i["gpus"])) for i in status["instances"]} == {
        (p["metadata"]["name"], p["spec"]["nodeName"], (p["metadata"]["annotations"][L.ANN_GPUS],))
        for p in pods
    }
    assert conditions(obj)["Available"] == ("True", "ReplicasReady")
    assert conditions(obj)["Degraded"] == ("False", "AsExpected")
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["phase"] == "Ready"
    assert "modelfleet.io/deployment=gemma" in status["selector"]
    assert "finalizers" not in obj["metadata"]  # ownerReferences clean up; no finalizer

    # Events carry the placement reason.
    placed = [e for e in await events_of(kube, namespace, "gemma") if e["reason"] == "Placed"]
    assert len(placed) == 2
    assert all("availability" in e["message"].lower() for e in placed)

    # The Service selects the replicas.
    svc = await kube.get(f"/api/v1/namespaces/{namespace}/services/gemma")
    assert svc["spec"]["selector"][L.LABEL_DEPLOYMENT] == "gemma"
    assert svc["spec"]["ports"][0]["port"] == 8000


async def test_scale_up_down_kubectl_scale_and_delete(
    cluster: Cluster, kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(2, 2)
    operators.start()
    await kube.create(md_path(namespace), md("m", replicas=1))
    await wait_ready(kube, namespace, "m", 1)

    await kube.patch(md_path(namespace, "m"), {"spec": {"replicas": 3}})
    await wait_ready(kube, namespace, "m", 3)
    names = sorted(p["metadata"]["name"] for p in await replica_pods(kube, namespace, "m"))
    assert names == ["m-instance-1", "m-instance-2", "m-instance-3"]

    await kubectl(cluster, "-n", namespace, "scale", "modeldeployment/m", "--replicas=1")
    await wait_ready(kube, namespace, "m", 1)
    [left] = await replica_pods(kube, namespace, "m")
    assert left["metadata"]["name"] == "m-instance-1"  # highest instance numbers go first

    await kube.delete(md_path(namespace, "m"))

    async def gone() -> bool:
        pods = await kube.list(pods_path(namespace), labelSelector=f"{L.LABEL_DEPLOYMENT}=m")
        try:
            await kube.get(f"/api/v1/namespaces/{namespace}/services/m")
            svc = True
        except ApiError as exc:
            svc = not exc.not_found
        return not pods["items"] and not svc

    await wait_for(gone, timeout=60, what="replica Pods and Service garbage-collected")


async def test_node_lost_replica_replaced_on_another_node(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(3, 2)
    operators.start()
    await kube.create(md_path(namespace), md("m", replicas=2))
    await wait_ready(kube, namespace, "m", 2)
    pods = {p["metadata"]["name"]: p for p in await replica_pods(kube, namespace, "m")}
    lost_node = pods["m-instance-1"]["spec"]["nodeName"]
    old_uid = pods["m-instance-1"]["metadata"]["uid"]

    await kube.delete(f"/api/v1/nodes/{lost_node}")
    started = asyncio.get_running_loop().time()

    async def replaced() -> bool:
        now = {p["metadata"]["name"]: p for p in await replica_pods(kube, namespace, "m")}
        new = now.get("m-instance-1")
        return bool(
            new
            and new["metadata"]["uid"] != old_uid
            and new["spec"]["nodeName"] != lost_node
            and pod_ready(new)
        )

    await wait_for(replaced, timeout=60, what="m-instance-1 replaced on another node")
    assert asyncio.get_running_loop().time() - started < 60
    reasons = [e["reason"] for e in await events_of(kube, namespace, "m")]
    assert "NodeLost" in reasons
    await wait_ready(kube, namespace, "m", 2)


async def test_full_cluster_evicts_the_least_recently_used(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(1, 2)
    operators.start()
    old = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    recent = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await kube.create(
        md_path(namespace), md("stale", replicas=1, annotations={L.ANN_LAST_REQUEST: old})
    )
    await kube.create(
        md_path(namespace), md("busy", replicas=1, annotations={L.ANN_LAST_REQUEST: recent})
    )
    await wait_ready(kube, namespace, "stale", 1)
    await wait_ready(kube, namespace, "busy", 1)

    await kube.create(md_path(namespace), md("newcomer", replicas=1))
    await wait_ready(kube, namespace, "newcomer", 1)
    await wait_ready(kube, namespace, "busy", 1)  # the recently used one stays

    async def stale_evicted() -> dict[str, Any] | None:
        obj = await kube.get(md_path(namespace, "stale"))
        cond = conditions(obj) if obj.get("status", {}).get("conditions") else {}
        return obj if cond.get("Available", ("", ""))[1] == "Evicted" else None

    obj = await wait_for(stale_evicted, timeout=30, what="stale shows Evicted")
    assert obj["metadata"]["annotations"][L.ANN_EVICTED_BY] == f"{namespace}/newcomer"
    assert not await replica_pods(kube, namespace, "stale")
    assert "Evicted" in [e["reason"] for e in await events_of(kube, namespace, "stale")]

    # Capacity frees up: the evicted deployment comes back by itself.
    await kube.delete(md_path(namespace, "newcomer"))
    obj = await wait_ready(kube, namespace, "stale", 1)
    assert L.ANN_EVICTED_AT not in obj["metadata"].get("annotations", {})


async def test_invalid_spec_is_refused(cluster: Cluster, namespace: str) -> None:
    bad = md("bad", replicas=1, minReplicas=3)
    done = await kubectl(
        cluster, "-n", namespace, "apply", "-f", "-", input=json.dumps(bad), check=False
    )
    assert done.returncode != 0
    assert "minReplicas" in done.stderr


async def test_operator_killed_mid_reconcile_leaves_no_duplicates(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(3, 4)
    first = operators.start()
    await kube.create(md_path(namespace), md("m", replicas=6))

    async def some_created() -> bool:
        return len(await replica_pods(kube, namespace, "m")) >= 1

    await wait_for(some_created, timeout=60, interval=0.02, what="the first replica Pod")
    first.kill()  # in the middle of creating the six
    operators.start()
    await wait_ready(kube, namespace, "m", 6)
    pods = await kube.list(pods_path(namespace), labelSelector=f"{L.LABEL_DEPLOYMENT}=m")
    names = sorted(p["metadata"]["name"] for p in pods["items"])
    assert names == [f"m-instance-{n}" for n in range(1, 7)]

    # No GPU handed out twice: the GPUs the nodes assigned (their device manager chooses; a plan
    # made by the killed operator may name other ones), as the operator records them.
    async def assigned() -> list[str] | None:
        items = (await kube.list(pods_path(namespace), labelSelector=f"{L.LABEL_DEPLOYMENT}=m"))[
            "items"
        ]
        found = [p["metadata"]["annotations"].get(L.ANN_ASSIGNED_GPUS) for p in items]
        return [str(a) for a in found] if len(found) == 6 and all(found) else None

    gpu_ids = await wait_for(assigned, timeout=30, what="the GPUs the nodes assigned")
    assert len(set(gpu_ids)) == 6, gpu_ids


async def test_two_operators_only_one_acts(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(2, 2)
    a = operators.start()

    async def holder() -> str:
        try:
            lease = await kube.get(
                f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/modelfleet-operator"
            )
        except ApiError:
            return ""
        return str(lease["spec"].get("holderIdentity") or "")

    first_holder = await wait_for(holder, timeout=30, what="a Lease holder")
    b = operators.start()
    await kube.create(md_path(namespace), md("m", replicas=2))
    await wait_ready(kube, namespace, "m", 2)
    assert "standing by" in b.output()
    assert "create m-instance" in a.output()
    assert "create m-instance" not in b.output()
    assert await holder() == first_holder

    a.kill()  # no release: the standby waits out the lease duration, then acts

    async def b_leads() -> bool:
        return "acquired Lease" in b.output()

    await wait_for(b_leads, timeout=30, what="the standby to take over")
    await kube.patch(md_path(namespace, "m"), {"spec": {"replicas": 3}})
    await wait_ready(kube, namespace, "m", 3)
    assert "create m-instance-3" in b.output()


async def test_spec_change_rolls_one_replica_at_a_time(
    kube: KubeClient, namespace: str, gpus: Any, operators: Operators
) -> None:
    await gpus(2, 2)
    operators.start()
    await kube.create(md_path(namespace), md("m", replicas=2))
    await wait_ready(kube, namespace, "m", 2)
    before = {
        p["metadata"]["name"]: p["metadata"]["annotations"][L.ANN_TEMPLATE_HASH]
        for p in await replica_pods(kube, namespace, "m")
    }
    await kube.patch(
        md_path(namespace, "m"), {"spec": {"engine": {"args": ["--max-model-len", "4096"]}}}
    )

    lowest_ready = 2

    async def rolled() -> bool:
        nonlocal lowest_ready
        pods = await replica_pods(kube, namespace, "m")
        lowest_ready = min(lowest_ready, sum(pod_ready(p) for p in pods))
        new = [
            p
            for p in pods
            if p["metadata"]["annotations"][L.ANN_TEMPLATE_HASH] not in before.values()
            and pod_ready(p)
        ]
        return len(new) == 2

    await wait_for(
        rolled, timeout=90, interval=0.05, what="both replicas rebuilt from the new spec"
    )
    assert lowest_ready >= 1  # one at a time: the other kept serving
    pods = await replica_pods(kube, namespace, "m")
    assert sorted(p["metadata"]["name"] for p in pods) == sorted(before)  # same names
    args = pods[0]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--max-model-len", "4096"]
    reasons = [e["reason"] for e in await events_of(kube, namespace, "m")]
    assert "RollingUpdate" in reasons
