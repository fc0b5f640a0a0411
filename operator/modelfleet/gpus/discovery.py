"""Where the agents are: the static list from settings, or the agent pods in the cluster.

`build_discovered_endpoints` is pure (pods in, url -> node out); `watch_agent_pods` follows the
pods with the level-triggered `list_and_watch` loop and hands every new mapping to a callback.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from modelfleet.kube import KubeClient, list_and_watch, pods_path


def format_endpoint(ip: str, port: int) -> str:
    """http://ip:port, with IPv6 addresses in brackets."""
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    return f"http://{host}:{port}"


def _pod_usable(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    return (
        not meta.get("deletionTimestamp")
        and bool(spec.get("nodeName"))
        and bool(status.get("podIP"))
        and status.get("phase") == "Running"
    )


def build_discovered_endpoints(pods: Iterable[Mapping[str, Any]], port: int) -> dict[str, str]:
    """Agent pods -> {url: node}: Running, with an IP, not terminating; one endpoint per node.

    During a DaemonSet rollout two agent pods can run on one node for a moment; the newer one
    (by creation time, then name) wins, since the old one is about to go.
    """
    best: dict[str, tuple[str, str, str]] = {}
    for pod in pods:
        if not _pod_usable(pod):
            continue
        node = str(pod["spec"]["nodeName"])
        meta = pod.get("metadata") or {}
        key = (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))
        try:
            url = format_endpoint(str(pod["status"]["podIP"]), port)
        except ValueError:
            continue
        if node not in best or key > best[node][:2]:
            best[node] = (*key, url)
    return {url: node for node, (_, _, url) in sorted(best.items())}


async def watch_agent_pods(
    kube: KubeClient,
    *,
    namespace: str,
    selector: str,
    port: int,
    on_change: Callable[[dict[str, str]], None],
    retry_delay_s: float = 1.0,
) -> None:
    """Follow the agent pods forever; call `on_change({url: node})` after every change."""
    pods: dict[str, Mapping[str, Any]] = {}
    async for kind, obj in list_and_watch(
        kube, pods_path(namespace), labelSelector=selector, retry_delay_s=retry_delay_s
    ):
        if kind == "SYNC":
            pods = {_uid(p): p for p in obj.get("items") or []}
        elif kind in ("ADDED", "MODIFIED"):
            pods[_uid(obj)] = obj
        elif kind == "DELETED":
            pods.pop(_uid(obj), None)
        else:
            continue
        on_change(build_discovered_endpoints(pods.values(), port))


def _uid(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")
