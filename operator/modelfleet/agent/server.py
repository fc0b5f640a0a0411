"""The agent's HTTP server (aiohttp.web): /v1/gpus, /metrics, /healthz, /readyz, /sim/faults.

Every data reply comes from the latest sample in memory; a request never reads a GPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from modelfleet.agent.auth import Authenticator, AuthUnavailable, Decision, parse_bearer
from modelfleet.agent.simulated import Faults, SimulatedBackend
from modelfleet.agent.state import AgentState
from modelfleet.api.times import format_micro_time

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
FAULTED_PATHS = frozenset({"/v1/gpus", "/metrics"})
GARBAGE_BODY = b'{"schemaVersion": 7, "node": ["not", "a", "node"], "gpus": [{"index": "x"'

STATE_KEY = web.AppKey("state", AgentState)
SIM_KEY = web.AppKey("sim", SimulatedBackend)


def _json(status: int, payload: object) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    return _json(status, {"error": message, "status": status})


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and wrong methods answer JSON, like every other reply."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _error(404, f"no such path: {request.path}; see /v1/gpus, /metrics, /healthz")
    except web.HTTPMethodNotAllowed as exc:
        return _error(
            405, f"{request.method} not allowed on {request.path}; use {exc.allowed_methods}"
        )


def build_auth_middleware(
    auth: Authenticator | None,
) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is None or request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization")
        token = parse_bearer(header)
        if token is None:
            return _unauthorized(
                "malformed bearer token: expected 'Authorization: Bearer <token>' in visible ASCII"
                if header
                else "missing bearer token"
            )
        try:
            verdict = await auth.check(token)
        except AuthUnavailable as exc:
            log.warning("%s", exc)
            return _error(503, "cannot verify the token now; try again")
        if verdict.decision is Decision.FORBIDDEN:
            return _error(403, verdict.reason)
        if not verdict.allowed:
            return _unauthorized(verdict.reason or "invalid bearer token")
        return await handler(request)

    return check_auth


class _QuietBadRequests(logging.Filter):
    """A request the HTTP parser refuses (400) is the client's fault: one line, no traceback.

    aiohttp logs those with the parser's traceback at ERROR; everything else passes unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = str(exc.message).strip().splitlines()[0] if exc.message else ""
            record.args = (record.getMessage(), exc.code, first.rstrip(":"))
            record.msg = "%s: refused a malformed request (%s): %s"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


#: The logger of the agent's HTTP server (pass it to `web.AppRunner(logger=...)`).
HTTP_LOG = logging.getLogger("modelfleet.agent.http")
HTTP_LOG.addFilter(_QuietBadRequests())


def build_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner of the agent's app: no access log, malformed requests logged in one line."""
    return web.AppRunner(app, access_log=None, logger=HTTP_LOG, **kwargs)


def _unauthorized(message: str) -> web.Response:
    response = _error(401, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="modelfleet-agent"'
    return response


@web.middleware
async def apply_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Simulated backend only: delay, fail or garble data replies as the fault knobs say."""
    sim = request.app.get(SIM_KEY)
    if sim is None or request.path not in FAULTED_PATHS:
        return await handler(request)
    faults = sim.faults
    if faults.delay_s:
        await asyncio.sleep(faults.delay_s)
    if faults.fail_status is not None:
        return _error(faults.fail_status, "failure injected by /sim/faults")
    if faults.garbage and request.path == "/v1/gpus":
        return web.Response(body=GARBAGE_BODY, content_type="application/json")
    return await handler(request)


async def get_gpus(request: web.Request) -> web.Response:
    sample = request.app[STATE_KEY].latest
    if sample is None:
        return _error(503, "no sample yet; the first poll has not finished")
    return web.Response(body=sample.body, content_type="application/json")


async def get_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def get_readyz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.latest is None:
        return _json(503, {"status": "waiting for the first sample"})
    report = state.latest.report
    sampled_at = format_micro_time(report.sampled_at)
    if not report.ready:
        # Still serving /v1/gpus (which says the same): the pool keeps hearing from the node.
        return _json(503, {"status": "not ready", "reason": report.reason, "sampledAt": sampled_at})
    return _json(200, {"status": "ready", "sampledAt": sampled_at})


async def get_faults(request: web.Request) -> web.Response:
    return _json(200, request.app[SIM_KEY].faults.model_dump(mode="json", by_alias=True))


async def post_faults(request: web.Request) -> web.Response:
    """Merge the given knobs into the current ones; the next sample shows GPU faults."""
    sim = request.app[SIM_KEY]
    try:
        patch = await request.json()
        if not isinstance(patch, dict):
            raise ValueError("expected a JSON object")
        merged = {**sim.faults.model_dump(by_alias=True), **patch}
        sim.faults = Faults.model_validate(merged)
    except (ValueError, ValidationError) as exc:
        return _error(400, f"bad fault knobs: {exc}")
    request.app[STATE_KEY].wake.set()
    return _json(200, sim.faults.model_dump(mode="json", by_alias=True))


async def delete_faults(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    sim.faults = Faults()
    request.app[STATE_KEY].wake.set()
    return _json(200, sim.faults.model_dump(mode="json", by_alias=True))


def build_app(
    state: AgentState,
    *,
    auth: Authenticator | None = None,
    sim: SimulatedBackend | None = None,
) -> web.Application:
    """The agent's web application; `sim` adds the fault knobs of the simulated backend."""
    app = web.Application(middlewares=[errors_as_json, build_auth_middleware(auth), apply_faults])
    app[STATE_KEY] = state
    app.router.add_get("/v1/gpus", get_gpus)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/readyz", get_readyz)
    if sim is not None:
        app[SIM_KEY] = sim
        app.router.add_get("/sim/faults", get_faults)
        app.router.add_post("/sim/faults", post_faults)
        app.router.add_delete("/sim/faults", delete_faults)
    return app
