"""The gateway's read-only documents, /v1/models and /gateway/status, built from the registry.

Pure functions over the registry's state, kept out of the request path (proxy.py). The model list
changes only when the registry does, so `ModelList` keeps it serialized and rebuilds it only on
the first read after a change (a burst of Pod events between two reads costs one rebuild, and
no read costs none). The status document reports live per-replica counters (requests in
flight, failure streaks, ejections) and the queues, so it is built on each read.
"""

from __future__ import annotations

import json
from typing import Any

from modelfleet.gateway.registry import Registry

# /v1/models `state` of a model.
STATE_READY = "ready"  # at least one ready replica
STATE_COLD = "cold"  # no ready replica: a request waits for one (and wakes a model that idled)
STATE_OFF = "off"  # spec.replicas is 0: requests are refused at once, nothing will start it


def compute_model_state(registry: Registry, model: str) -> str:
    route = registry.routes.get(model)
    if route is not None and route.replicas:
        return STATE_READY
    return STATE_OFF if registry.is_switched_off(model) else STATE_COLD


def build_models_document(registry: Registry) -> dict[str, Any]:
    """/v1/models: every served model, including those at zero replicas and those switched off."""
    data = []
    for model in sorted(registry.models):
        route = registry.routes.get(model)
        data.append(
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "modelfleet",
                "ready_replicas": len(route.replicas) if route is not None else 0,
                "desired_replicas": registry.desired_replicas(model),
                "state": compute_model_state(registry, model),
            }
        )
    return {"object": "list", "data": data}


class ModelList:
    """/v1/models as JSON bytes, rebuilt only after the registry changed."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._generation: int | None = None
        self._body = b""

    def body(self) -> bytes:
        registry = self._registry
        if self._generation != registry.generation:
            self._body = json.dumps(build_models_document(registry)).encode()
            self._generation = registry.generation
        return self._body


def build_status_document(registry: Registry, now: float) -> dict[str, Any]:
    """/gateway/status: the original gateway's fields, plus health and queues.

    `now` is the monotonic clock the replicas' ejection deadlines are measured on.
    """
    by_model: dict[str, list[dict[str, Any]]] = {}
    by_name: dict[str, dict[str, Any]] = {}
    for model, route in sorted(registry.routes.items()):
        instances = []
        for replica in route.replicas:
            item = {
                "name": replica.name,
                "namespace": replica.namespace,
                "model": model,
                "address": replica.address,
                "outstanding": replica.outstanding,
                "requests": replica.requests,
                "consecutive_failures": replica.consecutive_failures,
                "ejected": replica.ejected_until > now,
                "ejected_for_s": round(max(0.0, replica.ejected_until - now), 3),
            }
            instances.append(item)
            by_name[replica.name] = item
        if instances:
            by_model[model] = instances
    return {
        "healthy": registry.is_synced,
        "synced": dict(registry.synced),
        "parallel_model_config": {m: registry.desired_replicas(m) for m in sorted(registry.models)},
        "active_models_by_id": by_model,
        "active_containers_by_name": dict(sorted(by_name.items())),
        "queue_depth": registry.queue_depths(),
        "switched_off": [m for m in sorted(registry.models) if registry.is_switched_off(m)],
        "balancing": {m: r.balancing for m, r in sorted(registry.routes.items())},
        "deployments": {
            m: [f"{d.namespace}/{d.name}" if d.namespace else d.name for d in infos]
            for m, infos in sorted(registry.models.items())
        },
    }
