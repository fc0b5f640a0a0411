"""Builds the ModelDeployment CustomResourceDefinition from the pydantic models.

The result is a structural schema as the API server wants it: every $ref inlined, no titles, no
`anyOf: [X, null]` for optional fields (an absent field is simply not required), quantities as
int-or-string, and the models' invariants as CEL rules (x-kubernetes-validations) whose messages
name the field.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from modelfleet.api.rules import validations
from modelfleet.api.v1alpha1 import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
)

_DROP_KEYS = {"title", "$defs"}
# The order of the keys of an x-kubernetes-validations entry in the YAML, as people write them.
_RULE_KEYS = ("rule", "messageExpression", "message", "fieldPath", "reason")


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every $ref with its definition and make the schema structural."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _inline(_resolve_ref(node, defs), defs)
    any_of = node.get("anyOf")
    if isinstance(any_of, list) and any(option.get("type") == "null" for option in any_of):
        return _inline(_without_null(node, any_of), defs)
    out = {key: _inline_value(key, value, defs) for key, value in node.items()}
    return _make_structural({k: v for k, v in out.items() if k not in _DROP_KEYS})


def _inline_value(key: str, value: Any, defs: dict[str, Any]) -> Any:
    if key == "properties":
        # Field names, not keywords: a field may be called "title" or "enum".
        return {name: _inline(sub, defs) for name, sub in value.items()}
    return _inline(value, defs)


def _resolve_ref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The definition a $ref points at, with the keywords written beside the $ref on top."""
    target: dict[str, Any] = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def _without_null(node: dict[str, Any], any_of: list[Any]) -> dict[str, Any]:
    """Optional[X]: the field is optional through `required`; the schema is X's."""
    rest = [option for option in any_of if option.get("type") != "null"]
    merged = {k: v for k, v in node.items() if k != "anyOf"}
    if len(rest) == 1:
        merged.update(rest[0])
    else:
        merged["anyOf"] = rest
    if merged.get("default", 0) is None:
        del merged["default"]
    return merged


def _make_structural(out: dict[str, Any]) -> dict[str, Any]:
    """Fix the keywords of one (already inlined) node that structural schemas do not take."""
    additional = out.get("additionalProperties")
    if additional is False:
        # Structural schemas prune unknown fields; `false` is not allowed there.
        del out["additionalProperties"]
    elif additional is True:
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


def _name_fields(node: Any, path: str) -> None:
    """Put each node's path into its rules' messages ("{field}") and order the rule keys.

    List items and map values are written [*], as the API server writes them: env[0], limits[cpu].
    """
    if not isinstance(node, dict):
        return
    rules = node.get("x-kubernetes-validations")
    if rules:
        node["x-kubernetes-validations"] = [
            {key: rule[key].replace("{field}", path) for key in _RULE_KEYS if key in rule}
            for rule in rules
        ]
    for name, sub in node.get("properties", {}).items():
        _name_fields(sub, f"{path}.{name}" if path else name)
    _name_fields(node.get("items"), f"{path}[*]")
    _name_fields(node.get("additionalProperties"), f"{path}[*]")


def _schema_of(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    return dict(_inline(raw, raw.get("$defs", {})))


def build_openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the v1alpha1 version."""
    spec = _schema_of(ModelDeploymentSpec)
    # Defaults of nested objects: with `default: {}` the API server fills in their own defaults.
    for field in ("gpu", "placement", "engine"):
        spec["properties"][field]["default"] = {}
    spec["properties"]["engine"]["properties"]["resources"]["default"] = {}
    status = _schema_of(ModelDeploymentStatus)
    for prop in status["properties"].values():
        prop.pop("default", None)
    # Only name and generateName may be described under metadata. Their bound is ObjectMeta's own
    # (253); stated here, it keeps the cost the API server estimates for the name rule small.
    object_name: dict[str, Any] = {"type": "string", "maxLength": 253}
    schema: dict[str, Any] = {
        "type": "object",
        "description": (
            "ModelDeployment runs replicas of one LLM (vLLM servers) on GPU nodes, placed by "
            "live GPU availability."
        ),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "properties": {"name": object_name, "generateName": dict(object_name)},
            },
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
        **validations(*ModelDeployment.invariants),
    }
    _name_fields(schema, "")
    return schema


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
                        {
                            "name": "Desired",
                            "type": "integer",
                            "jsonPath": ".status.autoscaling.desiredReplicas",
                            "description": "Replicas the built-in autoscaler decided on.",
                            "priority": 1,
                        },
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
