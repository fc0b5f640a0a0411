"""What one vLLM stand-in runs with: vLLM's arguments plus the simulation knobs."""

from __future__ import annotations

from dataclasses import dataclass


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
    health_fail_after_s: float = 0.0  # 0: never
    token_latency_s: float = 0.002
    request_latency_s: float = 0.0
    fail_rate: float = 0.0
    fail_status: int = 503
    fail_body: bool = False
    embedding_dim: int = 32
    # The engine cost model (engine.COST_MODELS), or "" for the fixed delays above.
    cost_model: str = ""
    kv_cache_blocks: int = 0  # 0: what gpu_memory_utilization leaves on the modelled GPU
    stream_interval: int = 1  # tokens per streamed chunk after the first (vLLM --stream-interval)
