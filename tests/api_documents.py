"""ModelDeployment documents that the API models and the API server must judge alike.

The unit tier feeds them to the pydantic models; the integration tier feeds the same list to the
models and to a real kube-apiserver with the generated CRD, and expects both to agree.
Each invalid document names the field (as the API server writes its path) that must be blamed.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import pytest
from pydantic import ValidationError

MODEL = "google/gemma-3-4b-it"


def document(
    spec: dict[str, Any] | None = None, name: str = "doc", *, model: bool = True
) -> dict[str, Any]:
    """A ModelDeployment called `name` with `spec` (and a model id unless `model` is False)."""
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": ({"model": MODEL} if model else {}) | (spec or {}),
    }


class Invalid(NamedTuple):
    doc: dict[str, Any]
    field: str  # the path the API server blames, e.g. spec.gpu.memory


def _case(case_id: str, doc: dict[str, Any], field: str) -> Any:
    return pytest.param(Invalid(doc, field), id=case_id)


def _toleration(**fields: Any) -> dict[str, Any]:
    return {"placement": {"tolerations": [fields]}}


INVALID = [
    # metadata.name: the Service is <name> (DNS-1035), replica Pods <name>-instance-<n>.
    _case("name-100-characters", document(name="a" * 100), "metadata.name"),
    _case("name-51-characters", document(name="a" * 51), "metadata.name"),
    _case("name-dotted", document(name="gemma.3-4b"), "metadata.name"),
    _case("name-leading-digit", document(name="3b-model"), "metadata.name"),
    _case("name-uppercase", document(name="Gemma"), "metadata.name"),
    # Quantities: int-or-string, the sign checked by CEL.
    _case("memory-negative", document({"gpu": {"memory": "-5Gi"}}), "spec.gpu.memory"),
    _case("memory-negative-integer", document({"gpu": {"memory": -1}}), "spec.gpu.memory"),
    _case("memory-zero", document({"gpu": {"memory": "0Gi"}}), "spec.gpu.memory"),
    _case("memory-zero-integer", document({"gpu": {"memory": 0}}), "spec.gpu.memory"),
    _case("memory-malformed", document({"gpu": {"memory": "20 gigs"}}), "spec.gpu.memory"),
    _case("memory-trailing-space", document({"gpu": {"memory": "20Gi "}}), "spec.gpu.memory"),
    _case("memory-too-long", document({"gpu": {"memory": "1" * 65}}), "spec.gpu.memory"),
    _case(
        "cpu-request-negative",
        document({"engine": {"resources": {"requests": {"cpu": "-1"}}}}),
        "spec.engine.resources.requests[cpu]",
    ),
    _case(
        "memory-limit-malformed",
        document({"engine": {"resources": {"limits": {"memory": "lots"}}}}),
        "spec.engine.resources.limits[memory]",
    ),
    # Numeric ranges.
    _case("replicas-negative", document({"replicas": -1}), "spec.replicas"),
    _case("replicas-above-999", document({"replicas": 1000}), "spec.replicas"),
    _case("min-replicas-negative", document({"minReplicas": -1}), "spec.minReplicas"),
    _case("gpu-count-zero", document({"gpu": {"count": 0}}), "spec.gpu.count"),
    _case("gpu-count-65", document({"gpu": {"count": 65}}), "spec.gpu.count"),
    _case("priority-above-1000", document({"priority": 1001}), "spec.priority"),
    _case("port-zero", document({"engine": {"port": 0}}), "spec.engine.port"),
    _case("port-above-65535", document({"engine": {"port": 65536}}), "spec.engine.port"),
    # Strings: lengths and forms.
    _case("model-missing", document(model=False), "spec.model"),
    _case("model-empty", document({"model": ""}), "spec.model"),
    _case("model-too-long", document({"model": "m" * 513}), "spec.model"),
    _case("served-name-too-long", document({"servedModelName": "s" * 257}), "spec.servedModelName"),
    _case("idle-timeout-word", document({"idleTimeout": "soon"}), "spec.idleTimeout"),
    _case("idle-timeout-no-unit", document({"idleTimeout": "30"}), "spec.idleTimeout"),
    _case("idle-timeout-too-long", document({"idleTimeout": "1s" * 33}), "spec.idleTimeout"),
    _case(
        "too-many-resources",
        document({"engine": {"resources": {"limits": {f"r{i}": 1 for i in range(33)}}}}),
        "spec.engine.resources.limits",
    ),
    _case(
        "too-many-tolerations",
        document({"placement": {"tolerations": [{"operator": "Exists"}] * 65}}),
        "spec.placement.tolerations",
    ),
    _case("product-with-space", document({"gpu": {"product": "NVIDIA H100"}}), "spec.gpu.product"),
    _case("product-too-long", document({"gpu": {"product": "x" * 64}}), "spec.gpu.product"),
    _case(
        "node-selector-value-not-a-label-value",
        document({"placement": {"nodeSelector": {"zone": "a b"}}}),
        "spec.placement.nodeSelector.zone",
    ),
    _case(
        "env-name-empty", document({"engine": {"env": [{"name": ""}]}}), "spec.engine.env[0].name"
    ),
    # Enums.
    _case(
        "strategy-unknown",
        document({"placement": {"strategy": "Fastest"}}),
        "spec.placement.strategy",
    ),
    _case("sharing-unknown", document({"gpu": {"sharing": "Half"}}), "spec.gpu.sharing"),
    _case(
        "toleration-operator-unknown",
        document(_toleration(key="gpu", operator="Lt", value="3")),
        "spec.placement.tolerations[0].operator",
    ),
    _case(
        "toleration-effect-unknown",
        document(_toleration(key="gpu", effect="NoRun")),
        "spec.placement.tolerations[0].effect",
    ),
    # Rules across fields.
    _case("min-above-replicas", document({"replicas": 1, "minReplicas": 2}), "spec.minReplicas"),
    _case(
        "autoscaling-without-max",
        document({"autoscaling": {"enabled": True}}),
        "spec.autoscaling.maxReplicas",
    ),
    _case(
        "autoscaling-min-above-max",
        document({"autoscaling": {"minReplicas": 4, "maxReplicas": 2}}),
        "spec.autoscaling.minReplicas",
    ),
    _case(
        "autoscaling-below-eviction-floor",
        document(
            {
                "replicas": 3,
                "minReplicas": 3,
                "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8},
            }
        ),
        "spec.autoscaling.minReplicas",
    ),
    _case(
        "autoscaling-min-zero",
        document({"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}),
        "spec.autoscaling.minReplicas",
    ),
    _case(
        "autoscaling-target-zero",
        document({"autoscaling": {"targetPerReplica": 0}}),
        "spec.autoscaling.targetPerReplica",
    ),
    _case(
        "autoscaling-window-word",
        document({"autoscaling": {"scaleDownWindow": "later"}}),
        "spec.autoscaling.scaleDownWindow",
    ),
    _case(
        "shared-without-memory",
        document({"gpu": {"sharing": "Shared"}}),
        "spec.gpu.memory",
    ),
    _case(
        "toleration-key-not-a-label-key",
        document(_toleration(key="nvidia.com/gpu type", operator="Exists")),
        "spec.placement.tolerations[0].key",
    ),
    _case(
        "toleration-without-key-not-exists",
        document(_toleration(operator="Equal", value="x")),
        "spec.placement.tolerations[0].operator",
    ),
    _case(
        "toleration-exists-with-value",
        document(_toleration(key="gpu", operator="Exists", value="x")),
        "spec.placement.tolerations[0].value",
    ),
    _case(
        "toleration-seconds-without-no-execute",
        document(_toleration(key="gpu", operator="Exists", tolerationSeconds=30)),
        "spec.placement.tolerations[0].effect",
    ),
    _case(
        "env-value-and-value-from",
        document(
            {
                "engine": {
                    "env": [
                        {
                            "name": "TOKEN",
                            "value": "x",
                            "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                        }
                    ]
                }
            }
        ),
        "spec.engine.env[0].valueFrom",
    ),
    # Extra volumes: the replica's own names and paths are taken; mounts name a volume.
    _case(
        "volume-named-cache",
        document({"engine": {"volumes": [{"name": "cache", "emptyDir": {}}]}}),
        "spec.engine.volumes[0].name",
    ),
    _case(
        "volume-name-uppercase",
        document({"engine": {"volumes": [{"name": "Data", "emptyDir": {}}]}}),
        "spec.engine.volumes[0].name",
    ),
    _case(
        "volume-names-twice",
        document({"engine": {"volumes": [{"name": "a", "emptyDir": {}}] * 2}}),
        "spec.engine.volumes",
    ),
    _case(
        "volume-mount-without-volume",
        document({"engine": {"volumeMounts": [{"name": "a", "mountPath": "/a"}]}}),
        "spec.engine.volumeMounts",
    ),
    _case(
        "volume-mount-on-cache",
        document(
            {
                "engine": {
                    "volumes": [{"name": "a", "emptyDir": {}}],
                    "volumeMounts": [{"name": "a", "mountPath": "/cache/"}],
                }
            }
        ),
        "spec.engine.volumeMounts[0].mountPath",
    ),
    _case(
        "volume-mount-relative",
        document(
            {
                "engine": {
                    "volumes": [{"name": "a", "emptyDir": {}}],
                    "volumeMounts": [{"name": "a", "mountPath": "data"}],
                }
            }
        ),
        "spec.engine.volumeMounts[0].mountPath",
    ),
    _case(
        "hold-timeout-not-a-duration",
        document({"routing": {"holdTimeout": "soon"}}),
        "spec.routing.holdTimeout",
    ),
    # Fields the schema does not know (the API server refuses them with fieldValidation=Strict).
    _case("unknown-field", document({"replicaz": 2}), "spec.replicaz"),
]

VALID = [
    pytest.param(document(name="a" * 50), id="name-50-characters"),
    pytest.param(document(name="m-1"), id="name-with-digit-and-dash"),
    pytest.param(document({"replicas": 999, "minReplicas": 999}), id="replicas-999"),
    pytest.param(document({"replicas": 0}), id="replicas-zero"),
    pytest.param(document({"gpu": {"memory": 1}}), id="memory-integer"),
    pytest.param(document({"gpu": {"memory": "0.5Gi"}}), id="memory-fraction"),
    pytest.param(document({"gpu": {"memory": "+20G"}}), id="memory-plus-sign"),
    pytest.param(document({"gpu": {"memory": "2e9"}}), id="memory-exponent"),
    pytest.param(
        document({"gpu": {"count": 2, "memory": "20Gi", "sharing": "Shared"}}),
        id="shared-with-memory",
    ),
    pytest.param(
        document({"gpu": {"count": 64, "product": "NVIDIA-H100-80GB-HBM3"}}), id="gpu-product"
    ),
    pytest.param(
        document({"engine": {"resources": {"requests": {"cpu": "0", "memory": 0}}}}),
        id="zero-requests",
    ),
    pytest.param(
        document({"engine": {"resources": {"limits": {"cpu": "500m", "memory": "16Gi"}}}}),
        id="limits",
    ),
    pytest.param(document({"idleTimeout": "1h30m"}), id="idle-timeout"),
    pytest.param(document({"routing": {"holdTimeout": "45m"}}), id="hold-timeout"),
    pytest.param(
        document(
            {
                "minReplicas": 1,
                "idleTimeout": "10m",
                "autoscaling": {
                    "enabled": True,
                    "minReplicas": 1,
                    "maxReplicas": 8,
                    "targetPerReplica": 16,
                    "scaleUpWindow": "0s",
                    "scaleDownWindow": "5m",
                },
            }
        ),
        id="autoscaling",
    ),
    pytest.param(document({"autoscaling": {"enabled": False}}), id="autoscaling-off"),
    pytest.param(document({"gpu": {"memory": "1" * 64}}), id="memory-64-characters"),
    pytest.param(document({"priority": -1000}), id="priority-lowest"),
    pytest.param(
        document(
            {
                "placement": {
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100", "empty": ""},
                    "tolerations": [
                        {"operator": "Exists"},
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {
                            "key": "example.com/maintenance",
                            "value": "yes",
                            "effect": "NoExecute",
                            "tolerationSeconds": 60,
                        },
                    ],
                }
            }
        ),
        id="tolerations",
    ),
    pytest.param(
        document(
            {
                "engine": {
                    "env": [
                        {"name": "A", "value": "1"},
                        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                        {"name": "C", "value": "", "valueFrom": {"fieldRef": {"fieldPath": "x"}}},
                    ]
                }
            }
        ),
        id="env",
    ),
    pytest.param(
        document(
            {
                "engine": {
                    "volumes": [
                        {"name": "adapters", "persistentVolumeClaim": {"claimName": "lora"}},
                        {"name": "config", "configMap": {"name": "chat-templates"}},
                    ],
                    "volumeMounts": [
                        {"name": "adapters", "mountPath": "/adapters", "readOnly": True},
                        {"name": "config", "mountPath": "/templates", "subPath": "v2"},
                    ],
                }
            }
        ),
        id="extra-volumes",
    ),
]


def error_paths(error: ValidationError) -> list[str]:
    """Each error's location written as the API server writes field paths."""
    paths = []
    for err in error.errors():
        path = ""
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        paths.append(path)
    return paths


def pydantic_blames(error: ValidationError, field: str) -> bool:
    """True when the models' error names `field`: by its location, or (for a rule of an enclosing
    object, reported at that object) by its name in the message."""
    # pydantic's location does not tell a map key from a field: requests[cpu] is requests.cpu.
    field = re.sub(r"\[([^0-9\]][^\]]*)\]", r".\1", field)
    leaf = field.rsplit(".", 1)[-1]
    for path, err in zip(error_paths(error), error.errors(), strict=True):
        if path == field or path.startswith((f"{field}.", f"{field}[")):
            return True
        if field.startswith(path) and leaf in err["msg"]:
            return True
    return False
