"""Generated and hand-kept chart files agree with their sources: CRD, values docs, schema."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
import yaml
from chart_helpers import CHART, ROOT, VALUE_SETS
from jsonschema import Draft7Validator

from chartgen import (
    CRD_TEMPLATE,
    INSTALL_DOC,
    VALUES,
    parse_values_docs,
    render_chart_crd,
    render_install_doc,
)
from modelfleet.api.crd import build_crd, render_crd_yaml

SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def test_chart_crd_template_has_not_drifted() -> None:
    assert CRD_TEMPLATE.read_text() == render_chart_crd(render_crd_yaml()), (
        "the chart's CRD differs from the API models: run `make crds` and commit the result"
    )


def test_chart_crd_template_is_the_crd_behind_the_switches() -> None:
    text = CRD_TEMPLATE.read_text()
    assert text.startswith("{{- if .Values.crds.enabled }}\n")
    assert text.rstrip().endswith("{{- end }}")
    assert "{{- if .Values.crds.keep }}" in text
    assert "helm.sh/resource-policy: keep" in text
    # Everything from spec: on is the generated CRD's, byte for byte.
    crd = render_crd_yaml()
    assert crd[crd.index("\nspec:\n") :] in text


def test_chart_crd_refuses_template_braces() -> None:
    with pytest.raises(ValueError, match="reword the description"):
        render_chart_crd(render_crd_yaml().replace("vLLM model id", "{{ model }}"))


def test_every_value_is_documented_by_its_name() -> None:
    docs = parse_values_docs(VALUES.read_text())
    names = [d.name for d in docs]
    for expected in ("crds.enabled", "crds.keep", "parallelModels", "agent.auth.mode"):
        assert expected in names
    assert all(d.description for d in docs)


def test_undocumented_value_is_named() -> None:
    text = "# a -- A group.\na:\n  # a.b -- Documented.\n  b: 1\n  c: 2\n"
    with pytest.raises(ValueError, match=r"a\.c has no comment starting with '# a\.c -- '"):
        parse_values_docs(text)


def test_comment_naming_another_value_is_refused() -> None:
    with pytest.raises(ValueError, match="the comment above x names y"):
        parse_values_docs("# y -- Wrong name.\nx: 1\n")


def test_opaque_mapping_values_need_no_per_key_docs() -> None:
    docs = parse_values_docs("# r -- Resources.\nr:\n  requests:\n    cpu: 1\n")
    assert [(d.name, d.type, d.default) for d in docs] == [
        ("r", "object", '{"requests":{"cpu":1}}')
    ]


def test_install_doc_values_reference_is_current() -> None:
    current = INSTALL_DOC.read_text()
    assert current == render_install_doc(current, VALUES.read_text()), (
        "docs/install.md's values reference is out of date: run `make docs` and commit it"
    )


def _schema_at(schema: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    node = schema
    for part in path:
        if node.get("type") == "object" and "properties" not in node:
            return node  # an opaque mapping (e.g. modelDefaults.gpu): the CRD checks its contents
        props = node.get("properties", {})
        if part not in props:
            return None
        node = props[part]
        if "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_schema_knows_every_documented_value() -> None:
    for doc in parse_values_docs(VALUES.read_text()):
        parts = doc.name.split(".")
        if parts[0] == "modelAliases":
            continue  # a free map of names to model ids
        assert _schema_at(SCHEMA, parts) is not None, f"values.schema.json lacks {doc.name}"


def test_schema_is_strict_for_every_group() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, (
                f"{path or 'root'} admits unknown keys"
            )
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}".lstrip("."))

    walk(SCHEMA, "")
    for name, definition in SCHEMA["definitions"].items():
        walk(definition, name)


def test_schema_model_fields_are_the_crd_spec_fields() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    crd_fields = set(spec["properties"])
    defaults = set(SCHEMA["definitions"]["modelDefaults"]["properties"])
    entry = set(SCHEMA["definitions"]["modelEntry"]["properties"])
    assert defaults == crd_fields - {"model", "servedModelName"}
    assert entry == crd_fields | {"name", "labels", "annotations"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_value_sets_and_defaults_pass_the_schema(name: str) -> None:
    defaults = yaml.safe_load(VALUES.read_text())
    Draft7Validator(SCHEMA).validate(defaults)
    Draft7Validator(SCHEMA).validate(VALUE_SETS[name])


def test_schema_rejects_unknown_and_mistyped_values() -> None:
    validator = Draft7Validator(SCHEMA)
    bad = [
        {"operator": {"replica": 2}},
        {"agent": {"auth": {"mode": "password"}}},
        {"parallelModels": {"gemma3-4B": "two"}},
        {"parallelModels": {"gemma3-4B": {"replicas": 2, "gpus": 1}}},
        {"modelDefaults": {"model": "x"}},
        {"watchNamespaces": ["Team_A"]},
    ]
    for values in bad:
        assert list(validator.iter_errors(values)), f"schema accepted {values}"


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["kubeVersion"].startswith(">=1.28")
