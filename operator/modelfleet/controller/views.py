"""The placement view, built once per pool snapshot and kept between reconciles.

Building the view (every node, GPU and replica of the cluster) costs far more than one decision,
and most reconciles place nothing. `PlacementViews` keeps the last view with the snapshot and the
generation it was built for; anything that changes what the view would show and that the
placements themselves do not add (a replica Pod went away, a Node changed, a reservation changed,
an eviction was decided) calls `invalidate`. This process's own placements are added to the kept
view as they are decided (the operator is the only one that creates replica Pods).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from modelfleet import placement as P
from modelfleet.controller import inputs
from modelfleet.controller.decisions import Decision, PlacementRequest
from modelfleet.gpus.snapshot import PoolSnapshot


@dataclass(frozen=True, slots=True)
class _Kept:
    snapshot: PoolSnapshot | None
    generation: int
    view: P.ClusterView
    gpu_memory: Mapping[str, int]  # total MiB per global GPU ID


class PlacementViews:
    """The cached placement view and the round-robin cursor every deployment shares."""

    def __init__(self) -> None:
        self._generation = 0
        self._kept: _Kept | None = None
        self.cursor: str | None = None

    def invalidate(self) -> None:
        """The next placer rebuilds the view from the cluster, and a view taken before now is
        never kept."""
        self._generation += 1
        self._kept = None

    def placer(
        self,
        snapshot: PoolSnapshot | None,
        key: tuple[str, str],
        last_used: Mapping[tuple[str, str], float],
        build: Callable[[str | None], inputs.EnginePlacer],
    ) -> LazyPlacer:
        """A placer for deployment `key` over the kept view, or one `build` makes on first use."""
        return LazyPlacer(self, snapshot, key, last_used, build)

    def _take(
        self,
        snapshot: PoolSnapshot | None,
        last_used: Mapping[tuple[str, str], float],
        build: Callable[[str | None], inputs.EnginePlacer],
    ) -> tuple[inputs.EnginePlacer, int]:
        """A placer over the kept view (or a new one), and the generation it belongs to."""
        kept = self._kept
        if kept is not None and kept.snapshot is snapshot and kept.generation == self._generation:
            placer = inputs.EnginePlacer(
                view=kept.view, last_used=last_used, gpu_memory=kept.gpu_memory, cursor=self.cursor
            )
            return placer, self._generation
        return build(self.cursor), self._generation

    def _keep(
        self, snapshot: PoolSnapshot | None, placer: inputs.EnginePlacer, generation: int
    ) -> None:
        self.cursor = placer.cursor
        if generation == self._generation:  # else something invalidated it since it was taken
            self._kept = _Kept(snapshot, generation, placer.view, placer.gpu_memory)


class LazyPlacer:
    """Builds (or takes) the placement view on the first request only.

    The view it places on leaves out the GPUs reserved for its own deployment (they are its to
    take). Such a view is not kept for others: it would hand them the reserved GPUs.
    """

    def __init__(
        self,
        views: PlacementViews,
        snapshot: PoolSnapshot | None,
        key: tuple[str, str],
        last_used: Mapping[tuple[str, str], float],
        build: Callable[[str | None], inputs.EnginePlacer],
    ) -> None:
        self._views = views
        self._snapshot = snapshot
        self._key = key
        self._last_used = last_used
        self._build = build
        self._inner: inputs.EnginePlacer | None = None
        self._generation = 0  # of the view taken
        self._shared = True  # the view is the same every deployment sees
        self.decisions: list[Decision] = []

    def __call__(self, request: PlacementRequest) -> Decision:
        if self._inner is None:
            self._inner, self._generation = self._views._take(
                self._snapshot, self._last_used, self._build
            )
            full = self._inner.view
            self._inner.view = inputs.without_own_reservations(full, self._key)
            self._shared = self._inner.view is full
        decision = self._inner(request)
        self.decisions.append(decision)
        return decision

    def engine(self) -> inputs.EnginePlacer:
        """The placer over the view this one placed on (after its first request)."""
        assert self._inner is not None, "engine() before the first placement request"
        return self._inner

    def keep(self) -> None:
        """Keep the view, with this placer's placements, for the next reconcile."""
        if self._inner is None:
            return
        if self._shared:
            self._views._keep(self._snapshot, self._inner, self._generation)
        else:
            self._views.cursor = self._inner.cursor
            self._views.invalidate()
