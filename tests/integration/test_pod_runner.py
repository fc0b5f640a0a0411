"""The dev pod runner end to end: real pods on simulated nodes, real processes on pod IPs.

The programs are tests/integration/fake_modelfleet.py, a trivial HTTP server standing in for the
`modelfleet agent` and `modelfleet sim-vllm` commands, so these tests prove the runner itself;
the tests of the node's device part (admission, device assignment, attribution) run the real
agent (the `gpus` fixture) where they read what it reports.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from clusterkit import KUBECONFIG, PodRunner, wait_for
from operator_kit import create_test_nodes, delete_test_nodes

from modelfleet.gpufile import simulated_uuid
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import pods_path

# Every test here runs programs on kwok's loopback pod IPs.
pytestmark = pytest.mark.kwok

PORT = 8000


def replica_pod(name: str, delay_s: float = 0.0) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/component": "replica"}},
        "spec": {
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai",
                    "args": ["--model", "m", "--served-model-name", name, "--port", str(PORT)],
                    "env": [{"name": "MODELFLEET_SIM_STARTUP_DELAY_S", "value": str(delay_s)}],
                    "ports": [{"name": "http", "containerPort": PORT}],
                    "readinessProbe": {
                        "httpGet": {"path": "/health", "port": "http"},
                        "periodSeconds": 1,
                    },
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
        },
    }


def condition(pod: dict[str, Any], kind: str) -> str | None:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return str(cond["status"])
    return None


def restarts(pod: dict[str, Any]) -> int:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return int(statuses[0].get("restartCount", 0))


async def get_pod(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    return await kube.get(pods_path(namespace, name))


async def http_get(url: str) -> tuple[int, str] | None:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp,
        ):
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def test_replica_ready_only_when_its_program_answers(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    await kube.create(pods_path(namespace), replica_pod("r1", delay_s=2.0))

    async def running() -> dict[str, Any] | None:
        pod = await get_pod(kube, namespace, "r1")
        return pod if pod["status"].get("podIP") else None

    pod = await wait_for(running, timeout=30, what="r1 Running with a pod IP")
    ip = pod["status"]["podIP"]
    assert ip.startswith("127.")
    assert pod["status"]["phase"] == "Running"
    # kwok does not mark replicas Ready; the program takes 2 s to answer.
    assert condition(pod, "Ready") == "False"

    async def ready() -> dict[str, Any] | None:
        pod = await get_pod(kube, namespace, "r1")
        return pod if condition(pod, "Ready") == "True" else None

    pod = await wait_for(ready, timeout=30, what="r1 Ready")
    assert condition(pod, "ContainersReady") == "True"
    answer = await http_get(f"http://{ip}:{PORT}/argv")
    assert answer is not None, "Ready, but nothing answers on the pod IP"
    sent = json.loads(answer[1])
    assert sent["argv"] == [
        "sim-vllm", "--model", "m", "--served-model-name", "r1", "--port", "8000", "--host", ip,
    ]  # fmt: skip
    assert sent["env"]["MODELFLEET_SIM_STARTUP_DELAY_S"] == "2.0"


async def test_dead_program_makes_the_pod_unready_and_is_restarted(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    await kube.create(pods_path(namespace), replica_pod("r2"))

    async def ready_with(n: int) -> dict[str, Any] | None:
        pod = await get_pod(kube, namespace, "r2")
        ok = condition(pod, "Ready") == "True" and restarts(pod) == n
        return pod if ok else None

    pod = await wait_for(lambda: ready_with(0), timeout=30, what="r2 Ready")
    ip = pod["status"]["podIP"]
    pid_file = pod_runner.pid_dir / f"{ip}_{PORT}.pid"
    first_pid = int(pid_file.read_text())
    os.kill(first_pid, signal.SIGKILL)

    async def unready() -> bool:
        pod = await get_pod(kube, namespace, "r2")
        return condition(pod, "Ready") == "False" and restarts(pod) == 1

    await wait_for(unready, timeout=15, what="r2 Ready=False with restartCount 1")
    pod = await wait_for(lambda: ready_with(1), timeout=30, what="r2 Ready again after restart")
    status = pod["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == -signal.SIGKILL
    assert int(pid_file.read_text()) != first_pid


async def test_failing_probe_makes_the_pod_unready_without_a_restart(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    await kube.create(pods_path(namespace), replica_pod("r4"))

    async def ready_is(flag: str) -> dict[str, Any] | None:
        pod = await get_pod(kube, namespace, "r4")
        return pod if condition(pod, "Ready") == flag else None

    pod = await wait_for(lambda: ready_is("True"), timeout=30, what="r4 Ready")
    base = f"http://{pod['status']['podIP']}:{PORT}"
    assert await http_get(f"{base}/sick") is not None
    # failureThreshold 3 at a 1 s period: unready within a few seconds.
    pod = await wait_for(lambda: ready_is("False"), timeout=15, what="r4 Ready=False")
    assert restarts(pod) == 0
    assert await http_get(f"{base}/well") is not None
    pod = await wait_for(lambda: ready_is("True"), timeout=15, what="r4 Ready again")
    assert restarts(pod) == 0


async def test_program_stops_when_the_pod_is_deleted(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    await kube.create(pods_path(namespace), replica_pod("r3"))

    async def ready() -> dict[str, Any] | None:
        pod = await get_pod(kube, namespace, "r3")
        return pod if condition(pod, "Ready") == "True" else None

    pod = await wait_for(ready, timeout=30, what="r3 Ready")
    ip = pod["status"]["podIP"]
    pid = int((pod_runner.pid_dir / f"{ip}_{PORT}.pid").read_text())
    await kube.delete(pods_path(namespace, "r3"))

    async def gone() -> bool:
        try:
            await get_pod(kube, namespace, "r3")
        except ApiError as exc:
            return exc.not_found
        return False

    await wait_for(gone, timeout=30, what="r3 deleted")
    await wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=15, what=f"pid {pid} gone")
    assert await http_get(f"http://{ip}:{PORT}/health") is None


async def test_agent_pod_runs_the_agent_with_the_node_gpus(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    nodes = await kube.list("/api/v1/nodes", labelSelector="nvidia.com/gpu.present=true")
    node = nodes["items"][0]
    labels = node["metadata"]["labels"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent", "labels": {"app.kubernetes.io/component": "agent"}},
        "spec": {
            "nodeName": node["metadata"]["name"],
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "agent", "image": "modelfleet", "ports": [{"containerPort": 9400}]}
            ],
        },
    }
    await kube.create(pods_path(namespace), pod)

    async def answering() -> tuple[str, dict[str, Any]] | None:
        pod = await get_pod(kube, namespace, "agent")
        ip = pod["status"].get("podIP")
        answer = await http_get(f"http://{ip}:9400/argv") if ip else None
        return (ip, json.loads(answer[1])) if answer else None

    ip, sent = await wait_for(answering, timeout=30, what="the agent answering on its pod IP")
    argv = sent["argv"]
    assert argv[:3] == ["agent", "--backend", "simulated"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    socket = flags.pop("--pod-resources-socket")
    assert socket.endswith(f"/{node['metadata']['name']}.sock")
    assert flags == {
        "--node": node["metadata"]["name"],
        "--host": ip,
        "--port": "9400",
        "--gpus": labels["nvidia.com/gpu.count"],
        "--gpu-memory-mib": labels["nvidia.com/gpu.memory"],
        "--product": labels["nvidia.com/gpu.product"],
        "--kubeconfig": str(KUBECONFIG),
    }


async def test_unlabelled_pods_keep_kwok_behaviour_and_run_nothing(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    pod = replica_pod("plain")
    del pod["metadata"]["labels"]
    await kube.create(pods_path(namespace), pod)

    async def ready() -> dict[str, Any] | None:
        pod = await get_pod(kube, namespace, "plain")
        return pod if condition(pod, "Ready") == "True" else None

    pod = await wait_for(ready, timeout=30, what="plain Ready (kwok marks it at once)")
    assert restarts(pod) == 0
    # The runner may be serving pods that other tests left behind in namespaces still being
    # deleted; what matters is that nothing runs for this pod's address.
    ip = pod["status"]["podIP"]
    assert not [p.name for p in pod_runner.pid_dir.iterdir() if p.name.startswith(f"{ip}_")]


# --- the node's device part: admission, device assignment, attribution ------------------------


def gpu_pod(
    name: str,
    node: str,
    gpus: int,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    container: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A pod bound by spec.nodeName (as modelfleet binds replicas), asking for `gpus` GPUs."""
    main = container or {"name": "main", "image": "fake"}
    main["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0, "containers": [main]},
    }


def devices_of(pod: dict[str, Any]) -> dict[str, list[str]]:
    return dict(json.loads(pod["metadata"]["annotations"]["sim.modelfleet.io/devices"]))


async def test_gpu_pod_over_capacity_is_rejected_like_a_kubelet(
    kube: KubeClient, namespace: str, pod_runner: PodRunner
) -> None:
    (node,) = await create_test_nodes(kube, namespace, 1, 4)
    try:
        await kube.create(pods_path(namespace), gpu_pod("one", node, 1))

        async def running(name: str) -> dict[str, Any] | None:
            pod = await get_pod(kube, namespace, name)
            return pod if pod["status"].get("phase") == "Running" else None

        one = await wait_for(lambda: running("one"), timeout=30, what="one Running")
        assert devices_of(one) == {"main": [simulated_uuid(node, 0)]}
        await kube.create(pods_path(namespace), gpu_pod("four", node, 4))

        async def failed() -> dict[str, Any] | None:
            pod = await get_pod(kube, namespace, "four")
            return pod if pod["status"].get("phase") == "Failed" else None

        four = await wait_for(failed, timeout=30, what="four Failed")
        assert four["status"]["reason"] == "UnexpectedAdmissionError"
        assert four["status"]["message"] == (
            "Pod was rejected: Allocate failed due to requested number of devices unavailable "
            "for nvidia.com/gpu. Requested: 4, Available: 3, which is unexpected"
        )
        # Refused before it started: no IP, no container, and it stays refused.
        assert "podIP" not in four["status"]
        assert "sim.modelfleet.io/devices" not in (four["metadata"].get("annotations") or {})

        # The kubelet posts its Event after the status: wait for it, then take all there are.
        async def reasons() -> list[str]:
            events = await kube.list(
                f"/api/v1/namespaces/{namespace}/events",
                fieldSelector="involvedObject.name=four",
            )
            return [e["reason"] for e in events["items"]]

        await wait_for(reasons, timeout=10, what="the rejection Event")
        assert await reasons() == ["UnexpectedAdmissionError"]
        # Three fit: the free devices go lowest index first.
        await kube.create(pods_path(namespace), gpu_pod("three", node, 3))
        three = await wait_for(lambda: running("three"), timeout=30, what="three Running")
        assert devices_of(three) == {"main": [simulated_uuid(node, i) for i in (1, 2, 3)]}
        # Devices come free when the pod is gone.
        await kube.delete(pods_path(namespace, "one"))
        await kube.create(pods_path(namespace), gpu_pod("again", node, 1))
        again = await wait_for(lambda: running("again"), timeout=30, what="again Running")
        assert devices_of(again) == {"main": [simulated_uuid(node, 0)]}
    finally:
        await delete_test_nodes(kube, namespace)


async def agent_report(kube: KubeClient, namespace: str, node: str) -> dict[str, Any] | None:
    pods = await kube.list(pods_path(namespace), fieldSelector=f"spec.nodeName={node}")
    for pod in pods["items"]:
        labels = pod["metadata"].get("labels") or {}
        ip = pod["status"].get("podIP")
        if labels.get("app.kubernetes.io/component") == "agent" and ip:
            answer = await http_get(f"http://{ip}:9400/v1/gpus")
            return json.loads(answer[1]) if answer and answer[0] == 200 else None
    return None


async def test_devices_and_attribution_follow_the_nodes_rule_not_the_annotation(
    kube: KubeClient, namespace: str, gpus: Any
) -> None:
    (node,) = await gpus(1, 4)
    # A foreign pod (plain nvidia.com/gpu, no modelfleet label) takes the two lowest GPUs.
    await kube.create(
        pods_path(namespace),
        gpu_pod("batch", node, 2, annotations={"sim.modelfleet.io/gpu-memory-mib": "1000"}),
    )
    # A replica the operator "planned" on GPU 0: the node gives it GPU 2.
    replica = gpu_pod(
        "planned-on-0",
        node,
        1,
        labels={"app.kubernetes.io/component": "replica"},
        annotations={"modelfleet.io/gpus": f"{node}:0", "modelfleet.io/footprint-mib": "30000"},
        container={
            "name": "vllm",
            "image": "vllm/vllm-openai",
            "args": ["--model", "m", "--served-model-name", "m", "--port", str(PORT)],
        },
    )
    await kube.create(pods_path(namespace), replica)

    def summary(report: dict[str, Any]) -> list[tuple[int, list[str]]]:
        return [(g["memoryUsedMib"], [p["name"] for p in g["pods"]]) for g in report["gpus"]]

    want = [(1000, ["batch"]), (1000, ["batch"]), (30000, ["planned-on-0"]), (0, [])]

    async def attributed() -> dict[str, Any] | None:
        report = await agent_report(kube, namespace, node)
        return report if report and summary(report) == want else None

    await wait_for(attributed, timeout=60, what=f"the agent to report {want}")
    pod = await get_pod(kube, namespace, "planned-on-0")
    assert devices_of(pod) == {"vllm": [simulated_uuid(node, 2)]}

    # Node knobs: memory outside any pod; a device plugin that advertises fewer GPUs.
    await kube.patch(
        f"/api/v1/nodes/{node}",
        {
            "metadata": {
                "annotations": {
                    "sim.modelfleet.io/foreign-memory-mib": "3=5000",
                    "sim.modelfleet.io/plugin-devices": "0,1,2",
                }
            }
        },
    )
    want[3] = (5000, [])
    await wait_for(attributed, timeout=30, what="the foreign process's memory on GPU 3")

    async def allocatable() -> str:
        got = await kube.get(f"/api/v1/nodes/{node}")
        return str(got["status"]["allocatable"]["nvidia.com/gpu"])

    await wait_for(lambda: _equals(allocatable(), "3"), timeout=30, what="allocatable 3")
    await kube.create(pods_path(namespace), gpu_pod("one-more", node, 1))

    async def refused() -> dict[str, Any] | None:
        got = await get_pod(kube, namespace, "one-more")
        return got if got["status"].get("phase") == "Failed" else None

    refused_pod = await wait_for(refused, timeout=30, what="one-more refused")
    assert "Requested: 1, Available: 0" in refused_pod["status"]["message"]


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected
