"""Agent test helpers: a fake `pynvml` module and a real HTTP server on 127.0.0.1.

The fake `pynvml` is the only mock in the agent tests: there is no GPU (and no NVIDIA driver) on
the machines that run them. It is injected at the import boundary (sys.modules["pynvml"]), so the
backend runs its real code against it, including the blocking event wait in a worker thread.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from agent_testlib import FakeGpu, FakeNvml
from aiohttp import web


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """Two healthy H100s behind a fake pynvml installed as sys.modules['pynvml']."""
    fake = FakeNvml(
        gpus=[
            FakeGpu(uuid="GPU-aaaa", used_mib=20480, util=40, temp=51, power_mw=312500),
            FakeGpu(uuid="GPU-bbbb"),
        ]
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


ServeFn = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFn]:
    """Start an app on 127.0.0.1 with an ephemeral port; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture(autouse=True)
def _clean_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MODELFLEET_"):
            monkeypatch.delenv(name)
