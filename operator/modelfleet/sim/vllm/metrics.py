"""The stand-in's Prometheus metrics, with vLLM's names, in their own registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's request-latency buckets (vllm/engine/metrics.py), trimmed at the low end.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class SimMetrics:
    """vLLM's metrics of one stand-in, labelled with its first served name."""

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
    prefix_queries: Counter
    prefix_hits: Counter
    preemptions: Counter


def build_metrics(model_name: str) -> SimMetrics:
    """The metrics in a fresh registry, gauges at 0 so they show before the first request."""
    registry = CollectorRegistry(auto_describe=True)
    labels = ["model_name"]

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    metrics = SimMetrics(
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
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        ttft=Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        prefix_queries=Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels,
            registry=registry,
        ),
        prefix_hits=Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            labels,
            registry=registry,
        ),
        preemptions=Counter(
            "vllm:num_preemptions",
            "Cumulative number of preemptions from the engine.",
            labels,
            registry=registry,
        ),
    )
    for counter in (metrics.prefix_queries, metrics.prefix_hits, metrics.preemptions):
        counter.labels(model_name)
    for gauge_metric in (metrics.running, metrics.waiting, metrics.gpu_cache, metrics.kv_cache):
        gauge_metric.labels(model_name).set(0)
    return metrics
