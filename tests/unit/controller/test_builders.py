"""Replica Pod and Service builders: named cases over the spec and the placement."""

from __future__ import annotations

from typing import Any

import pytest
from controller_helpers import make_md

from modelfleet.api import labels as L
from modelfleet.controller.builders import (
    PodDefaults,
    build_engine_args,
    build_replica_pod,
    build_service,
    compute_gpu_memory_utilization,
    compute_template_hash,
    selector_labels,
)
from modelfleet.controller.decisions import Placed

PLACED = Placed(
    node="gpu-h100-0",
    gpu_ids=("gpu-h100-0:2", "gpu-h100-0:3"),
    gpu_uuids=("GPU-a", "GPU-b"),
    gpu_memory_mib=81559,
    footprint_mib=20480,
    reason="most free GPUs",
)
IMAGE = "vllm/vllm-openai:v0.11.0"
# As the operator's settings default them.
DEFAULTS = PodDefaults(
    image=IMAGE, shared_runtime_class_name="nvidia", cpu_request="1", memory_request="4Gi"
)


def build(**spec: Any) -> dict[str, Any]:
    md = make_md(**spec)
    return build_replica_pod(md, 2, PLACED, defaults=DEFAULTS, template_hash="h1")


def container(pod: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = pod["spec"]["containers"][0]
    return c


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(pod)["env"]}


def test_name_owner_labels_and_binding() -> None:
    pod = build(gpu={"count": 2})
    meta = pod["metadata"]
    assert meta["name"] == "gemma-instance-2"
    assert meta["namespace"] == "ns"
    owner = meta["ownerReferences"][0]
    assert owner == {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "name": "gemma",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert meta["labels"] == {
        "app.kubernetes.io/name": "modelfleet",
        "app.kubernetes.io/component": "replica",
        "app.kubernetes.io/managed-by": "modelfleet-operator",
        "modelfleet.io/deployment": "gemma",
        "modelfleet.io/instance": "2",
    }
    assert pod["spec"]["nodeName"] == "gpu-h100-0"


def test_annotations_carry_placement() -> None:
    ann = build(servedModelName="gemma3-4B", priority=5, minReplicas=1, replicas=2)["metadata"][
        "annotations"
    ]
    assert ann[L.ANN_GPUS] == "gpu-h100-0:2,gpu-h100-0:3"
    assert ann[L.ANN_GPU_UUIDS] == "GPU-a,GPU-b"
    assert ann[L.ANN_FOOTPRINT_MIB] == "20480"
    assert ann[L.ANN_PLACEMENT_REASON] == "most free GPUs"
    assert ann[L.ANN_SERVED_MODEL] == "gemma3-4B"
    assert ann[L.ANN_PRIORITY] == "5"
    assert ann[L.ANN_MIN_REPLICAS] == "1"
    assert ann[L.ANN_TEMPLATE_HASH] == "h1"
    assert ann[L.ANN_SHARING] == "Exclusive"


def test_discovery_run_has_empty_footprint() -> None:
    md = make_md()
    placed = Placed("n", ("n:0",), ("GPU-0",), 81559, None, "discovery")
    pod = build_replica_pod(md, 1, placed, defaults=DEFAULTS, template_hash="h")
    assert pod["metadata"]["annotations"][L.ANN_FOOTPRINT_MIB] == ""


@pytest.mark.parametrize(
    ("case", "spec", "expected_args"),
    [
        (
            "exclusive, defaults",
            {"gpu": {"count": 2}},
            [
                "google/gemma-3-4b-it",
                "--served-model-name",
                "gemma",
                "--tensor-parallel-size",
                "2",
                "--port",
                "8000",
                "--host",
                "0.0.0.0",
            ],
        ),
        (
            "shared sets memory utilization from the footprint",
            {"gpu": {"count": 2, "memory": "20Gi", "sharing": "Shared"}},
            [
                "google/gemma-3-4b-it",
                "--served-model-name",
                "gemma",
                "--tensor-parallel-size",
                "2",
                "--port",
                "8000",
                "--host",
                "0.0.0.0",
                "--gpu-memory-utilization",
                "0.26",
            ],
        ),
        (
            "extra args come last, port and served name from the spec",
            {
                "servedModelName": "g3",
                "engine": {"port": 9000, "args": ["--max-model-len", "8192"]},
                "gpu": {"count": 2},
            },
            [
                "google/gemma-3-4b-it",
                "--served-model-name",
                "g3",
                "--tensor-parallel-size",
                "2",
                "--port",
                "9000",
                "--host",
                "0.0.0.0",
                "--max-model-len",
                "8192",
            ],
        ),
    ],
)
def test_engine_args(case: str, spec: dict[str, Any], expected_args: list[str]) -> None:
    assert build_engine_args(make_md(**spec), PLACED) == expected_args, case


def test_exclusive_requests_whole_gpus_without_pin() -> None:
    pod = build(gpu={"count": 2})
    res = container(pod)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2"
    assert res["requests"]["nvidia.com/gpu"] == "2"
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(pod)


def test_shared_pins_uuids_without_gpu_limit() -> None:
    pod = build(gpu={"count": 2, "memory": "20Gi", "sharing": "Shared"})
    assert "nvidia.com/gpu" not in container(pod).get("resources", {}).get("limits", {})
    assert env_of(pod)["NVIDIA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert pod["metadata"]["annotations"][L.ANN_SHARING] == "Shared"


def test_user_env_resources_and_image() -> None:
    pod = build(
        gpu={"count": 2},
        engine={
            "image": "registry.local/vllm:custom",
            "env": [
                {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}},
            ],
            "resources": {"limits": {"memory": "64Gi"}, "requests": {"cpu": 4}},
        },
    )
    c = container(pod)
    assert c["image"] == "registry.local/vllm:custom"
    assert env_of(pod)["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}} in c[
        "env"
    ]
    assert c["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "2"}
    assert c["resources"]["requests"] == {"cpu": "4", "nvidia.com/gpu": "2"}


def test_default_image() -> None:
    assert container(build())["image"] == IMAGE


def test_probes_on_health_with_long_startup_budget() -> None:
    c = container(build())
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60


def test_restrictive_security_context_and_shm() -> None:
    pod = build()
    c = container(pod)
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_tolerations_are_copied_and_the_gpu_taint_is_tolerated() -> None:
    # GKE taints every GPU node nvidia.com/gpu=present:NoSchedule: replicas tolerate it, as
    # ExtendedResourceToleration makes pods that request nvidia.com/gpu do.
    pod = build(placement={"tolerations": [{"key": "gpu", "operator": "Exists"}]})
    assert pod["spec"]["tolerations"] == [
        {"key": "gpu", "operator": "Exists"},
        {"key": "nvidia.com/gpu", "operator": "Exists"},
    ]
    # Shared replicas request no GPU but run on GPU nodes all the same.
    shared = build(gpu={"sharing": "Shared", "memory": "20Gi"})
    assert shared["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    # A spec that tolerates every taint already needs nothing more.
    everything = build(placement={"tolerations": [{"operator": "Exists"}]})
    assert everything["spec"]["tolerations"] == [{"operator": "Exists"}]


def test_a_uid_without_passwd_entry_and_the_caches_have_what_python_needs() -> None:
    env = env_of(build())
    assert env["USER"] == env["LOGNAME"] == "vllm"  # getpass.getuser() reads these first
    for var in ("XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[var].startswith("/cache/"), var
    assert "HF_TOKEN" not in env


def test_hugging_face_token_comes_from_the_named_secret_key() -> None:
    pod = build(engine={"huggingFaceToken": {"secretName": "hf", "key": "token"}})
    (var,) = [e for e in container(pod)["env"] if e["name"] == "HF_TOKEN"]
    assert var == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }


PVC = {"name": "cache", "persistentVolumeClaim": {"claimName": "weights"}}
HOST = {"name": "cache", "hostPath": {"path": "/var/cache/models", "type": "DirectoryOrCreate"}}


@pytest.mark.parametrize(
    ("cache", "volume"),
    [
        (None, {"name": "cache", "emptyDir": {}}),
        ({"persistentVolumeClaim": "weights"}, PVC),
        ({"hostPath": "/var/cache/models"}, HOST),
        ({"sizeLimit": "200Gi"}, {"name": "cache", "emptyDir": {"sizeLimit": "200Gi"}}),
    ],
)
def test_cache_volume(cache: dict[str, str] | None, volume: dict[str, Any]) -> None:
    pod = build(engine={"cache": cache} if cache else {})
    assert next(v for v in pod["spec"]["volumes"] if v["name"] == "cache") == volume
    assert {"name": "cache", "mountPath": "/cache"} in container(pod)["volumeMounts"]
    requests = container(pod)["resources"].get("requests", {})
    # A sized emptyDir is asked for as ephemeral storage, so the kubelet places and evicts by it.
    assert requests.get("ephemeral-storage") == (cache or {}).get("sizeLimit")


def test_pod_settings_for_real_clusters() -> None:
    pod = build(
        engine={
            "startupTimeout": "1h",
            "runtimeClassName": "nvidia",
            "imagePullSecrets": ["registry"],
            "serviceAccountName": "models",
            "priorityClassName": "inference",
        }
    )
    spec = pod["spec"]
    assert container(pod)["startupProbe"]["failureThreshold"] * 10 == 3600
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["serviceAccountName"] == "models"
    assert spec["automountServiceAccountToken"] is False
    assert spec["priorityClassName"] == "inference"
    # A failed run's last log lines become its termination message: status can say why.
    assert container(pod)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    default = build()
    assert container(default)["startupProbe"]["failureThreshold"] * 10 == 1800
    assert not {"runtimeClassName", "imagePullSecrets", "serviceAccountName"} & set(default["spec"])


@pytest.mark.parametrize(
    ("case", "resources", "requests"),
    [
        ("none: the defaults", {}, {"cpu": "1", "memory": "4Gi", "nvidia.com/gpu": "1"}),
        (
            "a request of its own stays; the other is defaulted",
            {"requests": {"cpu": "8"}},
            {"cpu": "8", "memory": "4Gi", "nvidia.com/gpu": "1"},
        ),
        (
            "a limit alone is the request: no default beside it",
            {"limits": {"memory": "64Gi"}},
            {"cpu": "1", "nvidia.com/gpu": "1"},
        ),
    ],
)
def test_cpu_and_memory_requests_default_so_replicas_are_not_best_effort(
    case: str, resources: dict[str, Any], requests: dict[str, str]
) -> None:
    pod = build(engine={"resources": resources})
    assert container(pod)["resources"]["requests"] == requests, case


def test_without_default_requests_only_the_gpus_are_requested() -> None:
    md = make_md()
    pod = build_replica_pod(md, 1, PLACED, defaults=PodDefaults(image=IMAGE), template_hash="h")
    assert container(pod)["resources"]["requests"] == {"nvidia.com/gpu": "1"}


def test_the_platform_may_choose_the_uid() -> None:
    # OpenShift's restricted SCC assigns a uid from the namespace's range and refuses a fixed one.
    md = make_md()
    defaults = PodDefaults(image=IMAGE, run_as_user=None)
    context = build_replica_pod(md, 1, PLACED, defaults=defaults, template_hash="h")["spec"][
        "securityContext"
    ]
    assert context == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    fixed = build()["spec"]["securityContext"]
    assert (fixed["runAsUser"], fixed["runAsGroup"], fixed["fsGroup"]) == (1000, 1000, 1000)


def test_shared_replicas_run_under_the_runtime_that_reads_visible_devices() -> None:
    shared = {"sharing": "Shared", "memory": "20Gi"}
    assert build(gpu=shared)["spec"]["runtimeClassName"] == "nvidia"
    # The spec's own choice wins; Exclusive replicas get the device plugin's GPUs, no class.
    own = build(gpu=shared, engine={"runtimeClassName": "nvidia-cdi"})
    assert own["spec"]["runtimeClassName"] == "nvidia-cdi"
    assert "runtimeClassName" not in build(gpu={"count": 1})["spec"]


def test_extra_volumes_are_mounted_beside_the_replicas_own() -> None:
    pod = build(
        engine={
            "volumes": [
                {"name": "adapters", "persistentVolumeClaim": {"claimName": "lora"}},
                {"name": "templates", "configMap": {"name": "chat-templates"}},
            ],
            "volumeMounts": [
                {"name": "adapters", "mountPath": "/adapters", "readOnly": True},
                {"name": "templates", "mountPath": "/templates"},
            ],
        }
    )
    volumes = pod["spec"]["volumes"]
    assert [v["name"] for v in volumes] == ["shm", "cache", "tmp", "adapters", "templates"]
    assert volumes[3] == {"name": "adapters", "persistentVolumeClaim": {"claimName": "lora"}}
    assert volumes[4] == {"name": "templates", "configMap": {"name": "chat-templates"}}
    assert container(pod)["volumeMounts"][3:] == [
        {"name": "adapters", "mountPath": "/adapters", "readOnly": True},
        {"name": "templates", "mountPath": "/templates"},
    ]


def test_new_engine_fields_left_unset_keep_the_template_hash() -> None:
    # An operator upgrade must not roll replicas whose spec did not change.
    plain = compute_template_hash(make_md(), IMAGE)
    assert compute_template_hash(make_md(engine={"imagePullSecrets": []}), IMAGE) == plain
    assert compute_template_hash(make_md(engine={"volumes": []}), IMAGE) == plain
    assert compute_template_hash(make_md(engine={"runtimeClassName": "nvidia"}), IMAGE) != plain


@pytest.mark.parametrize(
    ("footprint", "total", "expected"),
    [(20480, 81559, 0.26), (8192, 23034, 0.36), (81559, 81559, 0.95), (1, 81559, 0.01)],
)
def test_gpu_memory_utilization(footprint: int, total: int, expected: float) -> None:
    assert compute_gpu_memory_utilization(footprint, total) == expected


def test_template_hash_follows_engine_spec_only() -> None:
    base = compute_template_hash(make_md(replicas=1), IMAGE)
    assert compute_template_hash(make_md(replicas=5), IMAGE) == base
    assert compute_template_hash(make_md(priority=9), IMAGE) == base
    assert compute_template_hash(make_md(engine={"args": ["--x"]}), IMAGE) != base
    assert compute_template_hash(make_md(), "other:image") != base


def test_service_selects_the_replicas() -> None:
    svc = build_service(make_md())
    assert svc["metadata"]["name"] == "gemma"
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == selector_labels("gemma")
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # Every replica Pod carries every selector label.
    pod_labels = build()["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
