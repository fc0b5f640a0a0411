"""The stand-in's engine cost model, stepped by hand: batching, prefix cache, LRU, preemption."""

from __future__ import annotations

import json

import aiohttp

from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.engine import (
    A100_LLAMA_3_1_8B,
    CostModel,
    Engine,
    Sequence,
    blocks_for_utilization,
    compute_block_hashes,
)
from modelfleet.sim.vllm.server import start_sim


def words(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def seq(tokens: list[str], output: int = 4, model: CostModel = A100_LLAMA_3_1_8B) -> Sequence:
    return Sequence(len(tokens), output, compute_block_hashes(tokens, model.block_size))


def run_to_end(engine: Engine, limit: int = 10_000) -> float:
    """Step until idle; the simulated time it took."""
    elapsed = 0.0
    for _ in range(limit):
        plan = engine.plan_step()
        if plan is None:
            return elapsed
        elapsed += plan.duration_s
        engine.finish_step(plan)
    raise AssertionError("the engine did not drain")


def small(blocks: int, **overrides: object) -> CostModel:
    base = {**A100_LLAMA_3_1_8B.__dict__, "num_blocks": blocks, **overrides}
    return CostModel(**base)  # type: ignore[arg-type]


def test_block_hashes_chain_over_the_whole_prefix() -> None:
    a = compute_block_hashes(words("a", 40), 16)
    b = compute_block_hashes(words("a", 32) + words("b", 8), 16)
    c = compute_block_hashes(words("x", 16) + words("a", 32)[16:], 16)
    assert len(a) == 2  # only full blocks
    assert a == b[:2]
    assert a[1] != c[1]  # same tokens in block 2, different history


def test_a_repeated_prompt_hits_the_prefix_cache_and_prefills_faster() -> None:
    engine = Engine(A100_LLAMA_3_1_8B)
    prompt = words("s", 1000)
    first = seq(prompt, output=1)
    engine.add(first)
    cold = run_to_end(engine)
    second = seq(prompt + words("u", 50), output=1)
    engine.add(second)
    warm = run_to_end(engine)
    assert first.cached_tokens == 0
    assert second.cached_tokens == 992  # 62 full blocks of the shared 1,000 tokens
    assert warm < cold / 4
    assert engine.counters.prefix_hits == 992
    assert engine.counters.prefix_queries == 2050
    assert engine.cache.used == 0  # everything finished gave its blocks back


def test_decode_steps_grow_with_the_batch() -> None:
    engine = Engine(A100_LLAMA_3_1_8B)
    one = seq(words("a", 100), output=3)
    engine.add(one)
    engine.finish_step(engine.plan_step())  # prefill
    single = engine.plan_step()
    assert single is not None
    assert len(single.decode) == 1
    engine.finish_step(single)
    for i in range(15):
        engine.add(seq(words(f"b{i}-", 100), output=50))
    run = [engine.plan_step() for _ in range(1)]
    engine.finish_step(run[0])  # prefill of the 15 new ones, with one decode beside
    batch = engine.plan_step()
    assert batch is not None
    assert len(batch.decode) == 15
    assert batch.duration_s > single.duration_s
    assert batch.duration_s < 2 * single.duration_s  # batching is almost free at this size


def test_prefill_is_chunked_by_the_token_budget() -> None:
    engine = Engine(A100_LLAMA_3_1_8B)
    engine.add(seq(words("a", 5000), output=1))
    plans = []
    while (plan := engine.plan_step()) is not None:
        plans.append(sum(c for _, c in plan.prefill))
        engine.finish_step(plan)
    assert plans == [2048, 2048, 904]


def test_least_recently_used_prefixes_are_evicted_first() -> None:
    engine = Engine(small(blocks=20))  # 320 tokens
    a, b, c = words("a", 160), words("b", 160), words("c", 160)
    for prompt in (a, b, c):  # c evicts a (the oldest), b stays
        engine.add(seq(prompt, output=1))
        run_to_end(engine)
    again_b, again_a = seq(b, output=1), seq(a, output=1)
    engine.add(again_b)
    run_to_end(engine)
    engine.add(again_a)
    run_to_end(engine)
    assert again_b.cached_tokens == 144
    assert again_a.cached_tokens == 0


def test_a_full_cache_preempts_the_newest_request_and_it_recomputes() -> None:
    engine = Engine(small(blocks=8))  # 128 tokens
    older = seq(words("a", 40), output=40)  # grows to 80 tokens: 5 blocks
    newer = seq(words("b", 40), output=40)
    engine.add(older)
    engine.add(newer)
    run_to_end(engine)
    assert older.finished
    assert newer.finished
    assert engine.counters.preemptions >= 1
    assert newer.preemptions >= 1
    assert older.preemptions == 0
    assert engine.cache.used == 0


def test_a_prompt_that_does_not_fit_now_waits_its_turn() -> None:
    engine = Engine(small(blocks=8))
    big = seq(words("a", 100), output=10)  # 7 blocks
    second = seq(words("b", 100), output=1)
    engine.add(big)
    engine.add(second)
    engine.finish_step(engine.plan_step())
    assert engine.running == [big]
    assert list(engine.waiting) == [second]
    run_to_end(engine)
    assert second.finished


def test_kv_blocks_follow_gpu_memory_utilization() -> None:
    assert blocks_for_utilization(0.9) == A100_LLAMA_3_1_8B.num_blocks
    assert blocks_for_utilization(0.55) == 2304
    assert blocks_for_utilization(0.1) == 64


async def test_the_stand_in_serves_through_the_engine_and_reports_vllm_metrics() -> None:
    config = SimConfig(
        model="meta-llama/Llama-3.1-8B-Instruct",
        served_names=("llama",),
        instance="sim-engine",
        port=0,
        cost_model=A100_LLAMA_3_1_8B.name,
        gpu_memory_utilization=0.55,
        stream_interval=4,
    )
    running = await start_sim(config)
    system = " ".join(words("s", 600))
    user = " ".join(words("u", 20))
    body = {
        "model": "llama",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 10,
        "stream": True,
    }
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for _ in range(2):
                async with http.post(running.url + "/v1/chat/completions", json=body) as resp:
                    events = [
                        line.strip()[6:]
                        async for line in resp.content
                        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]"
                    ]
                text = "".join(
                    json.loads(e)["choices"][0]["delta"].get("content", "") for e in events
                )
                assert text == " ".join(words("u", 10))
            async with http.post(
                running.url + "/v1/completions", json={"model": "llama", "prompt": system}
            ) as resp:
                assert (await resp.json())["usage"]["prompt_tokens"] == 600
            async with http.get(running.url + "/metrics") as resp:
                metrics = await resp.text()
            async with http.get(running.url + "/sim/info") as resp:
                info = await resp.json()
    finally:
        await running.stop()
    assert info["kv_cache_blocks"] == 2304
    assert 'vllm:prefix_cache_queries_total{model_name="llama"} 1840.0' in metrics
    # The second chat found the 38 full blocks of the first (608 tokens), the completion the
    # 37 blocks of the system prompt (592: its last token is always computed again).
    assert 'vllm:prefix_cache_hits_total{model_name="llama"} 1200.0' in metrics
    assert 'vllm:time_to_first_token_seconds_count{model_name="llama"} 3.0' in metrics
    assert 'vllm:num_requests_waiting{model_name="llama"} 0.0' in metrics
    assert 'vllm:num_preemptions_total{model_name="llama"} 0.0' in metrics
