"""Desired child objects of a ModelDeployment: replica Pods and the Service. Pure.

A replica Pod is bound directly to the node placement chose (`spec.nodeName`), so it is bound the
moment it exists and the scheduler never second-guesses a GPU decision. Everything another
component needs later (GPUs, footprint, served name, priority) travels in its annotations.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from modelfleet.api import (
    API_GROUP,
    API_VERSION,
    KIND,
    ModelDeployment,
    ModelDeploymentSpec,
    SharingMode,
)
from modelfleet.api import labels as L
from modelfleet.controller.decisions import Placed
from modelfleet.controller.nodeusage import compute_pod_requests
from modelfleet.controller.observed import ObservedPod, instance_name
from modelfleet.placement import Requests

# Startup budget: vLLM loads weights before /health answers; a 70B model from a cold cache can
# take well over 10 minutes. 180 x 10 s = 30 min before the kubelet gives up and restarts it.
STARTUP_PERIOD_S = 10
STARTUP_FAILURE_THRESHOLD = 180
READINESS_PERIOD_S = 5
LIVENESS_PERIOD_S = 10
SERVICE_PORT = 8000
SHM_SIZE = (
    "8Gi"  # NCCL uses /dev/shm between tensor-parallel workers; the default 64Mi is too small
)
# Never hand vLLM more than this share of a GPU in Shared mode: CUDA context and fragmentation.
MAX_GPU_MEMORY_UTILIZATION = 0.95
CONTAINER_NAME = "vllm"
RUN_AS_USER = 1000


def owner_reference(md: ModelDeployment) -> dict[str, Any]:
    """A controller ownerReference to the ModelDeployment: the garbage collector cleans up."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": md.metadata.name,
        "uid": md.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def selector_labels(deployment: str) -> dict[str, str]:
    """Labels that select every replica Pod of `deployment` (the Service selector)."""
    return {
        L.LABEL_NAME: L.NAME_VALUE,
        L.LABEL_COMPONENT: L.COMPONENT_REPLICA,
        L.LABEL_DEPLOYMENT: deployment,
    }


def selector_string(deployment: str) -> str:
    """The same selector as a string, for status.selector (the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(deployment).items()))


def compute_template_hash(md: ModelDeployment, default_image: str) -> str:
    """Hash of everything a replica Pod is built from except its placement.

    A Pod whose annotation differs was built from an older spec and is replaced in a rollout.
    """
    spec = md.spec
    material = {
        "model": spec.model,
        "served": md.served_name,
        "gpu": spec.gpu.model_dump(mode="json"),
        "engine": spec.engine.model_dump(mode="json"),
        "image": spec.engine.image or default_image,
        "tolerations": [t.model_dump(mode="json") for t in spec.placement.tolerations],
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def compute_gpu_memory_utilization(footprint_mib: int, gpu_memory_mib: int) -> float:
    """vLLM's --gpu-memory-utilization for a footprint on a GPU of this size (two decimals, up)."""
    if gpu_memory_mib <= 0:
        raise ValueError(f"GPU memory must be positive, got {gpu_memory_mib} MiB")
    share = -(-footprint_mib * 100 // gpu_memory_mib) / 100  # ceil to 0.01
    return min(max(share, 0.01), MAX_GPU_MEMORY_UTILIZATION)


def build_engine_args(md: ModelDeployment, placed: Placed) -> list[str]:
    """The vLLM command line: generated arguments first, then the user's extra args."""
    spec = md.spec
    args = [
        "--model",
        spec.model,
        "--served-model-name",
        md.served_name,
        "--tensor-parallel-size",
        str(spec.gpu.count),
        "--port",
        str(spec.engine.port),
        "--host",
        "0.0.0.0",
    ]
    if spec.gpu.sharing == SharingMode.SHARED and placed.footprint_mib is not None:
        util = compute_gpu_memory_utilization(placed.footprint_mib, placed.gpu_memory_mib)
        args += ["--gpu-memory-utilization", f"{util:.2f}"]
    return args + list(spec.engine.args)


def _env(md: ModelDeployment, placed: Placed) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The image's default HOME is root's; caches go to a writable emptyDir instead.
        {"name": "HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
    ]
    if md.spec.gpu.sharing == SharingMode.SHARED:
        # No nvidia.com/gpu request in Shared mode (the device plugin hands out whole GPUs), so
        # the container runtime is told which GPUs to expose.
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": ",".join(placed.gpu_uuids)})
    for var in md.spec.engine.env:
        env.append(var.model_dump(by_alias=True, exclude_none=True))
    return env


def compute_resources(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """The engine container's `resources`: spec.engine.resources and, when Exclusive, the GPUs."""
    res = spec.engine.resources
    limits: dict[str, Any] = {k: str(v) for k, v in res.limits.items()}
    requests: dict[str, Any] = {k: str(v) for k, v in res.requests.items()}
    if spec.gpu.sharing == SharingMode.EXCLUSIVE:
        limits["nvidia.com/gpu"] = str(spec.gpu.count)
        requests["nvidia.com/gpu"] = str(spec.gpu.count)
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _probe(period_s: int, failure_threshold: int, timeout_s: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period_s,
        "failureThreshold": failure_threshold,
        "timeoutSeconds": timeout_s,
    }


def build_replica_pod(
    md: ModelDeployment,
    n: int,
    placed: Placed,
    *,
    default_image: str,
    template_hash: str,
) -> dict[str, Any]:
    """Replica `n` of `md`, bound to the node and GPUs of `placed`."""
    spec = md.spec
    name = md.metadata.name
    annotations = {
        L.ANN_GPUS: ",".join(placed.gpu_ids),
        L.ANN_GPU_UUIDS: ",".join(placed.gpu_uuids),
        L.ANN_FOOTPRINT_MIB: "" if placed.footprint_mib is None else str(placed.footprint_mib),
        L.ANN_SHARING: str(spec.gpu.sharing),
        L.ANN_PLACEMENT_REASON: placed.reason,
        L.ANN_SERVED_MODEL: md.served_name,
        L.ANN_PRIORITY: str(spec.priority),
        L.ANN_MIN_REPLICAS: str(spec.min_replicas),
        L.ANN_TEMPLATE_HASH: template_hash,
    }
    pod_labels = {
        **selector_labels(name),
        L.LABEL_MANAGED_BY: L.MANAGED_BY_OPERATOR,
        L.LABEL_INSTANCE: str(n),
    }
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.engine.image or default_image,
        "imagePullPolicy": "IfNotPresent",
        "args": build_engine_args(md, placed),
        "env": _env(md, placed),
        "ports": [{"name": "http", "containerPort": spec.engine.port, "protocol": "TCP"}],
        "startupProbe": _probe(STARTUP_PERIOD_S, STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": _probe(READINESS_PERIOD_S, 3),
        "livenessProbe": _probe(LIVENESS_PERIOD_S, 3),
        "resources": compute_resources(md.spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "nodeName": placed.node,
        "restartPolicy": "Always",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.placement.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.placement.tolerations
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": instance_name(name, n),
            "namespace": md.metadata.namespace,
            "labels": pod_labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(md)],
        },
        "spec": pod_spec,
    }


def build_replica_record(
    md: ModelDeployment, n: int, placed: Placed, *, template_hash: str
) -> ObservedPod:
    """What the watch will show of replica `n` once `build_replica_pod` is created: the record
    the in-flight book keeps until then (built from the same inputs, never parsed back)."""
    return ObservedPod(
        name=instance_name(md.metadata.name, n),
        namespace=md.metadata.namespace or "",
        deployment=md.metadata.name,
        ordinal=n,
        node=placed.node,
        template_hash=template_hash,
        gpu_ids=placed.gpu_ids,
        gpu_uuids=placed.gpu_uuids,
        footprint_mib=placed.footprint_mib,
        sharing=str(md.spec.gpu.sharing),
        priority=md.spec.priority,
        min_replicas=md.spec.min_replicas,
        owner_uid=md.metadata.uid or "",
        requests=compute_replica_requests(md.spec),
    )


def compute_replica_requests(spec: ModelDeploymentSpec) -> Requests:
    """What a replica Pod of `spec` will ask of its node's kubelet."""
    return compute_pod_requests({"containers": [{"resources": compute_resources(spec)}]})


def build_service(md: ModelDeployment) -> dict[str, Any]:
    """The ClusterIP Service `<deployment>` in front of every replica, port 8000 named http."""
    name = md.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": md.metadata.namespace,
            "labels": {
                L.LABEL_NAME: L.NAME_VALUE,
                L.LABEL_COMPONENT: L.COMPONENT_REPLICA,
                L.LABEL_DEPLOYMENT: name,
                L.LABEL_MANAGED_BY: L.MANAGED_BY_OPERATOR,
            },
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": "http",
                    "port": SERVICE_PORT,
                    "targetPort": "http",
                    "protocol": "TCP",
                }
            ],
        },
    }
