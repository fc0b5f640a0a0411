"""The gateway's view of the fleet: ModelDeployments, their ready Pods, and a route per model.

Sources (the Kubernetes watch, or a static list) feed objects in; the proxy reads `routes`, a plain
dict from served model name to Route, so the request path does one lookup and no locking.

The registry also owns each model's waiting queue: a request for a model without a ready replica
takes a place (`hold`), waits (`wait_for_replica`) and leaves (`release`); a rebuild that gives the
model a ready replica, switches it off or removes it wakes the waiters. `generation` counts the
changes, so documents derived from the registry (documents.py) are rebuilt only after one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from typing import Any

from modelfleet.api.ownership import compute_ignored_reason
from modelfleet.api.v1alpha1 import Balancing
from modelfleet.gateway.balancer import Route, build_route
from modelfleet.gateway.model import (
    DeploymentInfo,
    PodEndpoint,
    parse_deployment,
    parse_replica_pod,
)
from modelfleet.gateway.routing import RoutingConfig

Key = tuple[str, str]


def _natural(text: str) -> list[Any]:
    """Sort key that puts instance-2 before instance-10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


class Registry:
    """Deployments and ready Pods in, one Route per served model out."""

    def __init__(
        self,
        default_balancing: Balancing = Balancing.ROUND_ROBIN,
        default_routing: RoutingConfig | None = None,
        engine_fresh_s: float = 3.0,
    ) -> None:
        self.default_balancing = default_balancing
        self.default_routing = default_routing or RoutingConfig(policy=default_balancing)
        self.engine_fresh_s = engine_fresh_s  # engine figures older than this are ignored
        self.deployments: dict[Key, DeploymentInfo] = {}
        self.pods: dict[Key, PodEndpoint] = {}
        self.routes: dict[str, Route] = {}
        self.models: dict[str, list[DeploymentInfo]] = {}  # served name -> [its holder]
        self.holders: dict[str, Key] = {}  # served name -> the deployment that holds it
        self.synced = {"deployments": False, "pods": False}
        self._pods_by_model: dict[str, dict[Key, PodEndpoint]] = {}
        self._pod_model: dict[Key, str] = {}
        self._waiting: dict[str, int] = {}  # model -> requests held for it
        self._wakers: dict[str, asyncio.Event] = {}  # model -> set when its waiters should look
        self._synced_event = asyncio.Event()
        self.generation = 0  # bumped on every change of deployments, pods or routes

    # ---- inputs -------------------------------------------------------------------------------

    def replace_deployments(self, objs: Iterable[dict[str, Any]]) -> None:
        """A full listing (after every watch reconnect): forget deployments not in it."""
        self.deployments = {}
        for obj in objs:
            info = parse_deployment(obj)
            if info:
                self.deployments[info.key] = info
        self.synced["deployments"] = True
        self._rebuild_all()

    def apply_deployment(self, event: str, obj: dict[str, Any]) -> None:
        info = parse_deployment(obj)
        if info is None:
            return
        if event == "DELETED":
            self.deployments.pop(info.key, None)
        else:
            self.deployments[info.key] = info
        self._rebuild_all()

    def replace_pods(self, objs: Iterable[dict[str, Any]]) -> None:
        self.pods = {}
        for obj in objs:
            pod = parse_replica_pod(obj)
            if pod:
                self.pods[pod.key] = pod
        self.synced["pods"] = True
        self._rebuild_all()

    def apply_pod(self, event: str, obj: dict[str, Any]) -> None:
        """One watch event. A Pod that is no longer ready leaves its route at once."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        pod = None if event == "DELETED" else parse_replica_pod(obj)
        if pod is None:
            if self.pods.pop(key, None) is None:
                return
        else:
            self.pods[key] = pod
        old_model = self._pod_model.pop(key, None)
        if old_model is not None:
            self._pods_by_model.get(old_model, {}).pop(key, None)
        new_model = self._index_pod(pod) if pod else None
        for model in {old_model, new_model} - {None}:
            assert model is not None
            self._rebuild_model(model)

    def set_static(self, upstreams: dict[str, list[str]]) -> None:
        """Fixed upstreams per model (tests, `--static-upstreams`): host:port addresses."""
        self.deployments = {}
        self.pods = {}
        for model, addresses in upstreams.items():
            # The gateway's own list: each upstream is owned by its model's entry.
            owner = f"static:{model}"
            info = DeploymentInfo("", model, model, len(addresses), None, 0, uid=owner)
            self.deployments[info.key] = info
            for address in addresses:
                host, _, port = address.rpartition(":")
                pod = PodEndpoint("", address, model, model, host, int(port), owner_uid=owner)
                self.pods[pod.key] = pod
        self.synced = {"deployments": True, "pods": True}
        self._rebuild_all()

    # ---- outputs ------------------------------------------------------------------------------

    @property
    def is_synced(self) -> bool:
        return all(self.synced.values())

    async def wait_synced(self, timeout_s: float) -> bool:
        """Wait for the first full listing of both kinds (requests at start-up wait, not 404)."""
        if not self.is_synced:
            try:
                await asyncio.wait_for(self._synced_event.wait(), timeout_s)
            except TimeoutError:
                return False
        return True

    def desired_replicas(self, model: str) -> int:
        return sum(d.replicas for d in self.models.get(model, ()))

    def is_switched_off(self, model: str) -> bool:
        """Every ModelDeployment serving `model` declares `spec.replicas: 0`: nothing will start
        a replica for a request (a model that idled to zero keeps its spec.replicas and wakes)."""
        return model in self.models and self.desired_replicas(model) == 0

    # ---- the waiting queue --------------------------------------------------------------------

    def queued(self, model: str) -> int:
        """Requests waiting for `model` to get a ready replica."""
        return self._waiting.get(model, 0)

    def queue_depths(self) -> dict[str, int]:
        """Every non-empty queue, by model name."""
        return {model: n for model, n in sorted(self._waiting.items()) if n}

    def hold(self, model: str, limit: int) -> bool:
        """Take a place in `model`'s queue; False (and no place) when `limit` already wait.

        Every successful hold is paired with one `release`, whatever the wait's outcome.
        """
        waiting = self._waiting.get(model, 0)
        if waiting >= limit:
            return False
        self._waiting[model] = waiting + 1
        return True

    def release(self, model: str) -> None:
        """Leave `model`'s queue."""
        waiting = self._waiting.get(model, 0) - 1
        if waiting > 0:
            self._waiting[model] = waiting
        else:
            self._waiting.pop(model, None)

    async def wait_for_replica(self, model: str, timeout_s: float) -> Route | None:
        """Wait until `model` has a ready replica and return its Route.

        None when nothing will bring one (the model was switched off by its spec or removed)
        or after `timeout_s`; the caller tells which from the registry.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            route = self.routes.get(model)
            if route is not None and route.replicas:
                return route
            if model not in self.models or self.is_switched_off(model):
                return None
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event = self._wakers.get(model)
            if event is None:
                event = self._wakers[model] = asyncio.Event()
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None

    def _wake(self, model: str) -> None:
        """Let `model`'s waiters look at the registry again."""
        event = self._wakers.pop(model, None)
        if event is not None:
            event.set()

    # ---- rebuilding ---------------------------------------------------------------------------

    def ignored_pods(self) -> dict[str, int]:
        """Ready Pods with the replica labels that are not replicas, by why (for the metric)."""
        counts: dict[str, int] = {}
        for pod in self.pods.values():
            info = self.deployments.get((pod.namespace, pod.deployment))
            why = compute_ignored_reason(pod.owner_uid, info.uid if info else None)
            if why is not None:
                counts[why] = counts.get(why, 0) + 1
        return counts

    def _served_name(self, pod: PodEndpoint) -> str | None:
        """The name `pod` is routed under; None when it is not routed at all.

        Only a Pod controlled by the ModelDeployment its label names is a replica; labels and
        annotations alone are anyone's to write. It serves its annotation's name (the name the
        operator started it with) or else its deployment's, and never a name that another,
        older ModelDeployment holds.
        """
        info = self.deployments.get((pod.namespace, pod.deployment))
        if info is None or compute_ignored_reason(pod.owner_uid, info.uid) is not None:
            return None
        model = pod.served_name or info.served_name
        holder = self.holders.get(model)
        if holder is not None and holder != info.key:
            return None
        return model

    def _index_pod(self, pod: PodEndpoint) -> str | None:
        model = self._served_name(pod)
        if model is None:
            return None
        self._pod_model[pod.key] = model
        self._pods_by_model.setdefault(model, {})[pod.key] = pod
        return model

    def _rebuild_all(self) -> None:
        self.generation += 1
        if self.is_synced:
            self._synced_event.set()
        # A served name belongs to one ModelDeployment, the oldest that claims it: a newer one
        # with the same name never takes or shares its traffic (the operator tells its owner).
        models: dict[str, list[DeploymentInfo]] = {}
        for info in sorted(self.deployments.values(), key=lambda d: d.claim):
            models.setdefault(info.served_name, [info])
        self.models = models
        self.holders = {model: infos[0].key for model, infos in models.items()}
        self._pods_by_model = {}
        self._pod_model = {}
        for pod in self.pods.values():
            self._index_pod(pod)
        for model in set(self.routes) | set(self._pods_by_model) | set(models):
            self._rebuild_model(model)

    def routing(self, model: str) -> RoutingConfig:
        """The model's routing: its holder's spec.routing (or annotation) over the defaults."""
        base = self.default_routing
        for info in self.models.get(model, ()):
            spec = info.routing
            return RoutingConfig(
                policy=info.balancing or self.default_balancing,
                prefix_chars=(spec and spec.prefix_chars) or base.prefix_chars,
                load_factor=(spec and spec.load_factor) or base.load_factor,
                engine_load=base.engine_load
                if spec is None or spec.engine_load is None
                else spec.engine_load,
            )
        return RoutingConfig(
            self.default_balancing, base.prefix_chars, base.load_factor, base.engine_load
        )

    def _rebuild_model(self, model: str) -> None:
        self.generation += 1
        pods = self._pods_by_model.get(model, {})
        if not pods and model not in self.models:
            self.routes.pop(model, None)
            self._pods_by_model.pop(model, None)
            self._wake(model)  # gone: its waiters answer now rather than at the timeout
            return
        triples = sorted(
            ((p.name, p.address, p.namespace) for p in pods.values()),
            key=lambda t: (_natural(t[0]), t[1]),
        )
        route = build_route(
            model, triples, self.routing(model), self.routes.get(model), self.engine_fresh_s
        )
        self.routes[model] = route
        if route.replicas or self.is_switched_off(model):
            self._wake(model)
