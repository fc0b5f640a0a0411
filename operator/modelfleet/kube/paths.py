"""API paths of the resources modelfleet touches."""

from __future__ import annotations

from modelfleet.api.v1alpha1 import API_GROUP, API_VERSION, PLURAL


def resource_path(
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    *,
    group: str = "",
    version: str = "v1",
) -> str:
    """/api/v1/... for the core group, /apis/<group>/<version>/... otherwise."""
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    return base


def pods_path(namespace: str | None = None, name: str | None = None) -> str:
    return resource_path("pods", namespace, name)


def md_path(namespace: str | None = None, name: str | None = None) -> str:
    return resource_path(PLURAL, namespace, name, group=API_GROUP, version=API_VERSION)
