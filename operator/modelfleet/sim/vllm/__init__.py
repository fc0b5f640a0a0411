"""`modelfleet sim-vllm`: an OpenAI-compatible stand-in for a vLLM server.

It runs wherever a real vLLM cannot (no GPU): in tests, in `make dev` behind the pod runner, and
in the gateway benchmark. It takes vLLM's own arguments, so a replica Pod's container args pass
straight through, and serves vLLM's endpoints with vLLM's shapes: chat and text completions
(plain and SSE streaming), embeddings, `/v1/models`, `/health` (503 while "loading weights") and
`/metrics` with vLLM's metric names. Output is deterministic (the prompt's words echoed back), and
every answer names the instance that served it in the `x-modelfleet-instance` header, so balancing
tests can count.

By default it answers after fixed delays. With a cost model (`MODELFLEET_SIM_COST_MODEL`) it
behaves like an engine under load instead: continuous batching, prefill and decode time, a paged
KV cache with automatic prefix caching, LRU eviction and preemption, calibrated for one GPU/model
pair (`engine`); routing benchmarks need that.

One module per concern: `config` (what an instance runs with), `shapes` (pure: prompts to
answers, vLLM's JSON shapes), `engine` (pure: the cost model's scheduler and KV cache),
`batching` (runs the engine in real time), `metrics` (vLLM's metric names), `state` (readiness,
load and failures of a running instance), `server` (the HTTP endpoints; `start_sim` for tests
and benchmarks) and `cli` (vLLM's arguments, `modelfleet sim-vllm`).
"""
