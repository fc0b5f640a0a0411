"""Gateway test harness: vLLM stand-ins and a gateway on 127.0.0.1, fed Pod objects as the
Kubernetes watch would feed them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from modelfleet.api import labels
from modelfleet.api.headers import INSTANCE_HEADER
from modelfleet.gateway.app import RunningGateway
from modelfleet.gateway.registry import Registry
from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.server import RunningSim, start_sim


def md_obj(
    name: str,
    *,
    served: str | None = None,
    replicas: int = 2,
    balancing: str | None = None,
    namespace: str = "default",
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    annotations = {labels.ANN_BALANCING: balancing} if balancing else {}
    spec: dict[str, Any] = {"model": "google/gemma-3-4b-it", "replicas": replicas}
    if served:
        spec["servedModelName"] = served
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": md_uid(namespace, name),
            "creationTimestamp": created,
            "annotations": annotations,
        },
        "spec": spec,
    }


def md_uid(namespace: str, name: str) -> str:
    """The UID md_obj gives a ModelDeployment."""
    return f"uid-{namespace}-{name}"


def owner_ref(uid: str, name: str = "owner") -> dict[str, Any]:
    """A controller ownerReference to a ModelDeployment, as the operator writes it."""
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pod_obj(
    name: str,
    deployment: str,
    port: int,
    *,
    ready: bool = True,
    served: str | None = None,
    deleting: bool = False,
    ip: str = "127.0.0.1",
    namespace: str = "default",
    owners: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A replica Pod of `deployment` as the operator makes it; `owners` replaces its
    ownerReferences (a look-alike someone else made)."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {
            labels.LABEL_COMPONENT: labels.COMPONENT_REPLICA,
            labels.LABEL_DEPLOYMENT: deployment,
        },
        "annotations": {labels.ANN_SERVED_MODEL: served} if served else {},
        "ownerReferences": (
            owners if owners is not None else [owner_ref(md_uid(namespace, deployment), deployment)]
        ),
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {
            "containers": [{"name": "vllm", "ports": [{"name": "http", "containerPort": port}]}]
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


@dataclass
class RecordingWriter:
    """Stands in for the API server's PATCH in tests that are not on the control plane."""

    writes: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def annotate(self, namespace: str, name: str, values: dict[str, str]) -> None:
        self.writes.append((namespace, name, values))
        self.changed.set()


@dataclass
class Fleet:
    """Stand-ins plus a gateway routing to them."""

    gateway: RunningGateway
    registry: Registry
    writer: RecordingWriter
    sims: dict[str, RunningSim]
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.gateway.url

    async def add_sim(self, name: str, served: str = "gemma3-4b", **config: Any) -> RunningSim:
        base: dict[str, Any] = {
            "model": "google/gemma-3-4b-it",
            "served_names": (served,),
            "instance": name,
            "port": 0,
            "token_latency_s": 0.0,
        }
        base.update(config)
        sim = await start_sim(SimConfig(**base))
        self.sims[name] = sim
        return sim

    def add_pod(self, name: str, deployment: str = "gemma3-4b", **kwargs: Any) -> None:
        port = kwargs.pop("port", None) or self.sims[name].state.config.port
        self.registry.apply_pod("ADDED", pod_obj(name, deployment, port, **kwargs))

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        async with self.http.post(self.url + path, json=body) as resp:
            raw = await resp.read()
            data = None
            if raw and resp.content_type == "application/json":
                data = await resp.json()
            return resp.status, dict(resp.headers), data

    async def chat(self, model: str = "gemma3-4b", text: str = "hello") -> tuple[int, str, Any]:
        status, headers, data = await self.post(
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": text}]},
        )
        return status, headers.get(INSTANCE_HEADER, ""), data


FleetFactory = Callable[..., Awaitable[Fleet]]


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for observable state, with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.01)
