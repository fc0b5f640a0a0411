"""Desired child objects of a ModelDeployment: replica Pods and the Service. Pure.

A replica Pod is bound directly to the node placement chose (`spec.nodeName`), so it is bound the
moment it exists and the scheduler never second-guesses a GPU decision. Everything another
component needs later (GPUs, footprint, served name, priority) travels in its annotations.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from modelfleet.api import (
    API_GROUP,
    API_VERSION,
    KIND,
    EngineSpec,
    ModelDeployment,
    ModelDeploymentSpec,
    SharingMode,
)
from modelfleet.api import labels as L
from modelfleet.api.units import parse_duration
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
RUN_AS_NAME = "vllm"
# The taint GPU nodes carry (GKE sets it on every GPU node; the GPU Operator's docs suggest it):
# tolerated by every replica, as Kubernetes' ExtendedResourceToleration does for pods that request
# nvidia.com/gpu. Shared replicas request none, but run on GPU nodes all the same.
GPU_TOLERATION: dict[str, Any] = {"key": "nvidia.com/gpu", "operator": "Exists"}
DEFAULT_STARTUP_S = STARTUP_PERIOD_S * STARTUP_FAILURE_THRESHOLD


@dataclass(frozen=True)
class PodDefaults:
    """What the operator's settings add to every replica Pod (MODELFLEET_DEFAULT_IMAGE, ...)."""

    image: str = "vllm/vllm-openai:v0.11.0"
    # None: the Pod names no uid and the platform picks one (OpenShift's SCC).
    run_as_user: int | None = RUN_AS_USER
    # RuntimeClass of Shared replicas that name none: the one honouring NVIDIA_VISIBLE_DEVICES.
    shared_runtime_class_name: str = ""
    # Requests of a replica whose spec.engine.resources names neither request nor limit.
    cpu_request: str | None = None
    memory_request: str | None = None


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


# spec.engine fields added after v0.1: left out of the template hash while unset, so that an
# operator upgrade does not roll every replica whose spec did not change.
LATER_ENGINE_FIELDS = (
    "hugging_face_token",
    "cache",
    "startup_timeout",
    "runtime_class_name",
    "image_pull_secrets",
    "service_account_name",
    "priority_class_name",
    "volumes",
    "volume_mounts",
)


def _engine_material(engine: EngineSpec) -> dict[str, Any]:
    unset = {f for f in LATER_ENGINE_FIELDS if getattr(engine, f) in (None, [])}
    return engine.model_dump(mode="json", exclude=unset)


def compute_template_hash(md: ModelDeployment, default_image: str) -> str:
    """Hash of everything a replica Pod is built from except its placement.

    A Pod whose annotation differs was built from an older spec and is replaced in a rollout.
    """
    spec = md.spec
    material = {
        "model": spec.model,
        "served": md.served_name,
        "gpu": spec.gpu.model_dump(mode="json"),
        "engine": _engine_material(spec.engine),
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
    """The arguments of `vllm serve` (the vllm-openai image's entrypoint): the model as its
    positional argument (`--model` is deprecated there), the generated flags, then the user's."""
    spec = md.spec
    args = [
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
        # The image's default HOME is root's; caches go to the writable cache volume instead.
        {"name": "HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        # The uid has no passwd entry in the image: Python's getpass.getuser() (torch inductor
        # calls it at import) reads these first instead of failing on getpwuid.
        {"name": "USER", "value": RUN_AS_NAME},
        {"name": "LOGNAME", "value": RUN_AS_NAME},
        # Everything vLLM, torch and triton compile or download lands in the cache volume.
        {"name": "XDG_CACHE_HOME", "value": "/cache/xdg"},
        {"name": "VLLM_CACHE_ROOT", "value": "/cache/vllm"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": "/cache/torchinductor"},
        {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
    ]
    token = md.spec.engine.hugging_face_token
    if token is not None:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": token.secret_name, "key": token.key}},
            }
        )
    if md.spec.gpu.sharing == SharingMode.SHARED:
        # No nvidia.com/gpu request in Shared mode (the device plugin hands out whole GPUs), so
        # the container runtime is told which GPUs to expose.
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": ",".join(placed.gpu_uuids)})
    for var in md.spec.engine.env:
        env.append(var.model_dump(by_alias=True, exclude_none=True))
    return env


def compute_resources(spec: ModelDeploymentSpec, defaults: PodDefaults) -> dict[str, Any]:
    """The engine container's `resources`: spec.engine.resources, the default CPU and memory
    requests for what it leaves out, and, when Exclusive, the GPUs."""
    res = spec.engine.resources
    limits: dict[str, Any] = {k: str(v) for k, v in res.limits.items()}
    requests: dict[str, Any] = {k: str(v) for k, v in res.requests.items()}
    for name, default in (("cpu", defaults.cpu_request), ("memory", defaults.memory_request)):
        # A limit alone is the request too (the API server copies it): no default then.
        if default is not None and name not in requests and name not in limits:
            requests[name] = default
    if spec.gpu.sharing == SharingMode.EXCLUSIVE:
        limits["nvidia.com/gpu"] = str(spec.gpu.count)
        requests["nvidia.com/gpu"] = str(spec.gpu.count)
    out: dict[str, Any] = {}
    cache = spec.engine.cache
    if cache is not None and cache.size_limit is not None:
        # The cache emptyDir counts against the node's ephemeral storage: ask for it.
        requests.setdefault("ephemeral-storage", str(cache.size_limit))
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def compute_tolerations(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    """The replica Pod's tolerations: the spec's, and the GPU taint unless the spec has it."""
    own = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.placement.tolerations]
    covered = any(
        t.get("key") in (None, "", GPU_TOLERATION["key"])
        and t.get("operator") == "Exists"
        and not t.get("effect")
        for t in own
    )
    return own if covered else [*own, GPU_TOLERATION]


def _cache_volume(spec: ModelDeploymentSpec) -> dict[str, Any]:
    cache = spec.engine.cache
    if cache is not None and cache.persistent_volume_claim:
        return {
            "name": "cache",
            "persistentVolumeClaim": {"claimName": cache.persistent_volume_claim},
        }
    if cache is not None and cache.host_path:
        return {"name": "cache", "hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"}}
    if cache is not None and cache.size_limit is not None:
        return {"name": "cache", "emptyDir": {"sizeLimit": str(cache.size_limit)}}
    return {"name": "cache", "emptyDir": {}}


def compute_startup_threshold(spec: ModelDeploymentSpec) -> int:
    """startupProbe failures allowed: spec.engine.startupTimeout over the probe period."""
    timeout = spec.engine.startup_timeout
    seconds = parse_duration(timeout) if timeout is not None else DEFAULT_STARTUP_S
    return max(1, math.ceil(seconds / STARTUP_PERIOD_S))


def _probe(period_s: int, failure_threshold: int, timeout_s: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period_s,
        "failureThreshold": failure_threshold,
        "timeoutSeconds": timeout_s,
    }


def compute_pod_security_context(run_as_user: int | None) -> dict[str, Any]:
    """The replica Pod's securityContext: non-root always; a fixed uid unless the platform
    assigns one (`run_as_user` None, as OpenShift's restricted SCC wants)."""
    out: dict[str, Any] = {"runAsNonRoot": True}
    if run_as_user is not None:
        out.update(runAsUser=run_as_user, runAsGroup=run_as_user, fsGroup=run_as_user)
    out["seccompProfile"] = {"type": "RuntimeDefault"}
    return out


def compute_runtime_class_name(spec: ModelDeploymentSpec, defaults: PodDefaults) -> str:
    """spec.engine.runtimeClassName; for a Shared replica that names none, the operator's
    default: NVIDIA_VISIBLE_DEVICES picks its GPUs, and only the NVIDIA runtime reads it."""
    if spec.engine.runtime_class_name:
        return spec.engine.runtime_class_name
    if spec.gpu.sharing == SharingMode.SHARED:
        return defaults.shared_runtime_class_name
    return ""


def build_replica_pod(
    md: ModelDeployment,
    n: int,
    placed: Placed,
    *,
    defaults: PodDefaults,
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
        "image": spec.engine.image or defaults.image,
        "imagePullPolicy": "IfNotPresent",
        "args": build_engine_args(md, placed),
        "env": _env(md, placed),
        "ports": [{"name": "http", "containerPort": spec.engine.port, "protocol": "TCP"}],
        "startupProbe": _probe(STARTUP_PERIOD_S, compute_startup_threshold(spec)),
        "readinessProbe": _probe(READINESS_PERIOD_S, 3),
        "livenessProbe": _probe(LIVENESS_PERIOD_S, 3),
        "resources": compute_resources(md.spec, defaults),
        # A run that fails leaves its last log lines as the termination message: status then
        # says why it crash-loops (a 401 for a gated model, CUDA out of memory, ...).
        "terminationMessagePolicy": "FallbackToLogsOnError",
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
            *(m.model_dump(by_alias=True, exclude_none=True) for m in spec.engine.volume_mounts),
        ],
    }
    pod_spec: dict[str, Any] = {
        "nodeName": placed.node,
        "restartPolicy": "Always",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": compute_pod_security_context(defaults.run_as_user),
        "containers": [container],
        "volumes": [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
            _cache_volume(spec),
            {"name": "tmp", "emptyDir": {}},
            *(v.model_dump(by_alias=True, exclude_none=True) for v in spec.engine.volumes),
        ],
        "tolerations": compute_tolerations(spec),
    }
    engine = spec.engine
    runtime_class = compute_runtime_class_name(spec, defaults)
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    if engine.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in engine.image_pull_secrets]
    if engine.service_account_name:
        pod_spec["serviceAccountName"] = engine.service_account_name
    if engine.priority_class_name:
        pod_spec["priorityClassName"] = engine.priority_class_name
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
    md: ModelDeployment,
    n: int,
    placed: Placed,
    *,
    template_hash: str,
    defaults: PodDefaults,
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
        requests=compute_replica_requests(md.spec, defaults),
    )


def compute_replica_requests(spec: ModelDeploymentSpec, defaults: PodDefaults) -> Requests:
    """What a replica Pod of `spec` will ask of its node's kubelet."""
    return compute_pod_requests({"containers": [{"resources": compute_resources(spec, defaults)}]})


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
