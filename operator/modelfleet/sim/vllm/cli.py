"""`modelfleet sim-vllm`: vLLM's command-line arguments in, a stand-in serving until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
from collections.abc import Mapping, Sequence

from modelfleet.aio import install_uvloop
from modelfleet.settings import SimSettings, load
from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.gpumemory import (
    GpuMemoryError,
    GpuMemoryHold,
    build_memory_hold,
    hold_gpu_memory,
)
from modelfleet.sim.vllm.server import start_sim
from modelfleet.sim.vllm.weights import fetch_weights

log = logging.getLogger(__name__)

# vLLM has many more arguments than the stand-in simulates; those are logged and ignored.
ACCEPTS_UNKNOWN_ARGS = True


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
    parser.add_argument(
        "--stream-interval", type=int, default=1, help="tokens per streamed chunk after the first"
    )


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
        health_fail_after_s=settings.health_fail_after_s,
        token_latency_s=settings.token_latency_s,
        request_latency_s=settings.request_latency_s,
        fail_rate=settings.fail_rate,
        fail_status=settings.fail_status,
        fail_body=settings.fail_body,
        embedding_dim=settings.embedding_dim,
        cost_model=settings.cost_model,
        kv_cache_blocks=settings.kv_cache_blocks,
        stream_interval=max(1, args.stream_interval),
    )


def parse_vllm_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse vLLM's arguments; return the ones the stand-in does not know, to be logged."""
    parser = argparse.ArgumentParser(prog="modelfleet sim-vllm", add_help=False)
    add_arguments(parser)
    args, unknown = parser.parse_known_args(list(argv))
    return args, unknown


async def serve(config: SimConfig, hold: GpuMemoryHold | None = None) -> None:
    """Serve until cancelled, holding `hold`'s GPU memory meanwhile (vLLM takes it at start)."""
    async with hold_gpu_memory(hold):
        await _serve(config)


async def _serve(config: SimConfig) -> None:
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


def check_start(model: str, gated: Sequence[str], env: Mapping[str, str]) -> str:
    """What stops vLLM before it loads anything, as the stand-in mimics it; "" when nothing.

    - torch's inductor asks for the user name at import: a uid without a passwd entry and no
      USER/LOGNAME makes getpass fail;
    - a gated model without a Hugging Face token: the Hub answers 401.
    """
    try:
        getpass.getuser()
    except (KeyError, OSError) as exc:
        return f"getpass.getuser() failed: {exc} (set USER or LOGNAME, or run as a known uid)"
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if not token and any(model.startswith(prefix) for prefix in gated):
        return (
            f"401 Client Error: model {model} is gated on the Hugging Face Hub and no token was "
            "given; set HF_TOKEN to a token that was granted access"
        )
    return ""


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for arg in getattr(args, "_unknown", []):
        log.info("ignoring vLLM argument the stand-in does not simulate: %s", arg)
    env = dict(os.environ)
    settings = load(SimSettings)
    config = build_config(args, settings, env)
    refusal = check_start(config.model, settings.gated_models, env)
    if refusal:
        log.error("cannot start: %s", refusal)
        return 1
    try:
        log.info(
            "weights of %s: %s", config.model, fetch_weights(config.model, env, config.instance)
        )
    except OSError as exc:
        log.error("cannot start: %s: %s", type(exc).__name__, exc)
        return 1
    try:
        hold = build_memory_hold(config, env)
    except GpuMemoryError as exc:
        log.error("cannot start: %s", exc)
        return 1
    install_uvloop()
    try:
        asyncio.run(serve(config, hold))
    except KeyboardInterrupt:
        return 0
    return 0
