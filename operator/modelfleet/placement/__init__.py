"""Placement: choose a node and GPUs for a replica, or whom to evict, or say why it waits.

Pure code: no kopf, no Kubernetes client, no HTTP (an import-linter contract checks it). The
operator adapts the pool snapshot and the replica Pods to the input types, then:

    view = build_view(nodes, replicas, settings, cursor)
    decision = decide(view, request)        # Placed | Evict | Unplaceable
    view = view.with_placed(decision)       # after creating the Pod of a Placed decision
    view = view.with_evicted(decision)      # after deleting the victims of an Evict decision

When nothing fits but enough GPUs are free in total, `plan_consolidation(view, request,
templates, budgets)` returns the fewest make-before-break moves that make room (Consolidation),
or why none can (Unplaceable).

docs/placement.md describes every strategy, score and rule with worked examples.
"""

from modelfleet.placement.consolidation import Consolidation, Move, plan_consolidation
from modelfleet.placement.engine import (
    check_request,
    compute_eviction_floors,
    compute_fragmentation_penalty,
    decide,
)
from modelfleet.placement.eviction import eviction_key
from modelfleet.placement.model import (
    NO_REQUESTS,
    ONE_POD,
    PRODUCT_LABEL,
    Decision,
    DeploymentRef,
    Evict,
    GpuInfo,
    NodeInfo,
    Placed,
    PlacedReplica,
    PlacementInputError,
    PlacementSettings,
    PlacementStrategy,
    ReplicaRequest,
    ReplicaState,
    Requests,
    SharingMode,
    Taint,
    Toleration,
    Unplaceable,
    UnplaceableCode,
)
from modelfleet.placement.view import ClusterView, LedgerEntry, build_view, compute_ledger

__all__ = [
    "NO_REQUESTS",
    "ONE_POD",
    "PRODUCT_LABEL",
    "ClusterView",
    "Consolidation",
    "Decision",
    "DeploymentRef",
    "Evict",
    "GpuInfo",
    "LedgerEntry",
    "Move",
    "NodeInfo",
    "Placed",
    "PlacedReplica",
    "PlacementInputError",
    "PlacementSettings",
    "PlacementStrategy",
    "ReplicaRequest",
    "ReplicaState",
    "Requests",
    "SharingMode",
    "Taint",
    "Toleration",
    "Unplaceable",
    "UnplaceableCode",
    "build_view",
    "check_request",
    "compute_eviction_floors",
    "compute_fragmentation_penalty",
    "compute_ledger",
    "decide",
    "eviction_key",
    "plan_consolidation",
]
