"""ModelDeployment, version v1alpha1: the single source of truth for the CRD and the operator.

Every field has a description (it becomes `kubectl explain` text). Cross-field rules are written
twice on purpose: as pydantic validators here, for the operator and the CLI, and as CEL rules in
the generated CRD (see `crd.py`), so the API server refuses the same documents.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from modelfleet.api.units import (
    DURATION_PATTERN,
    QUANTITY_PATTERN,
    parse_duration,
    parse_quantity,
)

API_GROUP = "modelfleet.io"
API_VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["mdeploy"]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _check_quantity(value: int | str) -> int | str:
    if parse_quantity(value) < 0:
        raise ValueError(f"{value!r} is negative; a quantity here must be zero or more")
    return value


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


# A Kubernetes quantity: an integer or a string such as "24Gi". In the CRD it is int-or-string
# with the upstream quantity pattern, as in core/v1 ResourceRequirements.
Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
Duration = Annotated[
    str,
    AfterValidator(_check_duration),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN}),
]
# Times travel as RFC 3339 strings, the form Kubernetes uses.
Timestamp = Annotated[
    datetime,
    PlainSerializer(lambda t: t.isoformat().replace("+00:00", "Z"), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class _Model(BaseModel):
    """Base for every API model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )


class SharingMode(StrEnum):
    EXCLUSIVE = "Exclusive"
    SHARED = "Shared"


class PlacementStrategy(StrEnum):
    AVAILABILITY = "Availability"
    ROUND_ROBIN = "RoundRobin"
    WEIGHTED = "Weighted"


class GpuSpec(_Model):
    """GPUs one replica needs."""

    count: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs per replica; vLLM's tensor-parallel size is set to this number.",
    )
    memory: Quantity | None = Field(
        None,
        description=(
            "GPU memory one replica uses (its footprint), e.g. 24Gi. Required when sharing is "
            "Shared. When absent in Exclusive mode, the first replica measures it."
        ),
    )
    product: str | None = Field(
        None,
        max_length=253,
        description=(
            "Only GPUs of this product, the value of the node label nvidia.com/gpu.product "
            "(e.g. NVIDIA-H100-80GB-HBM3)."
        ),
    )
    sharing: SharingMode = Field(
        SharingMode.EXCLUSIVE,
        description=(
            "Exclusive: the replica takes whole GPUs. Shared: replicas share GPUs by memory."
        ),
    )

    @model_validator(mode="after")
    def _shared_needs_memory(self) -> GpuSpec:
        if self.sharing == SharingMode.SHARED and self.memory is None:
            raise ValueError(
                "spec.gpu.memory is required when spec.gpu.sharing is Shared: "
                "set the memory each replica uses, e.g. memory: 20Gi"
            )
        return self


class Toleration(_Model):
    """A toleration, as in a Pod spec, for tainted GPU nodes."""

    key: str | None = Field(None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(None, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, description="How long a NoExecute taint is tolerated, in seconds."
    )


class PlacementSpec(_Model):
    """Where replicas may go and how the node is chosen."""

    strategy: PlacementStrategy | None = Field(
        None,
        description=(
            "Availability (most free GPUs, by share), RoundRobin or Weighted (by capacity). "
            "Empty means the operator's default."
        ),
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels every replica's node must carry."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the replicas tolerate."
    )
    spread: bool = Field(
        True, description="Prefer distinct nodes for the replicas of this deployment."
    )


class EnvVar(_Model):
    """An environment variable for the engine container."""

    name: str = Field(..., min_length=1, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        None,
        description="Source of the value, as in a Pod spec (secretKeyRef, configMapKeyRef, ...).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class ResourceRequirements(_Model):
    """CPU and memory for the engine container (GPUs come from spec.gpu)."""

    limits: dict[str, Quantity] = Field(default_factory=dict, description="Resource limits.")
    requests: dict[str, Quantity] = Field(default_factory=dict, description="Resource requests.")


class EngineSpec(_Model):
    """The vLLM server container."""

    image: str | None = Field(
        None, description="Container image; empty means the operator's default vLLM image."
    )
    args: list[str] = Field(
        default_factory=list, description="Extra vLLM arguments, appended to the generated ones."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="CPU and memory of the container."
    )
    port: int = Field(8000, ge=1, le=65535, description="Port vLLM listens on.")


class ModelDeploymentSpec(_Model):
    """What to run: a model, how many parallel instances, and what each needs."""

    model: str = Field(
        ...,
        min_length=1,
        max_length=512,
        description="vLLM model id (e.g. google/gemma-3-4b-it) or a path inside the image.",
    )
    served_model_name: str | None = Field(
        None,
        max_length=256,
        description="Name clients ask for; defaults to the ModelDeployment's name.",
    )
    replicas: int = Field(1, ge=0, le=1000, description="Parallel instances to run.")
    min_replicas: int = Field(
        0,
        ge=0,
        le=1000,
        description="Floor for idle scale-down and eviction; at most replicas.",
    )
    gpu: GpuSpec = Field(default_factory=GpuSpec, description="GPUs per replica.")
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec, description="Placement constraints and strategy."
    )
    priority: int = Field(
        0,
        ge=-1000,
        le=1000,
        description="Higher priority replicas may evict lower ones; never the reverse.",
    )
    idle_timeout: Duration | None = Field(
        None,
        description="Scale down to minReplicas after this long without requests, e.g. 30m.",
    )
    engine: EngineSpec = Field(default_factory=EngineSpec, description="The vLLM container.")

    @model_validator(mode="after")
    def _min_not_above_replicas(self) -> ModelDeploymentSpec:
        if self.min_replicas > self.replicas:
            raise ValueError(
                f"spec.minReplicas ({self.min_replicas}) must not exceed spec.replicas "
                f"({self.replicas}): lower minReplicas or raise replicas"
            )
        return self


class ConditionType(StrEnum):
    AVAILABLE = "Available"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    """A Kubernetes-style condition."""

    type: str = Field(..., description="Available, Progressing or Degraded.")
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str = Field("", description="One CamelCase word a program can match on.")
    message: str = Field("", description="What happened, in words a person can act on.")
    last_transition_time: Timestamp | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(
        None, description="The generation this condition was computed from."
    )


class Instance(_Model):
    """One replica Pod as the operator last saw it."""

    name: str = Field(..., description="Pod name, <deployment>-instance-<n>.")
    node: str | None = Field(None, description="Node the replica is bound to.")
    gpus: list[str] = Field(
        default_factory=list, description="Global GPU IDs (<node>:<index>) it uses."
    )
    phase: str = Field("Pending", description="Pending, Starting, Ready, Terminating or Failed.")
    reason: str = Field("", description="Why it is in this phase.")
    started_at: Timestamp | None = Field(None, description="When it became ready.")


class ModelDeploymentStatus(_Model):
    """What the operator observed and did."""

    replicas: int = Field(0, description="Replica Pods that exist.")
    ready_replicas: int = Field(0, description="Replica Pods that are ready to serve.")
    instances: list[Instance] = Field(default_factory=list, description="Every replica Pod.")
    footprint: Quantity | None = Field(
        None, description="GPU memory one replica was measured to use (the discovery run)."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Available, Progressing and Degraded."
    )
    observed_generation: int | None = Field(
        None, description="The spec generation this status describes."
    )
    selector: str = Field("", description="Label selector of the replica Pods (scale subresource).")
    phase: str = Field("", description="Short state for kubectl: Ready, Progressing, Pending, ...")
    reason: str = Field("", description="Short reason behind phase.")


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; everything else is kept as it is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ModelDeployment(BaseModel):
    """A whole ModelDeployment object, as read from the API or a YAML file."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel)

    api_version: Literal["modelfleet.io/v1alpha1"] = "modelfleet.io/v1alpha1"
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus = Field(default_factory=ModelDeploymentStatus)

    @model_validator(mode="after")
    def _name_is_dns_label(self) -> ModelDeployment:
        # Replica pods are named <name>-instance-<n> and the Service <name>: both need a DNS label.
        if not _DNS_LABEL.match(self.metadata.name) or len(self.metadata.name) > 50:
            raise ValueError(
                f"metadata.name {self.metadata.name!r} must be a DNS label of at most 50 "
                "characters (lowercase letters, digits and '-'), because replica Pods are "
                "named <name>-instance-<n>"
            )
        return self

    @property
    def served_name(self) -> str:
        """The model name clients send: spec.servedModelName, else the object's name."""
        return self.spec.served_model_name or self.metadata.name
