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
from modelfleet.sim.vllm.batching import Request
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
    job = state.engine.submit(prompt_words, len(tokens)) if state.engine is not None else None
    try:
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
            sse = _Sse(kind, rid, model, created, n, include_usage)
            return await _stream(request, state, sse, tokens, finish, usage, started, job)
        if job is not None:
            while not job.done:
                await job.wait()
            _observe_ttft(state, job, started)
        elif state.config.request_latency_s:
            await asyncio.sleep(state.config.request_latency_s)
        text = " ".join(tokens)
        build = build_chat_response if kind == "chat" else build_completion_response
        response = _json(state, 200, build(rid, model, created, text, finish, n, usage))
        state.record(usage["prompt_tokens"], usage["completion_tokens"], finish, started)
        return response
    finally:
        if job is not None:
            assert state.engine is not None
            state.engine.release(job)
        state.end()


def _observe_ttft(state: SimState, job: Request, started: float) -> None:
    if job.first_token_at is not None:
        state.metrics.ttft.labels(state.label).observe(job.first_token_at - started)


@dataclass
class _Sse:
    """The SSE events of one streamed answer, as bytes."""

    kind: str
    rid: str
    model: str
    created: int
    n: int
    include_usage: bool

    def event(self, payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def role(self) -> bytes:
        if self.kind != "chat":
            return b""
        delta = {"role": "assistant", "content": ""}
        return b"".join(self._chunk(i, delta, "", None) for i in range(self.n))

    def pieces(self, pieces: list[str]) -> bytes:
        return b"".join(
            self._chunk(i, {"content": piece}, piece, None)
            for piece in pieces
            for i in range(self.n)
        )

    def finish(self, reason: str) -> bytes:
        return b"".join(self._chunk(i, {}, "", reason) for i in range(self.n))

    def usage(self, usage: dict[str, int]) -> bytes:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self.event(
            {
                "id": self.rid,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            }
        )

    def _chunk(self, i: int, delta: dict[str, str], text: str, finish: str | None) -> bytes:
        if self.kind == "chat":
            chunk = build_chat_chunk(
                self.rid, self.model, self.created, i, delta, finish, self.include_usage
            )
        else:
            chunk = build_completion_chunk(
                self.rid, self.model, self.created, i, text, finish, self.include_usage
            )
        return self.event(chunk)


async def _relay_engine(
    response: web.StreamResponse, sse: _Sse, pieces: list[str], job: Request, state: SimState,
    started: float,
) -> None:  # fmt: skip
    """Tokens as the engine produces them: role and first token together (as vLLM sends them
    once the first step is done), then a chunk every `stream_interval` tokens."""
    interval = max(1, state.config.stream_interval)
    sent = 0
    head = sse.role()
    while not job.done or sent < min(job.produced, len(pieces)):
        if not job.done or job.produced == 0:
            await job.wait()
        ready = min(job.produced, len(pieces))
        if head and job.produced:
            await response.write(head)
            head = b""
        if ready > sent and (sent == 0 or ready - sent >= interval or job.done):
            await response.write(sse.pieces(pieces[sent:ready]))
            if sent == 0:
                _observe_ttft(state, job, started)
            sent = ready
    if head:
        await response.write(head)


async def _stream(
    request: web.Request,
    state: SimState,
    sse: _Sse,
    tokens: list[str],
    finish: str,
    usage: dict[str, int],
    started: float,
    job: Request | None = None,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **state.headers})
    await response.prepare(request)
    pieces = token_pieces(tokens)
    if job is not None:
        await _relay_engine(response, sse, pieces, job, state, started)
    else:
        await response.write(sse.role())
        for i, piece in enumerate(pieces):
            if state.config.token_latency_s:
                await asyncio.sleep(state.config.token_latency_s)
            await response.write(sse.pieces([piece]))
            if i == 0:
                state.metrics.ttft.labels(state.label).observe(time.perf_counter() - started)
    await response.write(sse.finish(finish))
    if sse.include_usage:
        await response.write(sse.usage(usage))
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
            "cost_model": cfg.cost_model or None,
            "kv_cache_blocks": state.engine.engine.model.num_blocks if state.engine else None,
        },
    )


def build_app(config: SimConfig) -> web.Application:
    """The stand-in's aiohttp application (not started)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = state = SimState(config)

    async def close_engine(_: web.Application) -> None:
        if state.engine is not None:
            await state.engine.close()

    app.on_cleanup.append(close_engine)
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
