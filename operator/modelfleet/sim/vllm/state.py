"""The live state of one stand-in: readiness, requests running and served, simulated failures."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from modelfleet.api.headers import INSTANCE_HEADER
from modelfleet.sim.vllm.batching import BatchingEngine
from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.engine import (
    COST_MODELS,
    Engine,
    EngineCounters,
    blocks_for_utilization,
)
from modelfleet.sim.vllm.metrics import SimMetrics, build_metrics

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
    metrics: SimMetrics = field(init=False)
    engine: BatchingEngine | None = field(init=False, default=None)
    _random: random.Random = field(default_factory=random.Random)
    _counted: EngineCounters = field(default_factory=EngineCounters)

    def __post_init__(self) -> None:
        self.metrics = build_metrics(self.config.served_names[0])
        self.label = self.config.served_names[0]  # the metrics' model_name
        self.headers = {INSTANCE_HEADER: self.config.instance}
        cfg = self.config
        if cfg.cost_model:
            model = COST_MODELS[cfg.cost_model]
            blocks = cfg.kv_cache_blocks or blocks_for_utilization(cfg.gpu_memory_utilization)
            self.engine = BatchingEngine(model.with_blocks(blocks), self._observe_engine)

    def _observe_engine(self, engine: Engine) -> None:
        """The engine's queue, cache and counters as vLLM's metrics, after every change."""
        label = self.label
        m = self.metrics
        m.running.labels(label).set(len(engine.running))
        m.waiting.labels(label).set(len(engine.waiting))
        usage = engine.cache.usage
        m.gpu_cache.labels(label).set(usage)
        m.kv_cache.labels(label).set(usage)
        now, before = engine.counters, self._counted
        if now.prefix_queries != before.prefix_queries:
            m.prefix_queries.labels(label).inc(now.prefix_queries - before.prefix_queries)
            m.prefix_hits.labels(label).inc(now.prefix_hits - before.prefix_hits)
        if now.preemptions != before.preemptions:
            m.preemptions.labels(label).inc(now.preemptions - before.preemptions)
        self._counted = EngineCounters(**now.__dict__)

    @property
    def ready(self) -> bool:
        return time.monotonic() - self.started >= self.config.startup_delay_s

    @property
    def healthy(self) -> bool:
        """/health answers 200: started, and not yet hung (health_fail_after_s)."""
        after = self.config.health_fail_after_s
        return self.ready and not (after and time.monotonic() - self.started >= after)

    def begin(self) -> None:
        self.running += 1
        self._set_running()

    def end(self) -> None:
        self.running -= 1
        self._set_running()

    def _set_running(self) -> None:
        if self.engine is not None:
            return  # the engine's own queue and cache are the figures
        label = self.label
        self.metrics.running.labels(label).set(self.running)
        usage = min(1.0, self.running / _MAX_NUM_SEQS)
        self.metrics.gpu_cache.labels(label).set(usage)
        self.metrics.kv_cache.labels(label).set(usage)

    def record(self, prompt: int, generated: int, finish: str, started: float) -> None:
        label = self.label
        self.served += 1
        m = self.metrics
        m.prompt_tokens.labels(label).inc(prompt)
        m.generation_tokens.labels(label).inc(generated)
        m.success.labels(label, finish).inc()
        m.e2e.labels(label).observe(time.perf_counter() - started)

    def should_fail(self) -> bool:
        rate = self.config.fail_rate
        return rate > 0 and (rate >= 1 or self._random.random() < rate)
