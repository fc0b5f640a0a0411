"""The cluster as placement sees it: per-GPU and per-node state, the ledger, and fast indexes.

`build_view` turns one snapshot (nodes + placed replicas) into a `ClusterView` once; every
decision reads it, and `ClusterView.with_placed` / `with_removed` return a new view that shares
everything but the one node that changed, so a burst of decisions never rebuilds the whole index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from modelfleet.placement.model import (
    PRODUCT_LABEL,
    DeploymentRef,
    Evict,
    GpuInfo,
    NodeInfo,
    Placed,
    PlacedReplica,
    PlacementInputError,
    PlacementSettings,
    ReplicaState,
    Requests,
    Taint,
    Toleration,
)

ReplicaKey = tuple[str, str]  # (namespace, pod name)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What is promised on one GPU to replicas that the agent does not measure yet."""

    gpu_id: str
    promised_mib: int  # Shared footprints not yet in memory_used
    whole: bool  # an unmeasured replica holds the whole GPU
    instances: tuple[str, ...]  # namespace/pod of every unmeasured replica on it


def compute_ledger(replicas: Iterable[PlacedReplica]) -> dict[str, LedgerEntry]:
    """Memory and GPUs promised but not yet measured, per global GPU ID.

    A pure function of the replicas (which the operator rebuilds from Pod annotations), so the
    ledger survives restarts and two quick placements never take the same resources.
    """
    promised: dict[str, int] = {}
    whole: dict[str, bool] = {}
    names: dict[str, list[str]] = {}
    for rep in replicas:
        if rep.measured:
            continue
        for gpu_id in rep.gpu_ids:
            names.setdefault(gpu_id, []).append(f"{rep.deployment.namespace}/{rep.pod}")
            if rep.whole_gpus:
                whole[gpu_id] = True
            else:
                promised[gpu_id] = promised.get(gpu_id, 0) + (rep.footprint_mib or 0)
    return {
        gpu_id: LedgerEntry(gpu_id, promised.get(gpu_id, 0), whole.get(gpu_id, False), tuple(n))
        for gpu_id, n in sorted(names.items())
    }


@dataclass(frozen=True, slots=True)
class GpuState:
    """One GPU with the replicas on it."""

    info: GpuInfo
    holders: tuple[PlacedReplica, ...]  # replicas holding it whole
    shared: tuple[PlacedReplica, ...]  # Shared replicas with a footprint on it
    ledger_mib: int  # footprints of the Shared replicas not measured yet
    available_mib: int  # memory_free - ledger - margin; -1 when held whole
    # Why something outside modelfleet's replicas uses it, as the node reports: a pod holds it,
    # or memory is in use with no replica on it. Empty when nothing does.
    used_elsewhere: str = ""

    @property
    def free_whole(self) -> bool:
        """Free for a whole-GPU replica: healthy, no replica and no promise on it, and nothing
        else using it."""
        return (
            self.info.healthy and not self.holders and not self.shared and not self.used_elsewhere
        )

    @property
    def starting(self) -> tuple[PlacedReplica, ...]:
        return tuple(r for r in self.shared if r.state == ReplicaState.STARTING)

    def replicas(self) -> tuple[PlacedReplica, ...]:
        return self.holders + self.shared


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node with its GPUs and the summaries a decision reads without looking at GPUs."""

    info: NodeInfo
    gpus: tuple[GpuState, ...]  # by index
    product: str | None  # node label, else the product every GPU shares, else None (mixed)
    healthy_gpus: int
    whole_free: int  # GPUs free for a whole-GPU replica
    shared_avail: tuple[int, ...]  # available MiB of healthy, not whole-held GPUs with no
    # starting Shared replica, largest first
    shared_avail_any: tuple[int, ...]  # the same, starting replicas or not
    shared_free_gpus: float  # sum of available/total over healthy not whole-held GPUs
    # The most MiB available on a GPU that already carries a Shared replica (none starting):
    # a Shared replica that fits there breaks no free GPU. -1 when there is none.
    shared_partial: int
    capacity_mib: int  # memory of the healthy GPUs
    replicas: tuple[PlacedReplica, ...]
    deployments: frozenset[DeploymentRef]
    # For the one-victim eviction search (see eviction.py), per replica whose removal alone
    # unblocks GPUs: (whole GPUs it alone frees, replica), and (MiB available on a GPU once it
    # alone is gone, replica, GPU index); with the maxima for a quick per-node check.
    solo_whole: tuple[tuple[int, PlacedReplica], ...]
    solo_shared: tuple[tuple[int, PlacedReplica, int], ...]
    max_solo_whole: int
    max_solo_shared: int
    # What the kubelet has left to admit pods with: allocatable minus the requests of every pod
    # bound there (replicas included); UNKNOWN_FREE each when allocatable is not known.
    cpu_free_m: int = 0
    memory_free_bytes: int = 0
    pods_free: int = 0

    @property
    def host_known(self) -> bool:
        return self.info.allocatable is not None

    def host_short(self, requests: Requests) -> str:
        """What the node lacks for a pod asking `requests` (CPU, memory, pods), or ""."""
        lacking = []
        alloc = self.info.allocatable
        if alloc is None:
            return ""
        if requests.cpu_m > self.cpu_free_m:
            lacking.append(
                f"cpu {requests.cpu_m}m requested, {max(self.cpu_free_m, 0)}m of "
                f"{alloc.cpu_m}m free"
            )
        if requests.memory_bytes > self.memory_free_bytes:
            lacking.append(
                f"memory {_mib(requests.memory_bytes)} requested, "
                f"{_mib(max(self.memory_free_bytes, 0))} of {_mib(alloc.memory_bytes)} free"
            )
        if requests.pods > self.pods_free:
            lacking.append(f"pods: all {alloc.pods} taken")
        return ", ".join(lacking)


# Free CPU, memory and pods of a node whose allocatable is not known: more than any request.
UNKNOWN_FREE = 1 << 62


def _mib(n_bytes: int) -> str:
    return f"{-(-n_bytes // 2**20)}Mi"


def compute_host_free(info: NodeInfo, replicas: Iterable[PlacedReplica]) -> Requests | None:
    """Allocatable minus what every pod bound to the node requests; None when unknown."""
    if info.allocatable is None:
        return None
    used = info.others
    for rep in replicas:
        used = used + rep.requests
    return info.allocatable - used


def _node_product(info: NodeInfo) -> str | None:
    label = info.labels.get(PRODUCT_LABEL)
    if label:
        return label
    products = {g.product for g in info.gpus}
    return products.pop() if len(products) == 1 else None


def _solo_victims(
    gpus: Iterable[GpuState], margin_mib: int
) -> tuple[tuple[tuple[int, PlacedReplica], ...], tuple[tuple[int, PlacedReplica, int], ...]]:
    """Per replica that alone blocks GPUs: the whole GPUs its eviction frees, and per GPU the
    memory its eviction would make available (the one-victim eviction reads these)."""
    solo_gain: dict[tuple[str, str], int] = {}
    solo_rep: dict[tuple[str, str], PlacedReplica] = {}
    solo_shared: list[tuple[int, PlacedReplica, int]] = []
    for st in gpus:
        if not st.info.healthy or st.info.foreign_pods:
            continue  # evicting a replica never frees a GPU a foreign pod holds
        blockers = st.holders + st.shared
        if len(blockers) == 1:
            only = blockers[0]
            solo_gain[only.key] = solo_gain.get(only.key, 0) + 1
            solo_rep[only.key] = only
        if st.holders:
            if len(st.holders) == 1 and not st.shared:
                h = st.holders[0]
                freed = st.info.memory_total_mib if h.measured else st.info.memory_free_mib
                solo_shared.append((freed - margin_mib, h, st.info.index))
            continue
        starting = [r for r in st.shared if r.state == ReplicaState.STARTING]
        for r in st.shared:
            if not starting or starting == [r]:
                solo_shared.append((st.available_mib + (r.footprint_mib or 0), r, st.info.index))
    solo_whole = tuple((solo_gain[k], solo_rep[k]) for k in sorted(solo_gain))
    return solo_whole, tuple(solo_shared)


# An idle GPU still shows some memory in use (the driver's context, persistence mode): up to this
# much, with no pod on it, it counts as free. The pool's "free GPU" figure uses the same bound.
IDLE_MEMORY_MIB = 512


def compute_used_elsewhere(gpu: GpuInfo, has_replicas: bool) -> str:
    """Why the node says something other than modelfleet's replicas uses `gpu`, or ""."""
    if gpu.foreign_pods:
        shown = ", ".join(gpu.foreign_pods[:2])
        more = f" and {len(gpu.foreign_pods) - 2} more" if len(gpu.foreign_pods) > 2 else ""
        return f"held by {shown}{more}"
    if not has_replicas and gpu.memory_used_mib > IDLE_MEMORY_MIB:
        return f"{gpu.memory_used_mib} MiB in use with no replica on it"
    return ""


def build_node_state(
    info: NodeInfo, replicas: Iterable[PlacedReplica], margin_mib: int
) -> NodeState:
    """Summarize one node from its GPUs and the replicas placed on it."""
    reps = tuple(sorted(replicas, key=lambda r: r.key))
    holders: dict[str, list[PlacedReplica]] = {}
    shared: dict[str, list[PlacedReplica]] = {}
    for rep in reps:
        for gpu_id in rep.gpu_ids:
            (holders if rep.whole_gpus else shared).setdefault(gpu_id, []).append(rep)
    gpus: list[GpuState] = []
    avail: list[int] = []
    avail_any: list[int] = []
    free_whole = 0
    free_equiv = 0.0
    partial = -1
    capacity = 0
    healthy = 0
    for g in sorted(info.gpus, key=lambda g: g.index):
        held = tuple(holders.get(g.gpu_id, ()))
        sh = tuple(shared.get(g.gpu_id, ()))
        ledger = sum(r.footprint_mib or 0 for r in sh if not r.measured)
        elsewhere = compute_used_elsewhere(g, bool(held or sh))
        # A pod the device plugin gave this GPU has it whole: no Shared replica joins it.
        available = -1 if held or g.foreign_pods else g.memory_free_mib - ledger - margin_mib
        state = GpuState(g, held, sh, ledger, available, elsewhere)
        gpus.append(state)
        if not g.healthy:
            continue
        healthy += 1
        capacity += g.memory_total_mib
        if not held and not sh and not elsewhere:
            free_whole += 1
        if not held and not g.foreign_pods:
            avail_any.append(available)
            if not any(r.state == ReplicaState.STARTING for r in sh):
                avail.append(available)
                if sh and available > partial:
                    partial = available
            if g.memory_total_mib > 0:
                free_equiv += max(available, 0) / g.memory_total_mib
    avail.sort(reverse=True)
    if info.gpu_allocatable is not None:
        # The kubelet admits no more devices than its plugin advertises, minus those held: by
        # replicas and by other pods as the agent saw them on GPUs, plus what other pods bound
        # there request beyond that (bound, not admitted yet: the agent cannot see them).
        foreign = sum(1 for st in gpus if st.info.foreign_pods)
        held_devices = sum(1 for st in gpus if st.holders or st.info.foreign_pods)
        held_devices += max(info.others.gpus - foreign, 0)
        free_whole = max(min(free_whole, info.gpu_allocatable - held_devices), 0)
    host = compute_host_free(info, reps)
    solo_whole, solo_shared = _solo_victims(gpus, margin_mib)
    avail_any.sort(reverse=True)
    return NodeState(
        info=info,
        gpus=tuple(gpus),
        product=_node_product(info),
        healthy_gpus=healthy,
        whole_free=free_whole,
        shared_avail=tuple(avail),
        shared_avail_any=tuple(avail_any),
        shared_free_gpus=free_equiv,
        shared_partial=partial,
        capacity_mib=capacity,
        replicas=reps,
        deployments=frozenset(r.deployment for r in reps),
        solo_whole=solo_whole,
        solo_shared=solo_shared,
        max_solo_whole=max((g for g, _ in solo_whole), default=0),
        max_solo_shared=max((a for a, _, _ in solo_shared), default=-1),
        cpu_free_m=UNKNOWN_FREE if host is None else host.cpu_m,
        memory_free_bytes=UNKNOWN_FREE if host is None else host.memory_bytes,
        pods_free=UNKNOWN_FREE if host is None else host.pods,
    )


def untolerated(taints: Iterable[Taint], tolerations: tuple[Toleration, ...]) -> list[Taint]:
    """The taints no toleration matches."""
    return [t for t in taints if not any(tol.tolerates(t) for tol in tolerations)]


# The static part of a request: what decides eligibility before any capacity is looked at.
# (product, nodeSelector, tolerations, asks for nvidia.com/gpu devices: Exclusive)
StaticKey = tuple[str | None, frozenset[tuple[str, str]], tuple[Toleration, ...], bool]


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Nodes a kind of request may use (name order), and why the others may not."""

    nodes: tuple[tuple[str, bool], ...]  # (node, has an untolerated PreferNoSchedule taint)
    excluded: Mapping[str, tuple[str, ...]]  # stage -> "node: why" for each node excluded there
    largest_gpu_mib: int = 0  # the most memory one GPU (of the product) has on these nodes
    # Nodes that pass every other stage but whose agent is stale or unreachable: a replica that
    # could go there waits for them rather than evicting elsewhere.
    stale: tuple[str, ...] = ()


# The stages a node passes, in the order the reasons are reported.
STAGE_SELECTOR = "selector"
STAGE_PRODUCT = "product"
STAGE_TAINTS = "taints"
STAGE_CORDONED = "cordoned"
STAGE_REJECTED = "rejected"
STAGE_SLICED = "sliced"
STAGE_STALE = "stale"
STAGE_UNHEALTHY = "unhealthy"
STAGES = (
    STAGE_SELECTOR,
    STAGE_PRODUCT,
    STAGE_TAINTS,
    STAGE_CORDONED,
    STAGE_REJECTED,
    STAGE_SLICED,
    STAGE_STALE,
    STAGE_UNHEALTHY,
)

# GPU Feature Discovery's label for time-slicing and MPS: each GPU is advertised this many times.
REPLICAS_LABEL = "nvidia.com/gpu.replicas"


def compute_sliced(info: NodeInfo) -> str:
    """Why an nvidia.com/gpu device of this node is not a whole GPU, or "".

    The device plugin then hands out time-slicing or MPS replicas, or MIG instances
    (`mig.strategy=single`), as nvidia.com/gpu: two Exclusive replicas could get one GPU.
    """
    replicas = info.labels.get(REPLICAS_LABEL, "")
    if replicas.isdigit() and int(replicas) > 1:
        return f"{REPLICAS_LABEL}={replicas}: each GPU is shared (time-slicing or MPS)"
    seen = len(info.gpus)
    if info.gpu_allocatable is not None and seen and info.gpu_allocatable > seen:
        return (
            f"allocates {info.gpu_allocatable} nvidia.com/gpu for the {seen} GPUs its agent sees "
            "(time-slicing, MPS or MIG instances, not whole GPUs)"
        )
    return ""


def _exclusion(node: NodeState, key: StaticKey) -> tuple[str, str] | None:
    product, selector, tolerations, devices = key
    info = node.info
    for label, value in selector:
        if info.labels.get(label) != value:
            return STAGE_SELECTOR, f"{info.name}: label {label}={info.labels.get(label, '')!r}"
    if (
        product is not None
        and node.product != product
        and not any(g.info.product == product for g in node.gpus)
    ):
        have = node.product or "mixed GPUs"
        return STAGE_PRODUCT, f"{info.name}: has {have}"
    bad = [t for t in untolerated(info.taints, tolerations) if t.effect != "PreferNoSchedule"]
    if bad:
        text = ", ".join(f"{t.key}={t.value}:{t.effect}" for t in bad)
        return STAGE_TAINTS, f"{info.name}: taint {text}"
    if not info.schedulable:
        return STAGE_CORDONED, f"{info.name}: cordoned"
    if info.rejected:
        return STAGE_REJECTED, f"{info.name}: {info.rejected}"
    sliced = compute_sliced(info) if devices else ""
    if sliced:
        return STAGE_SLICED, f"{info.name}: {sliced}"
    if info.stale:
        return STAGE_STALE, f"{info.name}: {info.reason or 'stats are stale'}"
    if not info.healthy:
        return STAGE_UNHEALTHY, f"{info.name}: {info.reason or 'unhealthy'}"
    if node.healthy_gpus == 0:
        return STAGE_UNHEALTHY, f"{info.name}: no healthy GPU"
    return None


def _largest_gpu_mib(nodes: Iterable[NodeState], product: str | None) -> int:
    """The most memory one GPU of `product` (any, when None) has on `nodes`."""
    return max(
        (
            g.memory_total_mib
            for node in nodes
            for g in node.info.gpus
            if product is None or g.product == product
        ),
        default=0,
    )


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Everything a decision reads. Build it with `build_view`; never mutate it."""

    # The dicts are never changed after construction: `with_*` copy them (dict.copy is a fast
    # C copy; read-only proxies would make every copy a slow Python-level iteration).
    settings: PlacementSettings
    nodes: dict[str, NodeState]
    order: tuple[str, ...]  # node names, sorted: the stable order of ties and round-robin
    replicas: dict[ReplicaKey, PlacedReplica]
    counts: dict[DeploymentRef, int]  # replicas per deployment
    floors: dict[DeploymentRef, int]  # minReplicas per deployment
    cursor: str | None  # the node round-robin chose last
    # Ready replicas per deployment (terminating ones excluded): what eviction floors protect.
    serving: dict[DeploymentRef, int] = field(default_factory=dict)
    # Eligibility depends only on node facts, which placements do not change: views derived
    # from one snapshot share this cache.
    _eligibility: dict[StaticKey, Eligibility] = field(default_factory=dict, repr=False)

    def eligibility(self, key: StaticKey) -> Eligibility:
        """Nodes a request with this product, selector and tolerations may use (cached).

        One pass over the nodes fills the entries of both kinds of request (asking the kubelet
        for devices or not): they differ only on the rare node whose devices are not whole GPUs.
        """
        found = self._eligibility.get(key)
        if found is not None:
            return found
        product, selector, tolerations, _ = key
        keys = ((product, selector, tolerations, False), (product, selector, tolerations, True))
        ok: tuple[list[tuple[str, bool]], list[tuple[str, bool]]] = ([], [])
        excluded: tuple[dict[str, list[str]], dict[str, list[str]]] = ({}, {})
        stale: tuple[list[str], list[str]] = ([], [])
        for name in self.order:
            node = self.nodes[name]
            why = _exclusion(node, keys[0])
            whys = (why, _exclusion(node, keys[1]) if compute_sliced(node.info) else why)
            prefer = None
            for i, w in enumerate(whys):
                if w is None:
                    if prefer is None:
                        prefer = any(
                            t.effect == "PreferNoSchedule"
                            for t in untolerated(node.info.taints, tolerations)
                        )
                    ok[i].append((name, prefer))
                else:
                    excluded[i].setdefault(w[0], []).append(w[1])
                    if w[0] == STAGE_STALE:
                        stale[i].append(name)
        if len(self._eligibility) > 4096:  # bounded: two entries per kind of request
            self._eligibility.clear()
        for i, k in enumerate(keys):
            largest = _largest_gpu_mib((self.nodes[n] for n, _ in ok[i]), product)
            self._eligibility[k] = Eligibility(
                tuple(ok[i]),
                {st: tuple(v) for st, v in excluded[i].items()},
                largest,
                tuple(stale[i]),
            )
        return self._eligibility[key]

    def ledger(self) -> dict[str, LedgerEntry]:
        """The ledger of this view (see `compute_ledger`)."""
        return compute_ledger(self.replicas.values())

    def with_placed(self, decision: Placed) -> ClusterView:
        """The view after `decision.replica` was added (the operator created its Pod)."""
        rep = decision.replica
        if rep.key in self.replicas:
            raise PlacementInputError(
                f"replica {rep.deployment.namespace}/{rep.pod} is already placed; "
                "use a new Pod name or remove the old replica first"
            )
        replicas = self.replicas.copy()
        replicas[rep.key] = rep
        counts = self.counts.copy()
        counts[rep.deployment] = counts.get(rep.deployment, 0) + 1
        floors = self.floors.copy()
        floors[rep.deployment] = max(floors.get(rep.deployment, 0), rep.min_replicas)
        nodes = self.nodes.copy()
        node = nodes.get(rep.node)
        if node is not None:
            nodes[rep.node] = build_node_state(
                node.info, (*node.replicas, rep), self.settings.memory_margin_mib
            )
        return replace(
            self,
            nodes=nodes,
            replicas=replicas,
            counts=counts,
            floors=floors,
            cursor=decision.cursor,
        )

    def with_removed(self, victims: Iterable[PlacedReplica]) -> ClusterView:
        """The view after these replicas were deleted (unknown ones are ignored)."""
        replicas = self.replicas.copy()
        counts = self.counts.copy()
        serving = self.serving.copy()
        touched: set[str] = set()
        for rep in victims:
            if replicas.pop(rep.key, None) is None:
                continue
            counts[rep.deployment] -= 1
            if counts[rep.deployment] == 0:
                del counts[rep.deployment]
            if rep.state == ReplicaState.READY:
                serving[rep.deployment] = serving.get(rep.deployment, 1) - 1
            touched.add(rep.node)
        nodes = self.nodes.copy()
        for name in touched:
            node = nodes.get(name)
            if node is not None:
                left = [r for r in node.replicas if r.key in replicas]
                nodes[name] = build_node_state(node.info, left, self.settings.memory_margin_mib)
        return replace(
            self,
            nodes=nodes,
            replicas=replicas,
            counts=counts,
            serving=serving,
        )

    def with_evicted(self, decision: Evict) -> ClusterView:
        """The view after the victims of `decision` were deleted."""
        return self.with_removed(decision.victims)


def build_view(
    nodes: Iterable[NodeInfo],
    replicas: Iterable[PlacedReplica],
    settings: PlacementSettings,
    cursor: str | None = None,
) -> ClusterView:
    """Index one snapshot for placement. Raises PlacementInputError on inconsistent input."""
    infos: dict[str, NodeInfo] = {}
    for info in nodes:
        if info.name in infos:
            raise PlacementInputError(f"node {info.name!r} appears twice in the snapshot")
        seen: set[int] = set()
        for g in info.gpus:
            if g.gpu_id != f"{info.name}:{g.index}":
                raise PlacementInputError(
                    f"GPU {g.index} of node {info.name!r} has global ID {g.gpu_id!r}; "
                    f"it must be {info.name}:{g.index}"
                )
            if g.index in seen:
                raise PlacementInputError(f"GPU index {g.index} appears twice on {info.name!r}")
            seen.add(g.index)
        infos[info.name] = info
    by_key: dict[ReplicaKey, PlacedReplica] = {}
    by_node: dict[str, list[PlacedReplica]] = {}
    counts: dict[DeploymentRef, int] = {}
    floors: dict[DeploymentRef, int] = {}
    serving: dict[DeploymentRef, int] = {}
    for rep in replicas:
        if rep.key in by_key:
            raise PlacementInputError(
                f"replica {rep.deployment.namespace}/{rep.pod} appears twice; "
                "Pod names must be unique in a namespace"
            )
        for gpu_id in rep.gpu_ids:
            node, _, index = gpu_id.rpartition(":")
            if node != rep.node or not index.isdigit():
                raise PlacementInputError(
                    f"replica {rep.deployment.namespace}/{rep.pod} on node {rep.node!r} "
                    f"lists GPU {gpu_id!r}; its GPUs must be {rep.node}:<index>"
                )
        if not rep.whole_gpus and (rep.footprint_mib or 0) <= 0:
            raise PlacementInputError(
                f"Shared replica {rep.deployment.namespace}/{rep.pod} promises "
                f"{rep.footprint_mib} MiB; a Shared footprint must be a positive number of MiB"
            )
        by_key[rep.key] = rep
        by_node.setdefault(rep.node, []).append(rep)
        counts[rep.deployment] = counts.get(rep.deployment, 0) + 1
        floors[rep.deployment] = max(floors.get(rep.deployment, 0), rep.min_replicas)
        if rep.state == ReplicaState.READY:
            serving[rep.deployment] = serving.get(rep.deployment, 0) + 1
    order = tuple(sorted(infos))
    states = {
        name: build_node_state(infos[name], by_node.get(name, ()), settings.memory_margin_mib)
        for name in order
    }
    return ClusterView(
        settings=settings,
        nodes=states,
        order=order,
        replicas=by_key,
        counts=counts,
        floors=floors,
        serving=serving,
        cursor=cursor,
    )
