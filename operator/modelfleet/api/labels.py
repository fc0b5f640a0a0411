"""Label and annotation keys: the contract between the operator, the gateway and the agents.

Replica Pods carry what every component needs to rebuild its view from the API alone (state
lives in the API server, not in any process).
"""

from __future__ import annotations

PREFIX = "modelfleet.io"

# Labels on replica Pods (and the Service selector).
LABEL_NAME = "app.kubernetes.io/name"  # "modelfleet" on everything the project creates
LABEL_COMPONENT = "app.kubernetes.io/component"  # "replica", "agent", "operator", "gateway"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"  # "modelfleet-operator" on replica Pods
LABEL_DEPLOYMENT = f"{PREFIX}/deployment"  # owning ModelDeployment's name
LABEL_INSTANCE = f"{PREFIX}/instance"  # instance number n of <deployment>-instance-<n>
COMPONENT_REPLICA = "replica"
COMPONENT_AGENT = "agent"
NAME_VALUE = "modelfleet"  # value of LABEL_NAME
MANAGED_BY_OPERATOR = "modelfleet-operator"  # value of LABEL_MANAGED_BY on replica Pods

# Annotations on replica Pods, written once at creation by the operator.
ANN_GPUS = f"{PREFIX}/gpus"  # comma-separated global GPU IDs, e.g. "gpu-node-a:0,gpu-node-a:1"
ANN_GPU_UUIDS = f"{PREFIX}/gpu-uuids"  # comma-separated UUIDs, same order as ANN_GPUS
# The GPUs the node assigned (its device manager, as the agent reads pod-resources), written by
# the operator once an agent reports them; ANN_GPUS stays what placement planned.
ANN_ASSIGNED_GPUS = f"{PREFIX}/assigned-gpus"
ANN_FOOTPRINT_MIB = f"{PREFIX}/footprint-mib"  # GPU memory promised per GPU, MiB ("" = whole GPU)
ANN_SHARING = f"{PREFIX}/sharing"  # Exclusive or Shared
ANN_PLACEMENT_REASON = f"{PREFIX}/placement-reason"  # the placement engine's reason, for people
ANN_SERVED_MODEL = f"{PREFIX}/served-model-name"  # the name the gateway routes by
ANN_PRIORITY = f"{PREFIX}/priority"  # copy of spec.priority, for eviction without a lookup
ANN_TEMPLATE_HASH = f"{PREFIX}/template-hash"  # hash of the spec parts the Pod is built from
ANN_MIN_REPLICAS = f"{PREFIX}/min-replicas"  # copy of spec.minReplicas, the eviction floor

# Annotations on ModelDeployments.
ANN_LAST_REQUEST = f"{PREFIX}/last-request-time"  # RFC 3339, written by the gateway
ANN_DEMAND = f"{PREFIX}/demand-time"  # RFC 3339, a request waited for a model scaled to zero
ANN_BALANCING = f"{PREFIX}/balancing"  # RoundRobin or LeastOutstanding, read by the gateway
ANN_EVICTED_AT = f"{PREFIX}/evicted-at"  # RFC 3339, written by the operator on an eviction victim
ANN_EVICTED_BY = f"{PREFIX}/evicted-by"  # <namespace>/<name> of the deployment that needed room
# On the deployment that evicted: the GPUs the eviction freed, held for it until it places its
# replica or the time passes. JSON {"gpus": ["<node>:<i>", ...], "until": RFC 3339}.
ANN_RESERVATION = f"{PREFIX}/reservation"
# On a deployment whose replica's move was abandoned (its copy never became Ready): when, RFC 3339.
# It counts against the deployment's move budget, so a copy that cannot start is not retried at
# once.
ANN_MOVE_ABANDONED_AT = f"{PREFIX}/move-abandoned-at"
# On a consolidation copy (a replica started elsewhere so that its old Pod can go): the old Pod's
# name and UID, the <namespace>/<name> of the deployment the move makes room for, the time the
# copy was decided and the deadline by which it must be Ready (RFC 3339). Until the copy is Ready
# the old Pod keeps serving; then the old Pod is deleted. A copy not Ready by the deadline is
# deleted instead (docs/placement.md, Consolidation).
ANN_MOVE_OF = f"{PREFIX}/move-of"
ANN_MOVE_OF_UID = f"{PREFIX}/move-of-uid"
ANN_MOVE_FOR = f"{PREFIX}/move-for"
ANN_MOVED_AT = f"{PREFIX}/moved-at"
ANN_MOVE_DEADLINE = f"{PREFIX}/move-deadline"
