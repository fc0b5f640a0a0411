"""Seeded synthetic clusters and ModelDeployment streams for the placement benchmarks."""

from __future__ import annotations

import random
from dataclasses import replace

from modelfleet.placement import (
    PRODUCT_LABEL,
    ClusterView,
    DeploymentRef,
    Evict,
    GpuInfo,
    NodeInfo,
    Placed,
    PlacedReplica,
    PlacementStrategy,
    ReplicaRequest,
    ReplicaState,
    SharingMode,
    Taint,
    decide,
)

PRODUCTS = (("NVIDIA-H100-80GB-HBM3", 81559), ("NVIDIA-L40S", 46068))


def make_nodes(
    count: int, gpus_per_node: int, seed: int, mixed_sizes: bool = False
) -> list[NodeInfo]:
    """`count` nodes, half H100 and half L40S; a few tainted; with `mixed_sizes`, 4 or 8 GPUs."""
    rng = random.Random(seed)
    nodes = []
    for i in range(count):
        name = f"gpu-node-{i:04d}"
        product, memory = PRODUCTS[i % 2]
        n = gpus_per_node if not mixed_sizes else rng.choice((4, 8, 8))
        gpus = tuple(
            GpuInfo(
                index=j,
                gpu_id=f"{name}:{j}",
                uuid=f"GPU-{i:04d}-{j:02d}",
                product=product,
                memory_total_mib=memory,
                memory_used_mib=0,
                memory_free_mib=memory,
            )
            for j in range(n)
        )
        taints = (Taint("dedicated", "batch", "NoSchedule"),) if i % 50 == 49 else ()
        nodes.append(
            NodeInfo(
                name=name,
                gpus=gpus,
                labels={PRODUCT_LABEL: product, "pool": "a" if i % 3 else "b"},
                taints=taints,
            )
        )
    return nodes


def random_request(
    rng: random.Random,
    serial: int,
    deployments: int,
    strategy: PlacementStrategy | None = None,
    sizes: tuple[int, ...] = (1, 1, 1, 2, 4),
    shared_share: float = 0.3,
) -> ReplicaRequest:
    """One replica of a random ModelDeployment (out of `deployments`)."""
    d = rng.randrange(deployments)
    dep = DeploymentRef("default", f"model-{d}")
    shared = rng.random() < shared_share
    return ReplicaRequest(
        deployment=dep,
        pod=f"model-{d}-instance-{serial}",
        gpu_count=1 if shared else rng.choice(sizes),
        memory_mib=rng.choice((8192, 16384, 24576)) if shared else None,
        measured_footprint_mib=None,
        sharing=SharingMode.SHARED if shared else SharingMode.EXCLUSIVE,
        product=PRODUCTS[d % 2][0] if d % 4 == 0 else None,
        node_selector={"pool": "a"} if d % 5 == 0 else {},
        strategy=strategy,
        spread=True,
        priority=d % 3,
        min_replicas=0,
        last_used=float(serial),
    )


def apply(view: ClusterView, request: ReplicaRequest) -> tuple[ClusterView, str]:
    """Decide and apply, as the operator would; return the view and the decision's kind."""
    decision = decide(view, request)
    if isinstance(decision, Placed):
        return view.with_placed(decision), "placed"
    if isinstance(decision, Evict):
        return view.with_evicted(decision), "evict"
    return view, decision.code.value


def measured_snapshot(view: ClusterView) -> tuple[list[NodeInfo], list[PlacedReplica]]:
    """The same cluster a poll later: every replica ready and measured by its agent."""
    used: dict[str, int] = {}
    replicas = []
    for rep in view.replicas.values():
        replicas.append(replace(rep, state=ReplicaState.READY, measured=True))
        for gpu_id in rep.gpu_ids:
            node = view.nodes[rep.node]
            total = next(g.info.memory_total_mib for g in node.gpus if g.info.gpu_id == gpu_id)
            add = int(total * 0.9) if rep.whole_gpus else (rep.footprint_mib or 0)
            used[gpu_id] = used.get(gpu_id, 0) + add
    nodes = []
    for name in view.order:
        info = view.nodes[name].info
        gpus = tuple(
            replace(
                g,
                memory_used_mib=used.get(g.gpu_id, 0),
                memory_free_mib=g.memory_total_mib - used.get(g.gpu_id, 0),
            )
            for g in info.gpus
        )
        nodes.append(replace(info, gpus=gpus))
    return nodes, replicas
