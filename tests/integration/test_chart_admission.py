"""The chart's ValidatingAdmissionPolicies on the real API server: the gateway's ServiceAccount
(impersonated) writes its usage annotations and is refused anything else; spec.priority stays
under the ceiling its namespace was granted.

The local cluster's CRD is applied by hack/cluster.sh, so the releases here use
`crds.enabled=false`. A policy takes effect a moment after it is created (the API server
compiles it in the background), so each test first waits until a write it must refuse is
refused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from clusterkit import ROOT, Cluster, helm, kubectl, wait_for

from modelfleet.api import labels
from modelfleet.api.held import HELD_PREFIX, held_key
from modelfleet.kube.client import ApiError, KubeClient

pytestmark = pytest.mark.integration

CHART = ROOT / "charts" / "modelfleet"
MD_PATH = "/apis/modelfleet.io/v1alpha1/namespaces/{ns}/modeldeployments"
MAX_PRIORITY = "modelfleet.io/max-priority"


def md(name: str, priority: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": name,
            "labels": {"team": "a"},
            "annotations": {"owner": "team-a"},
        },
        # No replicas: nothing needs to run for admission to be tested.
        "spec": {"model": "google/gemma-3-4b-it", "replicas": 0, "priority": priority},
    }


@pytest.fixture
async def release(cluster: Cluster, namespace: str) -> AsyncIterator[str]:
    name = f"mf{uuid.uuid4().hex[:6]}"
    yield name
    await helm(cluster, "uninstall", name, "-n", namespace, "--wait", check=False)


async def patch_as(
    cluster: Cluster, who: str, namespace: str, name: str, patch: dict[str, Any]
) -> tuple[bool, str]:
    """kubectl patch (merge) as `who`; (accepted, what kubectl said)."""
    done = await kubectl(
        cluster,
        "patch",
        "modeldeployment",
        name,
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        json.dumps(patch),
        "--as",
        who,
        check=False,
    )
    return done.returncode == 0, done.stdout + done.stderr


async def test_gateway_writes_its_usage_annotations_and_nothing_else(
    cluster: Cluster, kube: KubeClient, namespace: str, release: str
) -> None:
    await helm(
        cluster,
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        values={"crds": {"enabled": False}, "watchNamespaces": [namespace]},
    )
    await kube.create(MD_PATH.format(ns=namespace), md("gemma"))
    gateway = f"system:serviceaccount:{namespace}:{release}-modelfleet-gateway"

    tries = iter(range(1, 1000))

    async def spec_refused() -> str:
        # A new value every time: a patch that changes nothing is no change to refuse.
        patch = {"spec": {"replicas": next(tries)}}
        accepted, said = await patch_as(cluster, gateway, namespace, "gemma", patch)
        return "" if accepted else said

    said = await wait_for(spec_refused, 30, interval=0.5, what="the policy to refuse the gateway")
    assert f"ValidatingAdmissionPolicy '{release}-modelfleet-gateway-usage-only'" in said
    assert (
        f"the gateway ({release}-modelfleet-gateway) may change only the annotations "
        f"{labels.ANN_LAST_REQUEST}, {labels.ANN_DEMAND} and {HELD_PREFIX}* on a "
        "ModelDeployment, not its spec or status"
    ) in said

    # Each gateway replica's held-request count goes beside the usage annotations...
    held = {held_key("gw-a"): "3 2026-12-04T10:00:00.000Z", held_key("gw-b"): "1 x"}
    usage = {labels.ANN_LAST_REQUEST: "2026-12-04T10:00:00.000Z", labels.ANN_DEMAND: "now"}
    accepted, said = await patch_as(
        cluster, gateway, namespace, "gemma", {"metadata": {"annotations": usage | held}}
    )
    assert accepted, said
    # ...and is removed by it when nothing is held.
    gone = {held_key("gw-b"): None}
    accepted, said = await patch_as(
        cluster, gateway, namespace, "gemma", {"metadata": {"annotations": gone}}
    )
    assert accepted, said
    before = await kube.get(f"{MD_PATH.format(ns=namespace)}/gemma")
    assert before["metadata"]["annotations"] == {
        "owner": "team-a",
        **usage,
        held_key("gw-a"): held[held_key("gw-a")],
    }

    refused = {
        "another annotation": {"metadata": {"annotations": {labels.ANN_BALANCING: "x"}}},
        "an annotation removed": {"metadata": {"annotations": {"owner": None}}},
        "a label": {"metadata": {"labels": {"team": "b"}}},
        "a finalizer": {"metadata": {"finalizers": ["example.com/hold"]}},
        "the priority": {"spec": {"priority": 1000}},
    }
    for what, patch in refused.items():
        accepted, said = await patch_as(cluster, gateway, namespace, "gemma", patch)
        assert not accepted, f"the gateway changed {what}"
        assert "may change only the annotations" in said, said
    after = await kube.get(f"{MD_PATH.format(ns=namespace)}/gemma")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # Only the gateway is bound: anyone else with the rights still changes the spec.
    await kube.patch(f"{MD_PATH.format(ns=namespace)}/gemma", {"spec": {"replicas": 0}})
    obj = await kube.get(f"{MD_PATH.format(ns=namespace)}/gemma")
    assert obj["spec"]["replicas"] == 0


async def create(kube: KubeClient, namespace: str, name: str, priority: int) -> str:
    """Create a ModelDeployment; the refusal's message, or "" when it was created."""
    try:
        await kube.create(MD_PATH.format(ns=namespace), md(name, priority))
    except ApiError as exc:
        if exc.conflict:  # a name taken: the test's own mistake, not a refusal
            raise
        return str(exc)
    return ""


async def refusal(kube: KubeClient, namespace: str, priority: int) -> str:
    """Try a throwaway ModelDeployment at `priority`: the refusal's message, "" if created."""
    name = f"probe-{uuid.uuid4().hex[:8]}"
    said = await create(kube, namespace, name, priority)
    if not said:
        await kube.delete(f"{MD_PATH.format(ns=namespace)}/{name}")
    return said


async def test_priority_stays_under_the_ceiling_of_its_namespace(
    cluster: Cluster, kube: KubeClient, namespace: str, release: str
) -> None:
    other = f"t-prio-{uuid.uuid4().hex[:10]}"
    await kube.create("/api/v1/namespaces", {"metadata": {"name": other}})
    try:
        await helm(
            cluster,
            "install",
            release,
            str(CHART),
            "-n",
            namespace,
            values={
                "crds": {"enabled": False},
                "watchNamespaces": [namespace],
                "gateway": {"enabled": False},
                "admissionPolicies": {
                    "priorityLimit": {
                        "enabled": True,
                        "defaultMax": 5,
                        # This test's namespace only: other tests' deployments are not held to
                        # the ceiling while it runs.
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": namespace}
                        },
                    }
                },
            },
        )
        said = await wait_for(
            lambda: refusal(kube, namespace, 10),
            30,
            interval=0.5,
            what="the policy to refuse priority 10",
        )
        assert (
            f"spec.priority 10 is above 5, the highest namespace {namespace} may use (it has no "
            "label modelfleet.io/max-priority, so the chart value "
            "admissionPolicies.priorityLimit.defaultMax); lower spec.priority"
        ) in said
        assert await create(kube, namespace, "at-default", 5) == ""
        # Namespaces the selector leaves out are not limited.
        assert await create(kube, other, "elsewhere", 900) == ""

        # A cluster admin grants the namespace more.
        ns_path = f"/api/v1/namespaces/{namespace}"
        await kube.patch(ns_path, {"metadata": {"labels": {MAX_PRIORITY: "20"}}})

        async def accepted(priority: int) -> bool:
            return await refusal(kube, namespace, priority) == ""

        await wait_for(
            lambda: accepted(10), 30, interval=0.5, what="the namespace's label to be seen"
        )
        assert await create(kube, namespace, "granted", 10) == ""
        md_path = f"{MD_PATH.format(ns=namespace)}/granted"
        with pytest.raises(ApiError) as info:
            await kube.patch(md_path, {"spec": {"priority": 30}})
        assert "spec.priority 30 is above 20" in str(info.value)
        assert "(its label modelfleet.io/max-priority)" in str(info.value)

        # Lowered later: deployments above it keep working, only raising is refused.
        await kube.patch(ns_path, {"metadata": {"labels": {MAX_PRIORITY: "3"}}})
        await wait_for(
            lambda: refusal(kube, namespace, 4),
            30,
            interval=0.5,
            what="the lowered label to be seen",
        )
        await kube.patch(md_path, {"spec": {"replicas": 1}})
        await kube.patch(md_path, {"metadata": {"annotations": {labels.ANN_DEMAND: "now"}}})
        with pytest.raises(ApiError):
            await kube.patch(md_path, {"spec": {"priority": 11}})
        await kube.patch(md_path, {"spec": {"priority": 2}})
    finally:
        await kube.delete(f"/api/v1/namespaces/{other}")
