"""Fixtures for the gateway tests; the helpers live in gwharness.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest
import uvloop
from gwharness import Fleet, FleetFactory, RecordingWriter, md_obj
from gwrawhttp import RawServer, Serve

from modelfleet.gateway.app import build_app, start_gateway
from modelfleet.gateway.registry import Registry
from modelfleet.settings import GatewaySettings


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every gateway test on both loops: the gateway runs on uvloop, whose transports differ."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
async def make_fleet() -> AsyncIterator[FleetFactory]:
    """make_fleet(deployments=[md_obj(...)], **settings) -> Fleet; everything stops after."""
    fleets: list[Fleet] = []

    async def factory(deployments: list[dict[str, Any]] | None = None, **settings: Any) -> Fleet:
        gateway_settings = GatewaySettings(**{"host": "127.0.0.1", **settings})
        registry = Registry(gateway_settings.balancing)
        registry.replace_deployments(
            deployments if deployments is not None else [md_obj("gemma3-4b")]
        )
        registry.replace_pods([])
        writer = RecordingWriter()
        app = build_app(gateway_settings, registry=registry, writer=writer)
        gateway = await start_gateway(app, gateway_settings, "127.0.0.1", 0)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        fleet = Fleet(gateway, registry, writer, {}, http)
        fleets.append(fleet)
        return fleet

    yield factory
    for fleet in fleets:
        await fleet.http.close()
        await fleet.gateway.stop()
        for sim in fleet.sims.values():
            await sim.stop()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Serve], Awaitable[RawServer]]]:
    """raw(handler) -> a RawServer on 127.0.0.1 answering with `handler`; all stop after."""
    servers: list[RawServer] = []

    async def start(handler: Serve) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()
