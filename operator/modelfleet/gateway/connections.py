"""Client connection limits: a deadline for the request head, a cap on open connections.

aiohttp's server closes a connection that sits idle between requests (its keep-alive timeout,
which the gateway sets from `client_idle_timeout_s`), but it gives a client as long as that to
finish a request head, and it accepts any number of connections. So every accepted connection
passes through a `ConnectionGuard`, a thin protocol in front of aiohttp's own, which

- refuses a connection over `max_client_connections` with a 503 and `Retry-After`, without
  handing it to aiohttp at all;
- closes a connection whose request head is not complete within `client_header_timeout_s`
  (counted from accepting it, or from the first byte after an idle pause), with a 408 when part
  of a head had arrived.

The body's deadline and the budget for bodies in flight are the proxy's, the only handler that
reads a body (proxy.py). A middleware tells the guard when a request is being handled, so a long
stream is never cut by the head timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.model import build_error_body

# A refused connection gets its 503, a half-close, and this long to read it and hang up before
# it is closed; closing at once, with its request unread, would send a reset that may overtake
# the 503. At most this many refused connections wait like that; the rest are closed at once.
_REFUSED_LINGER_S = 1.0
_REFUSED_LINGERING_MAX = 1024


@dataclass(frozen=True)
class ClientLimits:
    """What a client may hold of the gateway, resolved once from the settings."""

    header_timeout_s: float
    max_connections: int
    retry_after_s: int


def build_raw_error(
    status: int, reason: str, message: str, kind: str, code: str, extra: str = ""
) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, for paths outside aiohttp."""
    body = build_error_body(status, message, kind, code, None)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


class Connections:
    """The gateway's open client connections and their limits; makes one guard per connection."""

    def __init__(self, limits: ClientLimits, metrics: GatewayMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        # aiohttp's protocol of each open connection -> its guard (the middleware's lookup).
        self.guards: dict[object, ConnectionGuard] = {}
        self.refused: set[asyncio.Transport] = set()
        self.refusal = build_raw_error(
            503,
            "Service Unavailable",
            "the gateway has as many client connections open as it accepts; retry later",
            "server_error",
            "too_many_connections",
            f"Retry-After: {limits.retry_after_s}\r\n",
        )
        self.header_timeout = build_raw_error(
            408,
            "Request Timeout",
            f"the request head did not arrive within {limits.header_timeout_s:g} s",
            "invalid_request_error",
            "request_timeout",
        )

    def guard(self, inner: asyncio.Protocol) -> ConnectionGuard:
        return ConnectionGuard(self, inner)

    def close_refused(self) -> None:
        for transport in list(self.refused):
            transport.close()
        self.refused.clear()


class ConnectionGuard(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection and passes everything on."""

    __slots__ = (
        "_busy",
        "_connections",
        "_head_started",
        "_inner",
        "_refused",
        "_timer",
        "_transport",
    )

    def __init__(self, connections: Connections, inner: asyncio.Protocol) -> None:
        self._connections = connections
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # a request of this connection is being handled
        self._head_started = False  # bytes of the next request head have arrived
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not derive from asyncio.Transport, so no isinstance.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        conns = self._connections
        if len(conns.guards) >= conns.limits.max_connections:
            self._refuse(transport)
            return
        conns.guards[self._inner] = self
        conns.metrics.client_connections.inc()
        self._arm()  # a new connection owes its first head within the header timeout
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped: the answer is already on its way
        if not self._busy:
            self._head_started = True
            if self._timer is None:  # the first byte after an idle pause
                self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:
            assert self._transport is not None
            self._transport.close()
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conns = self._connections
        if self._refused:
            if self._transport is not None:
                conns.refused.discard(self._transport)
            return
        if conns.guards.pop(self._inner, None) is not None:
            conns.metrics.client_connections.dec()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()

    def request_started(self) -> None:
        """A whole head arrived and its handler runs: no head deadline until it ends."""
        self._busy = True
        self._head_started = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_ended(self) -> None:
        self._busy = False

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._connections.limits.header_timeout_s
        self._timer = loop.call_later(delay, self._head_expired)

    def _head_expired(self) -> None:
        self._timer = None
        transport = self._transport
        if self._busy or transport is None or transport.is_closing():
            return
        conns = self._connections
        conns.metrics.client_timeouts.labels("header").inc()
        if self._head_started:  # a client that sent nothing gets no answer, as when idle
            transport.write(conns.header_timeout)
        transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        conns = self._connections
        conns.metrics.client_refusals.labels("connections").inc()
        transport.write(conns.refusal)
        if len(conns.refused) >= _REFUSED_LINGERING_MAX or not transport.can_write_eof():
            transport.close()
            return
        conns.refused.add(transport)
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_REFUSED_LINGER_S, transport.close)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_middleware(connections: Connections) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Marks a connection busy while one of its requests is handled."""

    @web.middleware
    async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = connections.guards.get(request.protocol)
        if guard is None:
            return await handler(request)
        guard.request_started()
        try:
            return await handler(request)
        finally:
            guard.request_ended()

    return track_requests


class GuardedSite(web.BaseSite):
    """A TCP site like aiohttp's TCPSite whose connections pass through `connections` first."""

    __slots__ = ("_connections", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        connections: Connections,
        host: str,
        port: int,
        *,
        backlog: int,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._connections = connections
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        connections = self._connections

        def factory() -> asyncio.Protocol:
            return connections.guard(server())

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True
        )

    async def stop(self) -> None:
        await super().stop()
        self._connections.close_refused()
