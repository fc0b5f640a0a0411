"""ModelDeployment models: defaults, the examples, and every invalid case with its message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from api_documents import INVALID, VALID, Invalid, error_paths, pydantic_blames
from modelfleet.api import ModelDeployment, ModelDeploymentSpec, parse_duration, quantity_to_mib
from modelfleet.api.crd import build_crd, render_crd_yaml
from modelfleet.api.v1alpha1 import (
    INSTANCE_INFIX,
    MAX_NAME_LENGTH,
    MAX_REPLICAS,
    EnvVar,
    GpuSpec,
    Toleration,
)

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def walk_crd() -> list[tuple[str, dict[str, Any]]]:
    """Every schema node of the generated CRD with its path."""
    out: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            out.append((path, node))
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
    return out


def spec(**fields: Any) -> dict[str, Any]:
    return {"model": "google/gemma-3-4b-it", **fields}


def test_defaults_are_applied() -> None:
    parsed = ModelDeploymentSpec.model_validate(spec())
    assert parsed.replicas == 1
    assert parsed.min_replicas == 0
    assert parsed.gpu.count == 1
    assert parsed.gpu.sharing == "Exclusive"
    assert parsed.engine.port == 8000
    assert parsed.placement.strategy is None
    assert parsed.priority == 0


def test_camel_case_round_trip() -> None:
    parsed = ModelDeploymentSpec.model_validate(
        spec(servedModelName="gemma3-4B", minReplicas=1, replicas=2, idleTimeout="30m")
    )
    dumped = parsed.model_dump(by_alias=True, exclude_none=True)
    assert dumped["servedModelName"] == "gemma3-4B"
    assert dumped["minReplicas"] == 1
    assert ModelDeploymentSpec.model_validate(dumped) == parsed


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        md = ModelDeployment.model_validate(doc)
        assert md.spec.replicas >= md.spec.min_replicas


def test_gemma_example_is_the_original_requirement() -> None:
    doc = yaml.safe_load((EXAMPLES[0].parent / "gemma3-4b.yaml").read_text())
    md = ModelDeployment.model_validate(doc)
    assert md.served_name == "gemma3-4B"
    assert md.spec.replicas == 2


def test_served_name_defaults_to_object_name() -> None:
    md = ModelDeployment.model_validate({"metadata": {"name": "qwen"}, "spec": spec()})
    assert md.served_name == "qwen"


@pytest.mark.parametrize(
    ("fields", "field_name", "words"),
    [
        pytest.param(
            {"replicas": -1}, "replicas", "greater than or equal to 0", id="negative-replicas"
        ),
        pytest.param(
            {"replicas": 1, "minReplicas": 2},
            "",
            "spec.minReplicas (2) must not exceed",
            id="min-above-replicas",
        ),
        pytest.param(
            {"gpu": {"sharing": "Shared"}},
            "gpu",
            "spec.gpu.memory is required",
            id="shared-without-memory",
        ),
        pytest.param(
            {"placement": {"strategy": "Fastest"}},
            "placement.strategy",
            "Availability",
            id="unknown-strategy",
        ),
        pytest.param(
            {"gpu": {"memory": "24 gigs"}},
            "gpu.memory",
            "not a Kubernetes quantity",
            id="bad-quantity",
        ),
        pytest.param({"gpu": {"memory": "-2Gi"}}, "gpu.memory", "negative", id="negative-quantity"),
        pytest.param(
            {"replica": 2}, "replica", "Extra inputs are not permitted", id="unknown-field"
        ),
        pytest.param(
            {"gpu": {"count": 0}}, "gpu.count", "greater than or equal to 1", id="zero-gpus"
        ),
        pytest.param({"idleTimeout": "soon"}, "idleTimeout", "not a duration", id="bad-duration"),
    ],
)
def test_invalid_spec_names_the_field(fields: dict[str, Any], field_name: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ModelDeploymentSpec.model_validate(spec(**fields))
    errors = caught.value.errors()
    locs = {".".join(str(p) for p in err["loc"]) for err in errors}
    assert any(loc.startswith(field_name) for loc in locs), locs
    assert words in str(caught.value)


def test_missing_model_is_refused() -> None:
    with pytest.raises(ValidationError, match="model"):
        ModelDeploymentSpec.model_validate({"replicas": 1})


def test_name_must_be_a_dns_label() -> None:
    with pytest.raises(ValidationError, match="must be a DNS label"):
        ModelDeployment.model_validate({"metadata": {"name": "Gemma_3"}, "spec": spec()})


@pytest.mark.parametrize(
    ("quantity", "mib"),
    [
        ("24Gi", 24576),
        ("16000Mi", 16000),
        (1048576, 1),
        ("1G", 954),
        ("1.5Gi", 1536),
        ("2e9", 1908),
    ],
)
def test_quantity_to_mib(quantity: int | str, mib: int) -> None:
    assert quantity_to_mib(quantity) == mib


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h30m", 5400), ("500ms", 0.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("case", INVALID)
def test_shared_invalid_documents_are_refused_naming_the_field(case: Invalid) -> None:
    # The integration tier feeds the same documents to the API server with the generated CRD.
    with pytest.raises(ValidationError) as caught:
        ModelDeployment.model_validate(case.doc)
    assert pydantic_blames(caught.value, case.field), (error_paths(caught.value), caught.value)


@pytest.mark.parametrize("doc", VALID)
def test_shared_valid_documents_are_accepted(doc: dict[str, Any]) -> None:
    ModelDeployment.model_validate(doc)


def test_name_limit_keeps_every_replica_pod_name_within_a_dns_label() -> None:
    longest = "a" * MAX_NAME_LENGTH + INSTANCE_INFIX + str(MAX_REPLICAS)
    assert len(longest) == 63
    ModelDeployment.model_validate({"metadata": {"name": "a" * MAX_NAME_LENGTH}, "spec": spec()})


@pytest.mark.parametrize(
    ("memory", "words"),
    [("-5Gi", "is negative"), ("0", "is zero"), (0, "is zero"), ("24Gi\n", "not a Kubernetes")],
)
def test_gpu_memory_must_be_more_than_zero(memory: int | str, words: str) -> None:
    with pytest.raises(ValidationError, match=words) as caught:
        ModelDeploymentSpec.model_validate(spec(gpu={"memory": memory}))
    assert error_paths(caught.value) == ["gpu.memory"]


def test_every_model_invariant_is_a_cel_rule_in_the_crd() -> None:
    crd = render_crd_yaml()
    models = [GpuSpec, ModelDeploymentSpec, ModelDeployment, Toleration, EnvVar]
    invariants = [inv for model in models for inv in model.invariants]
    assert len(invariants) >= 6
    for inv in invariants:
        rules = [
            r["rule"] for _, node in walk_crd() for r in node.get("x-kubernetes-validations", [])
        ]
        assert inv.cel in rules, inv.cel
    assert "{field}" not in crd
