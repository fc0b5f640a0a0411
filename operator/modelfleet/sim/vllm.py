"""`modelfleet sim-vllm`: an OpenAI-compatible stand-in for a vLLM server.

It runs wherever a real vLLM cannot (no GPU): in tests, in `make dev` behind the pod runner, and
in the gateway benchmark. It takes vLLM's own arguments, so a replica Pod's container args pass
straight through, and serves vLLM's endpoints with vLLM's shapes: chat and text completions
(plain and SSE streaming), embeddings, `/v1/models`, `/health` (503 while "loading weights") and
`/metrics` with vLLM's metric names. Output is deterministic (the prompt's words echoed back), and
every answer names the instance that served it in the `x-modelfleet-instance` header, so balancing
tests can count.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import os
import random
import signal
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from modelfleet.aio import install_uvloop
from modelfleet.api.headers import INSTANCE_HEADER
from modelfleet.settings import SimSettings, load

log = logging.getLogger(__name__)

# vLLM has many more arguments than the stand-in simulates; those are logged and ignored.
ACCEPTS_UNKNOWN_ARGS = True
DEFAULT_MAX_TOKENS = 16
# vLLM's request-latency buckets (vllm/engine/metrics.py), trimmed at the low end.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


@dataclass
class SimConfig:
    """Everything one stand-in instance needs: vLLM's arguments plus the simulation knobs."""

    model: str
    served_names: tuple[str, ...]
    instance: str
    host: str = "127.0.0.1"
    port: int = 8000
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 8192
    startup_delay_s: float = 0.0
    token_latency_s: float = 0.002
    request_latency_s: float = 0.0
    fail_rate: float = 0.0
    fail_status: int = 503
    fail_body: bool = False
    embedding_dim: int = 32


class SimError(Exception):
    """A request the stand-in refuses, answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param


# ---------------------------------------------------------------------------------------------
# Pure part: prompts to deterministic answers, and the OpenAI/vLLM JSON shapes.


def build_error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    """The OpenAI error shape, as vLLM's OpenAI server answers it."""
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}
    ).encode()


def _text_of(content: Any) -> str:
    """Message content is a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def compute_chat_prompt(messages: Any) -> tuple[list[str], list[str]]:
    """(all prompt words, words of the last user message) of a chat request."""
    if not isinstance(messages, list) or not messages:
        raise SimError(400, "messages must be a non-empty list", "BadRequestError", "messages")
    words: list[str] = []
    last_user: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise SimError(
                400, "each message needs a role and content", "BadRequestError", "messages"
            )
        text = _text_of(message.get("content")).split()
        words += text
        if message["role"] == "user":
            last_user = text
    return words, last_user


def compute_completion_prompt(prompt: Any) -> list[str]:
    """Words of a text-completion prompt (a string, or a list whose first item is used)."""
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    if isinstance(prompt, list):  # token ids
        return [str(t) for t in prompt]
    if not isinstance(prompt, str):
        raise SimError(400, "prompt must be a string", "BadRequestError", "prompt")
    return prompt.split()


def compute_max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SimError(
            400, "max_tokens must be a positive integer", "BadRequestError", "max_tokens"
        )
    return value


def compute_output(words: list[str], max_tokens: int) -> tuple[list[str], str]:
    """The echoed tokens and the finish reason: the prompt's words, cut at max_tokens."""
    if len(words) > max_tokens:
        return words[:max_tokens], "length"
    return list(words), "stop"


def token_pieces(tokens: list[str]) -> list[str]:
    """Stream pieces whose concatenation equals the non-streaming text."""
    return [tok if i == 0 else " " + tok for i, tok in enumerate(tokens)]


def build_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def build_chat_response(
    rid: str, model: str, created: int, text: str, finish: str, n: int, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            for i in range(n)
        ],
        "usage": usage,
    }


def build_completion_response(
    rid: str, model: str, created: int, text: str, finish: str, n: int, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            for i in range(n)
        ],
        "usage": usage,
    }


def build_chat_chunk(
    rid: str,
    model: str,
    created: int,
    index: int,
    delta: dict[str, Any],
    finish: str | None,
    with_usage: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def build_completion_chunk(
    rid: str, model: str, created: int, index: int, text: str, finish: str | None, with_usage: bool
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        ],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def compute_embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from the text's hash."""
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(b - 127.5) / 127.5 for b in raw[: dim * 4 : 4]]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]


def compute_embedding_inputs(value: Any) -> list[str]:
    """Embedding input: a string, a list of strings, or token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise SimError(400, "input must be a string or a list of strings", "BadRequestError", "input")


def build_embeddings_response(
    inputs: list[str], model: str, dim: int, encoding: str
) -> dict[str, Any]:
    data = []
    tokens = 0
    for i, text in enumerate(inputs):
        vector = compute_embedding(text, dim)
        tokens += max(1, len(text.split()))
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "id": f"embd-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }


def build_models_response(config: SimConfig, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": config.model,
                "parent": None,
                "max_model_len": config.max_model_len,
            }
            for name in config.served_names
        ],
    }


# ---------------------------------------------------------------------------------------------
# Server.


@dataclass
class _Metrics:
    registry: CollectorRegistry
    running: Gauge
    waiting: Gauge
    gpu_cache: Gauge
    kv_cache: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    success: Counter
    e2e: Histogram
    ttft: Histogram


def _build_metrics(model_name: str) -> _Metrics:
    registry = CollectorRegistry(auto_describe=True)
    labels = ["model_name"]

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    metrics = _Metrics(
        registry=registry,
        running=gauge("vllm:num_requests_running", "Number of requests currently running on GPU."),
        waiting=gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        gpu_cache=gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent."),
        kv_cache=gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent."),
        prompt_tokens=Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=registry
        ),
        generation_tokens=Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            labels,
            registry=registry,
        ),
        success=Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=registry,
        ),
        e2e=Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
        ttft=Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
    )
    for gauge_metric in (metrics.running, metrics.waiting, metrics.gpu_cache, metrics.kv_cache):
        gauge_metric.labels(model_name).set(0)
    return metrics


# Simulated KV-cache slots: usage is running requests over this many sequences (vLLM's default
# --max-num-seqs), so dashboards see the cache fill with load.
_MAX_NUM_SEQS = 256


@dataclass
class SimState:
    """The live state of one stand-in; tests may change `config` fields while it runs."""

    config: SimConfig
    started: float = field(default_factory=time.monotonic)
    running: int = 0
    served: int = 0
    metrics: _Metrics = field(init=False)
    _random: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.metrics = _build_metrics(self.config.served_names[0])
        self._label = self.config.served_names[0]
        self.headers = {INSTANCE_HEADER: self.config.instance}

    @property
    def ready(self) -> bool:
        return time.monotonic() - self.started >= self.config.startup_delay_s

    def begin(self) -> None:
        self.running += 1
        self._set_running()

    def end(self) -> None:
        self.running -= 1
        self._set_running()

    def _set_running(self) -> None:
        label = self._label
        self.metrics.running.labels(label).set(self.running)
        usage = min(1.0, self.running / _MAX_NUM_SEQS)
        self.metrics.gpu_cache.labels(label).set(usage)
        self.metrics.kv_cache.labels(label).set(usage)

    def record(self, prompt: int, generated: int, finish: str, started: float) -> None:
        label = self._label
        self.served += 1
        m = self.metrics
        m.prompt_tokens.labels(label).inc(prompt)
        m.generation_tokens.labels(label).inc(generated)
        m.success.labels(label, finish).inc()
        m.e2e.labels(label).observe(time.perf_counter() - started)

    def should_fail(self) -> bool:
        rate = self.config.fail_rate
        return rate > 0 and (rate >= 1 or self._random.random() < rate)


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
            state.metrics.ttft.labels(state._label).observe(time.perf_counter() - started)
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
    return web.Response(status=200 if state.ready else 503, headers=state.headers)


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


# ---------------------------------------------------------------------------------------------
# Command line: vLLM's arguments.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_tag", nargs="?", default=None, help="model, as in `vllm serve MODEL`"
    )
    parser.add_argument("--model", default=None, help="model id or path (vLLM --model)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="names clients ask for; default: the model",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-model-len", type=int, default=8192)


def build_config(args: argparse.Namespace, settings: SimSettings, env: dict[str, str]) -> SimConfig:
    """SimConfig from parsed vLLM arguments, the MODELFLEET_SIM_* settings and POD_NAME."""
    model = args.model or (args.model_tag if args.model_tag != "serve" else None)
    if not model:
        model = "facebook/opt-125m"  # vLLM's own default
    names = tuple(args.served_model_name or [model])
    return SimConfig(
        model=model,
        served_names=names,
        instance=env.get("POD_NAME") or f"{args.host}:{args.port}",
        host=args.host,
        port=args.port,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        startup_delay_s=settings.startup_delay_s,
        token_latency_s=settings.token_latency_s,
        request_latency_s=settings.request_latency_s,
        fail_rate=settings.fail_rate,
        fail_status=settings.fail_status,
        fail_body=settings.fail_body,
        embedding_dim=settings.embedding_dim,
    )


def parse_vllm_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse vLLM's arguments; return the ones the stand-in does not know, to be logged."""
    parser = argparse.ArgumentParser(prog="modelfleet sim-vllm", add_help=False)
    add_arguments(parser)
    args, unknown = parser.parse_known_args(list(argv))
    return args, unknown


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


async def serve(config: SimConfig) -> None:
    """Serve until cancelled."""
    sim = await start_sim(config)
    log.info(
        "vLLM stand-in %s serving %s (%s) on %s:%d; healthy in %.1fs",
        config.instance,
        ",".join(config.served_names),
        config.model,
        config.host,
        config.port,
        config.startup_delay_s,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # a Pod's SIGTERM ends it cleanly
    try:
        await stop.wait()
    finally:
        await sim.stop()
    log.info("vLLM stand-in %s stopped", config.instance)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for arg in getattr(args, "_unknown", []):
        log.info("ignoring vLLM argument the stand-in does not simulate: %s", arg)
    config = build_config(args, load(SimSettings), dict(os.environ))
    install_uvloop()
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 0
    return 0
