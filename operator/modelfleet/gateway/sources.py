"""Where the registry's objects come from: the Kubernetes API, or a static list.

Upstream addresses come only from here (the operator's replica Pods, or the operator of the
gateway's own static list), never from anything in a request.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from modelfleet.api import labels
from modelfleet.gateway.registry import Registry
from modelfleet.kube.client import KubeClient, list_and_watch
from modelfleet.kube.paths import md_path, pods_path

log = logging.getLogger(__name__)

REPLICA_SELECTOR = f"{labels.LABEL_COMPONENT}={labels.COMPONENT_REPLICA}"


async def watch_deployments(kube: KubeClient, registry: Registry, namespace: str) -> None:
    """Keep the registry's ModelDeployments current; re-list after every reconnect."""
    async for event, obj in list_and_watch(kube, md_path(namespace or None)):
        if event == "SYNC":
            registry.replace_deployments(obj.get("items") or [])
            log.info("model deployments listed: %d", len(registry.deployments))
        else:
            registry.apply_deployment(event, obj)


async def watch_pods(kube: KubeClient, registry: Registry, namespace: str) -> None:
    """Keep the registry's ready replica Pods current; re-list after every reconnect."""
    path = pods_path(namespace or None)
    async for event, obj in list_and_watch(kube, path, labelSelector=REPLICA_SELECTOR):
        if event == "SYNC":
            registry.replace_pods(obj.get("items") or [])
            log.info("ready replica pods listed: %d", len(registry.pods))
        else:
            registry.apply_pod(event, obj)


async def run_kube_source(registry: Registry, kube: KubeClient, namespace: str) -> None:
    """Both watches, until cancelled."""
    async with asyncio.TaskGroup() as group:
        group.create_task(watch_deployments(kube, registry, namespace))
        group.create_task(watch_pods(kube, registry, namespace))


class StaticUpstreamsError(ValueError):
    """--static-upstreams is malformed; the message says how to write it."""


def parse_static_upstreams(text: str) -> dict[str, list[str]]:
    """`model=http://h:p,http://h:p;other=http://h:p` to {model: ["h:p", ...]}."""
    result: dict[str, list[str]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        model, sep, urls = part.partition("=")
        model = model.strip()
        if not sep or not model:
            raise StaticUpstreamsError(
                f"{part.strip()!r}: write MODEL=URL[,URL...], models separated by ';'"
            )
        addresses = []
        for url in urls.split(","):
            if not url.strip():
                continue
            parts = urlsplit(url.strip())
            if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
                raise StaticUpstreamsError(
                    f"{url.strip()!r} for model {model!r}: write http://HOST:PORT"
                )
            try:
                port = parts.port or 80
            except ValueError:
                raise StaticUpstreamsError(f"{url.strip()!r}: the port is not a number") from None
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            addresses.append(f"{host}:{port}")
        result[model] = addresses
    if not result:
        raise StaticUpstreamsError("no upstreams given: write MODEL=URL[,URL...]")
    return result
