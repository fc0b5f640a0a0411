"""What makes a Pod a replica and a ModelDeployment the holder of a served name. Pure.

Labels and annotations can be written by anyone who may create a Pod, so they only say what a Pod
claims to be. A replica is a Pod whose controller ownerReference names an existing
ModelDeployment by UID: only the operator creates those (a look-alike would have to know the
UID and be made in that namespace, and then the garbage collector deletes it with the
deployment). The operator and the gateway both decide with these functions, so they never
disagree about which Pods and names count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from modelfleet.api.times import parse_time
from modelfleet.api.v1alpha1 import API_GROUP, API_VERSION, KIND

OWNER_API_VERSION = f"{API_GROUP}/{API_VERSION}"

# A deployment without a creation time (never from the API server) sorts after every other.
NEVER = datetime.max.replace(tzinfo=UTC)

# Why a Pod with the replica labels is not a replica: the values of the ignored-pods metrics.
NOT_CONTROLLED = "not_controlled"  # no controller ownerReference to a ModelDeployment
OWNER_MISMATCH = "owner_mismatch"  # controlled by a ModelDeployment that is not the labelled one
IGNORED_REASONS = (NOT_CONTROLLED, OWNER_MISMATCH)

ClaimKey = tuple[datetime, str, str]


def controller_uid(meta: Mapping[str, Any]) -> str:
    """The UID of the ModelDeployment that controls an object (from its metadata), else ""."""
    for ref in meta.get("ownerReferences") or ():
        if (
            isinstance(ref, Mapping)
            and ref.get("controller") is True
            and ref.get("kind") == KIND
            and ref.get("apiVersion") == OWNER_API_VERSION
        ):
            return str(ref.get("uid") or "")
    return ""


def compute_ignored_reason(owner_uid: str, deployment_uid: str | None) -> str | None:
    """None when a labelled Pod is a replica of its deployment, else why it is not.

    `owner_uid` is the Pod's `controller_uid`; `deployment_uid` the UID of the ModelDeployment
    that exists in the Pod's namespace under its label's name (None: there is none).
    """
    if not owner_uid:
        return NOT_CONTROLLED
    if deployment_uid is None or owner_uid != deployment_uid:
        return OWNER_MISMATCH
    return None


def served_name(body: Mapping[str, Any]) -> str:
    """The model name clients send for a ModelDeployment: spec.servedModelName, else its name."""
    spec = body.get("spec") or {}
    name = str((body.get("metadata") or {}).get("name") or "")
    served = spec.get("servedModelName") if isinstance(spec, Mapping) else None
    return str(served) if isinstance(served, str) and served else name


def claim_key(body: Mapping[str, Any]) -> ClaimKey:
    """Order of claims on a served name: the oldest deployment first, then namespace/name."""
    meta = body.get("metadata") or {}
    created = parse_time(meta.get("creationTimestamp")) or NEVER
    return (created, str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def compute_name_holders(bodies: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Served name -> (namespace, name) of the ModelDeployment that holds it."""
    best: dict[str, ClaimKey] = {}
    for body in bodies:
        name, claim = served_name(body), claim_key(body)
        held = best.get(name)
        if held is None or claim < held:
            best[name] = claim
    return {name: (claim[1], claim[2]) for name, claim in best.items()}
