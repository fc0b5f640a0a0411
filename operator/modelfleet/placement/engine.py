"""`decide`: place one replica on a `ClusterView`, or say whom to evict, or say why it waits.

Pure: the same view and request give the same decision. docs/placement.md gives every score and
rule with worked examples; the reasons returned here are what Events and status show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from modelfleet.placement.eviction import EvictionPlan, blocked_reasons, plan_eviction
from modelfleet.placement.model import (
    Decision,
    DeploymentRef,
    Evict,
    Placed,
    PlacedReplica,
    PlacementInputError,
    PlacementStrategy,
    ReplicaRequest,
    ReplicaState,
    Requests,
    SharingMode,
    Unplaceable,
    UnplaceableCode,
)
from modelfleet.placement.view import (
    STAGE_CORDONED,
    STAGE_PRODUCT,
    STAGE_REJECTED,
    STAGE_SELECTOR,
    STAGE_SLICED,
    STAGE_STALE,
    STAGE_TAINTS,
    STAGE_UNHEALTHY,
    STAGES,
    ClusterView,
    Eligibility,
    GpuState,
    NodeState,
    StaticKey,
    build_node_state,
)


def check_request(request: ReplicaRequest) -> None:
    """Raise PlacementInputError when a request cannot be placed as written."""
    name = f"{request.deployment}"
    if request.gpu_count < 1:
        raise PlacementInputError(f"{name}: gpu count is {request.gpu_count}; it must be 1 or more")
    for what, value in (
        ("spec.gpu.memory", request.memory_mib),
        ("status.footprint", request.measured_footprint_mib),
    ):
        if value is not None and value <= 0:
            raise PlacementInputError(f"{name}: {what} is {value} MiB; it must be positive")


def compute_eviction_floors(
    floors: Mapping[DeploymentRef, int], request: ReplicaRequest
) -> Mapping[DeploymentRef, int]:
    """The Ready replicas eviction must leave each deployment for this request: its
    minReplicas, raised to what its own load needs where the request says so (load_floors)."""
    if not request.load_floors:
        return floors
    merged = dict(floors)
    for dep, needed in request.load_floors.items():
        if dep != request.deployment and needed > merged.get(dep, 0):
            merged[dep] = needed
    return merged


def compute_static_key(request: ReplicaRequest) -> StaticKey:
    """What decides which nodes a request may use before any capacity is looked at."""
    return (
        request.product,
        frozenset(request.node_selector.items()),
        request.tolerations,
        request.sharing == SharingMode.EXCLUSIVE,
    )


def _product_node(node: NodeState, product: str | None, margin: int) -> NodeState:
    """`node` restricted to GPUs of `product` when it mixes products (rare: the slow path)."""
    if product is None or node.product == product:
        return node
    gpus = tuple(g for g in node.info.gpus if g.product == product)
    return build_node_state(replace(node.info, gpus=gpus), node.replicas, margin)


def _free_block(free: set[int], start: int, size: int, limit: int) -> int:
    """The largest aligned block of free indices (at most `limit` wide) that contains the
    aligned block [start, start + size)."""
    while size * 2 <= limit:
        outer = start - start % (size * 2)
        if not all(i in free for i in range(outer, outer + size * 2)):
            break
        start, size = outer, size * 2
    return size


def _whole_gpus(node: NodeState, count: int) -> list[GpuState]:
    """`count` free GPUs by best fit: from the smallest aligned block of free GPUs that holds
    them, so larger aligned blocks (NVLink pairs and quads are adjacent, aligned indices) stay
    free for the next multi-GPU replica. Ties: the lowest index."""
    free_gpus = [g for g in node.gpus if g.free_whole]
    if len(free_gpus) <= count:
        return free_gpus[:count]
    by_index = {g.info.index: g for g in free_gpus}
    free = set(by_index)
    limit = 1 << max(g.info.index for g in node.gpus).bit_length()  # indices fit below it
    size = 1 << (count - 1).bit_length()  # the aligned block that holds `count`
    blocks = [
        (_free_block(free, start, size, limit), start)
        for start in range(0, limit, size)
        if all(i in free for i in range(start, start + size))
    ]
    if blocks:
        _, start = min(blocks)
        return [by_index[i] for i in range(start, start + count)]
    # No aligned block is free as a whole: the GPUs in the smallest free blocks first.
    ranked = sorted(free, key=lambda i: (_free_block(free, i, 1, limit), i))
    return [by_index[i] for i in sorted(ranked[:count])]


def compute_fragmentation_penalty(
    whole_free: int, healthy: int, count: int, partial_fits: bool = False
) -> int:
    """How much placing `count` GPUs on a node breaks up its free GPUs: 0 when it breaks no
    block a larger replica could use, else twice the size of the largest free block it breaks
    (the largest power of two at most `whole_free`), plus one when the node was entirely free.
    `partial_fits`: a Shared replica fits on a GPU already shared, breaking no free GPU.

    `decide` inlines the same arithmetic in its per-node loop; the two are tested together.
    """
    if partial_fits or whole_free <= count:
        return 0
    if whole_free == healthy:
        return 2 * whole_free + 1
    block = 1 << (whole_free.bit_length() - 1)
    return 2 * block if block > count and whole_free - count < block else 0


def _best_fit_gpus(node: NodeState, count: int, footprint: int) -> list[GpuState]:
    # Best fit: the GPU with the least memory that still fits, so emptier GPUs stay whole for
    # Exclusive and large Shared replicas (the classic way to keep fragmentation down).
    fits = [
        g
        for g in node.gpus
        if g.info.healthy
        and not g.holders
        and g.available_mib >= footprint
        and not any(r.state == ReplicaState.STARTING for r in g.shared)
    ]
    fits.sort(key=lambda g: (g.available_mib, g.info.index))
    return fits[:count]


def _fmt_gpus(gpus: Sequence[GpuState]) -> str:
    return ",".join(g.info.gpu_id for g in gpus)


# The one function over the complexity bar, on purpose: its per-node scoring loop is the hot path
# `make bench-placement` measures (1,000 nodes x 8 GPUs, with fragmentation-aware ranking: ~4,300
# decisions/s, p99 0.6 ms of CPU on the 2-core CI machine, benchmarks/RESULTS.md); it keeps the
# key as scalars and calls nothing per node (the fragmentation penalty is inlined). Everything
# outside the loop lives in helpers.
def decide(view: ClusterView, request: ReplicaRequest) -> Decision:  # noqa: C901
    """Place `request` on `view`: Placed, Evict or Unplaceable, each with a reason."""
    check_request(request)
    strategy = PlacementStrategy(request.strategy or view.settings.default_strategy)
    margin = view.settings.memory_margin_mib
    count = request.gpu_count
    dep = request.deployment
    existing = view.counts.get(dep, 0)
    footprint = request.footprint_mib
    discovery = footprint is None and existing == 0
    shared = request.sharing == SharingMode.SHARED and footprint is not None
    if request.sharing == SharingMode.SHARED and footprint is None and existing > 0:
        runs = sorted(
            f"{r.deployment.namespace}/{r.pod}"
            for r in view.replicas.values()
            if r.deployment == dep
        )
        return Unplaceable(
            UnplaceableCode.WAITING_FOR_STATS,
            f"the GPU memory of {dep} is not known yet: waiting for its discovery run "
            f"({', '.join(runs[:3])}) to be measured, or set spec.gpu.memory",
        )
    if not view.nodes:
        return Unplaceable(
            UnplaceableCode.WAITING_FOR_STATS,
            "no GPU node is known yet: no node-stats agent has reported",
        )
    elig = view.eligibility(compute_static_key(request))
    if not elig.nodes:
        return _no_eligible_node(view, request, elig)
    too_large = _larger_than_any_node(request, elig)
    if too_large is not None:
        return too_large

    need = footprint if shared and footprint is not None else 0
    product = request.product
    nodes = view.nodes
    spread = request.spread
    # One pass over the eligible nodes (name order). A node's key is (spread ok, no untolerated
    # PreferNoSchedule taint, fragmentation, the strategy's score, its second signal); the
    # highest key wins and, as only a strictly higher key replaces the best, ties go to the
    # lowest node name. Round-robin's score is "after the cursor" and its second signal the
    # negated position, so the first node after the cursor wins, else (wrapping) the first node.
    cursor = view.cursor
    rr = strategy == PlacementStrategy.ROUND_ROBIN
    weighted = strategy == PlacementStrategy.WEIGHTED
    binpack = strategy == PlacementStrategy.BIN_PACK
    frag = view.settings.fragmentation_aware
    # The key is kept as scalars (rank, score, second) rather than a tuple: this loop runs once
    # per eligible node and tuple building dominated it. rank = cls * FRAG_SCALE - fragmentation
    # penalty (compute_fragmentation_penalty, inlined), cls = 2 * spread ok + no soft taint.
    # With fragmentation on, the best node by (cls, score, second) alone is tracked beside it
    # ("plain"), so that the reason can say when fragmentation decided.
    best_rank, best_score, best_second, best_cls = -FRAG_SCALE, 0.0, 0.0, -1
    plain_cls, plain_score, plain_second = -1, 0.0, 0.0
    chosen: NodeState | None = None
    plain: NodeState | None = None
    fits = top = short = colocated = 0
    unit = 1 if shared else count
    cpu, mem, pods = request.requests.cpu_m, request.requests.memory_bytes, request.requests.pods
    host_free_only_pods = cpu <= 0 and mem <= 0
    i = -1
    for name, prefer in elig.nodes:
        i += 1
        node = nodes[name]
        # A node's unfiltered capacity bounds its capacity for one product: check it first.
        if shared:
            av = node.shared_avail
            if len(av) < count or av[count - 1] < need:
                continue
        elif node.whole_free < count:
            continue
        if product is not None and node.product != product:
            node = _product_node(node, product, margin)
            if shared:
                av = node.shared_avail
                if len(av) < count or av[count - 1] < need:
                    continue
            elif node.whole_free < count:
                continue
        # The kubelet admits the Pod only if its CPU, memory and a pod slot are free there too
        # (one comparison when the replica asks for no CPU or memory, the common case).
        if (
            pods > node.pods_free
            if host_free_only_pods
            else cpu > node.cpu_free_m or mem > node.memory_free_bytes or pods > node.pods_free
        ):
            short += 1
            continue
        fits += 1
        if not spread or dep not in node.deployments:
            cls = 2 if prefer else 3
        else:
            colocated += 1
            cls = 0 if prefer else 1
        if frag:
            f = node.whole_free
            if f <= unit or (shared and node.shared_partial >= need):
                rank = cls * FRAG_SCALE
            elif f == node.healthy_gpus:
                rank = cls * FRAG_SCALE - 2 * f - 1
            else:
                block = 1 << (f.bit_length() - 1)
                rank = cls * FRAG_SCALE - (2 * block if block > unit and f - unit < block else 0)
            if rank < best_rank and cls < plain_cls:
                continue
        else:
            rank = cls * FRAG_SCALE
            if rank < best_rank:
                continue
        if rr:
            sc, second = (1.0 if cursor is None or name > cursor else 0.0), float(-i)
        elif weighted:
            second = float(node.capacity_mib)
            sc = second / (len(node.replicas) + 1)
        elif binpack:
            # Most allocated after placing (share), then best fit (fewest GPUs left free).
            second = -node.shared_free_gpus if shared else float(count - node.whole_free)
            sc = 1.0 + second / node.healthy_gpus
        else:
            second = node.shared_free_gpus if shared else float(node.whole_free)
            sc = second / node.healthy_gpus
        if rank > best_rank:
            best_rank, best_score, best_second, chosen, top = rank, sc, second, node, 1
            best_cls = cls
        elif rank == best_rank:
            top += 1
            if sc > best_score or (sc == best_score and second > best_second):
                best_score, best_second, chosen = sc, second, node
        if frag:
            if cls > plain_cls:
                plain_cls, plain_score, plain_second, plain = cls, sc, second, node
            elif cls == plain_cls and (
                sc > plain_score or (sc == plain_score and second > plain_second)
            ):
                plain_score, plain_second, plain = sc, second, node
    if chosen is None:
        return _no_fit(view, request, elig, footprint, short > 0)
    return _placed(
        view,
        request,
        chosen,
        _Choice(
            strategy,
            best_score,
            best_second,
            best_cls,
            top,
            fits,
            colocated,
            discovery,
            cursor,
            plain if plain is not chosen else None,
        ),
    )


# Fragmentation penalties stay below this, so the rank keeps the class first.
FRAG_SCALE = 1 << 20


@dataclass(frozen=True, slots=True)
class _Choice:
    """How `decide` chose its node, for the decision and its reason."""

    strategy: PlacementStrategy
    score: float
    second: float
    cls: int  # 2 * spread ok + no untolerated PreferNoSchedule taint
    top: int  # nodes of the best class and fragmentation penalty
    fits: int  # nodes that fit at all
    colocated: int  # nodes that fit but already run a replica of the deployment (spread on)
    discovery: bool
    cursor: str | None
    plain: NodeState | None  # the strategy's own pick, when fragmentation chose another node


def _strategy_why(
    chosen: NodeState, choice: _Choice, shared: bool, what: str
) -> tuple[str, float, str | None]:
    """The strategy's words for `chosen`, its score, and the cursor to return."""
    strategy, top, cursor = choice.strategy, choice.top, choice.cursor
    nodes = f"{top} node{'s' if top > 1 else ''} {what}"
    if strategy == PlacementStrategy.ROUND_ROBIN:
        why = (
            f"round-robin: the next node after {cursor} that fits"
            if cursor is not None
            else "round-robin: the first node that fits"
        )
        return why, 0.0, chosen.info.name
    if strategy == PlacementStrategy.WEIGHTED:
        score = chosen.capacity_mib / 1024 / (len(chosen.replicas) + 1)
        why = (
            f"weighted: {chosen.capacity_mib // 1024} GiB of GPU memory for "
            f"{len(chosen.replicas) + 1} replicas, {score:.1f} GiB per replica, the most among "
            f"{nodes}"
        )
        return why, score, cursor
    if strategy == PlacementStrategy.BIN_PACK:
        in_use = chosen.healthy_gpus + choice.second
        if shared:
            used = f"{in_use:.1f} of {chosen.healthy_gpus} GPUs' memory in use"
        else:
            used = f"{in_use:.0f} of {chosen.healthy_gpus} GPUs in use once placed"
        why = f"bin-packing: {used} ({choice.score:.0%}), the most among {nodes}"
        return why, choice.score, cursor
    free_text = f"{choice.second:.1f}" if shared else f"{choice.second:.0f}"
    unit = "GPUs' memory" if shared else "GPUs"
    why = (
        f"availability: {free_text} of {chosen.healthy_gpus} {unit} free "
        f"({choice.score:.0%}), the highest share among {nodes}"
    )
    return why, choice.score, cursor


def _penalty(node: NodeState, request: ReplicaRequest, need: int, shared: bool) -> int:
    partial = shared and node.shared_partial >= need
    unit = 1 if shared else request.gpu_count
    return compute_fragmentation_penalty(node.whole_free, node.healthy_gpus, unit, partial)


def _describe_break(node: NodeState, penalty: int) -> str:
    if penalty % 2:
        return f"would break up a whole free node ({node.whole_free} GPUs)"
    return f"would break up a block of {penalty // 2} free GPUs"


def _fragmentation_note(
    chosen: NodeState, plain: NodeState, request: ReplicaRequest, need: int, shared: bool
) -> str:
    """Why fragmentation overruled the strategy's own pick."""
    mine = _penalty(chosen, request, need, shared)
    theirs = _penalty(plain, request, need, shared)
    if mine == 0:
        kept = "breaks no larger free block"
    elif mine % 2:
        kept = f"breaks up a smaller whole node ({chosen.whole_free} GPUs)"
    else:
        kept = f"breaks up a smaller block ({mine // 2} free GPUs)"
    return (
        f"fragmentation: {plain.info.name}, the strategy's own pick, "
        f"{_describe_break(plain, theirs)}; {chosen.info.name} {kept}"
    )


def _placed(
    view: ClusterView, request: ReplicaRequest, chosen: NodeState, choice: _Choice
) -> Placed:
    """The decision for `chosen`, with its reason and the replica record."""
    count = request.gpu_count
    dep = request.deployment
    footprint = request.footprint_mib
    shared = request.sharing == SharingMode.SHARED and footprint is not None
    need = footprint if shared and footprint is not None else 0
    strategy = choice.strategy
    frag = view.settings.fragmentation_aware
    what = "that fit without breaking up more free GPUs" if frag else "that fit"
    why, score, cursor = _strategy_why(chosen, choice, shared, what)
    if shared:
        gpus = _best_fit_gpus(chosen, count, need)
        gpu_why = (
            f"GPU {_fmt_gpus(gpus)} by best fit ({gpus[0].available_mib} MiB available "
            f"for {need} MiB)"
        )
    else:
        gpus = _whole_gpus(chosen, count)
        gpu_why = f"GPU {_fmt_gpus(gpus)} by best fit (the smallest free block that holds them)"
    notes = []
    if choice.plain is not None:
        notes.append(_fragmentation_note(chosen, choice.plain, request, need, shared))
    if request.spread and view.counts.get(dep, 0) > 0:
        if choice.cls < 2:
            notes.append(
                f"spread not possible: every node that fits already runs a replica of {dep}"
            )
        elif choice.colocated:
            notes.append(f"spread: no other replica of {dep} there")
    if choice.cls % 2 == 0:
        notes.append("only nodes with an untolerated PreferNoSchedule taint fit")
    if choice.discovery:
        notes.append(
            "discovery run: holds whole GPUs until its memory is measured"
            if request.sharing == SharingMode.SHARED
            else "discovery run: its memory will be measured"
        )
    reason = f"{chosen.info.name}: {why}; {gpu_why}" + "".join(f"; {n}" for n in notes)
    replica = PlacedReplica(
        deployment=dep,
        pod=request.pod,
        node=chosen.info.name,
        gpu_ids=tuple(g.info.gpu_id for g in gpus),
        sharing=request.sharing,
        footprint_mib=footprint,
        priority=request.priority,
        last_used=request.last_used,
        min_replicas=request.min_replicas,
        state=ReplicaState.STARTING,
        measured=False,
        requests=request.requests,
    )
    return Placed(
        node=chosen.info.name,
        gpu_ids=replica.gpu_ids,
        uuids=tuple(g.info.uuid for g in gpus),
        reason=reason,
        score=round(score, 4),
        cursor=cursor,
        strategy=strategy,
        discovery=choice.discovery,
        replica=replica,
    )


def _larger_than_any_node(request: ReplicaRequest, elig: Eligibility) -> Unplaceable | None:
    """A replica no eligible node could ever hold, however empty: say so, never place it."""
    # (More GPUs than any node has is NoCapacity, whose reason already names the largest node.)
    what = f"{request.product} GPU" if request.product else "GPU"
    memory = request.memory_mib
    if memory is not None and memory > elig.largest_gpu_mib:
        return Unplaceable(
            UnplaceableCode.FOOTPRINT_TOO_LARGE,
            f"spec.gpu.memory is {memory} MiB per GPU, more than any eligible {what} has (the "
            f"largest: {elig.largest_gpu_mib} MiB); lower spec.gpu.memory, or ask for a larger "
            "GPU with spec.gpu.product",
        )
    return None


def _settling_memory(nodes: Sequence[tuple[NodeState, bool]], count: int) -> Unplaceable | None:
    """Wait, rather than evict, where whole GPUs are missing only because memory is in use on
    GPUs no pod holds: most often a replica that just went, whose memory the agent has not
    measured free yet. A monitoring lag must not cost another model its replicas."""
    for node, _ in nodes:
        unclaimed = [
            g
            for g in node.gpus
            if g.info.healthy
            and g.used_elsewhere
            and not g.info.foreign_pods
            and not g.holders
            and not g.shared
        ]
        if unclaimed and node.whole_free + len(unclaimed) >= count:
            shown = _examples([f"{g.info.gpu_id} ({g.used_elsewhere})" for g in unclaimed])
            return Unplaceable(
                UnplaceableCode.WAITING_FOR_STATS,
                f"{node.info.name} has {count} GPUs once memory in use with no pod on it is "
                f"measured free ({shown}); waiting for the next sample rather than evicting",
            )
    return None


def _could_fit_when_fresh(
    node: NodeState, request: ReplicaRequest, need: int | None, margin: int
) -> bool:
    """Whether `node`, whose agent is stale or unreachable, could take the replica by what is
    known without its agent: its GPUs (last reported, else the Node's allocatable count), the
    replicas placed there (terminating ones are going) and what other pods there request."""
    info = node.info
    if request.product is not None and node.product not in (None, request.product):
        return False
    if node.host_known and node.host_short(request.requests):
        return False
    holding = [r for r in node.replicas if r.state != ReplicaState.TERMINATING]
    held = {g for r in holding if r.whole_gpus for g in r.gpu_ids}
    gpus = [g for g in info.gpus if request.product is None or g.product == request.product]
    foreign = sum(1 for g in gpus if g.foreign_pods)
    devices_held = len(held) + foreign + max(info.others.gpus - foreign, 0)
    if gpus:
        # A whole-GPU replica needs a GPU nothing is on; a Shared one, one nothing holds whole.
        busy = held if need is not None else held | {g for r in holding for g in r.gpu_ids}
        free = sum(1 for g in gpus if g.gpu_id not in busy and not g.foreign_pods)
        if info.gpu_allocatable is not None:
            free = min(free, info.gpu_allocatable - devices_held)
    else:
        free = (info.gpu_allocatable or 0) - devices_held
    if need is None or not gpus:
        return free >= request.gpu_count
    promised: dict[str, int] = {}
    for r in holding:
        if not r.whole_gpus:
            for g in r.gpu_ids:
                promised[g] = promised.get(g, 0) + (r.footprint_mib or 0)
    room = [
        g
        for g in gpus
        if g.gpu_id not in held
        and not g.foreign_pods
        and g.memory_total_mib - promised.get(g.gpu_id, 0) - margin >= need
    ]
    return len(room) >= request.gpu_count


def _waiting_for_stale(
    view: ClusterView, request: ReplicaRequest, stale: Sequence[str], need: int | None
) -> Unplaceable | None:
    """Wait, rather than evict, when a node whose agent is stale or unreachable could take the
    replica: nothing fits on the nodes with fresh figures, but a monitoring blip must not cost
    another model its replicas. (A node that is lost, NotReady or gone, is never stale.)"""
    margin = view.settings.memory_margin_mib
    fit = [
        view.nodes[name]
        for name in stale
        if _could_fit_when_fresh(view.nodes[name], request, need, margin)
    ]
    if not fit:
        return None
    shown = _examples([f"{n.info.name} ({n.info.reason or 'stats are stale'})" for n in fit])
    k = len(fit)
    return Unplaceable(
        UnplaceableCode.WAITING_FOR_STATS,
        f"no node with fresh GPU stats has room; {k} node{'s' if k > 1 else ''} whose agent is "
        f"stale or unreachable could take it by what is known ({shown}): waiting for "
        f"{'their' if k > 1 else 'its'} stats rather than evicting",
    )


def _host_short(nodes: Sequence[tuple[NodeState, bool]], request: ReplicaRequest) -> str:
    """The nodes whose GPUs would do but whose kubelet lacks the CPU, memory or a pod slot."""
    count = request.gpu_count
    footprint = request.footprint_mib
    shared = request.sharing == SharingMode.SHARED and footprint is not None
    lacking = []
    for node, _ in nodes:
        if shared:
            av = node.shared_avail
            gpus_fit = len(av) >= count and av[count - 1] >= (footprint or 0)
        else:
            gpus_fit = node.whole_free >= count
        what = node.host_short(request.requests) if gpus_fit else ""
        if what:
            lacking.append(f"{node.info.name} ({what})")
    if not lacking:
        return ""
    k = len(lacking)
    return (
        f"{k} node{'s' if k > 1 else ''} with the GPUs free lack{'' if k > 1 else 's'} what "
        f"the replica requests besides: {_examples(lacking)}; lower spec.engine.resources."
        "requests or free the node (eviction frees GPUs, not CPU or memory)"
    )


def _host_after_eviction(plan: EvictionPlan, request: ReplicaRequest) -> bool:
    """Whether the node admits the replica once the victims are gone."""
    node = plan.node
    if not node.host_known:
        return True
    freed = sum((v.requests for v in plan.victims), Requests())
    return (
        request.requests.cpu_m <= node.cpu_free_m + freed.cpu_m
        and request.requests.memory_bytes <= node.memory_free_bytes + freed.memory_bytes
        and request.requests.pods <= node.pods_free + freed.pods
    )


# Nodes an eviction plan may be tried on before giving up because they lack CPU or memory.
HOST_RETRIES = 8


def _no_fit(
    view: ClusterView,
    request: ReplicaRequest,
    elig: Eligibility,
    footprint: int | None,
    host_short: bool,
) -> Decision:
    """Nothing fits as things are: wait for a starting replica, evict, or say why not."""
    margin = view.settings.memory_margin_mib
    count = request.gpu_count
    dep = request.deployment
    shared = request.sharing == SharingMode.SHARED and footprint is not None
    need = footprint if shared else None
    nodes = [
        (_product_node(view.nodes[name], request.product, margin), prefer)
        for name, prefer in elig.nodes
    ]
    stale = _waiting_for_stale(view, request, elig.stale, need)
    if stale is not None:
        return stale
    what = f"{request.product} GPU" if request.product else "GPU"
    largest = max(nodes, key=lambda n: n[0].healthy_gpus)[0]
    if largest.healthy_gpus < count:
        return Unplaceable(
            UnplaceableCode.NO_CAPACITY,
            f"needs {count} {what}s on one node; the largest matching node, "
            f"{largest.info.name}, has {largest.healthy_gpus} healthy",
        )
    if need is None:
        settling = _settling_memory(nodes, count)
        if settling is not None:
            return settling
    if need is not None:
        waiting = [
            n
            for n, _ in nodes
            if len(n.shared_avail_any) >= count and n.shared_avail_any[count - 1] >= need
        ]
        if waiting:
            node = waiting[0]
            busy = next(
                g
                for g in node.gpus
                if g.info.healthy and not g.holders and g.available_mib >= need and g.starting
            )
            starting = busy.starting[0]
            return Unplaceable(
                UnplaceableCode.START_SERIALIZED,
                f"{busy.info.gpu_id} has {busy.available_mib} MiB available but "
                f"{starting.deployment.namespace}/{starting.pod} is still starting there; "
                "Shared replicas start one at a time on a GPU",
            )
    candidates = [
        (n, [g for g in n.gpus if g.info.healthy], not request.spread or dep not in n.deployments)
        for n, _ in nodes
    ]
    floors = compute_eviction_floors(view.floors, request)
    for _ in range(HOST_RETRIES):
        plan = plan_eviction(
            candidates, count, need, margin, dep, request.priority, view.serving, floors
        )
        if plan is None or _host_after_eviction(plan, request):
            break
        # Freeing its GPUs would not free enough CPU or memory there: try the next node.
        candidates = [c for c in candidates if c[0] is not plan.node]
        plan = None
    if plan is not None:
        names = ", ".join(v.describe() for v in plan.victims)
        return Evict(
            victims=plan.victims,
            node=plan.node.info.name,
            gpu_ids=tuple(g.info.gpu_id for g in plan.gpus),
            uuids=tuple(g.info.uuid for g in plan.gpus),
            reason=(
                f"nothing fits; evicting {len(plan.victims)} replica"
                f"{'s' if len(plan.victims) > 1 else ''} (lowest priority, then least recently "
                f"used) frees {_fmt_gpus(plan.gpus)} on {plan.node.info.name}: {names}"
            ),
        )
    in_the_way = [r for n, _ in nodes for r in n.replicas]
    blocked = blocked_reasons(
        in_the_way, dep, request.priority, view.serving, view.floors, request.load_floors
    )
    if host_short:
        return Unplaceable(
            UnplaceableCode.NO_CAPACITY, f"{_host_short(nodes, request)}; elsewhere: {blocked}"
        )
    if need is not None:
        gpus = [(g.available_mib, g) for n, _ in nodes for g in n.gpus if g.info.healthy]
        most, top_gpu = max(gpus, key=lambda t: t[0])
        if count == 1:
            head = f"no {what} has {need} MiB available"
        else:
            head = f"needs {count} {what}s with {need} MiB available each on one node"
        text = (
            f"{head} (most: {max(most, 0)} MiB on {top_gpu.info.gpu_id}, after the "
            f"{margin} MiB margin and memory promised to replicas not yet measured); {blocked}"
        )
    else:
        best = max(nodes, key=lambda n: n[0].whole_free)[0]
        elsewhere = [
            f"{g.info.gpu_id} {g.used_elsewhere}"
            for n, _ in nodes
            for g in n.gpus
            if g.info.healthy and g.used_elsewhere
        ]
        used = f"; {len(elsewhere)} in use outside modelfleet ({_examples(elsewhere)})"
        capped = [
            f"{n.info.name} allocates {n.info.gpu_allocatable}"
            for n, _ in nodes
            if n.info.gpu_allocatable is not None
            and n.whole_free < sum(1 for g in n.gpus if g.free_whole)
        ]
        plugin = f"; the device plugin advertises fewer GPUs ({_examples(capped)})"
        text = (
            f"needs {count} free {what}{'s' if count > 1 else ''} on one node; the largest free "
            f"block is {best.whole_free}, on {best.info.name}{used if elsewhere else ''}"
            f"{plugin if capped else ''}; {blocked}"
        )
    return Unplaceable(UnplaceableCode.NO_CAPACITY, text)


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _no_eligible_node(view: ClusterView, request: ReplicaRequest, elig: Eligibility) -> Unplaceable:
    """Why no node may take this request at all, stage by stage."""
    parts = []
    ex = elig.excluded
    total = len(view.order)
    for stage in STAGES:
        items = ex.get(stage, ())
        if not items:
            continue
        k = len(items)
        nodes = "node" if k == 1 else "nodes"
        if stage == STAGE_SELECTOR:
            sel = ",".join(f"{k_}={v}" for k_, v in sorted(request.node_selector.items()))
            parts.append(f"{k} of {total} {nodes} do not match nodeSelector {sel}")
        elif stage == STAGE_PRODUCT:
            parts.append(f"{k} {nodes} have no {request.product} GPU ({_examples(items)})")
        elif stage == STAGE_TAINTS:
            parts.append(f"{k} {nodes} carry taints not tolerated ({_examples(items)})")
        elif stage == STAGE_CORDONED:
            parts.append(f"{k} {nodes} cordoned ({_examples(items)})")
        elif stage == STAGE_REJECTED:
            parts.append(f"{k} {nodes} rejected a replica at admission ({_examples(items)})")
        elif stage == STAGE_SLICED:
            parts.append(
                f"{k} {nodes} hand out shared GPUs, which an Exclusive replica does not take "
                f"({_examples(items)})"
            )
        elif stage == STAGE_STALE:
            parts.append(f"{k} {nodes} with stale GPU stats ({_examples(items)})")
        elif stage == STAGE_UNHEALTHY:
            parts.append(f"{k} {nodes} unhealthy ({_examples(items)})")
    if ex.get(STAGE_STALE):
        code = UnplaceableCode.WAITING_FOR_STATS
    elif ex.get(STAGE_REJECTED):
        code = UnplaceableCode.ADMISSION_BACKOFF
    else:
        code = UnplaceableCode.NO_MATCHING_NODE
    return Unplaceable(code, "no node may run it: " + "; ".join(parts))
