"""Replica Pods created or deleted by this process that the watch does not show yet."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from modelfleet.controller.observed import ObservedPod

Key = tuple[str, str]


class InFlight:
    """Replica Pods this process created or deleted that the watch (the index) does not show yet.

    A created Pod is recorded when it is promised (under the placement lock, before the API call)
    and confirmed with its UID once the API answers; a deleted one is recorded with the UID it
    had. `merge` overlays both on what the index shows, so a reconcile never plans a replica
    twice and placement never hands out the GPUs of a Pod it cannot see yet.
    """

    def __init__(self, ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        # (namespace, deployment) -> pod name -> (pod, when created)
        self._created: dict[Key, dict[str, tuple[ObservedPod, float]]] = {}
        # (namespace, pod name) -> (uid, when deleted); uid "" matches Pods created before then
        self._deleted: dict[Key, tuple[str, float]] = {}

    def record_created(self, pod: ObservedPod) -> None:
        self._created.setdefault((pod.namespace, pod.deployment), {})[pod.name] = (
            pod,
            self._clock(),
        )

    def confirm_created(self, pod: ObservedPod, uid: str) -> None:
        """The API created `pod` with this UID (the promise keeps its time)."""
        entries = self._created.get((pod.namespace, pod.deployment), {})
        found = entries.get(pod.name)
        entries[pod.name] = (replace(pod, uid=uid), found[1] if found else self._clock())
        self._created[(pod.namespace, pod.deployment)] = entries

    def forget_created(self, pod: ObservedPod) -> None:
        """The create failed: forget the promise, so the next pass plans the replica again."""
        self._created.get((pod.namespace, pod.deployment), {}).pop(pod.name, None)

    def record_deleted(self, namespace: str, name: str, uid: str) -> None:
        self._deleted[(namespace, name)] = (uid, self._clock())

    def deleted_uid(self, namespace: str, name: str) -> str:
        """The UID a recorded deletion was for ("" when unknown: any incarnation)."""
        found = self._deleted.get((namespace, name))
        return found[0] if found else ""

    def merge(
        self, namespace: str, deployment: str, indexed: Iterable[ObservedPod]
    ) -> list[ObservedPod]:
        """The deployment's Pods: the index, plus Pods created here, with deletions applied."""
        now = self._clock()
        out: list[ObservedPod] = []
        position: dict[str, int] = {}
        deleted = self._deleted
        for pod in indexed:
            if deleted and not pod.deleting:
                gone = deleted.get(pod.key)
                if gone is not None and gone[0] == pod.uid and now - gone[1] < self._ttl:
                    pod = replace(pod, deleting=True)
            position[pod.name] = len(out)
            out.append(pod)
        created = self._created.get((namespace, deployment))
        if created:
            for name, (pod, created_at) in list(created.items()):
                at = position.get(name)
                # A Pod promised but not yet answered by the API has no UID: an indexed Pod of
                # that name that is not terminating is the same one.
                same = at is not None and (
                    out[at].uid == pod.uid or (not pod.uid and not out[at].deleting)
                )
                if same or now - created_at >= self._ttl:
                    del created[name]  # the index has it now (or it never came: forget it)
                    continue
                gone = deleted.get(pod.key)
                if gone is not None and gone[0] == pod.uid:
                    pod = replace(pod, deleting=True)
                if at is not None:
                    out[at] = pod  # the index still shows the incarnation this one replaced
                else:
                    out.append(pod)
            if not created:
                del self._created[(namespace, deployment)]
        return out

    def merge_all(self, indexed: Mapping[Key, Iterable[ObservedPod]]) -> list[ObservedPod]:
        """Every replica Pod in the cluster, with this process's creations and deletions."""
        out: list[ObservedPod] = []
        for (namespace, deployment), pods in indexed.items():
            out += self.merge(namespace, deployment, pods)
        for namespace, deployment in list(self._created):
            if (namespace, deployment) not in indexed:
                out += self.merge(namespace, deployment, ())
        return out

    def prune(self) -> None:
        """Forget entries older than the TTL (called by the timer)."""
        now = self._clock()
        self._deleted = {k: v for k, v in self._deleted.items() if now - v[1] < self._ttl}
        for key in list(self._created):
            alive = {n: v for n, v in self._created[key].items() if now - v[1] < self._ttl}
            if alive:
                self._created[key] = alive
            else:
                del self._created[key]


__all__ = ["InFlight", "Key"]
