"""The operator's background loops: the periodic re-check, the GPU-pool watcher and the watch
of the pods bound to nodes.

The re-check is levels-not-edges insurance: every ModelDeployment is reconciled at least every
MODELFLEET_RECHECK_INTERVAL_S whatever events arrived. It is one loop rather than a kopf timer per
object because kopf puts a finalizer on every object that has a timer, and then deleting a
ModelDeployment would hang whenever the operator is down; ownerReferences already clean up.

The pool watcher turns what only the agents can tell (an agent that stopped answering, a GPU
that turned unhealthy, the first stats after start, freed memory) into reconciles of the
deployments it concerns, right after the poll round that saw it.

The node-usage watch keeps what every pod bound to a node requests (nodeusage.py), all
namespaces, so that placement counts CPU, memory and GPUs the way the kubelet will at admission;
a pod that finishes or goes frees room, and the deployments waiting for it are re-checked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from modelfleet.controller.inflight import Key
from modelfleet.controller.nodeusage import BOUND_POD_SELECTOR, NodeUsage
from modelfleet.controller.observed import NodeHealth
from modelfleet.controller.reconcile import reconcile
from modelfleet.controller.runtime import Runtime, pods_on_nodes
from modelfleet.gpus.pool import GpuPool
from modelfleet.gpus.snapshot import compute_replica_counts
from modelfleet.kube.client import ApiError, list_and_watch

log = logging.getLogger(__name__)


async def reconcile_keys(
    rt: Runtime, keys: Iterable[Key], *, ensure_svc: bool = False, pace_s: float = 0.0
) -> None:
    """Reconcile these deployments one after the other; a failure is logged, not raised.

    Between two of them the loop yields (for `pace_s`), so a long sweep never holds the event
    loop: a reconcile with nothing to write does not suspend on its own.
    """
    cluster = rt.cluster
    if cluster is None:
        return
    for key in keys:
        body = cluster.body(key)
        if body is None:
            continue
        try:
            await reconcile(rt, body, cluster, ensure_svc=ensure_svc)
        except Exception:  # one broken deployment must not stop the others' re-check
            log.exception("re-check of %s/%s failed", *key)
        await asyncio.sleep(pace_s)


async def recheck_forever(rt: Runtime, interval_s: float) -> None:
    """Reconcile every ModelDeployment, spread over the interval; forever."""
    while True:
        started = time.monotonic()
        if rt.cluster is not None:
            keys = sorted(rt.cluster.deployments.keys())
            rt.metrics.deployments.set(len(keys))
            rt.metrics.set_ignored(rt.cluster.ignored_pods())
            # Spread over most of the interval: a steady trickle instead of a burst.
            pace = 0.8 * interval_s / max(1, len(keys))
            await reconcile_keys(rt, keys, ensure_svc=True, pace_s=pace)
            rt.inflight.prune()
        await asyncio.sleep(max(1.0, interval_s - (time.monotonic() - started)))


def compute_health_changes(
    before: Mapping[str, NodeHealth], after: Mapping[str, NodeHealth]
) -> set[str]:
    """Nodes whose agent or GPU health differs between two views."""
    changed = set()
    for name in set(before) | set(after):
        old, new = before.get(name), after.get(name)
        if old is None or new is None:
            changed.add(name)
            continue
        if (old.agent_known, old.agent_up, old.agent_missing, old.unhealthy_gpus) != (
            new.agent_known,
            new.agent_up,
            new.agent_missing,
            new.unhealthy_gpus,
        ):
            changed.add(name)
    return changed


async def watch_pool(rt: Runtime, pool: GpuPool) -> None:
    """After each poll round: re-check deployments on nodes whose health changed, and the
    deployments waiting for capacity or stats."""
    seen = pool.rounds
    before: dict[str, NodeHealth] = {}
    while True:
        try:
            snapshot = await pool.wait_for_round(seen, timeout_s=3600)
        except TimeoutError:
            continue
        seen = pool.rounds
        cluster = rt.cluster
        if cluster is None:
            continue
        # The replica-share balance figures of the next snapshots (and their metrics).
        pool.set_replica_counts(
            compute_replica_counts(
                p.node for pods in cluster.pods.values() for p in pods if not p.deleting
            )
        )
        now = datetime.now(UTC)
        unseen = rt.observe_agents(cluster, snapshot, now)
        if unseen:
            log.warning(
                "GPU nodes without a node-stats agent (placement cannot use their GPUs; check "
                "the agent DaemonSet's node affinity, tolerations and runtime class): %s",
                ", ".join(unseen),
            )
        after = rt.node_health(cluster, snapshot, now)
        changed = compute_health_changes(before, after)
        before = after
        keys = pods_on_nodes(cluster.pods, changed) if changed else set()
        if keys or rt.blocked:
            await reconcile_keys(rt, [*sorted(keys), *rt.restore_order(rt.blocked - keys)])


# After a pod freed room, the waiting deployments are re-checked at most this often.
USAGE_RECHECK_S = 1.0
# A denied pod watch (RBAC) is tried again this often, with one warning each time.
USAGE_DENIED_RETRY_S = 300.0


async def watch_node_usage(rt: Runtime, usage: NodeUsage) -> None:
    """Keep `usage` from a cluster-wide watch of bound, unfinished pods; forever.

    When room frees on a node (a pod went or finished) and deployments wait for room, they are
    re-checked, at most once per USAGE_RECHECK_S.
    """
    last_recheck = 0.0
    freed = False

    def denied(exc: Exception) -> float | None:
        if isinstance(exc, ApiError) and exc.status in (401, 403):
            log.warning(
                "cannot list pods in all namespaces (%s): placement counts only the replicas' "
                "own CPU and memory against each node; grant the operator list and watch on "
                "pods cluster-wide (the chart does unless operator.watchNodePods is false)",
                exc.message or exc.reason,
            )
            return USAGE_DENIED_RETRY_S
        return None

    async for event, obj in list_and_watch(
        rt.client, "/api/v1/pods", fieldSelector=BOUND_POD_SELECTOR, on_error=denied
    ):
        if event == "SYNC":
            usage.replace(obj.get("items") or [])
            freed = True
        elif event in ("ADDED", "MODIFIED", "DELETED"):
            before = len(usage)
            if usage.apply(event, obj) and len(usage) < before:
                freed = True
        now = time.monotonic()
        if freed and rt.blocked and now - last_recheck >= USAGE_RECHECK_S:
            freed = False
            last_recheck = now
            await reconcile_keys(rt, rt.restore_order(set(rt.blocked)))
