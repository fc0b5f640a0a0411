"""Helpers for the operator's integration tests: private GPU nodes, agents, operator processes.

Each test gets its own simulated GPU nodes (labelled with the test namespace), an agent
DaemonSet on them in the test namespace, and operator processes that watch only that namespace
and discover only those agents, so tests never see each other's GPUs. One pod runner per session
starts the real programs (`modelfleet agent`, `modelfleet sim-vllm`) for pods on simulated nodes.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterkit import ROOT, Cluster, wait_for

from modelfleet.api import labels as L
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import md_path, pods_path

TEST_POOL_LABEL = "modelfleet.io/test-pool"
H100 = "NVIDIA-H100-80GB-HBM3"
H100_MIB = 81559
# Pod CIDR slots 100..254 of the cluster's 127.<octet>.0.0/16 are for test nodes (hack/nodes.yaml
# uses the first few); one counter per session hands them out.
_slots = itertools.count(100)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def cluster_octet(kube: KubeClient) -> int:
    """N of the cluster's 127.N.0.0/16 pod range, read from a simulated node's pod CIDR."""
    nodes = await kube.list("/api/v1/nodes", labelSelector="modelfleet.io/simulated=true")
    for node in nodes.get("items", []):
        cidr = (node.get("spec") or {}).get("podCIDR", "")
        if cidr.startswith("127."):
            return int(cidr.split(".")[1])
    raise AssertionError("no simulated node with a loopback pod CIDR: is hack/cluster.sh up?")


def build_test_node(name: str, pool: str, octet: int, gpus: int) -> dict[str, Any]:
    slot = next(_slots)
    assert slot <= 254, "the session ran out of pod CIDR slots for test nodes"
    cidr = f"127.{octet}.{slot}.0/24"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "type": "kwok",
                "modelfleet.io/simulated": "true",
                TEST_POOL_LABEL: pool,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": H100,
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.memory": str(H100_MIB),
            },
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "capacity": {
                "cpu": "64",
                "memory": "512Gi",
                "pods": "110",
                "nvidia.com/gpu": str(gpus),
            },
            "allocatable": {
                "cpu": "64",
                "memory": "512Gi",
                "pods": "110",
                "nvidia.com/gpu": str(gpus),
            },
            "addresses": [{"type": "InternalIP", "address": f"127.{octet}.0.{slot}"}],
        },
    }


async def create_test_nodes(kube: KubeClient, namespace: str, count: int, gpus: int) -> list[str]:
    octet = await cluster_octet(kube)
    names = []
    for i in range(count):
        name = f"{namespace[:50]}-n{i}"
        node = build_test_node(name, namespace, octet, gpus)
        await kube.create("/api/v1/nodes", node)
        await kube.patch(
            f"/api/v1/nodes/{name}/status",
            {"status": {k: node["status"][k] for k in ("capacity", "allocatable", "addresses")}},
        )
        names.append(name)
    return names


async def delete_test_nodes(kube: KubeClient, namespace: str) -> None:
    nodes = await kube.list("/api/v1/nodes", labelSelector=f"{TEST_POOL_LABEL}={namespace}")
    for node in nodes.get("items", []):
        try:
            await kube.delete(f"/api/v1/nodes/{node['metadata']['name']}")
        except ApiError as exc:
            if not exc.not_found:
                raise


def agent_daemonset(namespace: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "modelfleet", "app.kubernetes.io/component": "agent"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {TEST_POOL_LABEL: namespace},
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "agent",
                            "image": "modelfleet:test",
                            "ports": [{"name": "http", "containerPort": 9400}],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz", "port": "http"},
                                "periodSeconds": 2,
                            },
                        }
                    ],
                },
            },
        },
    }


@dataclass
class OperatorProcess:
    """One `modelfleet operator` subprocess."""

    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no Lease release (a crash)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


@dataclass
class Operators:
    """Starts operator processes for one test namespace; stops them all at the end."""

    cluster: Cluster
    namespace: str
    tmp: Path
    started: list[OperatorProcess] = field(default_factory=list)

    def start(self, **env: str) -> OperatorProcess:
        port = free_port()
        log = self.tmp / f"operator-{len(self.started)}.log"
        settings = {
            "MODELFLEET_WATCH_NAMESPACE": self.namespace,
            "MODELFLEET_AGENT_NAMESPACE": self.namespace,
            "MODELFLEET_LEASE_NAMESPACE": self.namespace,
            "MODELFLEET_METRICS_HOST": "127.0.0.1",
            "MODELFLEET_METRICS_PORT": str(port),
            "MODELFLEET_POLL_INTERVAL_S": "1",
            "MODELFLEET_RECHECK_INTERVAL_S": "10",
            # The simulated and fake-driver nodes honour NVIDIA_VISIBLE_DEVICES: Shared works.
            "MODELFLEET_SHARED_MODE": "true",
            # The real test nodes have this machine's 2 CPUs, shared by every replica there: the
            # default 1 CPU per replica would leave room for one replica per node.
            "MODELFLEET_REPLICA_CPU_REQUEST": "100m",
            "MODELFLEET_LEASE_DURATION_S": "4",
            "MODELFLEET_LEASE_RENEW_INTERVAL_S": "1",
            "MODELFLEET_BREAKER_FAILURE_THRESHOLD": "2",
            **env,
        }
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "modelfleet",
                    "operator",
                    "--kubeconfig",
                    str(self.cluster.kubeconfig),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **settings},
                cwd=ROOT,
            )
        handle = OperatorProcess(process, log, port)
        self.started.append(handle)
        return handle

    def stop_all(self) -> None:
        for op in self.started:
            op.stop()


@dataclass
class RunnerProcess:
    process: subprocess.Popen[bytes]
    log: Path


def start_pod_runner(cluster: Cluster, tmp: Path) -> Iterator[RunnerProcess]:
    """hack/pod_runner.py with the real modelfleet programs, for the whole session."""
    log = tmp / "pod-runner.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "hack" / "pod_runner.py"),
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--log-dir",
                str(tmp / "pod-logs"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MODELFLEET_SIM_STARTUP_DELAY_S": "0.5"},
        )
    deadline = time.monotonic() + 30
    while b"watching pods" not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the pod runner did not start:\n{log.read_text()}")
        time.sleep(0.05)
    try:
        yield RunnerProcess(process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- ModelDeployments and their replicas, as tests check them ---------------------------------


def pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def md(name: str, **spec: Any) -> dict[str, Any]:
    annotations = spec.pop("annotations", {})
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"model": f"org/{name}", "gpu": {"count": 1, "memory": "20Gi"}, **spec},
    }


async def replica_pods(kube: KubeClient, namespace: str, deployment: str) -> list[dict[str, Any]]:
    pods = await kube.list(pods_path(namespace), labelSelector=f"{L.LABEL_DEPLOYMENT}={deployment}")
    return [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]


async def wait_ready(
    kube: KubeClient, namespace: str, deployment: str, count: int, deadline_s: float = 60
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        obj = await kube.get(md_path(namespace, deployment))
        status = obj.get("status") or {}
        pods = await replica_pods(kube, namespace, deployment)
        ok = (
            status.get("readyReplicas") == count
            and len(pods) == count
            and sum(pod_ready(p) for p in pods) == count
        )
        return obj if ok else None

    found: dict[str, Any] = await wait_for(
        check, timeout=deadline_s, interval=0.2, what=f"{deployment}: {count} ready replicas"
    )
    return found


async def events_of(kube: KubeClient, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = await kube.list(
        f"/api/v1/namespaces/{namespace}/events",
        fieldSelector=f"involvedObject.kind=ModelDeployment,involvedObject.name={name}",
    )
    return list(listing["items"])


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in obj["status"]["conditions"]}


# --- the gateway as a subprocess -----------------------------------------------------------------


@dataclass
class GatewayProcess:
    """One `modelfleet gateway` subprocess watching a test namespace, on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    log: Path
    url: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_gateway(cluster: Cluster, namespace: str, tmp: Path, **env: str) -> GatewayProcess:
    """Start the gateway on a free port; the caller waits for /healthz (it is async)."""
    port = free_port()
    log = tmp / "gateway.log"
    settings = {
        "MODELFLEET_GATEWAY_NAMESPACE": namespace,
        "MODELFLEET_GATEWAY_LAST_USE_INTERVAL_S": "1",
        **env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfleet",
                "gateway",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **settings},
            cwd=ROOT,
        )
    return GatewayProcess(process, log, f"http://127.0.0.1:{port}")
