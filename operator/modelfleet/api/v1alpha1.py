"""ModelDeployment, version v1alpha1: the single source of truth for the CRD and the operator.

Every field has a description (it becomes `kubectl explain` text). The API server refuses what
these models refuse: field constraints become OpenAPI keywords of the generated CRD (`crd.py`),
and every other rule is an `Invariant` (`rules.py`) that pairs the Python check with its CEL rule,
declared here beside the model it guards.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from modelfleet.api.rules import Invariant, check_all, validations
from modelfleet.api.times import format_time
from modelfleet.api.units import (
    DURATION_PATTERN,
    NONZERO_QUANTITY_PATTERN,
    UNSIGNED_QUANTITY_PATTERN,
    parse_duration,
    parse_quantity,
)

API_GROUP = "modelfleet.io"
API_VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["mdeploy"]

# Object names. The operator names the model's Service <name>, a DNS-1035 label (at most 63
# characters, starting with a letter: the API server refuses any other Service name), labels its
# Pods modelfleet.io/deployment=<name> (label values: at most 63 characters) and names replica n
# <name>-instance-<n>; a Pod's hostname is its name cut at 63 characters, so a longer name would
# give replicas the same hostname. 63 - len("-instance-999") = 50.
MAX_REPLICAS = 999
INSTANCE_INFIX = "-instance-"
MAX_NAME_LENGTH = 63 - len(INSTANCE_INFIX) - len(str(MAX_REPLICAS))
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)

# Label values (node labels such as nvidia.com/gpu.product, toleration values) and label keys
# (qualified names: an optional DNS-subdomain prefix and "/", then at most 63 characters).
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE_PATTERN)]
LabelKey = Annotated[str, StringConstraints(max_length=253 + 1 + 63, pattern=LABEL_KEY_PATTERN)]

# Strings a CEL rule reads are bounded, so the API server's cost estimate of the rule stays small
# (without maxLength it assumes a string as long as a whole request).
QUANTITY_MAX_LENGTH = 64
MAX_RESOURCES = 32  # resource names in engine.resources.limits or .requests
MAX_TOLERATIONS = 64  # entries in placement.tolerations
DURATION_MAX_LENGTH = 64


def _short(value: int | str, limit: int) -> None:
    # The CRD's maxLength, checked here too so that both refuse the same strings.
    if isinstance(value, str) and len(value) > limit:
        raise ValueError(f"{value[:20]!r}... is {len(value)} characters long; at most {limit}")


def _quantity_at_least_zero(value: int | str) -> bool:
    _short(value, QUANTITY_MAX_LENGTH)
    if parse_quantity(value) < 0:
        raise ValueError(f"{value!r} is negative; a quantity here must be zero or more")
    return True


def _quantity_above_zero(value: int | str) -> bool:
    _short(value, QUANTITY_MAX_LENGTH)
    amount = parse_quantity(value)
    if amount <= 0:
        sign = "negative" if amount < 0 else "zero"
        raise ValueError(f"{value!r} is {sign}; a quantity here must be more than zero, e.g. 20Gi")
    return True


def _is_duration(value: str) -> bool:
    _short(value, DURATION_MAX_LENGTH)
    parse_duration(value)
    return True


# int-or-string is a dynamic type in CEL: every rule on a quantity tests which one it got. The
# string patterns are the API server's own quantity pattern without a minus sign.
_STRING_QUANTITY = f"self.matches(r'{UNSIGNED_QUANTITY_PATTERN}')"
QUANTITY_AT_LEAST_ZERO = Invariant(
    holds=_quantity_at_least_zero,
    cel=f"type(self) == int ? self >= 0 : {_STRING_QUANTITY}",
    message=(
        "{field} must be a Kubernetes quantity of zero or more: a number with an optional "
        "suffix, such as 24Gi, 16000Mi, 500m or 2"
    ),
)
QUANTITY_ABOVE_ZERO = Invariant(
    holds=_quantity_above_zero,
    cel=(
        f"type(self) == int ? self > 0 : "
        f"{_STRING_QUANTITY} && self.matches(r'{NONZERO_QUANTITY_PATTERN}')"
    ),
    message=(
        "{field} must be a Kubernetes quantity of more than zero: a number with an optional "
        "suffix, such as 20Gi or 16000Mi"
    ),
)
IS_DURATION = Invariant(
    holds=_is_duration,
    cel=f"self.matches(r'{DURATION_PATTERN}')",
    message="{field} must be a duration: a number with a unit, such as 90s, 30m or 1h30m",
)


def _int_or_string(rule: Invariant) -> dict[str, Any]:
    return {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
        "maxLength": QUANTITY_MAX_LENGTH,
        **validations(rule),
    }


# A Kubernetes quantity: an integer or a string such as "24Gi" (int-or-string in the CRD, as in
# core/v1 ResourceRequirements), zero or more.
Quantity = Annotated[
    int | str,
    AfterValidator(QUANTITY_AT_LEAST_ZERO.check),
    WithJsonSchema(_int_or_string(QUANTITY_AT_LEAST_ZERO)),
]
# The same, more than zero: GPU memory a replica uses.
PositiveQuantity = Annotated[
    int | str,
    AfterValidator(QUANTITY_ABOVE_ZERO.check),
    WithJsonSchema(_int_or_string(QUANTITY_ABOVE_ZERO)),
]
Duration = Annotated[
    str,
    AfterValidator(IS_DURATION.check),
    WithJsonSchema(
        {"type": "string", "maxLength": DURATION_MAX_LENGTH, **validations(IS_DURATION)}
    ),
]
# Times travel as RFC 3339 strings, the form Kubernetes uses.
Timestamp = Annotated[
    datetime,
    PlainSerializer(format_time, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def _invariants_to_schema(schema: dict[str, Any], cls: type[Any]) -> None:
    invariants: tuple[Invariant, ...] = getattr(cls, "invariants", ())
    if invariants:
        schema.update(validations(*invariants))


class _Model(BaseModel):
    """Base for every API model: camelCase on the wire, unknown fields refused.

    `invariants` are the model's rules across fields: pydantic checks them after the fields, and
    the CRD carries their CEL rules on the model's schema node.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        json_schema_extra=_invariants_to_schema,
    )
    invariants: ClassVar[tuple[Invariant, ...]] = ()

    @model_validator(mode="after")
    def _check_invariants(self) -> Any:
        check_all(self, type(self).invariants)
        return self


class SharingMode(StrEnum):
    EXCLUSIVE = "Exclusive"
    SHARED = "Shared"


class PlacementStrategy(StrEnum):
    AVAILABILITY = "Availability"
    ROUND_ROBIN = "RoundRobin"
    WEIGHTED = "Weighted"
    BIN_PACK = "BinPack"


class Balancing(StrEnum):
    """How the gateway spreads a model's requests over its ready replicas (spec.routing.policy,
    else the annotation modelfleet.io/balancing, else the gateway's setting)."""

    ROUND_ROBIN = "RoundRobin"
    LEAST_OUTSTANDING = "LeastOutstanding"
    # Consistent hashing with bounded load over the prompt's first characters.
    PREFIX_HASH = "PrefixHash"
    # The least loaded replica by the engine's own queue (scraped) and the gateway's in-flight.
    LOAD_AWARE = "LoadAware"
    # Consistent hashing with bounded load over x-session-id or the OpenAI `user` field.
    SESSION_AFFINITY = "SessionAffinity"


class RoutingSpec(_Model):
    """How the gateway chooses among this model's replicas; every field empty: the gateway's
    defaults (docs/gateway.md, Routing)."""

    policy: Balancing | None = Field(
        None,
        description=(
            "RoundRobin, LeastOutstanding, PrefixHash (requests that share a prompt prefix go "
            "to the same replica, whose KV cache holds it), LoadAware (the replica with the "
            "shortest engine queue) or SessionAffinity (x-session-id header or the OpenAI user "
            "field); empty: the gateway's default."
        ),
    )
    prefix_chars: int | None = Field(
        None,
        ge=16,
        le=65536,
        description=(
            "PrefixHash: how many characters of the prompt (chat messages' contents in order, "
            "or the completion prompt, whitespace collapsed) choose the replica; longer than a "
            "system prompt that all users share, so that conversations spread. Empty: the "
            "gateway's default (256)."
        ),
    )
    load_factor: float | None = Field(
        None,
        ge=1.0,
        le=10.0,
        description=(
            "PrefixHash and SessionAffinity: a replica takes a request only while its load is "
            "below this factor times the average; beyond it the request goes to the next "
            "replica on the ring. Empty: the gateway's default (1.5)."
        ),
    )
    engine_load: bool | None = Field(
        None,
        description=(
            "PrefixHash and SessionAffinity: count each replica's engine queue, scraped from its "
            "/metrics, in its load beside the gateway's own in-flight requests (LoadAware always "
            "does). Empty: the gateway's default (false)."
        ),
    )
    hold_timeout: Duration | None = Field(
        None,
        description=(
            "How long the gateway holds a request for this model while no replica is ready "
            "(a scale-up from zero, a first start that pulls the image and downloads the "
            "weights) before it answers 503. Empty: the gateway's default "
            "(MODELFLEET_GATEWAY_COLD_START_TIMEOUT_S, 10m)."
        ),
    )


class GpuSpec(_Model):
    """GPUs one replica needs."""

    count: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs per replica; vLLM's tensor-parallel size is set to this number.",
    )
    memory: PositiveQuantity | None = Field(
        None,
        description=(
            "GPU memory one replica uses (its footprint), e.g. 24Gi. Required when sharing is "
            "Shared. When absent in Exclusive mode, the first replica measures it."
        ),
    )
    product: LabelValue | None = Field(
        None,
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

    # Every field a CEL rule reads is guarded by has(): the API server also checks the rules
    # against the schema's `default: {}` values, where the nested defaults are not filled in yet.
    invariants = (
        Invariant(
            holds=lambda gpu: gpu.sharing != SharingMode.SHARED or gpu.memory is not None,
            cel="!has(self.sharing) || self.sharing != 'Shared' || has(self.memory)",
            message=(
                "spec.gpu.memory is required when spec.gpu.sharing is Shared: "
                "set the memory each replica uses, e.g. memory: 20Gi"
            ),
            field_path=".memory",
            reason="FieldValueRequired",
        ),
    )


class Toleration(_Model):
    """A toleration, as in a Pod spec, for tainted GPU nodes."""

    key: LabelKey | None = Field(
        None, description="Taint key the toleration applies to; empty (with Exists) matches all."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Exists or Equal (default Equal)."
    )
    value: LabelValue | None = Field(
        None, description="Taint value to match when operator is Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, description="How long a NoExecute taint is tolerated, in seconds."
    )

    # The Pod API's rules for tolerations: the replica Pods carry these tolerations.
    invariants = (
        Invariant(
            holds=lambda t: bool(t.key) or t.operator == "Exists",
            cel=(
                "(has(self.key) && size(self.key) > 0) || "
                "(has(self.operator) && self.operator == 'Exists')"
            ),
            message=(
                "spec.placement.tolerations: a toleration without a key must have "
                "operator: Exists (it then tolerates every taint); set key, or operator: Exists"
            ),
            field_path=".operator",
        ),
        Invariant(
            holds=lambda t: t.operator != "Exists" or not t.value,
            cel=(
                "!has(self.operator) || self.operator != 'Exists' || "
                "!has(self.value) || size(self.value) == 0"
            ),
            message=(
                "spec.placement.tolerations: value must be empty when operator is Exists; "
                "remove value, or use operator: Equal"
            ),
            field_path=".value",
        ),
        Invariant(
            holds=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message=(
                "spec.placement.tolerations: tolerationSeconds applies only to effect: "
                "NoExecute; set effect: NoExecute or remove tolerationSeconds"
            ),
            field_path=".effect",
        ),
    )


class PlacementSpec(_Model):
    """Where replicas may go and how the node is chosen."""

    strategy: PlacementStrategy | None = Field(
        None,
        description=(
            "Availability (most free GPUs, by share), RoundRobin, Weighted (by capacity) or "
            "BinPack (most allocated, best fit). Empty means the operator's default."
        ),
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Node labels every replica's node must carry."
    )
    # Bounded for the same reason as engine.resources: the API server multiplies the cost of
    # each toleration's rules by the longest list the schema allows.
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=MAX_TOLERATIONS,
        description="Taints the replicas tolerate.",
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

    invariants = (
        Invariant(
            holds=lambda var: not (var.value and var.value_from is not None),
            cel="!has(self.valueFrom) || !has(self.value) || size(self.value) == 0",
            message="spec.engine.env: set either value or valueFrom, not both",
            field_path=".valueFrom",
        ),
    )


class ResourceRequirements(_Model):
    """CPU and memory for the engine container (GPUs come from spec.gpu)."""

    # At most MAX_RESOURCES names each: the API server multiplies the cost of the rule on each
    # quantity by the largest number of entries a map may have.
    limits: dict[str, Quantity] = Field(
        default_factory=dict, max_length=MAX_RESOURCES, description="Resource limits."
    )
    requests: dict[str, Quantity] = Field(
        default_factory=dict, max_length=MAX_RESOURCES, description="Resource requests."
    )


# A DNS subdomain name, as Secrets, PersistentVolumeClaims, ServiceAccounts, RuntimeClasses and
# PriorityClasses are named.
ObjectName = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ),
]
MAX_PULL_SECRETS = 16


class SecretKey(_Model):
    """A key of a Secret in the ModelDeployment's namespace."""

    secret_name: ObjectName = Field(..., description="Name of the Secret.")
    key: Annotated[
        str, StringConstraints(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    ] = Field("HF_TOKEN", description="Key in the Secret that holds the value.")


class CacheSpec(_Model):
    """Where a replica keeps downloaded weights and compiled kernels (mounted at /cache)."""

    persistent_volume_claim: ObjectName | None = Field(
        None,
        description=(
            "A PersistentVolumeClaim in the namespace, shared by every replica of the model "
            "(ReadWriteMany, or ReadWriteOnce when the replicas share one node): weights are "
            "downloaded once, and a restart reads them back."
        ),
    )
    host_path: Annotated[str, StringConstraints(max_length=4096, pattern=r"^/.*")] | None = Field(
        None,
        description=(
            "A directory on the node, shared by every replica there: a second replica or a "
            "restart on the node does not download again. It must be writable by the replicas' "
            "uid (1000 by default): one the kubelet creates is root's, and vLLM then fails to "
            "download. Needs a namespace whose Pod Security level allows hostPath volumes."
        ),
    )
    size_limit: PositiveQuantity | None = Field(
        None,
        description=(
            "Neither set: an emptyDir of this size, also requested as ephemeral-storage so the "
            "kubelet places and evicts by it. Empty: an unsized emptyDir."
        ),
    )

    invariants = (
        Invariant(
            holds=lambda c: c.persistent_volume_claim is None or c.host_path is None,
            cel="!has(self.persistentVolumeClaim) || !has(self.hostPath)",
            message="spec.engine.cache.hostPath: set persistentVolumeClaim or hostPath, not both",
            field_path=".hostPath",
        ),
        Invariant(
            holds=lambda c: (
                c.size_limit is None or (c.persistent_volume_claim is None and c.host_path is None)
            ),
            cel="!has(self.sizeLimit) || (!has(self.persistentVolumeClaim) && !has(self.hostPath))",
            message=(
                "spec.engine.cache.sizeLimit sizes the emptyDir used when neither "
                "persistentVolumeClaim nor hostPath is set; remove it, or the volume"
            ),
            field_path=".sizeLimit",
        ),
    )


# Volume names and mount paths of the replica Pod that the operator uses itself.
RESERVED_VOLUMES = ("shm", "cache", "tmp")
RESERVED_MOUNT_PATHS = ("/dev/shm", "/cache", "/tmp")
MAX_EXTRA_VOLUMES = 16
DnsLabel = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
]


class ExtraVolume(_Model):
    """A volume of the replica Pod, as in a Pod spec: a name and one source (configMap, secret,
    persistentVolumeClaim, csi, ...); the API server checks the source when the Pod is made."""

    model_config = ConfigDict(extra="allow")

    name: DnsLabel = Field(..., description="Volume name; shm, cache and tmp are the operator's.")

    invariants = (
        Invariant(
            holds=lambda v: v.name not in RESERVED_VOLUMES,
            cel="!(self.name in " + repr(list(RESERVED_VOLUMES)) + ")",
            message=(
                "spec.engine.volumes[*].name: shm, cache and tmp are the replica's own volumes; "
                "choose another name (the model cache is spec.engine.cache)"
            ),
            field_path=".name",
        ),
    )


class ExtraVolumeMount(_Model):
    """Where the vLLM container mounts one of spec.engine.volumes."""

    name: DnsLabel = Field(..., description="Name of a volume in spec.engine.volumes.")
    mount_path: Annotated[str, StringConstraints(max_length=4096, pattern=r"^/.*")] = Field(
        ..., description="Absolute path in the container."
    )
    read_only: bool | None = Field(None, description="Mount read-only.")
    sub_path: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        None, description="Path within the volume to mount instead of its root."
    )

    invariants = (
        Invariant(
            holds=lambda m: m.mount_path.rstrip("/") not in RESERVED_MOUNT_PATHS,
            cel=(
                "!((self.mountPath.endsWith('/') ? self.mountPath.substring(0, "
                "size(self.mountPath) - 1) : self.mountPath) in "
                + repr(list(RESERVED_MOUNT_PATHS))
                + ")"
            ),
            message=(
                "spec.engine.volumeMounts[*].mountPath: /dev/shm, /cache and /tmp are "
                "mounted by the operator; mount the volume elsewhere"
            ),
            field_path=".mountPath",
        ),
    )


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
    hugging_face_token: SecretKey | None = Field(
        None,
        description=(
            "A Secret key holding a Hugging Face token, passed as HF_TOKEN: gated models "
            "(gemma, Llama) need one. A missing Secret or key keeps the replica from starting "
            "(CreateContainerConfigError) and status says so."
        ),
    )
    cache: CacheSpec | None = Field(
        None, description="Where weights and compiled kernels are kept; empty: an emptyDir."
    )
    startup_timeout: Duration | None = Field(
        None,
        description=(
            "How long a replica may take to answer /health for the first time (image pull not "
            "included: download, load, compile) before the kubelet restarts it; empty: 30m."
        ),
    )
    runtime_class_name: ObjectName | None = Field(
        None,
        description="RuntimeClass of the replica Pods, e.g. nvidia where it is not the default.",
    )
    image_pull_secrets: list[ObjectName] = Field(
        default_factory=list,
        max_length=MAX_PULL_SECRETS,
        description="Secrets (names, in the namespace) for pulling a private engine image.",
    )
    service_account_name: ObjectName | None = Field(
        None,
        description="ServiceAccount of the replica Pods; its token is never mounted.",
    )
    priority_class_name: ObjectName | None = Field(
        None,
        description=(
            "PriorityClass of the replica Pods (the kubelet's and the cluster's order, e.g. for "
            "node-pressure eviction); spec.priority orders modelfleet's own evictions."
        ),
    )
    volumes: list[ExtraVolume] = Field(
        default_factory=list,
        max_length=MAX_EXTRA_VOLUMES,
        description="Extra volumes of the replica Pods, as in a Pod spec.",
    )
    volume_mounts: list[ExtraVolumeMount] = Field(
        default_factory=list,
        max_length=MAX_EXTRA_VOLUMES,
        description="Where the vLLM container mounts spec.engine.volumes.",
    )

    invariants = (
        Invariant(
            holds=lambda e: len({v.name for v in e.volumes}) == len(e.volumes),
            cel=(
                "!has(self.volumes) || "
                "self.volumes.all(v, self.volumes.exists_one(w, w.name == v.name))"
            ),
            message="spec.engine.volumes: two volumes have the same name; names must be unique",
            field_path=".volumes",
        ),
        Invariant(
            holds=lambda e: {m.name for m in e.volume_mounts} <= {v.name for v in e.volumes},
            cel=(
                "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
                "self.volumes.exists(v, v.name == m.name))"
            ),
            message=(
                "spec.engine.volumeMounts: a mount names no volume of spec.engine.volumes; "
                "add the volume or fix the name"
            ),
            field_path=".volumeMounts",
        ),
    )


# vLLM's default --max-num-seqs: the most requests one engine batches at once.
DEFAULT_BATCH_CAPACITY = 256


class AutoscalingSpec(_Model):
    """The built-in autoscaler: spec.replicas follows the engines' load (docs/operator.md,
    Autoscaling). Off: spec.replicas is left to people or to an external autoscaler (/scale)."""

    enabled: bool = Field(
        False,
        description=(
            "Let the operator set spec.replicas from the load; off, it never writes spec.replicas "
            "and HPA or KEDA may drive the scale subresource."
        ),
    )
    min_replicas: int = Field(
        1,
        ge=1,
        le=MAX_REPLICAS,
        description=(
            "Fewest replicas the autoscaler sets; at least spec.minReplicas (the eviction floor). "
            "Scaling to zero stays the idle rule's (spec.idleTimeout)."
        ),
    )
    max_replicas: int | None = Field(
        None,
        ge=1,
        le=MAX_REPLICAS,
        description="Most replicas the autoscaler sets; required when enabled.",
    )
    target_per_replica: int | None = Field(
        None,
        ge=1,
        le=65536,
        description=(
            "Requests (running plus waiting in the engine) one replica should carry; empty: the "
            "engine's batch capacity (--max-num-seqs in engine.args, else vLLM's 256)."
        ),
    )
    scale_up_window: Duration | None = Field(
        None,
        description=(
            "Scale up only to the lowest count wanted over this window, e.g. 30s; empty: 0s "
            "(at once)."
        ),
    )
    scale_down_window: Duration | None = Field(
        None,
        description=(
            "Scale down only to the highest count wanted over this window, e.g. 5m; empty: 5m."
        ),
    )

    invariants = (
        Invariant(
            holds=lambda a: not a.enabled or a.max_replicas is not None,
            cel="!has(self.enabled) || !self.enabled || has(self.maxReplicas)",
            message=(
                "spec.autoscaling.maxReplicas is required when spec.autoscaling.enabled is true: "
                "set the most replicas the autoscaler may run"
            ),
            field_path=".maxReplicas",
        ),
        Invariant(
            holds=lambda a: a.max_replicas is None or a.min_replicas <= a.max_replicas,
            cel=(
                "!has(self.maxReplicas) || !has(self.minReplicas) || "
                "self.minReplicas <= self.maxReplicas"
            ),
            message=(
                "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas: "
                "lower minReplicas or raise maxReplicas"
            ),
            field_path=".minReplicas",
        ),
    )


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
    replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="Parallel instances to run.")
    min_replicas: int = Field(
        0,
        ge=0,
        le=MAX_REPLICAS,
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
    routing: RoutingSpec = Field(
        default_factory=RoutingSpec,
        description="How the gateway spreads requests over the replicas (policy and its knobs).",
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec,
        description="Replicas that follow the load, between bounds (off by default).",
    )

    invariants = (
        Invariant(
            holds=lambda spec: _min_not_above_replicas(spec.min_replicas, spec.replicas),
            cel=(
                "!has(self.minReplicas) || !has(self.replicas) || self.minReplicas <= self.replicas"
            ),
            message=(
                "spec.minReplicas must not exceed spec.replicas: "
                "lower minReplicas or raise replicas"
            ),
            field_path=".minReplicas",
        ),
        Invariant(
            holds=lambda spec: _floor_within_autoscaling(spec.min_replicas, spec.autoscaling),
            cel=(
                "!has(self.autoscaling) || !has(self.autoscaling.enabled) || "
                "!self.autoscaling.enabled || !has(self.minReplicas) || "
                "self.minReplicas <= (has(self.autoscaling.minReplicas) ? "
                "self.autoscaling.minReplicas : 1)"
            ),
            message=(
                "spec.minReplicas (the eviction floor) must not exceed "
                "spec.autoscaling.minReplicas: the autoscaler never goes below the floor; "
                "raise autoscaling.minReplicas or lower minReplicas"
            ),
            field_path=".autoscaling.minReplicas",
        ),
    )


def _floor_within_autoscaling(min_replicas: int, autoscaling: AutoscalingSpec) -> bool:
    if autoscaling.enabled and min_replicas > autoscaling.min_replicas:
        raise ValueError(
            f"spec.minReplicas ({min_replicas}, the eviction floor) must not exceed "
            f"spec.autoscaling.minReplicas ({autoscaling.min_replicas}): the autoscaler never "
            "goes below the floor; raise autoscaling.minReplicas or lower minReplicas"
        )
    return True


def _min_not_above_replicas(min_replicas: int, replicas: int) -> bool:
    if min_replicas > replicas:
        raise ValueError(
            f"spec.minReplicas ({min_replicas}) must not exceed spec.replicas ({replicas}): "
            "lower minReplicas or raise replicas"
        )
    return True


class ConditionType(StrEnum):
    AVAILABLE = "Available"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    # The gateway routes the served name here: no older ModelDeployment claims the same name.
    ROUTED = "Routed"
    # In status.autoscaling: the autoscaler cannot raise the count (maxReplicas, or placement).
    SCALING_LIMITED = "ScalingLimited"


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
        default_factory=list,
        description=(
            "Global GPU IDs (<node>:<index>) it uses: the ones the node assigned (the kubelet's "
            "device manager, as the agent reports them) once known, else the ones planned."
        ),
    )
    planned_gpus: list[str] = Field(
        default_factory=list,
        description="The GPUs placement planned, only when the node assigned others.",
    )
    phase: str = Field("Pending", description="Pending, Starting, Ready, Terminating or Failed.")
    reason: str = Field("", description="Why it is in this phase.")
    message: str = Field(
        "",
        description=(
            'What the kubelet says about it (e.g. secret "hf" not found), or how its last '
            "run ended while it crash-loops."
        ),
    )
    started_at: Timestamp | None = Field(None, description="When it became ready.")


class AutoscalingSignal(_Model):
    """The load figures one autoscaler decision was made from."""

    running: float = Field(0, description="Requests the engines were running, summed.")
    waiting: float = Field(0, description="Requests waiting in the engines' queues, summed.")
    held: int = Field(
        0, description="Requests the gateway held for the model, which had no ready replica."
    )
    replicas_measured: int = Field(
        0, description="Ready replicas whose engine figures were fresh this round."
    )
    target: int = Field(0, description="Requests one replica should carry (the policy's target).")


class AutoscalingStatus(_Model):
    """The built-in autoscaler's last decision, in the manner of a HorizontalPodAutoscaler's
    status. Written only by the autoscaler, through the status subresource."""

    desired_replicas: int = Field(0, description="Replicas the autoscaler decided on.")
    signal: AutoscalingSignal = Field(
        default_factory=AutoscalingSignal, description="The figures the decision was made from."
    )
    reason: str = Field("", description="The decision in words, with its figures.")
    last_scale_time: Timestamp | None = Field(
        None, description="When the autoscaler last changed spec.replicas."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description=(
            "ScalingLimited: True when the count cannot grow (maxReplicas, or replicas already "
            "asked for that placement cannot place)."
        ),
    )


class ModelDeploymentStatus(_Model):
    """What the operator observed and did."""

    replicas: int = Field(0, description="Replica Pods that exist.")
    ready_replicas: int = Field(0, description="Replica Pods that are ready to serve.")
    instances: list[Instance] = Field(default_factory=list, description="Every replica Pod.")
    footprint: Quantity | None = Field(
        None,
        description=(
            "GPU memory per GPU the first replica was measured to hold, when spec.gpu.memory is "
            "not set. vLLM preallocates --gpu-memory-utilization (0.9 by default) of each GPU "
            "it gets, so this is that preallocation, not the least the model needs: it is shown, "
            "never used to share a GPU (Shared replicas declare spec.gpu.memory)."
        ),
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
    autoscaling: AutoscalingStatus | None = Field(
        None,
        description=(
            "The built-in autoscaler's last decision (spec.autoscaling.enabled); written by the "
            "autoscaler alone, never by the reconcile."
        ),
    )


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

    # Rules on the whole object; the CRD carries them at the root of its schema, the only place a
    # CEL rule may read metadata.name.
    invariants: ClassVar[tuple[Invariant, ...]] = (
        Invariant(
            holds=lambda md: _name_is_valid(md.metadata.name),
            cel=(
                f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && "
                f"self.metadata.name.matches(r'{NAME_PATTERN}')"
            ),
            message=(
                f"metadata.name must be a DNS label (RFC 1035) of at most {MAX_NAME_LENGTH} "
                "characters: lowercase letters, digits and '-', starting with a letter and ending "
                "with a letter or digit, e.g. gemma3-4b (the model's Service is named <name> and "
                "its replica Pods <name>-instance-<n>)"
            ),
            field_path=".metadata.name",
        ),
    )

    @model_validator(mode="after")
    def _check_invariants(self) -> ModelDeployment:
        check_all(self, type(self).invariants)
        return self

    @property
    def served_name(self) -> str:
        """The model name clients send: spec.servedModelName, else the object's name."""
        return self.spec.served_model_name or self.metadata.name


def _name_is_valid(name: str) -> bool:
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"metadata.name {name!r} must be a DNS label (RFC 1035) of at most {MAX_NAME_LENGTH} "
            "characters: lowercase letters, digits and '-', starting with a letter and ending "
            "with a letter or digit, e.g. gemma3-4b (the model's Service is named <name> and its "
            "replica Pods <name>-instance-<n>)"
        )
    return True
