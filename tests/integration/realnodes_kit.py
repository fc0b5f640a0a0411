"""Helpers for tests on the real kubelet nodes of the local cluster (hack/realnodes.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterkit import ROOT, Cluster

from modelfleet.agent.podresources import PodResourcesClient
from modelfleet.api.gpustats import PodRef

REAL_ROOT = ROOT / ".cluster" / "real"
REALNODES_PY = ROOT / "hack" / "realnodes.py"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
REAL_NODE_SELECTOR = {"modelfleet.io/test-node": "real"}


@dataclass(frozen=True)
class RealNodes:
    """The real nodes `hack/cluster.sh up` started, as `hack/realnodes.py up` recorded them."""

    root: Path
    context: dict[str, Any]

    @property
    def modelfleet_image(self) -> str:
        return "docker.io/modelfleet/modelfleet:local"

    @property
    def pause_image(self) -> str:
        return "registry.k8s.io/pause:3.10-modelfleet"

    @property
    def vllm_sim_image(self) -> str:
        return "docker.io/modelfleet/vllm-sim:local"

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def in_node(self, node: str, path: str) -> Path:
        """`path` inside the node's own mount namespace (its /run, /var/lib/kubelet, ...)."""
        holder = int((self.node_dir(node) / "pids" / "holder.pid").read_text())
        return Path(f"/proc/{holder}/root{path}")

    def pod_resources(self, node: str) -> dict[str, list[PodRef]]:
        """What the node's kubelet reports through its pod-resources socket: device -> pods."""
        sock = self.in_node(node, "/var/lib/kubelet/pod-resources/kubelet.sock")
        client = PodResourcesClient(str(sock))
        try:
            return client.list_blocking()
        finally:
            client.close()

    async def devices_of(self, node: str, namespace: str, pod: str) -> set[str]:
        """The devices the node's kubelet assigned to `pod` (the gRPC call runs off the loop)."""
        listing = await asyncio.to_thread(self.pod_resources, node)
        return {
            device
            for device, refs in listing.items()
            if any(r.namespace == namespace and r.name == pod for r in refs)
        }

    async def wait_devices_released(self, within_s: float = 90) -> None:
        """Until no pod holds a device on any real node: a pod of an earlier test still
        terminating keeps its GPUs, and the device manager then hands out others."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            held = {}
            for node in json.loads((self.root / "nodes.json").read_text()):
                listing = await asyncio.to_thread(self.pod_resources, node)
                held.update({d: refs for d, refs in listing.items() if refs})
            if not held:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"devices still held after {within_s}s: {held}")
            await asyncio.sleep(0.5)

    def inventory(self, node: str) -> list[dict[str, Any]]:
        doc = yaml.safe_load((self.node_dir(node) / "gpu" / "gpus.yaml").read_text())
        return list(doc["gpus"] if isinstance(doc, dict) else doc)

    async def realnodes(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REALNODES_PY),
            *args[:1],
            "--root",
            str(self.root),
            *args[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, f"realnodes.py {' '.join(args)} failed:\n{text}"
        return text

    async def restart_kubelet(self, node: str) -> None:
        await self.realnodes("restart-kubelet", node)

    async def set_nvml_fault(self, node: str, *args: str) -> None:
        """`modelfleet sim-gpu-driver set-fault` on the node's fake driver (see its --help)."""
        await self._driver("set-fault", node, *args)

    async def _driver(self, command: str, node: str, *args: str) -> None:
        cli = str(Path(sys.executable).with_name("modelfleet"))
        gpu_dir = str(self.node_dir(node) / "gpu")
        cmd = [cli, "sim-gpu-driver", command, "--dir", gpu_dir, *args]
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    async def set_gpu_health(self, node: str, gpu: int, unhealthy: str | None) -> None:
        health = ["--unhealthy", unhealthy] if unhealthy else ["--healthy"]
        cli = str(Path(sys.executable).with_name("modelfleet"))
        gpu_dir = str(self.node_dir(node) / "gpu")
        cmd = [cli, "sim-gpu-driver", "set-health", "--dir", gpu_dir, "--gpu", str(gpu), *health]
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def load_real_nodes(cluster: Cluster) -> RealNodes:
    """The real nodes of the local cluster; skips only where they are turned off on purpose."""
    if os.environ.get("MODELFLEET_TEST_KUBECONFIG"):
        pytest.skip("real-node tests need the local cluster's real nodes, not an external cluster")
    if os.environ.get("REAL_NODES") == "0":
        pytest.skip("real nodes are turned off (REAL_NODES=0)")
    context = REAL_ROOT / "context.json"
    if not context.exists():
        pytest.fail(
            f"no real nodes in {REAL_ROOT}: `hack/cluster.sh up` starts them (it needs root); "
            "REAL_NODES=0 turns these tests off",
            pytrace=False,
        )
    return RealNodes(root=REAL_ROOT, context=json.loads(context.read_text()))


def stand_in_args(name: str, gpus: int) -> list[str]:
    """vLLM's arguments for the stand-in: like vLLM, it uses `--tensor-parallel-size` GPUs."""
    return [
        "--model", "m", "--served-model-name", name, "--host", "0.0.0.0", "--port", "8000",
        "--tensor-parallel-size", str(max(gpus, 1)),
    ]  # fmt: skip


def gpu_pod(
    name: str,
    image: str,
    *,
    gpus: int,
    node: str | None = None,
    bind_to: str | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    probe_path: str = "/health",
    liveness: bool = False,
) -> dict[str, Any]:
    """A vLLM stand-in pod asking for `gpus` whole GPUs: scheduled onto `node`, or bound to
    `bind_to` with spec.nodeName as the operator binds its replicas (no scheduler)."""
    container: dict[str, Any] = {
        "name": "engine",
        "image": image,
        "imagePullPolicy": "Never",
        "args": args if args is not None else stand_in_args(name, gpus),
        # uid 1000 has no passwd entry in the image: like the operator's replicas, name the user
        # (the stand-in, as vLLM, cannot start otherwise).
        "env": [
            {"name": k, "value": v}
            for k, v in {"USER": "vllm", "LOGNAME": "vllm", **(env or {})}.items()
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 1},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": 1000,
        },
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    if liveness:
        container["livenessProbe"] = {
            "httpGet": {"path": probe_path, "port": 8000},
            "periodSeconds": 1,
            "failureThreshold": 2,
        }
    spec: dict[str, Any] = {
        "containers": [container],
        "tolerations": [GPU_TOLERATION],
        "terminationGracePeriodSeconds": 2,
        "automountServiceAccountToken": False,
    }
    if bind_to:
        spec["nodeName"] = bind_to
    else:
        spec["nodeSelector"] = {**REAL_NODE_SELECTOR, "kubernetes.io/hostname": node or ""}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
