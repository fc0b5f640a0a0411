"""The node-stats agent: per-node GPU stats (NVML or simulated) as JSON, metrics and health.

One agent runs on every GPU node. A background poll loop samples the GPUs every few seconds and
keeps the latest sample in memory (`state`); the HTTP server (`server`) answers `GET /v1/gpus`
and `GET /metrics` from that sample only, never touching the GPUs per request.
"""
