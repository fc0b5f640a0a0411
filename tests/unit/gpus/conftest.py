"""Fixtures for the pool tests; the fake agent itself is in pool_fakes.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pool_fakes import FakeAgent
from prometheus_client import CollectorRegistry


@pytest.fixture
async def agents() -> AsyncIterator[Any]:
    """Factory: `await agents(n)` starts n fake agents on node-a, node-b, ...; all stopped after."""
    started: list[FakeAgent] = []

    async def factory(n: int, gpus: int = 8, **kwargs: Any) -> list[FakeAgent]:
        new = [
            FakeAgent(f"node-{chr(ord('a') + len(started) + i)}", gpus, **kwargs) for i in range(n)
        ]
        for agent in new:
            await agent.start()
        started.extend(new)
        return new

    yield factory
    for agent in started:
        await agent.stop()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MODELFLEET_"):
            monkeypatch.delenv(name)
