"""Builds the ModelDeployment CustomResourceDefinition from the pydantic models.

The result is a structural schema as the API server wants it: every $ref inlined, no titles, no
`anyOf: [X, null]` for optional fields (an absent field is simply not required), quantities as
int-or-string, and the cross-field rules as CEL with messages that name the field.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from modelfleet.api.v1alpha1 import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
)

# CEL rules that span fields. Each message names the field so `kubectl apply` says what to fix.
# Every field a rule reads is guarded by has(): the API server also checks the rules against the
# schema's `default: {}` values, where the nested defaults are not filled in yet.
_SPEC_RULES = [
    {
        "rule": (
            "!has(self.minReplicas) || !has(self.replicas) || self.minReplicas <= self.replicas"
        ),
        "message": "spec.minReplicas must not exceed spec.replicas",
        "fieldPath": ".minReplicas",
        "reason": "FieldValueInvalid",
    },
]
_GPU_RULES = [
    {
        "rule": "!has(self.sharing) || self.sharing != 'Shared' || has(self.memory)",
        "message": "spec.gpu.memory is required when spec.gpu.sharing is Shared",
        "fieldPath": ".memory",
        "reason": "FieldValueRequired",
    },
]

_DROP_KEYS = {"title"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every $ref with its definition and make the schema structural."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        target.update(extra)
        return _inline(target, defs)
    any_of = node.get("anyOf")
    if isinstance(any_of, list) and any(option.get("type") == "null" for option in any_of):
        # Optional[X]: the field is optional through `required`; the schema is X's.
        rest = [option for option in any_of if option.get("type") != "null"]
        merged = {k: v for k, v in node.items() if k != "anyOf"}
        if len(rest) == 1:
            merged.update(rest[0])
        else:
            merged["anyOf"] = rest
        if merged.get("default", 0) is None:
            del merged["default"]
        return _inline(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: _inline(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _inline(value, defs)
    if out.get("additionalProperties") is False:
        # Structural schemas prune unknown fields; `false` is not allowed there.
        del out["additionalProperties"]
    if out.get("additionalProperties") is True:
        # A free-form object is said with x-kubernetes-preserve-unknown-fields instead.
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "anyOf" in out and out.get("x-kubernetes-int-or-string"):
        # int-or-string needs no "type" beside it, and the anyOf branches may carry only
        # the type and pattern (no defaults or descriptions).
        out.pop("type", None)
    if "properties" in out:
        out.setdefault("type", "object")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _schema_of(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    return dict(_inline(raw, raw.get("$defs", {})))


def build_openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the v1alpha1 version."""
    spec = _schema_of(ModelDeploymentSpec)
    spec["x-kubernetes-validations"] = _SPEC_RULES
    spec["properties"]["gpu"]["x-kubernetes-validations"] = _GPU_RULES
    # Defaults of nested objects: with `default: {}` the API server fills in their own defaults.
    for name in ("gpu", "placement", "engine"):
        spec["properties"][name]["default"] = {}
    spec["properties"]["engine"]["properties"]["resources"]["default"] = {}
    status = _schema_of(ModelDeploymentStatus)
    for prop in status["properties"].values():
        prop.pop("default", None)
    return {
        "type": "object",
        "description": (
            "ModelDeployment runs replicas of one LLM (vLLM servers) on GPU nodes, placed by "
            "live GPU availability."
        ),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {"app.kubernetes.io/part-of": "modelfleet"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["modelfleet"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": build_openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
                        {
                            "name": "Age",
                            "type": "date",
                            "jsonPath": ".metadata.creationTimestamp",
                        },
                    ],
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` (modelfleet crd) from operator/modelfleet/api. Do not edit.\n"


def render_crd_yaml() -> str:
    """The CRD as the YAML text committed under crds/."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)
