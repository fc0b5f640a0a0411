"""The pod -> program mapping of the dev pod runner: named table cases, no cluster."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import pytest

from pod_runner import (
    ContainerState,
    Launch,
    NotRunnable,
    Probe,
    _stop_process,
    build_launch,
    build_status_patch,
    desired_launches,
    map_volume_paths,
    restart_count,
)

KUBECONFIG = "/tmp/kc"

NODE = {
    "metadata": {
        "name": "gpu-h100-0",
        "annotations": {"kwok.x-k8s.io/node": "fake"},
        "labels": {
            "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": "81559",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        },
    }
}
REAL_NODE = {"metadata": {"name": "real-0", "labels": NODE["metadata"]["labels"]}}


def pod(
    component: str | None,
    *,
    uid: str = "u1",
    node: str = "gpu-h100-0",
    ip: str | None = "127.9.1.3",
    phase: str = "Running",
    container: dict[str, Any] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": "ns", "uid": uid}
    if component:
        meta["labels"] = {"app.kubernetes.io/component": component}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
    return {
        "metadata": meta,
        "spec": {"nodeName": node, "containers": [container or {"name": "c", "image": "img"}]},
        "status": status,
    }


VLLM = {
    "name": "vllm",
    "image": "vllm/vllm-openai",
    "args": ["--model", "m", "--served-model-name", "s", "--port", "8000"],
    "env": [
        {"name": "MODELFLEET_SIM_STARTUP_DELAY_S", "value": "2"},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}},
    ],
    "ports": [{"name": "http", "containerPort": 8000}],
    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
}


@pytest.mark.parametrize(
    ("name", "the_pod", "argv"),
    [
        (
            "agent with its container port",
            pod("agent", container={"name": "a", "ports": [{"containerPort": 9500}]}),
            (
                "agent", "--backend", "simulated", "--node", "gpu-h100-0",
                "--host", "127.9.1.3", "--port", "9500", "--gpus", "8",
                "--gpu-memory-mib", "81559", "--product", "NVIDIA-H100-80GB-HBM3",
                "--kubeconfig", KUBECONFIG,
            ),
        ),
        (
            "agent without a port uses 9400",
            pod("agent"),
            (
                "agent", "--backend", "simulated", "--node", "gpu-h100-0",
                "--host", "127.9.1.3", "--port", "9400", "--gpus", "8",
                "--gpu-memory-mib", "81559", "--product", "NVIDIA-H100-80GB-HBM3",
                "--kubeconfig", KUBECONFIG,
            ),
        ),
        (
            "replica gets the container args and the pod IP last",
            pod("replica", container=VLLM),
            (
                "sim-vllm", "--model", "m", "--served-model-name", "s", "--port", "8000",
                "--host", "127.9.1.3",
            ),
        ),
        (
            "replica without args",
            pod("replica"),
            ("sim-vllm", "--host", "127.9.1.3"),
        ),
    ],
)  # fmt: skip
def test_build_launch_commands(name: str, the_pod: dict[str, Any], argv: tuple[str, ...]) -> None:
    assert build_launch(the_pod, NODE, KUBECONFIG).argv == argv, name


def test_replica_launch_keeps_literal_env_and_resolves_the_named_probe_port() -> None:
    launch = build_launch(pod("replica", container=VLLM), NODE, KUBECONFIG)
    assert launch.env == (("MODELFLEET_SIM_STARTUP_DELAY_S", "2"),)
    assert launch.probe == Probe(path="/health", port=8000, period_s=5.0, failure_threshold=3)
    assert (launch.kind, launch.container, launch.host) == ("replica", "vllm", "127.9.1.3")


def test_a_replicas_cache_paths_land_in_a_directory_of_its_own(tmp_path: Any) -> None:
    env = {
        "HF_HOME": "/cache/huggingface",
        "HOME": "/cache",
        "CACHEDIR": "/cachedir",  # not under /cache: left alone
        "TOKEN": "t",
    }
    assert map_volume_paths(env, tmp_path) == {
        "HF_HOME": f"{tmp_path}/cache/huggingface",
        "HOME": f"{tmp_path}/cache",
        "CACHEDIR": "/cachedir",
        "TOKEN": "t",
    }


@pytest.mark.parametrize(
    ("name", "the_pod", "node", "message"),
    [
        ("no pod IP yet", pod("replica", ip=None), NODE, "no IP"),
        ("unknown component", pod("gateway"), NODE, "maps to no program"),
        (
            "agent on a node without GPU labels",
            pod("agent"),
            {"metadata": {"name": "n", "labels": {}}},
            "lacks the GPU labels",
        ),
        (
            "probe names a port the container lacks",
            pod(
                "replica",
                container={"name": "c", "readinessProbe": {"httpGet": {"port": "nope"}}},
            ),
            NODE,
            "names no container port",
        ),
    ],
)
def test_not_runnable(name: str, the_pod: dict[str, Any], node: Any, message: str) -> None:
    with pytest.raises(NotRunnable, match=message):
        build_launch(the_pod, node, KUBECONFIG)


@pytest.mark.parametrize(
    ("name", "the_pod", "nodes", "runs"),
    [
        ("running replica on a simulated node", pod("replica"), {"gpu-h100-0": NODE}, True),
        ("pod without the component label", pod(None), {"gpu-h100-0": NODE}, False),
        ("pending pod", pod("replica", phase="Pending"), {"gpu-h100-0": NODE}, False),
        ("terminating pod", pod("replica", deleting=True), {"gpu-h100-0": NODE}, False),
        ("pod on a real node", pod("replica", node="real-0"), {"real-0": REAL_NODE}, False),
        ("pod on an unknown node", pod("replica"), {}, False),
    ],
)
def test_desired_launches(name: str, the_pod: Any, nodes: Any, runs: bool) -> None:
    launches, skipped = desired_launches({"u1": the_pod}, nodes, KUBECONFIG)
    assert ("u1" in launches) is runs, name
    assert not skipped


def test_desired_launches_reports_why_a_labelled_pod_runs_nothing() -> None:
    launches, skipped = desired_launches(
        {"u1": pod("agent")},
        {"gpu-h100-0": {**NODE, "metadata": {**NODE["metadata"], "labels": {}}}},
        KUBECONFIG,
    )
    assert launches == {}
    assert "ns/p" in skipped["u1"]
    assert "GPU labels" in skipped["u1"]


LAUNCH = Launch(
    uid="u",
    namespace="ns",
    name="p",
    container="vllm",
    image="img",
    kind="replica",
    argv=("sim-vllm",),
    env=(),
    host="127.0.0.9",
    probe=None,
)


def test_status_patch_ready() -> None:
    state = ContainerState(ready=True, running=True, restarts=0, started_at="T0")
    patch = build_status_patch(LAUNCH, state, "T1")["status"]
    assert [(c["type"], c["status"]) for c in patch["conditions"]] == [
        ("Ready", "True"),
        ("ContainersReady", "True"),
    ]
    (container,) = patch["containerStatuses"]
    assert container["ready"] is True
    assert container["state"] == {"running": {"startedAt": "T0"}}
    assert "lastState" not in container


def test_status_patch_after_a_crash_counts_the_restart() -> None:
    state = ContainerState(ready=False, running=False, restarts=2, last_exit_code=3)
    patch = build_status_patch(LAUNCH, state, "T1")["status"]
    assert {c["status"] for c in patch["conditions"]} == {"False"}
    assert {c["reason"] for c in patch["conditions"]} == {"ContainersNotReady"}
    (container,) = patch["containerStatuses"]
    assert container["restartCount"] == 2
    assert container["state"] == {"waiting": {"reason": "CrashLoopBackOff"}}
    assert container["lastState"]["terminated"]["exitCode"] == 3
    assert container["lastState"]["terminated"]["reason"] == "Error"


def test_restart_count_continues_from_the_pod() -> None:
    assert restart_count(pod("replica")) == 0
    the_pod = pod("replica")
    the_pod["status"]["containerStatuses"] = [{"name": "c", "restartCount": 4}]
    assert restart_count(the_pod) == 4


def test_agent_reads_its_nodes_pod_resources_socket() -> None:
    argv = build_launch(pod("agent"), NODE, KUBECONFIG, "/run/podres").argv
    assert argv[-2:] == ("--pod-resources-socket", "/run/podres/gpu-h100-0.sock")
    # Replicas are not told: only the agent reads the node's pod-resources.
    assert "--pod-resources-socket" not in build_launch(pod("replica"), NODE, KUBECONFIG, "/x").argv


async def test_a_program_that_ignores_sigterm_does_not_outlive_a_second_stop() -> None:
    """The runner, told to stop while it is stopping a pod's program (its grace running), kills
    the program at once rather than leaving it behind with the SIGTERM it ignores."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)",
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"up\n"
    stopping = asyncio.create_task(_stop_process(proc, grace_s=30))
    await asyncio.sleep(0.3)
    assert proc.returncode is None  # SIGTERM ignored, grace running
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
