"""The vLLM stand-in over real HTTP: vLLM's endpoints, shapes, startup, failures and CLI."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from modelfleet.api.headers import INSTANCE_HEADER
from modelfleet.sim.vllm.cli import parse_vllm_args
from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.server import RunningSim, start_sim
from modelfleet.sim.vllm.shapes import compute_output, token_pieces


def sim_config(**overrides: object) -> SimConfig:
    base: dict[str, object] = {
        "model": "google/gemma-3-4b-it",
        "served_names": ("gemma3-4b", "gemma"),
        "instance": "sim-a",
        "port": 0,
        "token_latency_s": 0.0,
    }
    base.update(overrides)
    return SimConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    running = await start_sim(sim_config())
    yield running
    await running.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def test_output_is_the_prompt_echoed_and_cut_at_max_tokens() -> None:
    assert compute_output(["a", "b", "c"], 2) == (["a", "b"], "length")
    assert compute_output(["a", "b"], 2) == (["a", "b"], "stop")
    assert "".join(token_pieces(["a", "b", "c"])) == "a b c"


async def test_chat_completion_shape_usage_and_instance(
    sim: RunningSim, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "gemma3-4b",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one two three four"}]},
        ],
        "max_tokens": 3,
    }
    async with http.post(sim.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers[INSTANCE_HEADER] == "sim-a"
        data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "gemma3-4b"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "one two three", "tool_calls": []}
    assert choice["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


async def test_second_served_name_and_text_completion(
    sim: RunningSim, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gemma", "prompt": "x y"}
    async with http.post(sim.url + "/v1/completions", json=body) as resp:
        data = await resp.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "x y"
    assert data["choices"][0]["finish_reason"] == "stop"


async def test_streaming_chat_chunks_done_and_usage(
    sim: RunningSim, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "gemma3-4b",
        "messages": [{"role": "user", "content": "alpha beta gamma"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(sim.url + "/v1/chat/completions", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "alpha beta gamma"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_stream_sends_tokens_apart(http: aiohttp.ClientSession) -> None:
    running = await start_sim(sim_config(token_latency_s=0.05))
    try:
        body = {"model": "gemma3-4b", "prompt": "a b c d", "stream": True}
        arrivals = []
        async with http.post(running.url + "/v1/completions", json=body) as resp:
            async for _line in resp.content:
                arrivals.append(time.monotonic())
        # Chunks arrive over time rather than in one piece at the end.
        assert arrivals[-1] - arrivals[0] >= 0.15
    finally:
        await running.stop()


async def test_embeddings_float_and_base64_are_deterministic(
    sim: RunningSim, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        sim.url + "/v1/embeddings", json={"model": "gemma3-4b", "input": ["a", "b"]}
    ) as resp:
        data = await resp.json()
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert len(data["data"][0]["embedding"]) == 32
    async with http.post(
        sim.url + "/v1/embeddings", json={"model": "gemma3-4b", "input": "a"}
    ) as resp:
        again = await resp.json()
    assert again["data"][0]["embedding"] == data["data"][0]["embedding"]
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="none")
    try:
        # The official client asks for base64 and decodes it itself.
        result = await client.embeddings.create(model="gemma3-4b", input="a")
    finally:
        await client.close()
    assert result.data[0].embedding == pytest.approx(data["data"][0]["embedding"], abs=1e-6)


async def test_unknown_model_and_bad_body_are_openai_errors(
    sim: RunningSim, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        sim.url + "/v1/chat/completions", json={"model": "llama", "messages": []}
    ) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["type"] == "NotFoundError"
    assert "llama" in error["message"]
    assert error["code"] == 404
    async with http.post(sim.url + "/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert "JSON" in (await resp.json())["error"]["message"]
    async with http.post(
        sim.url + "/v1/chat/completions", json={"model": "gemma", "messages": "hi"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "messages"


async def test_models_lists_every_served_name(sim: RunningSim, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/v1/models") as resp:
        data = await resp.json()
    assert [m["id"] for m in data["data"]] == ["gemma3-4b", "gemma"]
    assert data["data"][0]["root"] == "google/gemma-3-4b-it"


async def test_health_is_503_until_the_startup_delay_passes(
    http: aiohttp.ClientSession,
) -> None:
    running = await start_sim(sim_config(startup_delay_s=0.3))
    try:
        async with http.get(running.url + "/health") as resp:
            assert resp.status == 503
        async with http.post(
            running.url + "/v1/completions", json={"model": "gemma", "prompt": "a"}
        ) as resp:
            assert resp.status == 503
        deadline = time.monotonic() + 5
        status = 503
        while status != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            async with http.get(running.url + "/health") as resp:
                status = resp.status
        assert status == 200
    finally:
        await running.stop()


async def test_health_turns_503_for_good_after_health_fail_after(
    http: aiohttp.ClientSession,
) -> None:
    running = await start_sim(sim_config(health_fail_after_s=0.3))
    try:
        async with http.get(running.url + "/health") as resp:
            assert resp.status == 200
        deadline = time.monotonic() + 5
        status = 200
        while status == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            async with http.get(running.url + "/health") as resp:
                status = resp.status
        assert status == 503
        await asyncio.sleep(0.2)
        async with http.get(running.url + "/health") as resp:
            assert resp.status == 503  # a hung engine does not come back by itself
    finally:
        await running.stop()


async def test_failures_with_and_without_body(sim: RunningSim, http: aiohttp.ClientSession) -> None:
    body = {"model": "gemma", "prompt": "a"}
    sim.state.config.fail_rate = 1.0
    async with http.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.status == 503
        assert await resp.read() == b""
    sim.state.config.fail_body = True
    sim.state.config.fail_status = 500
    async with http.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.status == 500
        assert (await resp.json())["error"]["code"] == 500
    sim.state.config.fail_rate = 0.0
    async with http.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200


async def test_metrics_use_vllm_names_and_count(
    sim: RunningSim, http: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        async with http.post(
            sim.url + "/v1/completions", json={"model": "gemma", "prompt": "a b", "max_tokens": 1}
        ) as resp:
            assert resp.status == 200
    async with http.get(sim.url + "/metrics") as resp:
        text = await resp.text()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:kv_cache_usage_perc",
        "vllm:e2e_request_latency_seconds_bucket",
    ):
        assert name in text
    assert 'vllm:prompt_tokens_total{model_name="gemma3-4b"} 4.0' in text
    assert 'vllm:generation_tokens_total{model_name="gemma3-4b"} 2.0' in text
    assert 'vllm:e2e_request_latency_seconds_count{model_name="gemma3-4b"} 2.0' in text


async def test_running_gauge_follows_open_streams(http: aiohttp.ClientSession) -> None:
    running = await start_sim(sim_config(token_latency_s=0.2))
    try:
        body = {"model": "gemma", "prompt": "a b c d e f", "stream": True}
        async with http.post(running.url + "/v1/completions", json=body) as resp:
            await resp.content.readline()
            assert running.state.running == 1
            async with http.get(running.url + "/metrics") as mresp:
                assert 'vllm:num_requests_running{model_name="gemma3-4b"} 1.0' in (
                    await mresp.text()
                )
    finally:
        await running.stop()


async def test_openai_client_chat_and_stream(sim: RunningSim) -> None:
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="none")
    try:
        reply = await client.chat.completions.create(
            model="gemma3-4b", messages=[{"role": "user", "content": "hi there"}]
        )
        assert reply.choices[0].message.content == "hi there"
        stream = await client.chat.completions.create(
            model="gemma3-4b",
            messages=[{"role": "user", "content": "one two"}],
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == "one two"
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="other", prompt="x")
    finally:
        await client.close()


def test_vllm_arguments_parse_and_unknown_ones_are_kept_apart() -> None:
    args, unknown = parse_vllm_args(
        [
            "--model",
            "google/gemma-3-4b-it",
            "--served-model-name",
            "gemma3-4b",
            "g",
            "--tensor-parallel-size=2",
            "--gpu-memory-utilization",
            "0.45",
            "--enable-prefix-caching",
        ]
    )
    assert args.model == "google/gemma-3-4b-it"
    assert args.served_model_name == ["gemma3-4b", "g"]
    assert args.tensor_parallel_size == 2
    assert args.gpu_memory_utilization == 0.45
    assert args.port == 8000
    assert unknown == ["--enable-prefix-caching"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_command_line_process_serves_and_logs_ignored_args(
    http: aiohttp.ClientSession,
) -> None:
    port = _free_port()
    env = dict(os.environ, POD_NAME="gemma3-4b-instance-1", MODELFLEET_SIM_STARTUP_DELAY_S="0.2")
    proc = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "modelfleet",
            "sim-vllm",
            "--model",
            "google/gemma-3-4b-it",
            "--served-model-name",
            "gemma3-4b",
            "--port",
            str(port),
            "--dtype",
            "bfloat16",
        ],
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        status = 0
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    status = resp.status
                    if status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
        assert status == 200
        async with http.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "gemma3-4b", "prompt": "ok"},
        ) as resp:
            assert resp.headers[INSTANCE_HEADER] == "gemma3-4b-instance-1"
    finally:
        proc.terminate()
        output = (await asyncio.wait_for(proc.communicate(), 10))[0].decode()
    assert proc.returncode == 0
    assert "ignoring vLLM argument the stand-in does not simulate: --dtype" in output
