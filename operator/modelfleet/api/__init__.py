"""The ModelDeployment API (group modelfleet.io, version v1alpha1) as pydantic models.

This layer imports neither kopf nor any Kubernetes or HTTP client: it is data and validation only.
"""

from modelfleet.api.units import parse_duration, parse_quantity, quantity_to_mib
from modelfleet.api.v1alpha1 import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    AutoscalingSignal,
    AutoscalingStatus,
    Balancing,
    Condition,
    ConditionStatus,
    ConditionType,
    EngineSpec,
    GpuSpec,
    Instance,
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    PlacementSpec,
    PlacementStrategy,
    RoutingSpec,
    SharingMode,
    Toleration,
)

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "KIND",
    "PLURAL",
    "AutoscalingSignal",
    "AutoscalingStatus",
    "Balancing",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "EngineSpec",
    "GpuSpec",
    "Instance",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
    "PlacementSpec",
    "PlacementStrategy",
    "RoutingSpec",
    "SharingMode",
    "Toleration",
    "parse_duration",
    "parse_quantity",
    "quantity_to_mib",
]
