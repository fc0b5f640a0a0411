"""The only module of the controller that writes to the Kubernetes API.

`execute(plan, ...)` applies one reconcile's plan in a fixed order:

1. the eviction: the reservation on the evicting deployment first (so an operator restarted
   after this point still holds the freed GPUs), then each victim's deployment is marked as
   evicted (so its own reconcile, woken by the deletion, does not evict back), then the victim
   Pods are deleted;
   or the consolidation: the reservation first, then the copies of the moved replicas (each
   names the Pod it replaces; that Pod is deleted by its own deployment's plan once the copy is
   Ready);
2. the Pods to create, concurrently;
3. the Pods to delete;
4. on replica Pods, the GPUs their node assigned (`modelfleet.io/assigned-gpus`);
5. the deployment's annotations;
6. the Service (when asked: create, resume and the periodic re-check);
7. the Events;
8. the status, last, and only when it changed.

Every function is idempotent, so a reconcile that dies half way and runs again converges: a Pod
that already exists and is ours counts as created, a Pod already gone counts as deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from modelfleet.api import API_GROUP, API_VERSION, KIND, ModelDeployment, ModelDeploymentStatus
from modelfleet.api import labels as L
from modelfleet.api.times import format_time
from modelfleet.controller.decisions import Victim
from modelfleet.controller.inflight import InFlight
from modelfleet.controller.observed import parse_service
from modelfleet.controller.plan import AssignmentRecord, EventSpec, Plan, PodToCreate, Reason
from modelfleet.controller.reservations import Reservation, format_reservation
from modelfleet.controller.status import dump_status, status_changed
from modelfleet.kube.client import ApiError, KubeClient
from modelfleet.kube.paths import md_path, pods_path, resource_path

log = logging.getLogger(__name__)

COMPONENT = "modelfleet-operator"
MAX_EVENT_MESSAGE = 1024  # the API server refuses longer Event messages


class PodNameTaken(RuntimeError):
    """A Pod with a replica's name exists but belongs to something else."""


def _owned_by(pod: Mapping[str, Any], uid: str) -> bool:
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == uid for r in refs)


async def create_pod(client: KubeClient, body: Mapping[str, Any]) -> dict[str, Any]:
    """Create a replica Pod; an existing Pod of the same name and owner counts as created."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        return await client.create(pods_path(namespace), body)
    except ApiError as exc:
        if not exc.conflict:
            raise
    existing = await client.get(pods_path(namespace, name))
    owner_uid = meta["ownerReferences"][0]["uid"]
    if not _owned_by(existing, owner_uid):
        raise PodNameTaken(
            f"Pod {namespace}/{name} exists and is not owned by this ModelDeployment; "
            "delete or rename it so the replica can take its name"
        )
    return existing


async def delete_pod(
    client: KubeClient, namespace: str, name: str, *, force: bool, uid: str = ""
) -> None:
    """Delete a Pod; gone already is fine. `force` skips the grace period (lost nodes).

    With `uid`, only that incarnation is deleted: a replacement that already took the name
    (the API answers 409 to the failed precondition) is left alone.
    """
    options: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "propagationPolicy": "Background",
    }
    if force:
        options["gracePeriodSeconds"] = 0
    if uid:
        options["preconditions"] = {"uid": uid}
    try:
        await client.delete(pods_path(namespace, name), options)
    except ApiError as exc:
        if not (exc.not_found or (uid and exc.conflict)):
            raise


async def apply_eviction(
    client: KubeClient, victim: Victim, evicted_by: str, now: datetime, uid: str = ""
) -> dict[str, Any] | None:
    """Mark the victim's ModelDeployment as evicted, then delete the victim Pod.

    The mark comes first so that the victim's own reconcile, woken by the Pod deletion, already
    knows not to evict back. Returns the victim ModelDeployment (None if it is gone).
    """
    victim_md: dict[str, Any] | None
    try:
        victim_md = await client.patch(
            md_path(victim.namespace, victim.deployment),
            {
                "metadata": {
                    "annotations": {
                        L.ANN_EVICTED_AT: format_time(now),
                        L.ANN_EVICTED_BY: evicted_by,
                    }
                }
            },
        )
    except ApiError as exc:
        if not exc.not_found:
            raise
        victim_md = None
    await delete_pod(client, victim.namespace, victim.pod, force=False, uid=uid)
    return victim_md


async def apply_assignment(client: KubeClient, record: AssignmentRecord) -> None:
    """Record the GPUs a replica's node assigned on its Pod; a Pod already gone is fine."""
    patch = {
        "metadata": {
            "uid": record.uid,  # this incarnation only: the API answers 409 for a new one
            "annotations": {L.ANN_ASSIGNED_GPUS: ",".join(record.gpus)},
        }
    }
    try:
        await client.patch(pods_path(record.namespace, record.name), patch)
    except ApiError as exc:
        if not (exc.not_found or exc.status == 409):
            raise


async def apply_annotations(
    client: KubeClient, md: ModelDeployment, annotations: Mapping[str, str | None]
) -> None:
    """Set (str) or remove (None) annotations on the ModelDeployment."""
    if not annotations:
        return
    await client.patch(
        md_path(md.metadata.namespace, md.metadata.name),
        {"metadata": {"annotations": dict(annotations)}},
    )


async def ensure_service(
    client: KubeClient,
    body: Mapping[str, Any],
    current: Mapping[str, Any] | None = None,
    *,
    indexed: bool = False,
) -> bool:
    """Create the Service, or patch its selector and ports back; True when something changed.

    With `indexed`, `current` is the Service as the operator's index shows it (None: absent),
    so a Service in shape costs no request at all; otherwise it is read first.
    """
    meta = body["metadata"]
    path = resource_path("services", meta["namespace"], meta["name"])
    if not indexed:
        try:
            current = parse_service(await client.get(path))
        except ApiError as exc:
            if not exc.not_found:
                raise
            current = None
    if current is None:
        try:
            await client.create(resource_path("services", meta["namespace"]), body)
        except ApiError as exc:
            if not exc.conflict:
                raise
        return True
    wanted = parse_service(body)
    if current == wanted:
        return False
    # A merge patch merges maps: keys that must go are set to null.
    selector: dict[str, Any] = dict.fromkeys(current["selector"])
    selector.update(wanted["selector"])
    await client.patch(path, {"spec": {"selector": selector, "ports": body["spec"]["ports"]}})
    return True


async def apply_status(
    client: KubeClient, md: ModelDeployment, status: ModelDeploymentStatus
) -> None:
    """Replace status through the status subresource (merge patch of the whole status)."""
    await client.patch(
        md_path(md.metadata.namespace, md.metadata.name) + "/status",
        {"status": dump_status(status)},
    )


class EventRecorder:
    """Posts core/v1 Events about ModelDeployments and aggregates repeats by bumping count.

    The Event name is derived from the object, reason and message, so a repeat finds the same
    Event even after a restart; the in-memory count only saves a GET.
    """

    def __init__(self, client: KubeClient, reporting_instance: str | None = None) -> None:
        self._client = client
        self._reporting_instance = reporting_instance or socket.gethostname()
        self._counts: dict[tuple[str, str], int] = {}

    async def post(self, event: EventSpec, uid: str | None, now: datetime) -> None:
        """Record one Event; failures are logged, never raised (Events are best effort)."""
        try:
            await self._post(event, uid, now)
        except (ApiError, OSError, TimeoutError) as exc:
            log.warning("could not post Event %s on %s: %s", event.reason, event.deployment, exc)

    async def _post(self, event: EventSpec, uid: str | None, now: datetime) -> None:
        message = event.message[:MAX_EVENT_MESSAGE]
        digest = hashlib.sha256(
            f"{uid or event.deployment}|{event.type}|{event.reason}|{message}".encode()
        ).hexdigest()[:16]
        name = f"{event.deployment}.{digest}"
        key = (event.namespace, name)
        path = resource_path("events", event.namespace, name)
        stamp = format_time(now)
        count = self._counts.get(key)
        if count is not None:
            try:
                await self._client.patch(path, {"count": count + 1, "lastTimestamp": stamp})
                self._counts[key] = count + 1
                return
            except ApiError as exc:
                if not exc.not_found:
                    raise
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": event.namespace},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": event.deployment,
                "namespace": event.namespace,
                **({"uid": uid} if uid else {}),
            },
            "type": event.type,
            "reason": event.reason,
            "message": message,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": COMPONENT},
            "reportingComponent": f"{API_GROUP}/operator",
            "reportingInstance": self._reporting_instance,
        }
        try:
            await self._client.create(resource_path("events", event.namespace), body)
            self._counts[key] = 1
        except ApiError as exc:
            if not exc.conflict:
                raise
            existing = await self._client.get(path)
            count = int(existing.get("count") or 1) + 1
            await self._client.patch(path, {"count": count, "lastTimestamp": stamp})
            self._counts[key] = count
        if len(self._counts) > 10_000:  # bound memory; the names are deterministic anyway
            self._counts.clear()


@dataclass
class Executed:
    """What one `execute` did."""

    created: list[str] = field(default_factory=list)
    create_failures: list[str] = field(default_factory=list)  # "<pod>: <why>"
    deleted: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)  # <namespace>/<pod>
    copies: list[str] = field(default_factory=list)  # consolidation copies created, <ns>/<pod>
    status_written: bool = False


@dataclass(frozen=True, slots=True)
class ServiceWanted:
    """The Service to keep in shape, and what the index shows of it (None: not indexed)."""

    body: Mapping[str, Any]
    current: Mapping[str, Any] | None
    indexed: bool


async def execute(
    client: KubeClient,
    events: EventRecorder,
    inflight: InFlight,
    md: ModelDeployment,
    plan: Plan,
    status: ModelDeploymentStatus | None,
    now: datetime,
    *,
    service: ServiceWanted | None = None,
) -> Executed:
    """Apply `plan` in the documented order (see the module docstring); report what was done.

    A create that fails is forgotten in the in-flight book (the next pass plans it again) and
    reported in `create_failures` with a Warning Event; any other failure raises.
    """
    done = Executed()
    key = (md.metadata.namespace or "", md.metadata.name)
    victim_uids = await _evict(client, inflight, md, plan, now, done)
    victim_uids.update(await _consolidate(client, inflight, md, plan, done))
    await asyncio.gather(*(_create(client, inflight, c, done) for c in plan.to_create))
    for gone in plan.to_delete:
        await delete_pod(client, gone.namespace, gone.name, force=gone.force, uid=gone.uid)
        inflight.record_deleted(gone.namespace, gone.name, gone.uid)
        done.deleted.append(gone.name)
    for record in plan.assignments:
        await apply_assignment(client, record)
    if plan.annotations:
        await apply_annotations(client, md, plan.annotations)
    if service is not None:
        await _ensure_service(client, events, md, service, now)
    for event in plan.events:
        target = (event.namespace, event.deployment)
        if target == key:
            await events.post(event, md.metadata.uid, now)
        elif target in victim_uids:
            await events.post(event, victim_uids[target], now)
    for failure in done.create_failures:
        await events.post(
            EventSpec(
                key[0], key[1], "Warning", Reason.CREATE_FAILED, f"could not create {failure}"
            ),
            md.metadata.uid,
            now,
        )
    if status is not None and status_changed(md.status, status):
        await apply_status(client, md, status)
        done.status_written = True
    return done


async def _evict(
    client: KubeClient,
    inflight: InFlight,
    md: ModelDeployment,
    plan: Plan,
    now: datetime,
    done: Executed,
) -> dict[tuple[str, str], str]:
    """Step 1; returns the victims' deployments' UIDs, for their Events."""
    eviction = plan.eviction
    if eviction is None:
        return {}
    namespace, name = md.metadata.namespace or "", md.metadata.name
    if eviction.gpu_ids:
        reservation = Reservation(eviction.node, eviction.gpu_ids, eviction.reserved_until)
        await apply_annotations(client, md, {L.ANN_RESERVATION: format_reservation(reservation)})
    uids: dict[tuple[str, str], str] = {}
    for victim in eviction.victims:
        victim_md = await apply_eviction(
            client,
            victim,
            f"{namespace}/{name}",
            now,
            inflight.deleted_uid(victim.namespace, victim.pod),
        )
        done.evicted.append(f"{victim.namespace}/{victim.pod}")
        if victim_md is not None:
            uids[(victim.namespace, victim.deployment)] = str(
                (victim_md.get("metadata") or {}).get("uid", "")
            )
    return uids


async def _consolidate(
    client: KubeClient, inflight: InFlight, md: ModelDeployment, plan: Plan, done: Executed
) -> dict[tuple[str, str], str]:
    """Step 1 for a consolidation; returns the moved deployments' UIDs, for their Events."""
    moving = plan.consolidation
    if moving is None:
        return {}
    reservation = Reservation(moving.node, moving.gpu_ids, moving.reserved_until)
    await apply_annotations(client, md, {L.ANN_RESERVATION: format_reservation(reservation)})
    made = Executed()
    await asyncio.gather(*(_create(client, inflight, c, made) for c in moving.copies))
    done.copies.extend(
        f"{c.record.namespace}/{c.name}" for c in moving.copies if c.name in made.created
    )
    done.create_failures.extend(made.create_failures)
    return {(m.namespace, m.deployment): m.deployment_uid for m in moving.moves}


async def _create(
    client: KubeClient, inflight: InFlight, create: PodToCreate, done: Executed
) -> None:
    try:
        created = await create_pod(client, create.body)
    except (ApiError, PodNameTaken, OSError, TimeoutError) as exc:
        inflight.forget_created(create.record)
        log.warning("could not create %s: %s", create.name, exc)
        done.create_failures.append(f"{create.name}: {exc}")
        return
    inflight.confirm_created(create.record, str((created.get("metadata") or {}).get("uid", "")))
    done.created.append(create.name)


async def _ensure_service(
    client: KubeClient,
    events: EventRecorder,
    md: ModelDeployment,
    service: ServiceWanted,
    now: datetime,
) -> None:
    """Keep the Service; a failure is reported but never holds up replicas or status."""
    key = (md.metadata.namespace or "", md.metadata.name)
    try:
        await ensure_service(client, service.body, service.current, indexed=service.indexed)
    except ApiError as exc:
        log.warning("%s/%s: Service not in shape: %s", *key, exc)
        await events.post(
            EventSpec(key[0], key[1], "Warning", Reason.SERVICE_FAILED, f"Service {key[1]}: {exc}"),
            md.metadata.uid,
            now,
        )


async def apply_invalid(
    client: KubeClient,
    events: EventRecorder,
    body: Mapping[str, Any],
    status: Mapping[str, Any] | None,
    event: EventSpec | None,
    now: datetime,
) -> None:
    """Report a spec the operator cannot run: the status (None: unchanged) and an Event."""
    meta = body.get("metadata") or {}
    if status is not None:
        path = md_path(str(meta.get("namespace", "")), str(meta.get("name", ""))) + "/status"
        try:
            await client.patch(path, {"status": dict(status)})
        except ApiError as exc:
            if not exc.not_found:
                raise
    if event is not None:
        await events.post(event, str(meta.get("uid", "")) or None, now)
