"""The load figures of a vLLM engine, read from its Prometheus text (`GET /metrics`).

Shared by whoever needs an engine's own view of its load: the gateway's load-aware routing
today, the operator's autoscaler later. Pure: bytes in, figures out.

Only the handful of series that describe load are read, by scanning for their names rather than
parsing the whole exposition: a real vLLM's /metrics runs to hundreds of lines (histograms),
and a router scrapes every replica several times a second. A series that appears with several
label sets (one per engine core of a data-parallel server) is summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RUNNING = b"vllm:num_requests_running"
WAITING = b"vllm:num_requests_waiting"
# vLLM renamed the cache gauge; older servers expose only the first name.
KV_CACHE = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
PREFIX_QUERIES = b"vllm:prefix_cache_queries_total"
PREFIX_HITS = b"vllm:prefix_cache_hits_total"


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One scrape of one engine. `kv_cache_usage` is 0..1; counters are totals since start."""

    running: float
    waiting: float
    kv_cache_usage: float
    prefix_queries: float | None = None
    prefix_hits: float | None = None


class EngineMetricsError(ValueError):
    """The text is not a vLLM engine's metrics (the message says which series is missing)."""


def _sum_series(text: bytes, name: bytes) -> float | None:
    """The sum of every sample of `name` (any labels); None when there is none."""
    total = 0.0
    found = False
    start = 0
    while True:
        at = text.find(name, start)
        if at < 0:
            break
        start = at + len(name)
        # A sample line starts with the name, followed by labels or a space (not a longer name).
        if at and text[at - 1] != 10:  # not at a line start: "# HELP name ..." or inside
            continue
        follow = text[start : start + 1]
        if follow == b"{":
            close = text.find(b"}", start)
            if close < 0:
                break
            start = close + 1
        elif follow != b" ":
            continue
        end = text.find(b"\n", start)
        fields = text[start : end if end >= 0 else len(text)].split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            total += value
            found = True
    return total if found else None


def parse_engine_load(text: bytes) -> EngineLoad:
    """The load figures of one /metrics answer; EngineMetricsError when they are missing."""
    running = _sum_series(text, RUNNING)
    waiting = _sum_series(text, WAITING)
    if running is None or waiting is None:
        missing = RUNNING if running is None else WAITING
        raise EngineMetricsError(
            f"no {missing.decode()} sample in the metrics: not a vLLM server, or one too old"
        )
    kv = None
    for name in KV_CACHE:
        kv = _sum_series(text, name)
        if kv is not None:
            break
    return EngineLoad(
        running=running,
        waiting=waiting,
        kv_cache_usage=min(1.0, max(0.0, kv or 0.0)),
        prefix_queries=_sum_series(text, PREFIX_QUERIES),
        prefix_hits=_sum_series(text, PREFIX_HITS),
    )
