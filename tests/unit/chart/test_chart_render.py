"""`helm lint` and `helm template` of the chart: valid objects, least privilege, the contracts.

Every rendered object is validated offline against the Kubernetes 1.36 schemas (strict: unknown
fields are errors); ModelDeployments against the generated CRD schema and the API models.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_helpers import CHART, NAMESPACE, RELEASE, ROOT, VALUE_SETS, Render, find, one, run_helm
from jsonschema import Draft7Validator

from modelfleet.api.crd import build_crd
from modelfleet.api.v1alpha1 import ModelDeployment
from modelfleet.settings import GatewaySettings

K8S_VERSION = "1.36.0"
CRD_SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
CLUSTER_SCOPED = {"nodes", "customresourcedefinitions", "namespaces", "tokenreviews"}
MD_API = "modelfleet.io/v1alpha1/ModelDeployment"


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# Volume kinds the restricted Pod Security Standard allows.
RESTRICTED_VOLUME_KINDS = {
    "emptyDir",
    "secret",
    "projected",
    "configMap",
    "downwardAPI",
    "ephemeral",
    "persistentVolumeClaim",
    "csi",
}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks the restricted Pod Security Standard (the checks of 1.36)."""
    out = restricted_pod_violations(spec)
    pod_sc = spec.get("securityContext", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        out += restricted_container_violations(c, pod_sc)
    return out


def restricted_pod_violations(spec: dict[str, Any]) -> list[str]:
    """The pod-level checks: volume kinds and host namespaces."""
    out: list[str] = []
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_KINDS:
            out.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUME_KINDS)}")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(field)
    return out


def restricted_container_violations(c: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    """The per-container checks; `pod_sc` supplies what the container does not set itself."""
    out: list[str] = []
    sc = c.get("securityContext", {})
    name = c["name"]
    if sc.get("privileged"):
        out.append(f"{name}: privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{name}: allowPrivilegeEscalation")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        out.append(f"{name}: capabilities not dropped")
    if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
        out.append(f"{name}: capabilities added")
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if non_root is not True:
        out.append(f"{name}: runAsNonRoot")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        out.append(f"{name}: runAsUser 0")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"{name}: seccompProfile")
    for port in c.get("ports", []):
        if port.get("hostPort"):
            out.append(f"{name}: hostPort")
    return out


# ---- lint and schema validation of every value set ----


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict(helm: str, name: str, tmp_path: Any) -> None:
    values = tmp_path / "values.json"
    values.write_text(json.dumps(VALUE_SETS[name]))
    proc = run_helm(helm, "lint", "--strict", str(CHART), "--values", str(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_are_valid_kubernetes(render: Render, name: str) -> None:
    objects = render(VALUE_SETS[name])
    assert objects
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "ModelDeployment":
            errors = sorted(e.message for e in Draft7Validator(CRD_SCHEMA).iter_errors(obj))
            assert not errors, f"{where}: {errors}"
            ModelDeployment.model_validate(obj)
        elif obj["kind"] == "ServiceMonitor":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert set(obj["spec"]) == {"selector", "namespaceSelector", "endpoints"}
        else:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is not a valid {K8S_VERSION} object: {exc.message}")


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_carries_the_standard_labels(render: Render, name: str) -> None:
    for obj in render(VALUE_SETS[name]):
        labels = obj["metadata"]["labels"]
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "modelfleet", where
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["app.kubernetes.io/version"] == "0.1.0", where
        assert labels["helm.sh/chart"] == "modelfleet-0.1.0", where
        if obj["kind"] not in ("CustomResourceDefinition",) and "default-deny" not in where:
            assert labels["app.kubernetes.io/component"], where


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator": {"replica": 2}}, "additional properties 'replica' not allowed"),
        ({"agent": {"auth": {"mode": "password"}}}, "/agent/auth/mode"),
        ({"parallelModels": {"gemma3-4B": "two"}}, "/parallelModels/gemma3-4B"),
        ({"parallelModels": {"x": {"gpus": 1}}}, "additional properties 'gpus' not allowed"),
        ({"parallelModels": {"+++": 1}}, '"+++" has no letter or digit'),
        ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
        ({"watchNamespaces": ["a", "b"]}, "/watchNamespaces"),
        ({"agent": {"platform": "eks"}}, "/agent/platform"),
        ({"agent": {"driverHostPath": "usr/lib"}}, "/agent/driverHostPath"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(
    helm: str, values: dict[str, Any], message: str
) -> None:
    proc = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--values", "-"],
        input=json.dumps(values),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode != 0
    assert message in proc.stderr


# ---- the CRD ----


def test_crd_is_rendered_behind_its_switches(render: Render) -> None:
    crd = one(render(), "CustomResourceDefinition", "modeldeployments.modelfleet.io")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["spec"] == build_crd()["spec"]
    unkept = one(render({"crds": {"keep": False}}), "CustomResourceDefinition", "modelfleet.io")
    assert "annotations" not in unkept["metadata"]
    assert not find(render({"crds": {"enabled": False}}), "CustomResourceDefinition")


# ---- RBAC ----


def rules_of(objects: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for obj in objects:
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj["rules"]:
                out.append((obj["kind"], obj["metadata"]["name"], rule))
    return out


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards_and_no_secrets(render: Render, name: str) -> None:
    for kind, role, rule in rules_of(render(VALUE_SETS[name])):
        where = f"{kind}/{role}"
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), f"{where}: wildcard in {field}"
        assert "secrets" not in rule["resources"], f"{where} grants access to Secrets"
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), where
        assert "nonResourceURLs" not in rule, where


def test_every_rbac_rule_says_why() -> None:
    templates = CHART / "templates"
    for path in (templates / "rbac.yaml", templates / "_rbac.tpl"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                above = lines[i - 1].strip()
                assert above.startswith("#"), f"{path.name}:{i + 1}: rule without a comment above"


def operator_grants(objects: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for obj in objects:
        if obj["kind"] in ("Role", "ClusterRole") and "-operator" in obj["metadata"]["name"]:
            scope = obj["metadata"].get("namespace", "*")
            for rule in obj["rules"]:
                for resource in rule["resources"]:
                    for group in rule["apiGroups"]:
                        key = (scope, f"{group}/{resource}")
                        grants.setdefault(key, set()).update(rule["verbs"])
    return grants


def test_operator_rbac_covers_its_work_cluster_wide(render: Render) -> None:
    grants = operator_grants(render())
    expected = {
        "modelfleet.io/modeldeployments": {"get", "list", "watch", "patch", "update"},
        "modelfleet.io/modeldeployments/status": {"get", "patch", "update"},
        "/pods": {"get", "list", "watch", "create", "delete", "patch"},
        "/services": {"get", "list", "watch", "create", "patch", "update", "delete"},
        "/events": {"create", "get", "patch"},
        "events.k8s.io/events": {"create", "patch"},
        "/nodes": {"get", "list", "watch"},
    }
    for resource, verbs in expected.items():
        assert grants[("*", resource)] == verbs, resource
    # kopf runs with scanning disabled: no access to CRDs or namespaces is needed.
    assert ("*", "apiextensions.k8s.io/customresourcedefinitions") not in grants
    assert ("*", "/namespaces") not in grants
    assert grants[(NAMESPACE, "coordination.k8s.io/leases")] == {"get", "create", "update"}
    leader = one(render(), "Role", "-operator-leader")
    by_name = [r for r in leader["rules"] if r["resources"] == ["leases"] and "get" in r["verbs"]]
    assert by_name == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [f"{RELEASE}-modelfleet-operator"],
            "verbs": ["get", "update"],
        }
    ]
    env = env_of(pod_spec(one(render(), "Deployment", "-operator"))["containers"][0])
    assert env["MODELFLEET_LEASE_NAME"] == f"{RELEASE}-modelfleet-operator"
    assert env["MODELFLEET_LEASE_NAMESPACE"] == NAMESPACE


def test_watch_namespaces_switch_to_roles(render: Render) -> None:
    objects = render(VALUE_SETS["namespaced"])
    for obj in find(objects, "ClusterRole"):
        for rule in obj["rules"]:
            if rule["resources"] == ["pods"]:
                # Reading the pods bound to nodes, for the fit check: list and watch only.
                assert obj["metadata"]["name"].endswith("-operator-cluster"), obj
                assert rule["verbs"] == ["list", "watch"], rule
                continue
            assert set(rule["resources"]) <= CLUSTER_SCOPED, (obj["metadata"]["name"], rule)
    grants = operator_grants(objects)
    for ns in ("team-a",):
        assert grants[(ns, "/pods")] == {"get", "list", "watch", "create", "delete", "patch"}
        role = one([o for o in objects if o["metadata"].get("namespace") == ns], "Role", "gateway")
        assert {r for rule in role["rules"] for r in rule["resources"]} == {
            "modeldeployments",
            "pods",
        }
    assert (NAMESPACE, "/pods") in grants  # agent discovery in the release namespace
    assert grants[("*", "/pods")] == {"list", "watch"}  # never a write outside team-a
    operator = one(objects, "Deployment", "operator")
    assert env_of(pod_spec(operator)["containers"][0])["MODELFLEET_WATCH_NAMESPACE"] == "team-a"
    gateway = one(objects, "Deployment", "-gateway")
    assert env_of(pod_spec(gateway)["containers"][0])["MODELFLEET_GATEWAY_NAMESPACE"] == "team-a"
    bindings = [b for b in find(objects, "RoleBinding") if b["metadata"]["namespace"] == "team-a"]
    assert {s["namespace"] for b in bindings for s in b["subjects"]} == {NAMESPACE}


def test_without_node_pod_watch_no_cluster_wide_pod_read(render: Render) -> None:
    objects = render({**VALUE_SETS["namespaced"], "operator": {"watchNodePods": False}})
    for obj in find(objects, "ClusterRole"):
        for rule in obj["rules"]:
            assert set(rule["resources"]) <= CLUSTER_SCOPED, (obj["metadata"]["name"], rule)
    assert ("*", "/pods") not in operator_grants(objects)
    operator = one(objects, "Deployment", "operator")
    assert env_of(pod_spec(operator)["containers"][0])["MODELFLEET_WATCH_NODE_PODS"] == "false"


def test_gateway_rbac_reads_models_and_pods_and_patches_annotations(render: Render) -> None:
    role = one(render(), "ClusterRole", "-gateway")
    grants = {r: set(rule["verbs"]) for rule in role["rules"] for r in rule["resources"]}
    assert grants == {
        "modeldeployments": {"get", "list", "watch", "patch"},
        "pods": {"get", "list", "watch"},
    }


def test_agent_gets_api_access_only_for_tokenreview(render: Render) -> None:
    token = render(VALUE_SETS["restricted"])
    assert not find(token, "ClusterRole", "-agent")
    assert one(token, "ServiceAccount", "-agent")["automountServiceAccountToken"] is False
    assert pod_spec(one(token, "DaemonSet", "-agent"))["automountServiceAccountToken"] is False
    default = render()
    role = one(default, "ClusterRole", "-agent")
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    assert pod_spec(one(default, "DaemonSet", "-agent"))["automountServiceAccountToken"] is True


# ---- workloads ----


def test_operator_runs_two_replicas_one_acting_with_a_pdb(render: Render) -> None:
    objects = render()
    deployment = one(objects, "Deployment", "-operator")
    assert deployment["spec"]["replicas"] == 2
    pdb = one(objects, "PodDisruptionBudget", "-operator")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    container = pod_spec(deployment)["containers"][0]
    assert container["args"] == ["operator"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    env = env_of(container)
    assert env["MODELFLEET_DEFAULT_IMAGE"] == "vllm/vllm-openai:v0.11.0"
    assert env["MODELFLEET_METRICS_PORT"] == "8080"
    assert env["MODELFLEET_AGENT_NAMESPACE"] == NAMESPACE
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    service = one(objects, "Service", "-operator")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_operator_finds_exactly_this_releases_agents(render: Render) -> None:
    objects = render()
    env = env_of(pod_spec(one(objects, "Deployment", "-operator"))["containers"][0])
    selector = dict(pair.split("=") for pair in env["MODELFLEET_AGENT_SELECTOR"].split(","))
    agent_labels = one(objects, "DaemonSet", "-agent")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= agent_labels.items()
    assert selector["app.kubernetes.io/component"] == "agent"
    assert selector["app.kubernetes.io/instance"] == RELEASE
    assert env["MODELFLEET_AGENT_PORT"] == "9400"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_operator_and_gateway_meet_the_restricted_standard(render: Render, name: str) -> None:
    objects = render(VALUE_SETS[name])
    for workload in find(objects, "Deployment"):
        spec = pod_spec(workload)
        assert restricted_violations(spec) == [], workload["metadata"]["name"]
        assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_agent_departs_from_restricted_only_for_pod_resources(render: Render) -> None:
    restricted = pod_spec(one(render(VALUE_SETS["restricted"]), "DaemonSet", "-agent"))
    assert restricted_violations(restricted) == []
    assert env_of(restricted["containers"][0])["MODELFLEET_AGENT_POD_RESOURCES_SOCKET"] == ""
    mounted = pod_spec(one(render(), "DaemonSet", "-agent"))
    assert restricted_violations(mounted) == [
        "volume pod-resources: ['hostPath']",
        "agent: runAsNonRoot",
        "agent: runAsUser 0",
    ]
    assert mounted["volumes"][-1]["hostPath"] == {
        "path": "/var/lib/kubelet/pod-resources",
        "type": "Directory",
    }
    mount = mounted["containers"][0]["volumeMounts"][-1]
    assert mount == {
        "name": "pod-resources",
        "mountPath": "/var/lib/kubelet/pod-resources",
        "readOnly": True,
    }
    security = mounted["containers"][0]["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    env = env_of(mounted["containers"][0])
    assert env["MODELFLEET_AGENT_POD_RESOURCES_SOCKET"] == (
        "/var/lib/kubelet/pod-resources/kubelet.sock"
    )
    values_text = (CHART / "values.yaml").read_text()
    assert "Where the agent departs from the restricted Pod Security Standard, and why" in (
        values_text
    )


# Each term alone puts an agent on a node (nodeSelectorTerms are ORed).
GPU_NODE_TERMS = [
    ("nvidia.com/gpu.present", "In", ["true"]),  # GPU Operator
    ("feature.node.kubernetes.io/pci-10de.present", "In", ["true"]),  # NFD, NVIDIA's PCI vendor
    ("cloud.google.com/gke-accelerator", "Exists", None),  # GKE
    ("kubernetes.azure.com/accelerator", "In", ["nvidia"]),  # AKS
    ("eks.amazonaws.com/instance-gpu-manufacturer", "In", ["nvidia"]),  # EKS Auto Mode
    ("karpenter.k8s.aws/instance-gpu-manufacturer", "In", ["nvidia"]),  # Karpenter on EKS
    ("k8s.amazonaws.com/accelerator", "Exists", None),  # EKS node groups, cluster autoscaler
]


def node_terms(spec: dict[str, Any]) -> list[tuple[str, str, list[str] | None]]:
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    out = []
    for term in required["nodeSelectorTerms"]:
        (expression,) = term["matchExpressions"]
        out.append((expression["key"], expression["operator"], expression.get("values")))
    return out


def test_agent_runs_on_gpu_nodes_only(render: Render) -> None:
    spec = pod_spec(one(render(VALUE_SETS["restricted"]), "DaemonSet", "-agent"))
    assert env_of(spec["containers"][0])["MODELFLEET_AGENT_AUTH"] == "token"
    assert node_terms(spec) == GPU_NODE_TERMS
    for toleration in (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},  # GKE, EKS
        {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},  # AKS
    ):
        assert toleration in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["priorityClassName"] == "system-node-critical"
    container = spec["containers"][0]
    env = env_of(container)
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_agent_gpu_node_labels_are_overridable(render: Render) -> None:
    mine = {"nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}
    values = {
        "agent": {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": mine}}
        }
    }
    spec = pod_spec(one(render(values), "DaemonSet", "-agent"))
    assert node_terms(spec) == [("gpu", "Exists", None)]


# ---- the agent's platforms (agent.platform) ----


def agent_spec(render: Render, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = pod_spec(one(render(values), "DaemonSet", "-agent"))
    return spec, spec["containers"][0]


def test_gpu_operator_is_the_default_platform_runtime_class_nvidia(render: Render) -> None:
    # GPU Operator 25.10 and later: CDI, runc stays the default runtime, NVML only under nvidia.
    spec, container = agent_spec(render, {})
    assert spec["runtimeClassName"] == "nvidia"
    env = env_of(container)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert "LD_LIBRARY_PATH" not in env
    assert "privileged" not in container["securityContext"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    restricted, _ = agent_spec(render, {"agent": {"podResources": {"enabled": False}}})
    assert restricted_violations(restricted) == []  # a RuntimeClass is no privilege


def test_platform_none_adds_nothing(render: Render) -> None:
    spec, container = agent_spec(render, VALUE_SETS["platform-none"])
    assert "runtimeClassName" not in spec
    assert env_of(container)["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert [v["name"] for v in spec["volumes"]] == ["tmp", "pod-resources"]
    assert "privileged" not in container["securityContext"]


def test_gke_runs_privileged_with_the_host_driver_and_no_runtime_class(render: Render) -> None:
    spec, container = agent_spec(render, VALUE_SETS["gke"])
    assert "runtimeClassName" not in spec  # GKE has no NVIDIA container runtime
    env = env_of(container)
    assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64"
    assert "PATH" not in env  # the image's entrypoint is found through its own PATH
    assert "NVIDIA_VISIBLE_DEVICES" not in env  # nothing would read it
    driver = next(v for v in spec["volumes"] if v["name"] == "nvidia-driver")
    assert driver["hostPath"] == {"path": "/home/kubernetes/bin/nvidia", "type": "Directory"}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "nvidia-driver")
    assert mount == {"name": "nvidia-driver", "mountPath": "/usr/local/nvidia", "readOnly": True}
    security = container["securityContext"]
    assert security["privileged"] is True
    assert security["allowPrivilegeEscalation"] is True  # the API server refuses it false
    assert "capabilities" not in security  # privileged has them all, whatever is dropped
    assert security["readOnlyRootFilesystem"] is True
    assert spec["affinity"] == pod_spec(one(render(), "DaemonSet", "-agent"))["affinity"]
    quiet, _ = agent_spec(
        render, {"agent": {"platform": "gke", "podResources": {"enabled": False}}}
    )
    assert restricted_violations(quiet) == [
        "volume nvidia-driver: ['hostPath']",
        "agent: privileged",
        "agent: allowPrivilegeEscalation",
        "agent: capabilities not dropped",
    ]


def test_bottlerocket_runs_privileged_under_the_default_runtime(render: Render) -> None:
    # Bottlerocket's NVIDIA runtime is the default one, and honours NVIDIA_VISIBLE_DEVICES in
    # privileged containers only (visible-devices-envvar-when-unprivileged is off by default).
    spec, container = agent_spec(render, VALUE_SETS["bottlerocket"])
    assert "runtimeClassName" not in spec
    env = env_of(container)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "LD_LIBRARY_PATH" not in env
    assert "nvidia-driver" not in [v["name"] for v in spec["volumes"]]
    assert container["securityContext"]["privileged"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is True


def test_explicit_values_win_over_the_platform(render: Render) -> None:
    spec, container = agent_spec(
        render,
        {
            "agent": {
                "platform": "gke",
                "runtimeClassName": "nvidia-cdi",
                "driverHostPath": "/opt/nvidia/driver",
                "securityContext": {"privileged": False, "allowPrivilegeEscalation": False},
            }
        },
    )
    assert spec["runtimeClassName"] == "nvidia-cdi"
    driver = next(v for v in spec["volumes"] if v["name"] == "nvidia-driver")
    assert driver["hostPath"]["path"] == "/opt/nvidia/driver"
    assert container["securityContext"]["privileged"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    spec, _ = agent_spec(render, {"agent": {"platform": "bottlerocket", "runtimeClassName": "x"}})
    assert spec["runtimeClassName"] == "x"


def test_simulated_agents_take_nothing_from_the_platform(render: Render) -> None:
    for platform in ("gpu-operator", "gke", "bottlerocket"):
        values = {"agent": {"backend": "simulated", "platform": platform}}
        spec, container = agent_spec(render, values)
        assert "runtimeClassName" not in spec, platform
        assert "privileged" not in container["securityContext"], platform
        env = env_of(container)
        assert "NVIDIA_VISIBLE_DEVICES" not in env, platform
        assert "LD_LIBRARY_PATH" not in env, platform


def test_privileged_platforms_are_documented_as_needing_a_privileged_namespace() -> None:
    values_text = (CHART / "values.yaml").read_text()
    assert "gke and bottlerocket need a privileged namespace" in values_text
    install = (ROOT / "docs" / "install.md").read_text()
    for platform in (
        "NVIDIA GPU Operator",
        "GKE",
        "EKS: Amazon Linux 2023 NVIDIA AMI",
        "EKS: Bottlerocket",
        "AKS",
    ):
        assert f"\n#### {platform}\n" in install, platform


def test_agent_token_is_shared_by_agent_and_operator(render: Render) -> None:
    objects = render(VALUE_SETS["restricted"])
    secret = one(objects, "Secret", "-agent-token")
    assert re.fullmatch(r"[A-Za-z0-9]{48}", _b64(secret["data"]["token"]))
    name = secret["metadata"]["name"]
    for kind, suffix in (("DaemonSet", "-agent"), ("Deployment", "-operator")):
        spec = pod_spec(one(objects, kind, suffix))
        volume = next(v for v in spec["volumes"] if v["name"] == "agent-auth")
        assert volume["secret"]["secretName"] == name
        env = env_of(spec["containers"][0])
        key = "MODELFLEET_AGENT_TOKEN_FILE"
        assert env[key] == "/var/run/modelfleet/agent-auth/token"
    with_existing = render({"agent": {"auth": {"mode": "token", "existingSecret": "mine"}}})
    assert not find(with_existing, "Secret")
    spec = pod_spec(one(with_existing, "Deployment", "-operator"))
    assert spec["volumes"][-1]["secret"]["secretName"] == "mine"


def test_tokenreview_is_the_default_with_an_audience_token_for_the_operator_only(
    render: Render,
) -> None:
    objects = render()
    assert not find(objects, "Secret")
    spec = pod_spec(one(objects, "Deployment", "-operator"))
    volume = next(v for v in spec["volumes"] if v["name"] == "agent-auth")
    assert volume["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "modelfleet-agent",
                "expirationSeconds": 3600,
                "path": "token",
            }
        }
    ]
    env = env_of(spec["containers"][0])
    assert env["MODELFLEET_AGENT_TOKEN_FILE"] == "/var/run/modelfleet/agent-auth/token"
    agent = env_of(pod_spec(one(objects, "DaemonSet", "-agent"))["containers"][0])
    assert agent["MODELFLEET_AGENT_AUTH"] == "tokenreview"
    assert agent["MODELFLEET_AGENT_AUDIENCES"] == "modelfleet-agent"
    assert agent["MODELFLEET_AGENT_ALLOWED_SUBJECTS"] == (
        f"system:serviceaccount:{NAMESPACE}:{RELEASE}-modelfleet-operator"
    )
    assert "MODELFLEET_AGENT_TOKEN_FILE" not in agent
    more = render({"agent": {"auth": {"extraAllowedSubjects": ["system:serviceaccount:m:prom"]}}})
    agent = env_of(pod_spec(one(more, "DaemonSet", "-agent"))["containers"][0])
    assert agent["MODELFLEET_AGENT_ALLOWED_SUBJECTS"].split(",") == [
        f"system:serviceaccount:{NAMESPACE}:{RELEASE}-modelfleet-operator",
        "system:serviceaccount:m:prom",
    ]


def test_auth_none_sends_no_token(render: Render) -> None:
    objects = render({"agent": {"auth": {"mode": "none"}}})
    env = env_of(pod_spec(one(objects, "Deployment", "-operator"))["containers"][0])
    assert "MODELFLEET_AGENT_TOKEN_FILE" not in env
    assert not find(objects, "Secret")


def test_gateway_deployment_service_and_pdb(render: Render) -> None:
    objects = render()
    deployment = one(objects, "Deployment", "-gateway")
    container = pod_spec(deployment)["containers"][0]
    assert container["args"] == ["gateway"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = one(objects, "Service", "-gateway")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert one(objects, "PodDisruptionBudget", "-gateway")["spec"]["minAvailable"] == 1
    minimal = render(VALUE_SETS["minimal"])
    assert not find(minimal, "Deployment", "-gateway")
    assert not find(minimal, "DaemonSet")
    assert not find(minimal, "PodDisruptionBudget")


def test_gateway_client_limits_reach_its_settings(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = {
        "headerTimeoutSeconds": 10,
        "bodyTimeoutSeconds": 120.5,
        "idleTimeoutSeconds": 30,
        "maxConnections": 1000000,  # helm prints a large float as 1e+06 unless made an int
        "maxBufferedBodyBytes": 536870912,
    }
    objects = render({"gateway": {"clientLimits": limits}})
    env = env_of(pod_spec(one(objects, "Deployment", "-gateway"))["containers"][0])
    for name, value in env.items():
        if name.startswith("MODELFLEET_GATEWAY_"):
            monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    assert settings.client_header_timeout_s == 10
    assert settings.client_body_timeout_s == 120.5
    assert settings.client_idle_timeout_s == 30
    assert settings.max_client_connections == 1000000
    assert settings.max_buffered_body_bytes == 536870912
    validator = Draft7Validator(json.loads((CHART / "values.schema.json").read_text()))
    bad_values = (
        {"maxConnections": 0},
        {"headerTimeoutSeconds": 0},
        {"maxBufferedBodyBytes": 1.5},
        {"idleTimeout": 5},
    )
    for bad in bad_values:
        assert list(validator.iter_errors({"gateway": {"clientLimits": bad}})), bad


# ---- NetworkPolicies ----


def test_network_policies_deny_by_default_and_allow_what_is_needed(render: Render) -> None:
    objects = render()
    deny = one(objects, "NetworkPolicy", "-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"]
    assert "egress" not in deny["spec"]
    assert deny["spec"]["podSelector"]["matchExpressions"] == [
        {
            "key": "app.kubernetes.io/component",
            "operator": "In",
            "values": ["operator", "agent", "gateway"],
        }
    ]
    agent = one(objects, "NetworkPolicy", "-agent")
    assert agent["spec"]["ingress"] == [
        {
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "modelfleet",
                            "app.kubernetes.io/instance": RELEASE,
                            "app.kubernetes.io/component": "operator",
                        }
                    }
                }
            ],
            "ports": [{"port": "http", "protocol": "TCP"}],
        }
    ]
    operator = one(objects, "NetworkPolicy", "-operator")
    assert operator["spec"]["ingress"] == []
    ports = [p["port"] for rule in operator["spec"]["egress"] for p in rule["ports"]]
    assert ports == [53, 53, 443, 6443, 9400]
    gateway = one(objects, "NetworkPolicy", "-gateway")
    to_replicas = gateway["spec"]["egress"][-1]
    assert to_replicas["to"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "modelfleet",
                    "app.kubernetes.io/component": "replica",
                }
            },
            "namespaceSelector": {},
        }
    ]
    assert to_replicas["ports"] == [{"port": 8000, "protocol": "TCP"}]
    replicas = one(objects, "NetworkPolicy", "-replicas")
    assert replicas["spec"]["policyTypes"] == ["Ingress"]
    assert {"namespaceSelector": {}} in replicas["spec"]["ingress"][0]["from"]


def test_network_policies_follow_the_values(render: Render) -> None:
    objects = render(VALUE_SETS["namespaced"])
    replicas = find(objects, "NetworkPolicy", "-replicas")
    assert sorted(p["metadata"]["namespace"] for p in replicas) == [NAMESPACE, "team-a"]
    assert all({"namespaceSelector": {}} not in p["spec"]["ingress"][0]["from"] for p in replicas)
    gateway = one(objects, "NetworkPolicy", "-gateway")
    selector = gateway["spec"]["egress"][-1]["to"][0]["namespaceSelector"]
    assert selector["matchExpressions"][0]["values"] == ["team-a"]
    restricted = render(VALUE_SETS["restricted"])
    operator = one(restricted, "NetworkPolicy", "-operator")
    assert operator["spec"]["egress"][1] == {
        "ports": [{"port": 443, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
    }
    agent = one(restricted, "NetworkPolicy", "-agent")
    assert len(agent["spec"]["ingress"][0]["from"]) == 2  # operator + the metrics scrapers
    assert len(agent["spec"]["egress"]) == 1  # DNS only: token mode needs no API server
    default_agent = one(render(), "NetworkPolicy", "-agent")
    assert len(default_agent["spec"]["egress"]) == 2  # DNS + the API server for TokenReviews
    assert not find(render(VALUE_SETS["minimal"]), "NetworkPolicy")


# ---- ServiceMonitors ----


def test_service_monitors_are_optional_and_authenticate_to_agents(render: Render) -> None:
    assert not find(render(), "ServiceMonitor")
    monitors = find(
        render({"serviceMonitor": {"enabled": True}, "agent": {"auth": {"mode": "token"}}}),
        "ServiceMonitor",
    )
    assert [m["metadata"]["name"].rsplit("-", 1)[-1] for m in monitors] == [
        "operator",
        "agent",
        "gateway",
    ]
    agent = monitors[1]["spec"]["endpoints"][0]
    assert agent["authorization"]["credentials"] == {
        "name": f"{RELEASE}-modelfleet-agent-token",
        "key": "token",
    }
    assert agent["port"] == "http"
    auth = {"type": "Bearer", "credentials": {"name": "prom-token", "key": "token"}}
    values = {"serviceMonitor": {"enabled": True, "agentAuthorization": auth}}
    agent_monitor = one(render(values), "ServiceMonitor", "-agent")
    assert agent_monitor["spec"]["endpoints"][0]["authorization"] == auth


# ---- parallelModels ----


def test_parallel_models_render_from_one_template(render: Render) -> None:
    objects = render(VALUE_SETS["models"], "--api-versions", MD_API)
    models = {m["metadata"]["name"]: m for m in find(objects, "ModelDeployment")}
    assert sorted(models) == ["gemma3-4b", "llama-3-2-1b", "qwen"]
    gemma = models["gemma3-4b"]
    assert gemma["metadata"]["namespace"] == NAMESPACE
    assert gemma["spec"] == {
        "model": "google/gemma-3-4b-it",
        "servedModelName": "gemma3-4B",
        "replicas": 2,
        "gpu": {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"},
        "placement": {"spread": True, "strategy": "Availability"},
        "priority": 10,
    }
    llama = models["llama-3-2-1b"]["spec"]
    assert llama["servedModelName"] == "Llama-3.2-1B"
    assert llama["gpu"] == {
        "count": 1,
        "memory": "6Gi",
        "sharing": "Shared",
        "product": "NVIDIA-H100-80GB-HBM3",
    }
    assert llama["placement"] == {"spread": False, "strategy": "Availability"}  # false wins
    assert llama["priority"] == -10
    qwen = models["qwen"]
    assert qwen["spec"]["replicas"] == 0  # zero wins over nothing
    assert qwen["spec"]["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert qwen["metadata"]["labels"]["team"] == "ml"
    assert qwen["metadata"]["annotations"] == {"modelfleet.io/balancing": "LeastOutstanding"}
    for model in models.values():
        ModelDeployment.model_validate(model)
    operator = one(objects, "Deployment", "-operator")
    image = env_of(pod_spec(operator)["containers"][0])["MODELFLEET_DEFAULT_IMAGE"]
    assert image == "vllm/vllm-openai:v0.11.1"


def test_a_model_name_starting_with_a_digit_gets_a_letter_first(render: Render) -> None:
    # The object name is also the Service's, a DNS-1035 label: the CRD refuses a leading digit.
    values = {"parallelModels": {"3B-chat": 1}}
    [model] = find(render(values, "--api-versions", MD_API), "ModelDeployment")
    assert model["metadata"]["name"] == "m-3b-chat"
    assert model["spec"]["servedModelName"] == "3B-chat"
    ModelDeployment.model_validate(model)


def test_parallel_models_are_a_post_install_hook_until_the_crd_exists(render: Render) -> None:
    values = {"parallelModels": {"gemma3-4B": 2}}
    (first,) = find(render(values), "ModelDeployment")
    annotations = first["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install"
    assert annotations["meta.helm.sh/release-name"] == RELEASE
    assert annotations["meta.helm.sh/release-namespace"] == NAMESPACE
    (later,) = find(render(values, "--api-versions", MD_API), "ModelDeployment")
    assert "annotations" not in later["metadata"]
    assert later["spec"] == first["spec"]


def test_no_models_by_default(render: Render) -> None:
    assert not find(render(), "ModelDeployment")


def _b64(text: str) -> str:
    import base64

    return base64.b64decode(text).decode()


def test_rendered_yaml_has_no_duplicate_keys(render_text: Any) -> None:
    class Strict(yaml.SafeLoader):
        pass

    def construct(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        keys = [loader.construct_object(k) for k, _ in node.value]
        assert len(keys) == len(set(keys)), f"duplicate keys at line {node.start_mark.line}"
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct)
    for name in VALUE_SETS:
        list(yaml.load_all(render_text(VALUE_SETS[name]), Loader=Strict))
    assert ROOT.is_dir()


@pytest.mark.parametrize(
    ("case", "values", "expected"),
    [
        ("GPU Operator: its RuntimeClass", {}, "nvidia"),
        ("GKE: no NVIDIA runtime at all", {"agent": {"platform": "gke"}}, ""),
        ("NVIDIA's runtime is the default", {"agent": {"platform": "none"}}, ""),
        ("set: wins", {"operator": {"sharedRuntimeClassName": "nvidia-legacy"}}, "nvidia-legacy"),
        ("empty: never one", {"operator": {"sharedRuntimeClassName": ""}}, ""),
    ],
)
def test_shared_replicas_runtime_class_follows_the_platform(
    render: Render, case: str, values: dict[str, Any], expected: str
) -> None:
    operator = one(render(values), "Deployment", "operator")
    env = env_of(pod_spec(operator)["containers"][0])
    assert env["MODELFLEET_SHARED_RUNTIME_CLASS_NAME"] == expected, case


def test_replica_uid_and_requests_may_be_left_to_the_platform(render: Render) -> None:
    default = env_of(pod_spec(one(render(), "Deployment", "operator"))["containers"][0])
    assert default["MODELFLEET_REPLICA_RUN_AS_USER"] == "1000"
    assert default["MODELFLEET_REPLICA_CPU_REQUEST"] == "1"
    assert default["MODELFLEET_REPLICA_MEMORY_REQUEST"] == "4Gi"
    # docs/install.md, OpenShift: every uid left to the SCC.
    unset = {"runAsUser": None, "runAsGroup": None, "fsGroup": None}
    openshift = {
        "operator": {
            "replicaRunAsUser": None,
            "replicaRequests": {"cpu": "4"},
            "podSecurityContext": unset,
        },
        "gateway": {"podSecurityContext": unset},
        "agent": {"podSecurityContext": unset},
    }
    objects = render(openshift)
    env = env_of(pod_spec(one(objects, "Deployment", "operator"))["containers"][0])
    assert env["MODELFLEET_REPLICA_RUN_AS_USER"] == ""
    assert env["MODELFLEET_REPLICA_CPU_REQUEST"] == "4"
    for kind, name in (("Deployment", "operator"), ("Deployment", "gateway"), ("DaemonSet", "")):
        context = pod_spec(one(objects, kind, name))["securityContext"]
        assert not {k: v for k, v in context.items() if k in unset and v is not None}, name
