"""Replicas, per-model routes and the balancing decisions (no I/O; time is passed in).

A Route is rebuilt whenever the model's ready Pods change, but Replica objects are carried over
by address, so outstanding counts, failure streaks, ejections, engine figures and counters
survive the rebuild. The hashed policies (routing.py) get a ring over the replicas' names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelfleet.api.v1alpha1 import Balancing
from modelfleet.gateway.routing import (
    KeyView,
    Ring,
    RoutingConfig,
    choose_bounded,
    choose_least,
    compute_load,
)


@dataclass(eq=False)
class Replica:
    """One ready replica as the proxy sees it."""

    name: str  # Pod name (or the URL for static upstreams)
    address: str  # host:port
    namespace: str = ""
    base_url: str = field(init=False)
    # path -> the request line and Host header the proxy sends, cached so it dies with the replica.
    heads: dict[str, bytes] = field(init=False, default_factory=dict)
    outstanding: int = 0
    consecutive_failures: int = 0
    ejections: int = 0  # consecutive ejections; grows the ejection time, reset by a success
    ejected_until: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0  # from the answers' usage, where they carry one
    completion_tokens: int = 0
    # The engine's own figures from its /metrics (engineload.py), and when they were read.
    engine_running: float = 0.0
    engine_waiting: float = 0.0
    engine_kv_cache: float = 0.0
    engine_at: float = -1e18

    def __post_init__(self) -> None:
        self.base_url = f"http://{self.address}"

    def load(self, now: float, fresh_s: float) -> float:
        """In-flight requests, combined with the engine's queue while its figures are fresh."""
        if now - self.engine_at > fresh_s:
            return float(self.outstanding)
        return compute_load(self.outstanding, (self.engine_running, self.engine_waiting))


@dataclass(frozen=True)
class EjectionPolicy:
    """Passive outlier ejection: after `failures` in a row, skip for base * 2^(n-1) up to cap."""

    failures: int = 3
    base_s: float = 2.0
    max_s: float = 60.0


@dataclass(eq=False)
class Route:
    """Every ready replica of one served model, and how to choose among them."""

    model: str
    replicas: list[Replica]
    config: RoutingConfig = field(default_factory=RoutingConfig)
    counter: int = 0
    ring: Ring | None = None  # for the hashed policies
    # Engine figures older than this are ignored (set from the scrape interval).
    engine_fresh_s: float = 0.0

    @property
    def balancing(self) -> Balancing:
        return self.config.policy

    def loads(self, now: float) -> list[float]:
        fresh = self.engine_fresh_s if self.config.uses_engine_load else -1.0
        return [r.load(now, fresh) for r in self.replicas]


def _least_loaded(
    route: Route, loads: list[float], start: int, now: float, exclude: tuple[Replica, ...]
) -> Replica | None:
    """The healthy, untried replica with the lowest load; ties go round from `start`."""
    replicas = route.replicas
    count = len(replicas)
    best: int | None = None
    for i in range(count):
        index = (start + i) % count
        candidate = replicas[index]
        if candidate.ejected_until > now or candidate in exclude:
            continue
        if best is None or loads[index] < loads[best]:
            best = index
    return None if best is None else replicas[best]


def pick_replica(
    route: Route,
    now: float,
    exclude: tuple[Replica, ...] = (),
    key: int | None = None,
    view: KeyView | None = None,
) -> Replica | None:
    """The replica for the next request, or None when the route has none.

    `key` is the request's position on the ring (prefix or session) for the hashed policies;
    a hashed policy without one (no prompt, no session) takes the least loaded replica.
    `view` is what the gateway remembers of the key (routing.KeyMemory): a new key of a model
    whose keys rarely come back takes the replica with the fewest requests in flight, the first
    of them in ring order from the key; any other goes back to the replica it went to last, or
    else takes the first replica on the ring, within the load bound and the key bound.

    Ejected replicas are skipped while others are left; when all are ejected (or excluded after a
    failed try), they are used anyway, since refusing every request helps nobody.
    """
    replicas = route.replicas
    count = len(replicas)
    if count == 0:
        return None
    start = route.counter
    route.counter = start + 1
    policy = route.config.policy
    chosen: Replica | None = None
    if key is not None and route.ring is not None:
        eligible = [r.ejected_until <= now and r not in exclude for r in replicas]
        if view is not None and view.least_loaded:
            # In-flight only, as least-outstanding: engine figures are up to a scrape old, and
            # new prompts would pile onto the replica that looked least loaded at the last one.
            in_flight = [float(r.outstanding) for r in replicas]
            index = choose_least(route.ring, key, in_flight, eligible)
        else:
            index = choose_bounded(
                route.ring,
                key,
                route.loads(now),
                eligible,
                route.config.load_factor,
                view.held if view is not None else None,
                view.last if view is not None else None,
                view is not None and view.counted,
            )
        chosen = None if index is None else replicas[index]
    elif policy == Balancing.LEAST_OUTSTANDING:
        chosen = _least_loaded(route, [float(r.outstanding) for r in replicas], start, now, exclude)
    elif policy == Balancing.LOAD_AWARE or route.config.hashed:
        chosen = _least_loaded(route, route.loads(now), start, now, exclude)
    else:
        for i in range(count):
            candidate = replicas[(start + i) % count]
            if candidate.ejected_until <= now and candidate not in exclude:
                # Keep the counter on this replica so the next request takes the one after it.
                route.counter = start + i + 1
                return candidate
    if chosen is not None:
        return chosen
    # Panic mode: nothing healthy and untried is left.
    fallback = [r for r in replicas if r not in exclude] or replicas
    return min(fallback, key=lambda r: (r.ejected_until, r.outstanding))


def record_success(replica: Replica) -> None:
    replica.consecutive_failures = 0
    replica.ejections = 0


def record_failure(replica: Replica, now: float, policy: EjectionPolicy) -> bool:
    """Count a failure; return True when it ejects the replica.

    Failures of requests that were already under way when the replica was ejected do not count:
    a burst of concurrent failures is one incident, not a reason to eject for a minute.
    """
    if replica.ejected_until > now:
        return False
    replica.consecutive_failures += 1
    if replica.consecutive_failures < policy.failures:
        return False
    replica.consecutive_failures = 0
    replica.ejections += 1
    replica.ejected_until = now + min(policy.max_s, policy.base_s * 2 ** (replica.ejections - 1))
    return True


def build_route(
    model: str,
    addresses: list[tuple[str, str, str]],
    config: RoutingConfig,
    previous: Route | None,
    engine_fresh_s: float = 0.0,
) -> Route:
    """A Route over (name, address, namespace) triples, in that order, reusing old Replicas
    (and the old ring while the names are the same)."""
    old = {r.address: r for r in previous.replicas} if previous else {}
    replicas = []
    for name, address, namespace in addresses:
        replica = old.get(address)
        if replica is None or replica.name != name:
            replica = Replica(name=name, address=address, namespace=namespace)
        replicas.append(replica)
    ring = None
    if config.hashed:
        names = tuple(r.name for r in replicas)
        old_ring = previous.ring if previous else None
        ring = old_ring if old_ring is not None and old_ring.names == names else Ring(names)
    return Route(
        model=model,
        replicas=replicas,
        config=config,
        counter=previous.counter if previous else 0,
        ring=ring,
        engine_fresh_s=engine_fresh_s,
    )
