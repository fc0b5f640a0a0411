"""The committed CRD is exactly what the models generate, and it is a structural schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from modelfleet.api.crd import build_crd, render_crd_yaml
from modelfleet.cli import main

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "modelfleet.io_modeldeployments.yaml"


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out += walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += walk(value, f"{path}[{i}]")
    return out


def test_committed_crd_has_not_drifted() -> None:
    assert CRD_FILE.read_text() == render_crd_yaml(), "run `make crds` and commit the result"


def test_cli_prints_the_crd(capsys: Any) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == render_crd_yaml()


def test_schema_has_no_pydantic_artefacts() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "$ref" not in node, path
        assert "$defs" not in node, path
        assert "title" not in node, path
        assert node.get("type") != "null", path
        for option in node.get("anyOf", []):
            assert option.get("type") != "null", path
        assert node.get("additionalProperties") is not True, path


def test_quantities_are_int_or_string() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    memory = spec["properties"]["gpu"]["properties"]["memory"]
    assert memory["x-kubernetes-int-or-string"] is True
    assert "type" not in memory


def test_subresources_and_columns() -> None:
    version = build_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Model", "Replicas", "Ready", "Desired", "Status", "Reason", "Age"]
    # The autoscaler's desired count shows in the wide listing only.
    wide = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) > 0]
    assert wide == ["Desired"]
    assert "md" not in build_crd()["spec"]["names"]["shortNames"]


def test_cel_rules_name_the_field() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "spec.minReplicas" in spec["x-kubernetes-validations"][0]["message"]
    assert "spec.gpu.memory" in spec["properties"]["gpu"]["x-kubernetes-validations"][0]["message"]


def test_crd_yaml_is_one_document() -> None:
    docs = list(yaml.safe_load_all(CRD_FILE.read_text()))
    assert len(docs) == 1
    assert docs[0]["metadata"]["name"] == "modeldeployments.modelfleet.io"


def schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its field path (list items and map values [*])."""
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += schema_nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        out += schema_nodes(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        out += schema_nodes(node["additionalProperties"], f"{path}[*]")
    return out


def openapi_schema() -> dict[str, Any]:
    return dict(build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_every_cel_message_names_its_field() -> None:
    rules = 0
    for path, node in schema_nodes(openapi_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            rules += 1
            field = (path + rule.get("fieldPath", "")).lstrip(".").split("[")[0]
            assert field in rule["message"], (path, rule)
            assert list(rule)[:2] == ["rule", "message"], rule
    assert rules >= 10


def test_strings_that_cel_rules_read_are_bounded() -> None:
    # Without maxLength the API server estimates a rule's cost for a string as long as a whole
    # request; bounds keep the estimate far below its budget.
    for path, node in schema_nodes(openapi_schema()):
        reads_self = any(
            "self.matches" in rule["rule"] for rule in node.get("x-kubernetes-validations", [])
        )
        if reads_self:
            assert node.get("maxLength"), path
    metadata = openapi_schema()["properties"]["metadata"]["properties"]
    assert metadata["name"]["maxLength"] == 253


def test_name_rule_sits_at_the_root_and_blames_metadata_name() -> None:
    (rule,) = openapi_schema()["x-kubernetes-validations"]
    assert rule["fieldPath"] == ".metadata.name"
    assert "self.metadata.name.size() <= 50" in rule["rule"]
    assert "metadata.name must be a DNS label" in rule["message"]


def test_quantities_refuse_a_sign_through_cel_not_a_signed_pattern() -> None:
    spec = openapi_schema()["properties"]["spec"]
    memory = spec["properties"]["gpu"]["properties"]["memory"]
    assert "pattern" not in memory
    (rule,) = memory["x-kubernetes-validations"]
    assert rule["rule"].startswith("type(self) == int ? self > 0 :")
    assert "(\\+|-)?" not in rule["rule"].split("[eE]")[0]
