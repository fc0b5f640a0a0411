"""The chart's ValidatingAdmissionPolicies, as rendered: the gateway may write only its usage
annotations (on by default), and spec.priority may be capped per namespace (off by default).
What the API server makes of them is tested on the control plane
(tests/integration/test_chart_admission.py)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from chart_helpers import CHART, NAMESPACE, RELEASE, Render, find, one

from modelfleet.api import labels
from modelfleet.api.held import HELD_PREFIX

POLICY = "ValidatingAdmissionPolicy"
BINDING = "ValidatingAdmissionPolicyBinding"


def test_gateway_usage_policy_is_on_by_default_and_binds_to_its_service_account(
    render: Render,
) -> None:
    objects = render()
    policy = one(objects, POLICY, "-gateway-usage-only")
    binding = one(objects, BINDING, "-gateway-usage-only")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["modelfleet.io"]
    assert rule["operations"] == ["UPDATE"]
    account = one(objects, "ServiceAccount", "-gateway")["metadata"]["name"]
    (condition,) = spec["matchConditions"]
    assert condition["expression"] == (
        f'request.userInfo.username == "system:serviceaccount:{NAMESPACE}:{account}"'
    )
    # The annotations it lets through are the ones the gateway writes, and no others.
    usage = next(v for v in spec["variables"] if v["name"] == "usage")["expression"]
    assert usage == f"['{labels.ANN_LAST_REQUEST}', '{labels.ANN_DEMAND}']"
    held = next(v for v in spec["variables"] if v["name"] == "held")["expression"]
    assert held == f"'{HELD_PREFIX}'"
    expressions = " ".join(v["expression"] for v in spec["validations"])
    assert "object.spec == oldObject.spec" in expressions
    assert "!has(request.subResource)" in expressions
    for field in ("labels", "finalizers", "ownerReferences"):
        assert f"object.metadata.{field}" in expressions
    assert "k.startsWith(variables.held)" in expressions
    for validation in spec["validations"]:
        assert validation["message"].startswith(
            f"the gateway ({account}) may change only the annotations {labels.ANN_LAST_REQUEST}, "
            f"{labels.ANN_DEMAND} and {HELD_PREFIX}* on a ModelDeployment"
        )


def test_gateway_usage_policy_follows_its_switches_and_service_account_name(
    render: Render,
) -> None:
    assert not find(render({"admissionPolicies": {"gatewayUsageOnly": False}}), POLICY)
    assert not find(render({"gateway": {"enabled": False}}), POLICY)
    named = render({"gateway": {"serviceAccount": {"name": "front-door"}}})
    (condition,) = one(named, POLICY, "-gateway-usage-only")["spec"]["matchConditions"]
    assert condition["expression"].endswith(f':{NAMESPACE}:front-door"')


def test_priority_limit_is_off_by_default(render: Render) -> None:
    assert not find(render(), POLICY, "-priority-limit")
    assert not find(render(), BINDING, "-priority-limit")


def test_priority_limit_reads_the_namespace_label_and_the_default(render: Render) -> None:
    values: dict[str, Any] = {
        "admissionPolicies": {
            "priorityLimit": {
                "enabled": True,
                "defaultMax": -5,
                "namespaceSelector": {"matchLabels": {"tenant": "yes"}},
            }
        }
    }
    objects = render(values)
    policy = one(objects, POLICY, "-priority-limit")
    binding = one(objects, BINDING, "-priority-limit")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["matchResources"] == {
        "namespaceSelector": {"matchLabels": {"tenant": "yes"}}
    }
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["operations"] == ["CREATE", "UPDATE"]
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert "namespaceObject.metadata.labels" in variables["labels"]
    assert "'modelfleet.io/max-priority'" in variables["granted"]
    assert variables["limit"].endswith(": -5")
    assert "oldObject.spec.priority" in variables["unchanged"]
    (validation,) = policy["spec"]["validations"]
    assert "lower spec.priority" in validation["messageExpression"]
    # Without a selector the binding covers every namespace.
    unbound = render({"admissionPolicies": {"priorityLimit": {"enabled": True}}})
    assert "matchResources" not in one(unbound, BINDING, "-priority-limit")["spec"]


def test_priority_limit_default_outside_the_priority_range_is_refused(helm: str) -> None:
    for bad in (1001, -1001, "high"):
        values = {"admissionPolicies": {"priorityLimit": {"enabled": True, "defaultMax": bad}}}
        proc = subprocess.run(
            [helm, "template", RELEASE, str(CHART), "--values", "-"],
            input=json.dumps(values),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode != 0
        assert "/admissionPolicies/priorityLimit/defaultMax" in proc.stderr
