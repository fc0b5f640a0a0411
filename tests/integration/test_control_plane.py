"""The ModelDeployment CRD and the simulated GPU nodes, against the real kube-apiserver."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest
import yaml
from clusterkit import CLUSTER_SH, ROOT, Cluster, PodRunner, kubectl, wait_for
from pydantic import ValidationError

from api_documents import INVALID, VALID, Invalid, error_paths, pydantic_blames
from modelfleet.api import ModelDeployment
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import md_path, pods_path

CRD_NAME = "modeldeployments.modelfleet.io"
GPU = "nvidia.com/gpu"


def md(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": "google/gemma-3-4b-it", **spec},
    }


async def test_crd_is_established(kube: KubeClient) -> None:
    crd = await kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"


async def test_valid_modeldeployment_is_accepted_with_defaults(
    kube: KubeClient, namespace: str
) -> None:
    example = yaml.safe_load((ROOT / "examples" / "gemma3-4b.yaml").read_text())
    created = await kube.create(md_path(namespace), example, fieldValidation="Strict")
    spec = created["spec"]
    assert spec["replicas"] == 2
    assert spec["minReplicas"] == 0
    assert spec["priority"] == 0
    assert spec["gpu"] == {"count": 1, "memory": "20Gi", "sharing": "Exclusive"}
    assert spec["placement"]["spread"] is True
    assert spec["engine"]["port"] == 8000
    stored = await kube.get(md_path(namespace, "gemma3-4b"))
    assert stored["spec"] == spec


async def test_shared_example_is_accepted(kube: KubeClient, namespace: str) -> None:
    example = yaml.safe_load((ROOT / "examples" / "llama-shared.yaml").read_text())
    created = await kube.create(md_path(namespace), example, fieldValidation="Strict")
    assert created["spec"]["gpu"]["sharing"] == "Shared"
    assert created["spec"]["placement"]["strategy"] == "RoundRobin"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param({"replicas": -1}, "spec.replicas", id="negative-replicas"),
        pytest.param(
            {"replicas": 1, "minReplicas": 2}, "spec.minReplicas", id="min-above-replicas"
        ),
        pytest.param(
            {"gpu": {"count": 1, "sharing": "Shared"}},
            "spec.gpu.memory",
            id="shared-without-memory",
        ),
        pytest.param(
            {"placement": {"strategy": "Fastest"}}, "spec.placement.strategy", id="unknown-strategy"
        ),
        pytest.param({"gpu": {"memory": "20 gigs"}}, "spec.gpu.memory", id="malformed-quantity"),
        pytest.param({"replicaz": 2}, "spec.replicaz", id="unknown-field"),
    ],
)
async def test_invalid_modeldeployment_is_refused_naming_the_field(
    cluster: Cluster, kube: KubeClient, namespace: str, spec: dict[str, Any], field: str
) -> None:
    manifest = json.dumps(md("bad", **spec))
    # kubectl validates strictly by default (server-side field validation).
    done = await kubectl(cluster, "-n", namespace, "create", "-f", "-", input=manifest, check=False)
    assert done.returncode != 0, f"the API server accepted {spec}"
    assert field in done.stderr, done.stderr
    # The same through the client with fieldValidation=Strict.
    with pytest.raises(ApiError) as refused:
        await kube.create(md_path(namespace), md("bad", **spec), fieldValidation="Strict")
    assert refused.value.status in (400, 422)
    assert field in refused.value.message
    assert (await kube.list(md_path(namespace)))["items"] == []


@pytest.mark.parametrize("case", INVALID)
async def test_api_server_and_models_refuse_the_same_documents(
    kube: KubeClient, namespace: str, case: Invalid
) -> None:
    with pytest.raises(ValidationError) as by_models:
        ModelDeployment.model_validate(case.doc)
    assert pydantic_blames(by_models.value, case.field), error_paths(by_models.value)
    with pytest.raises(ApiError) as by_server:
        await kube.create(md_path(namespace), case.doc, fieldValidation="Strict")
    assert by_server.value.status in (400, 422), by_server.value.message
    # The API server writes "<field path>: <what is wrong>"; CEL messages name the field again.
    assert case.field in by_server.value.message, by_server.value.message
    assert (await kube.list(md_path(namespace)))["items"] == []


@pytest.mark.parametrize("doc", VALID)
async def test_api_server_and_models_accept_the_same_documents(
    kube: KubeClient, namespace: str, doc: dict[str, Any]
) -> None:
    parsed = ModelDeployment.model_validate(doc)
    created = await kube.create(md_path(namespace), doc, fieldValidation="Strict")
    # What the API server stored (with its defaults) is what the operator will parse.
    stored = ModelDeployment.model_validate(created)
    assert stored.spec == parsed.spec


async def test_cel_messages_say_how_to_fix(kube: KubeClient, namespace: str) -> None:
    bad = [
        ("metadata.name", {"metadata": {"name": "gemma.3-4b"}}, "e.g. gemma3-4b"),
        ("spec.gpu.memory", {"spec": {"gpu": {"memory": "-5Gi"}}}, "such as 20Gi"),
        ("spec.idleTimeout", {"spec": {"idleTimeout": "soon"}}, "such as 90s, 30m or 1h30m"),
    ]
    for field, change, advice in bad:
        doc = md("advice")
        doc["metadata"].update(change.get("metadata", {}))
        doc["spec"].update(change.get("spec", {}))
        with pytest.raises(ApiError) as refused:
            await kube.create(md_path(namespace), doc)
        assert f"{field}:" in refused.value.message
        assert f"{field} must be" in refused.value.message
        assert advice in refused.value.message


async def test_kubectl_get_shows_the_printer_columns(cluster: Cluster, namespace: str) -> None:
    manifest = json.dumps(md("cols", replicas=2))
    await kubectl(cluster, "-n", namespace, "create", "-f", "-", input=manifest)
    done = await kubectl(cluster, "-n", namespace, "get", "modeldeployments")
    header, row = done.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "MODEL", "REPLICAS", "READY", "STATUS", "REASON", "AGE"]
    assert row.split()[:3] == ["cols", "google/gemma-3-4b-it", "2"]
    short = await kubectl(cluster, "-n", namespace, "get", "mdeploy", "-o", "name")
    assert short.stdout.strip() == "modeldeployment.modelfleet.io/cols"


async def test_kubectl_scale_goes_through_the_scale_subresource(
    cluster: Cluster, kube: KubeClient, namespace: str
) -> None:
    await kube.create(md_path(namespace), md("scaled", replicas=1))
    await kubectl(cluster, "-n", namespace, "scale", "modeldeployment/scaled", "--replicas=3")
    assert (await kube.get(md_path(namespace, "scaled")))["spec"]["replicas"] == 3
    scale = await kube.get(md_path(namespace, "scaled") + "/scale")
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 3


@pytest.mark.kwok
async def test_simulated_nodes_look_like_gpu_nodes(kube: KubeClient) -> None:
    # The real nodes (hack/realnodes.py) carry the same GPU labels; they are not simulated.
    selector = "nvidia.com/gpu.present=true,!modelfleet.io/test-node"
    nodes = (await kube.list("/api/v1/nodes", labelSelector=selector))["items"]
    assert nodes, "no simulated GPU nodes"
    for node in nodes:
        labels = node["metadata"]["labels"]
        count = labels["nvidia.com/gpu.count"]
        assert node["status"]["capacity"][GPU] == count
        assert node["status"]["allocatable"][GPU] == count
        assert int(labels["nvidia.com/gpu.memory"]) > 0
        assert labels["nvidia.com/gpu.product"]
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert node["spec"]["podCIDR"].startswith("127.")
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert ready["Ready"] == "True"
    cidrs = [n["spec"]["podCIDR"] for n in nodes]
    assert len(set(cidrs)) == len(cidrs)


def gpu_pod(name: str, node_name: str | None = None, gpus: int = 1) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {"name": "main", "image": "fake", "resources": {"limits": {GPU: str(gpus)}}}
        ],
        "terminationGracePeriodSeconds": 0,
    }
    if node_name:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node_name}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return {}


@pytest.mark.kwok
async def test_gpu_pod_becomes_running_and_ready_with_a_loopback_ip(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    # A GPU pod starts once the node's "kubelet" (the pod runner) admitted it.
    await kube.create(pods_path(namespace), gpu_pod("one-gpu"))

    async def ready() -> dict[str, Any] | None:
        pod = await kube.get(pods_path(namespace, "one-gpu"))
        return pod if _condition(pod, "Ready").get("status") == "True" else None

    pod = await wait_for(ready, timeout=30, what="pod one-gpu Ready")
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"].startswith("127.")
    node = await kube.get(f"/api/v1/nodes/{pod['spec']['nodeName']}")
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"


async def _gpus_in_use(kube: KubeClient, node_name: str) -> int:
    pods = await kube.list("/api/v1/pods", fieldSelector=f"spec.nodeName={node_name}")
    used = 0
    for pod in pods["items"]:
        if pod["status"].get("phase") in ("Succeeded", "Failed"):
            continue
        for container in pod["spec"]["containers"]:
            used += int(container.get("resources", {}).get("limits", {}).get(GPU, 0))
    return used


async def test_ninth_gpu_pod_on_an_eight_gpu_node_stays_pending(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    nodes = await kube.list("/api/v1/nodes", labelSelector="nvidia.com/gpu.count=8")
    assert nodes["items"], "the cluster has no 8-GPU node (see hack/nodes.yaml)"
    node = nodes["items"][-1]["metadata"]["name"]
    # Pods of earlier tests' namespaces may still be going away.
    await wait_for(
        lambda: _is_zero(_gpus_in_use(kube, node)), timeout=60, what=f"no GPU pods on {node}"
    )
    for i in range(8):
        await kube.create(pods_path(namespace), gpu_pod(f"gpu-{i}", node))

    async def all_running() -> bool:
        pods = (await kube.list(pods_path(namespace)))["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return len(running) == 8

    await wait_for(all_running, timeout=60, what="8 one-GPU pods Running")
    await kube.create(pods_path(namespace), gpu_pod("gpu-9th", node))

    async def unschedulable() -> dict[str, Any] | None:
        pod = await kube.get(pods_path(namespace, "gpu-9th"))
        cond = _condition(pod, "PodScheduled")
        return cond if cond.get("reason") == "Unschedulable" else None

    cond = await wait_for(unschedulable, timeout=30, what="gpu-9th Unschedulable")
    assert f"Insufficient {GPU}" in cond["message"]
    pod = await kube.get(pods_path(namespace, "gpu-9th"))
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]


async def _is_zero(value: Any) -> bool:
    return await value == 0


@pytest.mark.kwok
def test_cluster_up_on_a_running_cluster_is_a_no_op(cluster: Cluster) -> None:
    started = time.monotonic()
    done = subprocess.run([CLUSTER_SH, "up"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # "updated" when the running cluster was made from another nodes file: applied in place.
    assert "already up" in done.stderr or "updated" in done.stderr, done.stderr
    assert "starting cluster" not in done.stderr
    assert time.monotonic() - started < 30
