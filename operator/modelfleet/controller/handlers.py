"""kopf glue: handlers that only find the state in the indices and call `reconcile`.

Handlers are module-level functions registered on an explicit registry by `build_registry`, so
tests can build as many operators as they like. Every ModelDeployment handler, the Pod and Node
event handlers, and the background loops (`loops.py`: the periodic re-check and the pool
watcher) end in the same `reconcile()`: levels, not edges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from modelfleet.api import API_GROUP, API_VERSION, PLURAL
from modelfleet.api import labels as L
from modelfleet.api.ownership import ClaimKey, claim_key, served_name
from modelfleet.controller.autoscale_loop import Autoscaler, autoscale_forever
from modelfleet.controller.autoscale_scrape import EngineScraper
from modelfleet.controller.execute import EventRecorder
from modelfleet.controller.loops import (
    recheck_forever,
    reconcile_keys,
    watch_node_usage,
    watch_pool,
)
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.nodeusage import NodeUsage
from modelfleet.controller.observed import (
    DeploymentEntry,
    NodeFacts,
    ObservedPod,
    parse_deployment,
    parse_node,
    parse_pod,
    parse_service,
)
from modelfleet.controller.reconcile import CreateFailed, reconcile
from modelfleet.controller.runtime import ClusterState, Runtime, pods_on_nodes
from modelfleet.controller.server import ServerState
from modelfleet.gpus.client import create_session
from modelfleet.gpus.metrics import default_metrics
from modelfleet.gpus.pool import GpuPool
from modelfleet.kube.client import KubeClient, load_config
from modelfleet.settings import OperatorSettings

log = logging.getLogger(__name__)

KOPF_PREFIX = f"kopf.{API_GROUP}"
REPLICA_LABELS = {L.LABEL_COMPONENT: L.COMPONENT_REPLICA, L.LABEL_NAME: L.NAME_VALUE}
SERVICE_LABELS = {**REPLICA_LABELS, L.LABEL_MANAGED_BY: L.MANAGED_BY_OPERATOR}


# --- lifecycle -------------------------------------------------------------------------------


async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Every kopf setting in one place, then the shared clients into the operator memo."""
    # kopf posts an Event per handler run at INFO; ours carry the reasons, so keep only trouble.
    settings.posting.level = logging.WARNING
    # Watches are re-established every 5 minutes; a stuck connection is noticed within 30 s.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 30
    # A burst of events for one object is handled once; 20 ms keeps the bind latency low.
    settings.batching.batch_window = 0.02
    settings.execution.default_backoff = 5
    # Leader election is our Lease (controller/leader.py), not kopf peering.
    settings.peering.standalone = True
    # Resources are discovered once at start: no RBAC for watching CRDs and namespaces (the
    # CRD is installed before the operator, by the chart or `make cluster-up`).
    settings.scanning.disabled = True
    # No deletion handler means no finalizer: ownerReferences clean the children up.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    config: OperatorSettings = memo.config
    cluster = load_config(memo.get("kubeconfig"))
    metrics: OperatorMetrics = memo.metrics
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=cluster.ssl_context, limit=64),
        headers={"User-Agent": "modelfleet-operator"},
        trace_configs=[metrics.api_trace()],
    )
    client = KubeClient(cluster, session=session, timeout_s=30)
    # As many pooled connections as agents polled at once: aiohttp's default of 100 would cap
    # MODELFLEET_POLL_CONCURRENCY silently. Each request carries its own timeout.
    agents = create_session(config.poll_concurrency, user_agent="modelfleet-operator")
    pool = GpuPool(config, agents, kube=client, metrics=default_metrics())
    await pool.start()
    memo.runtime = runtime = Runtime(
        client=client,
        settings=config,
        events=EventRecorder(client),
        metrics=metrics,
        snapshot=pool.snapshot,
        agent_discovery=pool.discovery,
        usage=NodeUsage() if config.watch_node_pods else None,
    )
    memo.tasks = [
        asyncio.create_task(recheck_forever(runtime, config.recheck_interval_s), name="recheck"),
        asyncio.create_task(watch_pool(runtime, pool), name="pool-watch"),
    ]
    # The built-in autoscaler: only models with spec.autoscaling.enabled (docs/operator.md).
    autoscaler = Autoscaler(client, EngineScraper(agents), metrics, runtime.events)
    # Placement reads what each autoscaled model's load needs: eviction follows load.
    runtime.load_history = lambda: autoscaler.history
    memo.tasks.append(
        asyncio.create_task(
            autoscale_forever(autoscaler, lambda: runtime.cluster), name="autoscaler"
        )
    )
    if runtime.usage is not None:
        memo.tasks.append(
            asyncio.create_task(watch_node_usage(runtime, runtime.usage), name="node-usage")
        )
    memo.closers = [pool.close, session.close, agents.close]
    server: ServerState = memo.server
    server.pool = pool
    server.gpu_nodes_without_agent = lambda: runtime.gpu_nodes_without_agent


async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; elsewhere: $KUBECONFIG (no third-party client needed)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Close what `configure` opened."""
    server: ServerState | None = memo.get("server")
    if server is not None:
        server.pool = None
        server.gpu_nodes_without_agent = tuple
    tasks: list[asyncio.Task[None]] = memo.get("tasks", [])
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for close in memo.get("closers", []):
        await close()


# --- indices: the cluster as the handlers see it (no LIST per reconcile) ------------------------


def replica_pods(body: kopf.Body, **_: Any) -> dict[tuple[str, str], ObservedPod]:
    """Replica Pods by (namespace, deployment)."""
    pod = parse_pod(body)
    return {(pod.namespace, pod.deployment): pod} if pod is not None else {}


def gpu_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeFacts]:
    """Nodes by name."""
    return {name: parse_node(body)}


def deployments(
    namespace: str, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], DeploymentEntry]:
    """ModelDeployments by (namespace, name), with their last use for LRU eviction."""
    return {(namespace, name): parse_deployment(body)}


def served_names(body: kopf.Body, **_: Any) -> dict[str, ClaimKey]:
    """Claims on served model names, by name: who holds one is found without a scan."""
    return {served_name(body): claim_key(body)}


def replica_services(
    namespace: str, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """The Services the operator made, by (namespace, name): checked without a request."""
    return {(namespace, name): parse_service(body)}


def _cluster(
    replica_pods: Mapping[tuple[str, str], Iterable[ObservedPod]],
    gpu_nodes: Mapping[str, Iterable[NodeFacts]],
    deployments: Mapping[tuple[str, str], Iterable[DeploymentEntry]],
    replica_services: Mapping[tuple[str, str], Iterable[Mapping[str, Any]]],
    served_names: Mapping[str, Iterable[ClaimKey]],
) -> ClusterState:
    return ClusterState(
        pods=replica_pods,
        nodes=gpu_nodes,
        deployments=deployments,
        services=replica_services,
        served=served_names,
    )


# --- handlers -------------------------------------------------------------------------------


async def on_deployment(
    body: kopf.Body,
    memo: kopf.Memo,
    replica_pods: kopf.Index[tuple[str, str], ObservedPod],
    gpu_nodes: kopf.Index[str, NodeFacts],
    deployments: kopf.Index[tuple[str, str], DeploymentEntry],
    replica_services: kopf.Index[tuple[str, str], dict[str, Any]],
    served_names: kopf.Index[str, ClaimKey],
    **_: Any,
) -> None:
    """Create, resume and update: reconcile, and keep the Service."""
    await _reconcile(
        memo,
        body,
        _cluster(replica_pods, gpu_nodes, deployments, replica_services, served_names),
        ensure_svc=True,
    )


async def on_replica_pod(
    type: str | None,
    namespace: str,
    name: str,
    labels: kopf.Labels,
    memo: kopf.Memo,
    replica_pods: kopf.Index[tuple[str, str], ObservedPod],
    gpu_nodes: kopf.Index[str, NodeFacts],
    deployments: kopf.Index[tuple[str, str], DeploymentEntry],
    replica_services: kopf.Index[tuple[str, str], dict[str, Any]],
    served_names: kopf.Index[str, ClaimKey],
    **_: Any,
) -> None:
    """A replica Pod changed: re-check its deployment."""
    cluster = _cluster(replica_pods, gpu_nodes, deployments, replica_services, served_names)
    key = (namespace, labels.get(L.LABEL_DEPLOYMENT, ""))
    body = cluster.body(key)
    if body is not None:
        await _reconcile(memo, body, cluster)
    if type == "DELETED":
        # Capacity was freed: deployments waiting for room (evicted ones too) try again, the
        # highest priority first.
        runtime: Runtime = memo.runtime
        runtime.pods_deleted((namespace, name), datetime.now(UTC))
        await reconcile_keys(runtime, runtime.restore_order(runtime.blocked - {key}))


async def on_node(
    name: str,
    type: str | None,
    body: kopf.Body,
    memo: kopf.Memo,
    replica_pods: kopf.Index[tuple[str, str], ObservedPod],
    gpu_nodes: kopf.Index[str, NodeFacts],
    deployments: kopf.Index[tuple[str, str], DeploymentEntry],
    replica_services: kopf.Index[tuple[str, str], dict[str, Any]],
    served_names: kopf.Index[str, ClaimKey],
    **_: Any,
) -> None:
    """A node went NotReady or away: re-check the deployments with replicas on it."""
    if type != "DELETED" and parse_node(body).ready:
        return
    runtime: Runtime = memo.runtime
    runtime.nodes_changed()
    cluster = _cluster(replica_pods, gpu_nodes, deployments, replica_services, served_names)
    for key in sorted(pods_on_nodes(replica_pods, {name})):
        found = cluster.body(key)
        if found is not None:
            await _reconcile(memo, found, cluster)


async def on_deleted(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Forget per-deployment state; the garbage collector deletes the Pods and the Service."""
    runtime: Runtime = memo.runtime
    runtime.forget((namespace, name))


async def _reconcile(
    memo: kopf.Memo, body: Mapping[str, Any], cluster: ClusterState, *, ensure_svc: bool = False
) -> None:
    runtime: Runtime = memo.runtime
    runtime.attach(cluster, datetime.now(UTC))  # the indices are live: the loops read them too
    try:
        await reconcile(runtime, body, cluster, ensure_svc=ensure_svc)
    except ValueError as exc:
        raise kopf.PermanentError(f"invalid ModelDeployment: {exc}") from exc
    except CreateFailed as exc:
        raise kopf.TemporaryError(str(exc), delay=5) from exc


def _h(fn: Any) -> Any:
    """kopf's callback protocols list every kwarg kopf may pass; handlers here take only the
    ones they use (kopf's documented style), which mypy cannot match structurally."""
    return fn


def build_registry() -> kopf.OperatorRegistry:
    """Register every handler on a fresh registry."""
    registry = kopf.OperatorRegistry()
    md = (API_GROUP, API_VERSION, PLURAL)
    kopf.on.startup(registry=registry)(_h(configure))
    kopf.on.login(registry=registry)(_h(login))
    kopf.on.cleanup(registry=registry)(_h(cleanup))
    kopf.index("pods", labels=REPLICA_LABELS, registry=registry)(_h(replica_pods))
    kopf.index("nodes", registry=registry)(_h(gpu_nodes))
    kopf.index(*md, registry=registry)(_h(deployments))
    kopf.index("services", labels=SERVICE_LABELS, registry=registry)(_h(replica_services))
    kopf.index(*md, registry=registry)(_h(served_names))
    kopf.on.resume(*md, registry=registry, id="resume")(_h(on_deployment))
    kopf.on.create(*md, registry=registry, id="create")(_h(on_deployment))
    kopf.on.update(*md, registry=registry, id="update")(_h(on_deployment))
    kopf.on.event("pods", labels=REPLICA_LABELS, registry=registry)(_h(on_replica_pod))
    kopf.on.event("nodes", registry=registry)(_h(on_node))
    kopf.on.delete(*md, registry=registry, optional=True, id="forget")(_h(on_deleted))
    return registry
