"""Helpers and value sets shared by the chart tests."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "modelfleet"
HACK = ROOT / "hack"
RELEASE = "mf"
# The `render` fixture: `helm template` of the chart with values (and extra helm arguments).
Render = Callable[..., list[dict[str, Any]]]
NAMESPACE = "modelfleet"

# Named value sets the chart is rendered, validated and snapshotted with.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Everything within the restricted Pod Security Standard, a Secret token, Prometheus.
    "restricted": {
        "agent": {
            "podResources": {"enabled": False},
            "auth": {"mode": "token"},
            "runtimeClassName": "nvidia",
            "priorityClassName": "system-node-critical",
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "admissionPolicies": {
            "priorityLimit": {
                "enabled": True,
                "defaultMax": 0,
                "namespaceSelector": {"matchLabels": {"tenant": "yes"}},
            }
        },
        "networkPolicy": {
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "gatewayFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}],
            "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [443]},
        },
    },
    # A watched namespace: Roles instead of ClusterRoles; the CRD managed elsewhere.
    "namespaced": {
        "watchNamespaces": ["team-a"],
        "crds": {"enabled": False},
        "networkPolicy": {"replicas": {"allowInCluster": False}},
    },
    # The original requirement and the richer form, from one shared template.
    "models": {
        "parallelModels": {
            "gemma3-4B": 2,
            "Llama-3.2-1B": {
                "model": "meta-llama/Llama-3.2-1B-Instruct",
                "gpu": {"memory": "6Gi", "sharing": "Shared", "count": 1},
                "idleTimeout": "30m",
                "priority": -10,
                "placement": {"spread": False},
            },
            "Qwen/Qwen2.5-7B-Instruct": {
                "name": "qwen",
                "replicas": 0,
                "labels": {"team": "ml"},
                "annotations": {"modelfleet.io/balancing": "LeastOutstanding"},
                "engine": {"args": ["--max-model-len", "8192"]},
            },
        },
        "modelDefaults": {
            "gpu": {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"},
            "placement": {"spread": True, "strategy": "Availability"},
            "priority": 10,
        },
        "vllmImage": {"tag": "v0.11.1"},
    },
    # The least: operator only, no auth, no policies, simulated agents elsewhere.
    "minimal": {
        "agent": {"enabled": False, "auth": {"mode": "none"}},
        "gateway": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "operator": {"replicas": 1, "podDisruptionBudget": {"enabled": False}},
        "crds": {"keep": False},
    },
    # The kubelet pod-resources socket mounted into the agents (privileged namespaces only).
    "podresources": {"agent": {"podResources": {"enabled": True}}},
    # Test clusters: simulated agents (they read pods to follow placements).
    "simulated": {"agent": {"backend": "simulated", "podResources": {"enabled": False}}},
    # The agent's platforms (agent.platform; gpu-operator is the default set above).
    "gke": {"agent": {"platform": "gke"}},
    "bottlerocket": {"agent": {"platform": "bottlerocket"}},
    "platform-none": {"agent": {"platform": "none"}},
}


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Objects of a kind (and name suffix), in render order."""
    return [
        o
        for o in objects
        if o["kind"] == kind and (name is None or o["metadata"]["name"].endswith(name))
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} named *{name}, got {len(found)}"
    return found[0]


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, check=False, timeout=60)
