"""Leader election on a coordination.k8s.io/v1 Lease, so that only one operator instance acts.

The rules are client-go's: the holder renews `renewTime` every few seconds; a candidate takes the
Lease over only after it has watched the same (holder, renewTime) pair stay unchanged for a whole
`leaseDurationSeconds` on its own monotonic clock, so clock skew between machines never matters.
Every write carries the resourceVersion it read, so two candidates can never both win. The leader
that fails to renew for a whole lease duration stops acting (the process exits); a leader that
shuts down cleanly releases the Lease so the standby takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modelfleet.api.times import format_micro_time
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import resource_path

log = logging.getLogger(__name__)


@dataclass
class Observation:
    """The last (holder, renewTime) seen, and when (monotonic) it was first seen."""

    holder: str = ""
    renew_time: str = ""
    seen_at: float = 0.0


def compute_lease_action(
    lease: Mapping[str, Any] | None,
    identity: str,
    observed: Observation,
    now_mono: float,
) -> str:
    """What to do with the Lease as read: "create", "renew", "take" (expired) or "wait". Pure.

    Updates `observed` when the holder or its renewTime changed.
    """
    if lease is None:
        return "create"
    spec = lease.get("spec") or {}
    holder = str(spec.get("holderIdentity") or "")
    renew = str(spec.get("renewTime") or "")
    if holder == identity:
        return "renew"
    if not holder:
        return "take"
    if (holder, renew) != (observed.holder, observed.renew_time):
        observed.holder, observed.renew_time, observed.seen_at = holder, renew, now_mono
        return "wait"
    duration = float(spec.get("leaseDurationSeconds") or 15)
    return "take" if now_mono - observed.seen_at >= duration else "wait"


class LeaderElector:
    """Acquire, renew and release one Lease."""

    def __init__(
        self,
        client: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: float = 15.0,
        renew_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_interval_s = renew_interval_s
        self._clock = clock
        self._observed = Observation()
        self.last_renewed = 0.0

    @property
    def _path(self) -> str:
        return resource_path(
            "leases", self.namespace, self.name, group="coordination.k8s.io", version="v1"
        )

    def _spec(self, transitions: int, acquired: bool, now: datetime) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
            "renewTime": format_micro_time(now),
            "leaseTransitions": transitions,
        }
        if acquired:
            spec["acquireTime"] = format_micro_time(now)
        return spec

    async def try_acquire_or_renew(self) -> bool:
        """One round: True when this instance holds the Lease afterwards."""
        now = datetime.now(UTC)
        try:
            lease: dict[str, Any] | None = await self.client.get(self._path)
        except ApiError as exc:
            if not exc.not_found:
                raise
            lease = None
        action = compute_lease_action(lease, self.identity, self._observed, self._clock())
        try:
            if action == "create":
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(0, True, now),
                }
                await self.client.create(
                    resource_path(
                        "leases", self.namespace, group="coordination.k8s.io", version="v1"
                    ),
                    body,
                )
            elif action in ("renew", "take"):
                assert lease is not None
                spec = lease.get("spec") or {}
                transitions = int(spec.get("leaseTransitions") or 0)
                if action == "take":
                    new_spec = self._spec(transitions + 1, True, now)
                else:
                    new_spec = {**spec, **self._spec(transitions, False, now)}
                await self.client.replace(self._path, {**lease, "spec": new_spec})
                if action == "take":
                    log.info(
                        "took over Lease %s/%s from %r",
                        self.namespace,
                        self.name,
                        spec.get("holderIdentity"),
                    )
            else:
                return False
        except ApiError as exc:
            if exc.conflict:  # someone else wrote first: they hold it
                return False
            raise
        self.last_renewed = self._clock()
        return True

    async def acquire(self, retry_s: float | None = None) -> None:
        """Block until this instance holds the Lease."""
        delay = retry_s if retry_s is not None else self.renew_interval_s
        logged = False
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info("acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return
            except (ApiError, OSError, TimeoutError) as exc:
                log.warning("Lease %s/%s: %s", self.namespace, self.name, exc)
            if not logged:
                log.info(
                    "standing by: Lease %s/%s is held by %r",
                    self.namespace,
                    self.name,
                    self._observed.holder,
                )
                logged = True
            await asyncio.sleep(delay)

    async def hold(self) -> None:
        """Renew until renewal fails for a whole lease duration; then return (leadership lost)."""
        while True:
            await asyncio.sleep(self.renew_interval_s)
            try:
                if not await self.try_acquire_or_renew():
                    log.error(
                        "Lease %s/%s was taken by %r",
                        self.namespace,
                        self.name,
                        self._observed.holder,
                    )
                    return
            except (ApiError, OSError, TimeoutError) as exc:
                log.warning("could not renew Lease %s/%s: %s", self.namespace, self.name, exc)
                if self._clock() - self.last_renewed >= self.lease_duration_s:
                    log.error(
                        "Lease %s/%s not renewed for %.0fs",
                        self.namespace,
                        self.name,
                        self.lease_duration_s,
                    )
                    return

    async def release(self) -> None:
        """Give the Lease up (if still ours) so a standby takes over without waiting."""
        try:
            lease = await self.client.get(self._path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1}
            await self.client.replace(self._path, {**lease, "spec": spec})
            log.info("released Lease %s/%s", self.namespace, self.name)
        except (ApiError, OSError, TimeoutError) as exc:
            log.warning("could not release Lease %s/%s: %s", self.namespace, self.name, exc)
