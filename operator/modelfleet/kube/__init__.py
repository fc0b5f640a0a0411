"""Adapters to the Kubernetes API: a small async client and path helpers."""

from modelfleet.kube.client import (
    ApiError,
    ClusterConfig,
    KubeClient,
    KubeConfigError,
    list_and_watch,
    load_config,
    load_incluster,
    load_kubeconfig,
)
from modelfleet.kube.paths import md_path, pods_path, resource_path

__all__ = [
    "ApiError",
    "ClusterConfig",
    "KubeClient",
    "KubeConfigError",
    "list_and_watch",
    "load_config",
    "load_incluster",
    "load_kubeconfig",
    "md_path",
    "pods_path",
    "resource_path",
]
