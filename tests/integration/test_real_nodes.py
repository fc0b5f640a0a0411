"""On the real nodes: what the kubelet, its device manager and our device plugin really do.

These nodes run an upstream kubelet with containerd and runc, so admission, device assignment,
probes and restarts are the kubelet's own; only NVML is faked (a per-node GPU inventory behind
the project's device plugin, the agent's fake NVML and the fake NVIDIA runtime hook).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from clusterkit import Cluster, exists, helm, wait_for
from operator_kit import Operators, events_of, md, replica_pods, wait_ready
from realnodes_kit import (
    GPU_TOLERATION,
    REAL_NODE_SELECTOR,
    RealNodes,
    gpu_pod,
    load_real_nodes,
)

from modelfleet.api.labels import LABEL_DEPLOYMENT as DEPLOYMENT_LABEL
from modelfleet.api.times import parse_time
from modelfleet.kube.client import KubeClient, list_and_watch
from modelfleet.kube.paths import md_path

pytestmark = pytest.mark.realnodes

CHART = "charts/modelfleet"


@pytest.fixture(scope="session")
def real_nodes_once(cluster: Cluster) -> RealNodes:
    return load_real_nodes(cluster)


@pytest.fixture
async def real_nodes(real_nodes_once: RealNodes) -> RealNodes:
    """The real nodes, once every device an earlier test's pod held is released (the tests
    name the GPUs the device manager hands out)."""
    await real_nodes_once.wait_devices_released()
    return real_nodes_once


async def create_pod(kube: KubeClient, namespace: str, pod: dict[str, Any]) -> str:
    await kube.create(f"/api/v1/namespaces/{namespace}/pods", pod)
    return str(pod["metadata"]["name"])


async def get_pod(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    return await kube.get(f"/api/v1/namespaces/{namespace}/pods/{name}")


def ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def engine_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


async def wait_pod_ready(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        pod = await get_pod(kube, namespace, name)
        return pod if ready(pod) else None

    return await wait_for(check, 60, interval=0.3, what=f"pod {name} Ready")


async def allocatable_gpus(kube: KubeClient, node: str) -> int:
    obj = await kube.get(f"/api/v1/nodes/{node}")
    return int(obj["status"]["allocatable"].get("nvidia.com/gpu", "0"))


@pytest.fixture
async def agents(
    cluster: Cluster, kube: KubeClient, namespace: str, real_nodes: RealNodes
) -> AsyncIterator[dict[str, str]]:
    """The chart's agent DaemonSet on the real nodes, from the image a user deploys: node ->
    agent base URL."""
    release = f"a{uuid.uuid4().hex[:6]}"
    repository, tag = real_nodes.modelfleet_image.rsplit(":", 1)
    values = {
        "crds": {"enabled": False},
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {"replicas": 1},
        "gateway": {"enabled": False},
        "parallelModels": {},
        "agent": {
            "auth": {"mode": "none"},
            "nodeSelector": REAL_NODE_SELECTOR,
            "pollIntervalSeconds": 1,
            # The fake NVIDIA runtime is the real nodes' default runtime; no RuntimeClass.
            "platform": "none",
        },
    }
    await helm(cluster, "install", release, CHART, "-n", namespace, values=values)
    try:

        async def agent_urls() -> dict[str, str] | None:
            pods = await kube.get(
                f"/api/v1/namespaces/{namespace}/pods",
                labelSelector="app.kubernetes.io/component=agent",
            )
            urls = {
                p["spec"]["nodeName"]: f"http://{p['status']['podIP']}:9400"
                for p in pods["items"]
                if ready(p)
            }
            return urls if len(urls) == 2 else None

        yield await wait_for(agent_urls, 90, interval=0.5, what="an agent Ready on each real node")
    finally:
        await helm(cluster, "uninstall", release, "-n", namespace, check=False)


async def agent_gpus(url: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(f"{url}/v1/gpus") as resp,
    ):
        assert resp.status == 200, await resp.text()
        body = json.loads(await resp.text())
    return list(body["gpus"])


async def test_gpu_pod_gets_devices_from_the_device_manager_and_the_agent_sees_them(
    kube: KubeClient, namespace: str, real_nodes: RealNodes, agents: dict[str, str]
) -> None:
    name = await create_pod(
        kube, namespace, gpu_pod("two-gpus", real_nodes.vllm_sim_image, gpus=2, node="real-0")
    )
    pod = await wait_pod_ready(kube, namespace, name)
    assert pod["spec"]["nodeName"] == "real-0"

    # The kubelet's device manager chose two devices of real-0's inventory ...
    devices = await real_nodes.devices_of("real-0", namespace, name)
    uuids = {g["uuid"]: g["index"] for g in real_nodes.inventory("real-0")}
    assert len(devices) == 2
    assert devices <= set(uuids)

    # ... and the agent (the chart's DaemonSet, NVML faked over the same inventory) reports that
    # pod on exactly those GPUs, with the memory the stand-in uses there and nowhere else.
    # (pod-resources names the pod from admission on, its memory follows once it runs).
    async def pod_on_gpus() -> list[dict[str, Any]] | None:
        gpus = await agent_gpus(agents["real-0"])
        held = {g["uuid"] for g in gpus if any(p["name"] == name for p in g.get("pods") or [])}
        used = {g["uuid"] for g in gpus if g["memoryUsedMib"] > 0}
        return gpus if held == devices == used else None

    gpus = await wait_for(pod_on_gpus, 30, interval=0.5, what="the agent to attribute the pod")
    for gpu in gpus:
        expected = int(0.9 * gpu["memoryTotalMib"]) if gpu["uuid"] in devices else 0
        assert gpu["memoryUsedMib"] == expected, gpu


async def test_bound_pod_without_free_gpus_fails_admission(
    kube: KubeClient, namespace: str, real_nodes: RealNodes
) -> None:
    # real-1 has 2 GPUs: a pod bound to it by spec.nodeName (as the operator binds replicas)
    # asking for 4 is rejected by the kubelet's device manager, not by any scheduler.
    pod = gpu_pod("too-many", real_nodes.vllm_sim_image, gpus=4, bind_to="real-1")
    name = await create_pod(kube, namespace, pod)

    async def failed() -> dict[str, Any] | None:
        obj = await get_pod(kube, namespace, name)
        return obj if obj.get("status", {}).get("phase") == "Failed" else None

    obj = await wait_for(failed, 30, interval=0.3, what="the kubelet to reject the pod")
    status = obj["status"]
    assert status["reason"] == "UnexpectedAdmissionError", status
    assert "requested number of devices unavailable for nvidia.com/gpu" in status["message"]
    assert "Requested: 4, Available: 2" in status["message"], status["message"]


async def test_kubelet_restart_keeps_running_replicas_and_their_devices(
    kube: KubeClient, namespace: str, real_nodes: RealNodes
) -> None:
    name = await create_pod(
        kube, namespace, gpu_pod("survivor", real_nodes.vllm_sim_image, gpus=1, node="real-1")
    )
    before = await wait_pod_ready(kube, namespace, name)
    devices = await real_nodes.devices_of("real-1", namespace, name)
    container_id = engine_status(before)["containerID"]
    assert len(devices) == 1

    restarted = datetime.now(UTC).replace(microsecond=0)
    await real_nodes.restart_kubelet("real-1")

    async def back() -> bool:
        # Status written by the new kubelet (not the old one's), Ready, with both GPUs again.
        node = await kube.get("/api/v1/nodes/real-1")
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        beat = parse_time(ready[0]["lastHeartbeatTime"]) if ready else None
        fresh = beat is not None and beat > restarted
        ok = fresh and ready[0]["status"] == "True"
        return bool(ok) and await allocatable_gpus(kube, "real-1") == 2

    await wait_for(back, 60, interval=0.5, what="real-1 Ready again with its GPUs")
    after = await wait_pod_ready(kube, namespace, name)
    assert engine_status(after)["containerID"] == container_id
    assert engine_status(after)["restartCount"] == 0

    async def same_devices() -> bool:
        # The restarted kubelet serves pod-resources again from its checkpoint.
        try:
            return await real_nodes.devices_of("real-1", namespace, name) == devices
        except grpc.RpcError:
            return False

    await wait_for(same_devices, 30, interval=0.5, what="pod-resources to report the same device")


async def test_unhealthy_device_leaves_allocatable(
    kube: KubeClient, namespace: str, real_nodes: RealNodes
) -> None:
    async def two_gpus() -> bool:
        return await allocatable_gpus(kube, "real-1") == 2

    await wait_for(two_gpus, 30, interval=0.5, what="real-1 with both GPUs allocatable")
    await real_nodes.set_gpu_health("real-1", 1, "XID 79: GPU has fallen off the bus")
    try:

        async def one_left() -> bool:
            return await allocatable_gpus(kube, "real-1") == 1

        await wait_for(one_left, 30, interval=0.5, what="allocatable nvidia.com/gpu to drop to 1")
        # The device manager hands out only the healthy device now.
        pod = gpu_pod("wants-two", real_nodes.vllm_sim_image, gpus=2, bind_to="real-1")
        name = await create_pod(kube, namespace, pod)

        async def rejected() -> dict[str, Any] | None:
            obj = await get_pod(kube, namespace, name)
            return obj if obj.get("status", {}).get("phase") == "Failed" else None

        obj = await wait_for(rejected, 30, interval=0.3, what="admission to fail on 1 healthy GPU")
        assert obj["status"]["reason"] == "UnexpectedAdmissionError"
    finally:
        await real_nodes.set_gpu_health("real-1", 1, None)

    await wait_for(two_gpus, 30, interval=0.5, what="the GPU to come back to allocatable")


async def test_failing_liveness_probe_restarts_the_stand_in(
    kube: KubeClient, namespace: str, real_nodes: RealNodes
) -> None:
    pod = gpu_pod(
        "unhealthy",
        real_nodes.vllm_sim_image,
        gpus=0,
        node="real-0",
        env={"MODELFLEET_SIM_HEALTH_FAIL_AFTER_S": "2"},
        liveness=True,
    )
    name = await create_pod(kube, namespace, pod)

    async def restarted() -> dict[str, Any] | None:
        obj = await get_pod(kube, namespace, name)
        return obj if engine_status(obj).get("restartCount", 0) >= 1 else None

    obj = await wait_for(restarted, 60, interval=0.5, what="the kubelet to restart the container")
    events = await kube.get(
        f"/api/v1/namespaces/{namespace}/events", fieldSelector=f"involvedObject.name={name}"
    )
    messages = " ".join(e.get("message", "") for e in events["items"])
    assert "Liveness probe failed" in messages, messages
    assert obj["status"]["phase"] == "Running"


async def test_crash_looping_stand_in_shows_crash_loop_back_off(
    kube: KubeClient, namespace: str, real_nodes: RealNodes
) -> None:
    # An argument vLLM would refuse makes the stand-in exit 2 at start, every time.
    pod = gpu_pod(
        "crasher", real_nodes.vllm_sim_image, gpus=0, node="real-0", args=["--port", "eighty"]
    )
    name = await create_pod(kube, namespace, pod)

    async def backing_off() -> dict[str, Any] | None:
        obj = await get_pod(kube, namespace, name)
        waiting = engine_status(obj).get("state", {}).get("waiting", {})
        return obj if waiting.get("reason") == "CrashLoopBackOff" else None

    obj = await wait_for(backing_off, 60, interval=0.5, what="CrashLoopBackOff")
    last = engine_status(obj)["lastState"]["terminated"]
    assert last["exitCode"] == 2, last


async def test_unknown_gpu_in_nvidia_visible_devices_fails_the_container(
    kube: KubeClient, namespace: str, real_nodes: RealNodes
) -> None:
    # Shared mode names GPUs by UUID without a GPU request; a UUID the node does not have is
    # refused by the (fake) NVIDIA runtime, as nvidia-container-cli refuses it.
    pod = gpu_pod(
        "wrong-gpu",
        real_nodes.vllm_sim_image,
        gpus=0,
        node="real-0",
        env={"NVIDIA_VISIBLE_DEVICES": "GPU-00000000-0000-0000-0000-000000000000"},
    )
    name = await create_pod(kube, namespace, pod)

    async def refused() -> dict[str, Any] | None:
        obj = await get_pod(kube, namespace, name)
        status = engine_status(obj)
        text = json.dumps(status.get("state", {})) + json.dumps(status.get("lastState", {}))
        return obj if "unknown device" in text else None

    await wait_for(refused, 60, interval=0.5, what="the runtime to refuse the unknown GPU")


async def test_rejected_replica_backs_off_and_goes_to_another_node(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """The operator binds replicas with spec.nodeName, so the kubelet's admission is the last
    check of its belief. Not allowed to read other namespaces' pods (watchNodePods off), it does
    not see another team's pod holding most of real-1's CPU: the replica placed there is
    rejected (OutOfcpu), the node backs off, and the replacement goes to real-0 instead of
    looping on real-1. (Placement's first choice is real-1: with fragmentation-aware ranking a
    one-GPU replica breaks up the smaller whole node, real-1's 2 GPUs, before real-0's 4.)"""
    await start_foreign_pod(kube, namespace, real_nodes, "real-1", cpu="1500m")
    operators.start(MODELFLEET_WATCH_NODE_PODS="false")
    placement = {"nodeSelector": REAL_NODE_SELECTOR, "tolerations": [GPU_TOLERATION]}
    engine = {"image": real_nodes.vllm_sim_image}

    creates_on_real_1: set[str] = set()

    async def watch() -> None:
        async for kind, obj in list_and_watch(
            kube, f"/api/v1/namespaces/{namespace}/pods", labelSelector=DEPLOYMENT_LABEL + "=probe"
        ):
            items = obj.get("items", []) if kind == "SYNC" else [obj]
            for pod in items:
                if (pod.get("spec") or {}).get("nodeName") == "real-1":
                    creates_on_real_1.add(pod["metadata"]["uid"])

    watcher = asyncio.create_task(watch())
    try:
        started = time.monotonic()
        probe_engine = {**engine, "resources": {"requests": {"cpu": "1"}}}
        probe = md("probe", gpu={"count": 1}, placement=placement, engine=probe_engine)
        await kube.create(md_path(namespace), probe)
        await wait_ready(kube, namespace, "probe", 1, deadline_s=90)
        (pod,) = await replica_pods(kube, namespace, "probe")
        assert pod["spec"]["nodeName"] == "real-0"
        assert len(creates_on_real_1) >= 1, "the replica never went to real-1: nothing was tested"
        events = await events_of(kube, namespace, "probe")
        rejected = [e for e in events if e["reason"] == "AdmissionRejected"]
        assert rejected, [e["reason"] for e in events]
        assert "node real-1 rejected" in rejected[0]["message"]
        assert "OutOfcpu" in rejected[0]["message"]
        # No loop: within a minute of the first try, at most 3 creates on the rejecting node.
        await asyncio.sleep(max(0.0, 60 - (time.monotonic() - started)))
        assert len(creates_on_real_1) <= 3, creates_on_real_1
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_cpu_other_pods_request_keeps_a_replica_off_the_node(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """Another team's pod requests 1500m of real-1's 2 CPUs. Counting what every pod bound to a
    node requests, as the kubelet does, the operator never sends a replica asking for 1 CPU
    there: it waits with the reason, and runs there once the pod is gone."""
    await start_foreign_pod(kube, namespace, real_nodes, "real-1", cpu="1500m")
    operators.start()
    on_real_1 = {
        "nodeSelector": {**REAL_NODE_SELECTOR, "kubernetes.io/hostname": "real-1"},
        "tolerations": [GPU_TOLERATION],
    }
    engine = {"image": real_nodes.vllm_sim_image, "resources": {"requests": {"cpu": "1"}}}
    await kube.create(
        md_path(namespace), md("probe", gpu={"count": 1}, placement=on_real_1, engine=engine)
    )

    message = await condition_saying(kube, namespace, "probe", "lacks what the replica requests")
    assert "real-1 (cpu 1000m requested" in message, message
    # Waiting, not trying: the kubelet never saw a replica to refuse.
    await asyncio.sleep(3)
    assert await replica_pods(kube, namespace, "probe") == []
    events = await events_of(kube, namespace, "probe")
    assert not [e for e in events if e["reason"] == "AdmissionRejected"], events

    await runs_there_once_foreign_is_gone(kube, namespace, "probe", "real-1")


async def test_a_replica_runs_on_gpu_tainted_nodes_with_a_token_secret_and_a_node_cache(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """The real nodes carry GKE's taint nvidia.com/gpu=present:NoSchedule and the spec tolerates
    nothing: the replica tolerates the GPU taint by itself. Its Hugging Face token Secret does
    not exist yet: the kubelet will not start it, and status says which Secret is missing; once
    the Secret is there it runs, with the node-local cache directory the kubelet created."""
    operators.start()
    cache = f"/var/lib/model-cache/{namespace}"
    # Made writable for the replicas' uid by whoever prepares the node, as the docs say.
    writable_cache_dir(real_nodes, "real-1", cache)
    engine = {
        "image": real_nodes.vllm_sim_image,
        "huggingFaceToken": {"secretName": "hf", "key": "token"},
        "cache": {"hostPath": cache},
    }
    on_real_1 = {"nodeSelector": {**REAL_NODE_SELECTOR, "kubernetes.io/hostname": "real-1"}}
    await kube.create(
        md_path(namespace), md("gated", gpu={"count": 1}, placement=on_real_1, engine=engine)
    )

    message = await condition_saying(kube, namespace, "gated", 'secret "hf" not found', within_s=90)
    assert "CreateContainerConfigError" in message, message
    (instance,) = (await kube.get(md_path(namespace, "gated")))["status"]["instances"]
    assert instance["message"] == 'secret "hf" not found', instance

    secret = {"metadata": {"name": "hf"}, "stringData": {"token": "hf_not_a_real_token"}}
    await kube.create(f"/api/v1/namespaces/{namespace}/secrets", secret)
    await wait_ready(kube, namespace, "gated", 1, deadline_s=180)
    (pod,) = await replica_pods(kube, namespace, "gated")
    assert pod["spec"]["nodeName"] == "real-1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists"} in pod["spec"]["tolerations"]
    # The weights went into the node's directory, through the cache volume.
    assert downloaded_by(real_nodes, "real-1", cache, "org/gated") == "gated-instance-1"


def writable_cache_dir(real_nodes: RealNodes, node: str, path: str) -> None:
    """`path` on `node`, owned by the replicas' uid (1000), as a node image or an admin makes it."""
    where = real_nodes.in_node(node, path)
    where.mkdir(parents=True, exist_ok=True)
    os.chown(where, 1000, 1000)


def downloaded_by(real_nodes: RealNodes, node: str, cache: str, model: str) -> str | None:
    """Which replica Pod wrote `model`'s weights into `cache` on `node` (the stand-in's marker
    holds its host name, which in a Pod is the Pod's name)."""
    snapshot = f"{cache}/huggingface/hub/models--{model.replace('/', '--')}/snapshots/sim"
    marker = real_nodes.in_node(node, snapshot) / "config.json"
    if not marker.is_file():
        return None
    return str(json.loads(marker.read_text())["host"])


async def test_a_node_cache_the_replica_cannot_write_is_reported_until_it_can(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """The kubelet creates a missing hostPath directory owned by root, mode 0755: vLLM, running
    as uid 1000, cannot download into it and exits. Status quotes the PermissionError; once the
    directory is the replica's, the next restart runs."""
    operators.start()
    cache = f"/var/lib/model-cache/{namespace}-ro"
    engine = {"image": real_nodes.vllm_sim_image, "cache": {"hostPath": cache}}
    on_real_1 = {"nodeSelector": {**REAL_NODE_SELECTOR, "kubernetes.io/hostname": "real-1"}}
    await kube.create(
        md_path(namespace), md("locked", gpu={"count": 1}, placement=on_real_1, engine=engine)
    )
    message = await condition_saying(
        kube, namespace, "locked", "PermissionError", "Permission denied", within_s=120
    )
    assert "/cache/huggingface" in message, message
    assert real_nodes.in_node("real-1", cache).stat().st_uid == 0

    writable_cache_dir(real_nodes, "real-1", cache)
    await wait_ready(kube, namespace, "locked", 1, deadline_s=180)
    assert downloaded_by(real_nodes, "real-1", cache, "org/locked") == "locked-instance-1"


async def test_every_replica_mounts_the_models_cache_claim(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """spec.engine.cache.persistentVolumeClaim: every replica mounts the claim at /cache and
    downloads through it. The PersistentVolume is a hostPath one bound to the claim up front
    (no provisioner here); on a real cluster it would be ReadWriteMany storage."""
    path = f"/var/lib/model-cache-pv/{namespace}"
    for node in ("real-0", "real-1"):
        writable_cache_dir(real_nodes, node, path)
    claim = {
        "metadata": {"name": "weights"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": f"{namespace}-weights",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    volume = {
        "metadata": {"name": f"{namespace}-weights"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "capacity": {"storage": "1Gi"},
            "storageClassName": "",
            "persistentVolumeReclaimPolicy": "Delete",
            "hostPath": {"path": path, "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": "weights"},
        },
    }
    await kube.create("/api/v1/persistentvolumes", volume)
    try:
        await kube.create(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", claim)
        operators.start()
        engine = {"image": real_nodes.vllm_sim_image, "cache": {"persistentVolumeClaim": "weights"}}
        placement = {"nodeSelector": REAL_NODE_SELECTOR, "spread": True}
        await kube.create(
            md_path(namespace),
            md("shared", replicas=2, gpu={"count": 1}, placement=placement, engine=engine),
        )
        await wait_ready(kube, namespace, "shared", 2, deadline_s=180)
        pods = await replica_pods(kube, namespace, "shared")
        for pod in pods:
            (cache,) = [v for v in pod["spec"]["volumes"] if v["name"] == "cache"]
            assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": "weights"}}
            writer = downloaded_by(real_nodes, pod["spec"]["nodeName"], path, "org/shared")
            assert writer in ("shared-instance-1", "shared-instance-2"), pod["spec"]["nodeName"]
        bound = await kube.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/weights")
        assert bound["status"]["phase"] == "Bound"
    finally:
        await kube.delete(f"/api/v1/persistentvolumes/{namespace}-weights")


async def test_a_gated_model_without_a_token_crash_loops_and_status_says_why(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """The stand-in, told the model is gated, exits 1 at start without HF_TOKEN as vLLM does
    (the Hub's 401). The kubelet restarts it with back-off; its last log lines are the
    termination message, and status quotes them instead of a bare CrashLoopBackOff."""
    operators.start()
    engine = {
        "image": real_nodes.vllm_sim_image,
        "env": [{"name": "MODELFLEET_SIM_GATED_MODELS", "value": "google/gemma-"}],
    }
    on_real_1 = {"nodeSelector": {**REAL_NODE_SELECTOR, "kubernetes.io/hostname": "real-1"}}
    gated = md("gated", gpu={"count": 1}, placement=on_real_1, engine=engine)
    gated["spec"]["model"] = "google/gemma-3-4b-it"
    await kube.create(md_path(namespace), gated)

    message = await condition_saying(
        kube, namespace, "gated", "CrashLoopBackOff", "401 Client Error", within_s=120
    )
    assert "is gated on the Hugging Face Hub" in message, message
    assert "exit code 1" in message, message


async def test_gpus_a_foreign_pod_holds_are_not_placed_on(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """Another team's pod holds 2 of real-0's 4 GPUs (the device plugin gave them to it, the
    agent reads that from pod-resources): a replica needing 3 does not go there, and says why."""
    await start_foreign_pod(kube, namespace, real_nodes, "real-0", gpus=2)
    operators.start()
    placement = {"nodeSelector": REAL_NODE_SELECTOR, "tolerations": [GPU_TOLERATION]}
    big = md(
        "big", gpu={"count": 3}, placement=placement, engine={"image": real_nodes.vllm_sim_image}
    )
    await kube.create(md_path(namespace), big)

    message = await condition_saying(kube, namespace, "big", "in use outside modelfleet")
    # The device manager chose which two GPUs the foreign pod holds; the reason names those.
    uuids = {g["uuid"]: g["index"] for g in real_nodes.inventory("real-0")}
    held = sorted(uuids[u] for u in await real_nodes.devices_of("real-0", namespace, "foreign"))
    assert len(held) == 2
    for index in held:
        assert f"real-0:{index} held by {namespace}/foreign" in message, message
    assert await replica_pods(kube, namespace, "big") == []
    # Once the foreign pod is gone (and the agent has measured again), it fits on real-0.
    await runs_there_once_foreign_is_gone(kube, namespace, "big", "real-0")


async def test_status_and_placement_follow_the_gpus_the_node_assigned(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """Placement avoids real-1:0 (memory in use there, no pod), but the kubelet's device manager
    knows nothing of memory and hands the replica GPU 0 anyway: status, the ledger and the next
    placement follow the node, and the plan stays visible."""
    record = squat(real_nodes, "real-1", 0, 1000)
    try:
        await wait_measured(agents["real-1"], 0, 1000)
        operators.start()
        on_real_1 = {
            "nodeSelector": {**REAL_NODE_SELECTOR, "kubernetes.io/hostname": "real-1"},
            "tolerations": [GPU_TOLERATION],
        }
        engine = {"image": real_nodes.vllm_sim_image}
        await kube.create(
            md_path(namespace), md("excl", gpu={"count": 1}, placement=on_real_1, engine=engine)
        )
        await wait_ready(kube, namespace, "excl", 1, deadline_s=90)

        async def followed() -> dict[str, Any] | None:
            obj = await kube.get(md_path(namespace, "excl"))
            (inst,) = obj["status"]["instances"]
            return inst if inst["gpus"] == ["real-1:0"] else None

        instance = await wait_for(followed, 30, interval=0.5, what="status to follow the node")
        assert instance["plannedGpus"] == ["real-1:1"], instance

        async def recorded() -> dict[str, str] | None:
            (pod,) = await replica_pods(kube, namespace, "excl")
            ann = pod["metadata"]["annotations"]
            return ann if ann.get("modelfleet.io/assigned-gpus") == "real-1:0" else None

        ann = await wait_for(recorded, 30, interval=0.5, what="the Pod to record the node's GPUs")
        assert ann["modelfleet.io/gpus"] == "real-1:1"  # the plan stays on the Pod too
        events = await events_of(kube, namespace, "excl")
        assigned = [e for e in events if e["reason"] == "GpusAssigned"]
        assert assigned, [e["reason"] for e in events]
        assert (
            "gave excl-instance-1 GPUs real-1:0 (placement planned real-1:1)"
            in (assigned[0]["message"])
        )
        # A Shared replica goes where the node says there is room: GPU 1, not the GPU the
        # Exclusive replica really holds.
        shared = md(
            "shared",
            gpu={"count": 1, "sharing": "Shared", "memory": "4Gi"},
            placement=on_real_1,
            engine=engine,
        )
        await kube.create(md_path(namespace), shared)
        await wait_ready(kube, namespace, "shared", 1, deadline_s=90)
        obj = await kube.get(md_path(namespace, "shared"))
        assert obj["status"]["instances"][0]["gpus"] == ["real-1:1"]
    finally:
        record.unlink(missing_ok=True)


def pinned_to(node: str) -> dict[str, Any]:
    return {
        "nodeSelector": {**REAL_NODE_SELECTOR, "kubernetes.io/hostname": node},
        "tolerations": [GPU_TOLERATION],
    }


async def replica_uids(kube: KubeClient, namespace: str, deployment: str) -> set[str]:
    return {p["metadata"]["uid"] for p in await replica_pods(kube, namespace, deployment)}


async def test_nvml_faults_are_not_gpu_faults(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """A sensor NVML cannot read is a monitoring fault: the replica stays. NVML failing as a
    whole (what a `systemctl daemon-reload` does to a GPU host) makes the node's stats unknown:
    no new replica goes there, and none is replaced for it."""
    operator = operators.start()
    engine = {"image": real_nodes.vllm_sim_image}
    steady = md("steady", gpu={"count": 1}, placement=pinned_to("real-1"), engine=engine)
    await kube.create(md_path(namespace), steady)
    await wait_ready(kube, namespace, "steady", 1, deadline_s=90)
    before = await replica_uids(kube, namespace, "steady")
    try:
        for gpu in ("0", "1"):
            await real_nodes.set_nvml_fault(
                "real-1", "--gpu", gpu, "--field", "power", "--error", "UNKNOWN"
            )
            await real_nodes.set_nvml_fault(
                "real-1", "--gpu", gpu, "--field", "utilization", "--error", "NOT_SUPPORTED"
            )

        async def nulls() -> bool:
            gpus = await agent_gpus(agents["real-1"])
            return all(g.get("powerW") is None and g["health"]["healthy"] for g in gpus)

        await wait_for(nulls, 30, interval=0.5, what="null power readings on healthy GPUs")
        await asyncio.sleep(5)  # five operator passes (MODELFLEET_POLL_INTERVAL_S=1)
        assert await replica_uids(kube, namespace, "steady") == before

        await real_nodes.set_nvml_fault("real-1", "--clear")
        await real_nodes.set_nvml_fault("real-1", "--all", "UNKNOWN")

        async def not_ready() -> bool:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
                http.get(f"{agents['real-1']}/v1/gpus") as resp,
            ):
                body = await resp.json()
            return body.get("ready") is False

        await wait_for(not_ready, 30, interval=0.5, what="the agent to report NVML down")

        async def operator_knows() -> bool:
            # The operator's pool has sampled it (its status document shows the node not ready).
            url = f"http://127.0.0.1:{operator.metrics_port}/status"
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
                http.get(url) as resp,
            ):
                body = await resp.json()
            nodes = (body.get("pool") or body).get("nodes") or []
            return any(n["name"] == "real-1" and n.get("notReady") for n in nodes)

        await wait_for(operator_knows, 30, interval=0.5, what="the operator to see NVML down")
        # A second replica may only go to real-1, whose stats are unknown now: it waits.
        await kube.patch(md_path(namespace, "steady"), {"spec": {"replicas": 2}})

        async def waiting() -> str | None:
            obj = await kube.get(md_path(namespace, "steady"))
            for cond in (obj.get("status") or {}).get("conditions") or []:
                if cond.get("reason") in ("WaitingForStats", "NoMatchingNode"):
                    return str(cond["message"])
            return None

        await wait_for(waiting, 30, interval=0.5, what="the second replica to wait")
        await asyncio.sleep(5)
        assert await replica_uids(kube, namespace, "steady") == before
    finally:
        await real_nodes.set_nvml_fault("real-1", "--clear")
    # NVML comes back (the agent starts it again with backoff), and so does placement.
    await wait_ready(kube, namespace, "steady", 2, deadline_s=90)
    assert before <= await replica_uids(kube, namespace, "steady")


async def test_an_unhealthy_gpu_replaces_the_replica_that_really_uses_it(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    agents: dict[str, str],
    operators: Operators,
) -> None:
    """`moved` is planned on real-1:1 but the device manager gives it real-1:0 (memory in use
    there keeps placement away; the kubelet does not look at memory); `other` then gets real-1:1.
    When real-1:0 fails, `moved` is replaced, and `other`, whose plan named the same GPU as
    `moved`'s, is not."""
    record = squat(real_nodes, "real-1", 0, 1000)
    engine = {"image": real_nodes.vllm_sim_image}
    try:
        await wait_measured(agents["real-1"], 0, 1000)
        operators.start()
        moved = md("moved", gpu={"count": 1}, placement=pinned_to("real-1"), engine=engine)
        await kube.create(md_path(namespace), moved)
        await wait_ready(kube, namespace, "moved", 1, deadline_s=90)
    finally:
        record.unlink()
    other = md("other", gpu={"count": 1}, placement=pinned_to("real-1"), engine=engine)
    await kube.create(md_path(namespace), other)
    await wait_ready(kube, namespace, "other", 1, deadline_s=90)

    async def gpus_of(name: str) -> tuple[list[str], list[str]]:
        obj = await kube.get(md_path(namespace, name))
        (inst,) = obj["status"]["instances"]
        return inst["gpus"], inst.get("plannedGpus", [])

    assert await gpus_of("moved") == (["real-1:0"], ["real-1:1"])
    assert (await gpus_of("other"))[0] == ["real-1:1"]
    moved_uids = await replica_uids(kube, namespace, "moved")
    other_uids = await replica_uids(kube, namespace, "other")
    await real_nodes.set_gpu_health("real-1", 0, "XID 79: GPU has fallen off the bus")
    try:

        async def replaced() -> bool:
            return not (moved_uids & await replica_uids(kube, namespace, "moved"))

        await wait_for(replaced, 60, interval=0.5, what="the replica on the failed GPU to go")
        events = await events_of(kube, namespace, "moved")
        assert any(e["reason"] == "GpuUnhealthy" for e in events), [e["reason"] for e in events]
        assert await replica_uids(kube, namespace, "other") == other_uids
    finally:
        await real_nodes.set_gpu_health("real-1", 0, None)


async def runs_there_once_foreign_is_gone(
    kube: KubeClient, namespace: str, deployment: str, node: str
) -> None:
    """Delete the foreign pod; the one replica of `deployment` then runs, on `node`."""
    await kube.delete(f"/api/v1/namespaces/{namespace}/pods/foreign")
    await wait_ready(kube, namespace, deployment, 1, deadline_s=90)
    (pod,) = await replica_pods(kube, namespace, deployment)
    assert pod["spec"]["nodeName"] == node


async def condition_saying(
    kube: KubeClient, namespace: str, name: str, *texts: str, within_s: float = 60
) -> str:
    """The message of the first condition of ModelDeployment `name` that says all of `texts`."""

    async def found() -> str | None:
        obj = await kube.get(md_path(namespace, name))
        for cond in (obj.get("status") or {}).get("conditions") or []:
            message = str(cond.get("message", ""))
            if all(t in message for t in texts):
                return message
        return None

    return await wait_for(found, within_s, interval=0.5, what=f"{name}'s status to say {texts}")


async def start_foreign_pod(
    kube: KubeClient,
    namespace: str,
    real_nodes: RealNodes,
    node: str,
    *,
    gpus: int = 0,
    cpu: str | None = None,
) -> None:
    """Another team's pod `foreign` on `node`: it holds `gpus` GPUs (and `cpu`) and uses no
    GPU memory (the pause image)."""
    pod = gpu_pod("foreign", real_nodes.pause_image, gpus=gpus, node=node, args=[])
    container = pod["spec"]["containers"][0]
    container.pop("readinessProbe")
    container["securityContext"] = {}
    if cpu:
        container.setdefault("resources", {})["requests"] = {"cpu": cpu}
    await create_pod(kube, namespace, pod)
    await wait_for(
        lambda: phase_is(kube, namespace, "foreign", "Running"), 60, what="the foreign pod"
    )


def squat(real_nodes: RealNodes, node: str, gpu: int, mib: int) -> Path:
    """Memory in use on one GPU with no pod: a record in the node's fake driver, as a process
    the kubelet does not know would leave. Returns the record, for the caller to remove."""
    uuid_ = real_nodes.inventory(node)[gpu]["uuid"]
    record = real_nodes.node_dir(node) / "gpu" / "memory" / uuid_ / "squatter.json"
    record.write_text(
        json.dumps({"holder": "squatter", "memoryMib": mib, "expiresAt": time.time() + 3600})
    )
    return record


async def wait_measured(agent: str, gpu: int, mib: int) -> None:
    async def measured() -> bool:
        gpus = await agent_gpus(agent)
        return any(g["index"] == gpu and g["memoryUsedMib"] == mib for g in gpus)

    await wait_for(measured, 30, interval=0.5, what=f"the agent to measure {mib} MiB on {gpu}")


async def phase_is(kube: KubeClient, namespace: str, name: str, phase: str) -> bool:
    obj = await get_pod(kube, namespace, name)
    return bool(obj.get("status", {}).get("phase") == phase)


async def test_real_nodes_down_leaves_nothing_behind(
    kube: KubeClient, namespace: str, real_nodes: RealNodes, tmp_path: Path
) -> None:
    """A node set of its own (one node, its own namespaces and range) with a running pod, then
    `down`: no process, mount, cgroup, network namespace, link or file of it is left."""
    suffix = uuid.uuid4().hex[:6]
    node, cluster_name = f"leak-{suffix}", f"mf-leak-{suffix}"
    root = tmp_path / "real"
    nodes_file = tmp_path / "nodes.yaml"
    nodes_file.write_text(f"nodes:\n  - name: {node}\n    gpus: 1\n")
    ctx = real_nodes.context
    # 10.240-254 are outside the range hack/cluster.sh derives from checkout paths.
    octet = 240 + int(suffix, 16) % 15
    kit = RealNodes(root=root, context={})
    await kit.realnodes(
        "up", "--cluster", cluster_name, "--octet", str(octet), "--nodes", str(nodes_file),
        "--bin-dir", ctx["bin_dir"], "--kubeconfig", ctx["kubeconfig"], "--pki", ctx["pki"],
        "--pause-image", ctx["pause_image"], "--image", ctx["image"][0],
    )  # fmt: skip
    try:
        pod = gpu_pod("pause", ctx["pause_image"], gpus=1, bind_to=node, args=[])
        pod["spec"]["containers"][0].pop("readinessProbe")
        pod["spec"]["containers"][0]["securityContext"] = {}
        await create_pod(kube, namespace, pod)

        async def running() -> bool:
            obj = await get_pod(kube, namespace, "pause")
            return obj.get("status", {}).get("phase") == "Running"

        await wait_for(running, 60, interval=0.3, what="a pod running on the node")
        assert root.exists()
        assert realnodes_leaks(root, cluster_name), "the check must see a running node set"
        # Everything in the node's mount namespace: its daemons and containerd's shims.
        node_processes = same_mount_namespace((root / node / "pids" / "holder.pid").read_text())
        assert len(node_processes) >= 4, node_processes
    finally:
        await kit.realnodes("down")
    assert realnodes_leaks(root, cluster_name) == []
    assert [p for p in node_processes if alive(p)] == []
    assert not await exists(kube, f"/api/v1/nodes/{node}")


def same_mount_namespace(pid: str) -> list[int]:
    target = os.readlink(f"/proc/{pid.strip()}/ns/mnt")
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(proc / "ns" / "mnt") == target:
                    found.append(int(proc.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is gone; only its parent can reap it


def realnodes_leaks(root: Path, cluster_name: str) -> list[str]:
    """Everything of a node set still on the machine, looked up independently of its script."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(root) in cmdline and "pytest" not in cmdline:
                found.append(f"process {proc.name}: {cmdline[:120]}")
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    found += [f"mount {line.split()[4]}" for line in mounts if str(root) in line]
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        found += [f"cgroup {p}" for p in hierarchy.glob(f"modelfleet-{cluster_name}-*")]
    if Path(f"/run/netns/{cluster_name}").exists():
        found.append(f"network namespace {cluster_name}")
    if Path(f"/sys/class/net/{cluster_name[:15]}").exists():
        found.append(f"link {cluster_name[:15]}")
    if root.exists():
        found.append(f"directory {root}")
    return found
