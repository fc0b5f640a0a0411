"""The multi-endpoint GPU pool: find the node-stats agents, poll them with circuit breakers,
and merge their GPUs into one snapshot keyed by global GPU ID. See docs/endpoints.md.

Modules: `pool` (GpuPool, the loop), `snapshot` (PoolSnapshot, pure), `breaker` and `health`
(pure rules), `client` (HTTP), `discovery` (agent pods), `status` (the /status document and
table), `http` (the /status route), `metrics`, `cli` (`modelfleet status`). This file imports
nothing so that `modelfleet <other command>` does not load the HTTP stack.
"""
