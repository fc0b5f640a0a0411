"""execute.py against a small in-memory API server on 127.0.0.1 (real HTTP, real client).

The fake (fake_api.py) is described there; the real API server's behaviour is covered by
tests/integration/test_operator.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from controller_helpers import make_md
from fake_api import FakeApi, serve_fake_api

from modelfleet.controller.builders import build_service
from modelfleet.controller.execute import (
    EventRecorder,
    PodNameTaken,
    create_pod,
    delete_pod,
    ensure_service,
)
from modelfleet.controller.observed import parse_service
from modelfleet.controller.plan import EventSpec
from modelfleet.kube.client import KubeClient

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApi, KubeClient]]:
    async with serve_fake_api() as served:
        yield served


def pod_body(owner_uid: str = "uid-1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "gemma-instance-1",
            "namespace": "ns",
            "ownerReferences": [{"uid": owner_uid, "controller": True}],
        },
    }


async def test_create_pod_is_idempotent_for_our_pod(api: tuple[FakeApi, KubeClient]) -> None:
    fake, client = api
    first = await create_pod(client, pod_body())
    again = await create_pod(client, pod_body())
    assert again["metadata"]["uid"] == first["metadata"]["uid"]
    assert len([k for k in fake.objects if "/pods/" in k]) == 1


async def test_create_pod_refuses_a_foreign_pod_with_the_name(
    api: tuple[FakeApi, KubeClient],
) -> None:
    _, client = api
    await create_pod(client, pod_body(owner_uid="someone-else"))
    with pytest.raises(PodNameTaken, match="not owned by this ModelDeployment"):
        await create_pod(client, pod_body())


async def test_delete_by_uid_spares_a_replacement(api: tuple[FakeApi, KubeClient]) -> None:
    fake, client = api
    created = await create_pod(client, pod_body())
    await delete_pod(client, "ns", "gemma-instance-1", force=True, uid="an-older-uid")
    assert "/api/v1/namespaces/ns/pods/gemma-instance-1" in fake.objects
    await delete_pod(client, "ns", "gemma-instance-1", force=True, uid=created["metadata"]["uid"])
    assert "/api/v1/namespaces/ns/pods/gemma-instance-1" not in fake.objects
    await delete_pod(client, "ns", "gemma-instance-1", force=False)  # gone already: fine


async def test_events_aggregate_repeats_across_restarts(api: tuple[FakeApi, KubeClient]) -> None:
    fake, client = api
    event = EventSpec("ns", "gemma", "Warning", "NoCapacity", "no node has a free H100")
    recorder = EventRecorder(client, reporting_instance="op-a")
    await recorder.post(event, "uid-1", NOW)
    await recorder.post(event, "uid-1", NOW)
    [stored] = [v for k, v in fake.objects.items() if "/events/" in k]
    assert stored["count"] == 2
    assert stored["involvedObject"]["uid"] == "uid-1"
    assert stored["involvedObject"]["kind"] == "ModelDeployment"
    # A new process (no memory of the count) finds the same Event by name.
    await EventRecorder(client, reporting_instance="op-b").post(event, "uid-1", NOW)
    [stored] = [v for k, v in fake.objects.items() if "/events/" in k]
    assert stored["count"] == 3
    other = EventSpec("ns", "gemma", "Normal", "Placed", "gemma-instance-1 on a")
    await recorder.post(other, "uid-1", NOW)
    assert len([k for k in fake.objects if "/events/" in k]) == 2


async def test_ensure_service(api: tuple[FakeApi, KubeClient]) -> None:
    fake, client = api
    body = build_service(make_md())
    assert await ensure_service(client, body, None, indexed=True)  # absent: created
    path = "/api/v1/namespaces/ns/services/gemma"
    assert path in fake.objects
    fake.requests.clear()
    current = parse_service(fake.objects[path])
    assert not await ensure_service(client, body, current, indexed=True)
    assert fake.requests == []  # in shape: no request at all
    fake.objects[path]["spec"]["selector"] = {"app": "wrong"}
    assert await ensure_service(client, body)  # read, then patched back
    assert fake.objects[path]["spec"]["selector"] == body["spec"]["selector"]
