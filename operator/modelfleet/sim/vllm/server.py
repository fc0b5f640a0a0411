"""The stand-in's HTTP server: vLLM's OpenAI endpoints, /health, /metrics and /sim/info."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from modelfleet.api.headers import INSTANCE_HEADER
from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.shapes import (
    SimError,
    build_chat_chunk,
    build_chat_response,
    build_completion_chunk,
    build_completion_response,
    build_embeddings_response,
    build_error_body,
    build_models_response,
    build_usage,
    compute_chat_prompt,
    compute_completion_prompt,
    compute_embedding_inputs,
    compute_max_tokens,
    compute_output,
    token_pieces,
)
from modelfleet.sim.vllm.state import SimState

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


STATE: web.AppKey[SimState] = web.AppKey("sim_state", SimState)


def _json(state: SimState, status: int, payload: Any) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=state.headers,
    )


def _error(state: SimState, exc: SimError) -> web.Response:
    return web.Response(
        status=exc.status,
        body=build_error_body(exc.status, exc.message, exc.kind, exc.param),
        content_type="application/json",
        headers=state.headers,
    )


async def _read_request(request: web.Request, state: SimState) -> tuple[dict[str, Any], str]:
    """The JSON body and the served name it asks for; SimError when either is wrong."""
    if not state.ready:
        raise SimError(503, "the model is still loading", "ServiceUnavailableError")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        raise SimError(400, "the request body is not valid JSON", "BadRequestError") from None
    if not isinstance(body, dict):
        raise SimError(400, "the request body must be a JSON object", "BadRequestError")
    model = body.get("model") or state.config.served_names[0]
    if model not in state.config.served_names:
        raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return body, str(model)


def _failure(state: SimState) -> web.Response:
    cfg = state.config
    if cfg.fail_body:
        return _error(state, SimError(cfg.fail_status, "simulated failure", "InternalServerError"))
    return web.Response(status=cfg.fail_status, headers=state.headers)


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.perf_counter()
    try:
        body, model = await _read_request(request, state)
        if kind == "chat":
            prompt_words, source = compute_chat_prompt(body.get("messages"))
        else:
            prompt_words = source = compute_completion_prompt(body.get("prompt"))
        max_tokens = compute_max_tokens(body)
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 16:
            raise SimError(400, "n must be an integer from 1 to 16", "BadRequestError", "n")
    except SimError as exc:
        return _error(state, exc)
    if state.should_fail():
        return _failure(state)
    tokens, finish = compute_output(source, max_tokens)
    usage = build_usage(len(prompt_words), len(tokens) * n)
    created = int(time.time())
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    state.begin()
    try:
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
            return await _stream(
                request, state, kind, rid, model, created, tokens, finish, n, usage,
                include_usage, started,
            )  # fmt: skip
        if state.config.request_latency_s:
            await asyncio.sleep(state.config.request_latency_s)
        text = " ".join(tokens)
        build = build_chat_response if kind == "chat" else build_completion_response
        response = _json(state, 200, build(rid, model, created, text, finish, n, usage))
        state.record(usage["prompt_tokens"], usage["completion_tokens"], finish, started)
        return response
    finally:
        state.end()


async def _stream(
    request: web.Request,
    state: SimState,
    kind: str,
    rid: str,
    model: str,
    created: int,
    tokens: list[str],
    finish: str,
    n: int,
    usage: dict[str, int],
    include_usage: bool,
    started: float,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **state.headers})
    await response.prepare(request)

    async def send(payload: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    chat = kind == "chat"
    if chat:
        for i in range(n):
            delta = {"role": "assistant", "content": ""}
            await send(build_chat_chunk(rid, model, created, i, delta, None, include_usage))
    first = True
    for piece in token_pieces(tokens):
        if state.config.token_latency_s:
            await asyncio.sleep(state.config.token_latency_s)
        for i in range(n):
            if chat:
                chunk = build_chat_chunk(
                    rid, model, created, i, {"content": piece}, None, include_usage
                )
            else:
                chunk = build_completion_chunk(rid, model, created, i, piece, None, include_usage)
            await send(chunk)
        if first:
            state.metrics.ttft.labels(state.label).observe(time.perf_counter() - started)
            first = False
    for i in range(n):
        if chat:
            await send(build_chat_chunk(rid, model, created, i, {}, finish, include_usage))
        else:
            await send(build_completion_chunk(rid, model, created, i, "", finish, include_usage))
    if include_usage:
        obj = "chat.completion.chunk" if chat else "text_completion"
        await send(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    state.record(usage["prompt_tokens"], usage["completion_tokens"], finish, started)
    return response


async def handle_chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def handle_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def handle_embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.perf_counter()
    try:
        body, model = await _read_request(request, state)
        inputs = compute_embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise SimError(
                400, "encoding_format must be float or base64", "BadRequestError", "encoding_format"
            )
        dim = body.get("dimensions") or state.config.embedding_dim
        if not isinstance(dim, int) or not 1 <= dim <= 8192:
            raise SimError(400, "dimensions must be 1 to 8192", "BadRequestError", "dimensions")
    except SimError as exc:
        return _error(state, exc)
    if state.should_fail():
        return _failure(state)
    payload = build_embeddings_response(inputs, model, dim, encoding)
    state.record(payload["usage"]["prompt_tokens"], 0, "stop", started)
    return _json(state, 200, payload)


async def handle_models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return _json(state, 200, build_models_response(state.config, int(time.time())))


async def handle_health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return web.Response(status=200 if state.healthy else 503, headers=state.headers)


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return web.Response(
        body=generate_latest(state.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def handle_info(request: web.Request) -> web.StreamResponse:
    """Stand-in only: what it was started with, for people and tests."""
    state = request.app[STATE]
    cfg = state.config
    return _json(
        state,
        200,
        {
            "instance": cfg.instance,
            "model": cfg.model,
            "served_model_names": list(cfg.served_names),
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "max_model_len": cfg.max_model_len,
            "ready": state.ready,
            "running": state.running,
            "served": state.served,
        },
    )


def build_app(config: SimConfig) -> web.Application:
    """The stand-in's aiohttp application (not started)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = SimState(config)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/embeddings", handle_embeddings)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/sim/info", handle_info)
    return app


@dataclass
class RunningSim:
    """A started stand-in: its URL, live state and runner (tests, benchmarks, the dev loop)."""

    url: str
    state: SimState
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_sim(config: SimConfig) -> RunningSim:
    """Start a stand-in in this event loop; port 0 picks a free port (written back to config)."""
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=4096, reuse_address=True)
    await site.start()
    config.port = int(runner.addresses[0][1])
    if config.instance.endswith(":0"):
        config.instance = f"{config.host}:{config.port}"
        app[STATE].headers = {INSTANCE_HEADER: config.instance}
    return RunningSim(f"http://{config.host}:{config.port}", app[STATE], runner)
