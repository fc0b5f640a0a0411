"""Replicas, per-model routes and the balancing decisions (no I/O; time is passed in).

A Route is rebuilt whenever the model's ready Pods change, but Replica objects are carried over
by address, so outstanding counts, failure streaks and ejections survive the rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelfleet.api.v1alpha1 import Balancing


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

    def __post_init__(self) -> None:
        self.base_url = f"http://{self.address}"


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
    balancing: Balancing = Balancing.ROUND_ROBIN
    counter: int = 0


def pick_replica(route: Route, now: float, exclude: tuple[Replica, ...] = ()) -> Replica | None:
    """The replica for the next request, or None when the route has none.

    Ejected replicas are skipped while others are left; when all are ejected (or excluded after a
    failed try), they are used anyway, since refusing every request helps nobody.
    """
    replicas = route.replicas
    count = len(replicas)
    if count == 0:
        return None
    start = route.counter
    route.counter = start + 1
    if route.balancing == Balancing.LEAST_OUTSTANDING:
        best: Replica | None = None
        for i in range(count):
            candidate = replicas[(start + i) % count]
            if candidate.ejected_until > now or candidate in exclude:
                continue
            if best is None or candidate.outstanding < best.outstanding:
                best = candidate
        if best is not None:
            return best
    else:
        for i in range(count):
            candidate = replicas[(start + i) % count]
            if candidate.ejected_until <= now and candidate not in exclude:
                # Keep the counter on this replica so the next request takes the one after it.
                route.counter = start + i + 1
                return candidate
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
    balancing: Balancing,
    previous: Route | None,
) -> Route:
    """A Route over (name, address, namespace) triples, in that order, reusing old Replicas."""
    old = {r.address: r for r in previous.replicas} if previous else {}
    replicas = []
    for name, address, namespace in addresses:
        replica = old.get(address)
        if replica is None or replica.name != name:
            replica = Replica(name=name, address=address, namespace=namespace)
        replicas.append(replica)
    return Route(
        model=model,
        replicas=replicas,
        balancing=balancing,
        counter=previous.counter if previous else 0,
    )
