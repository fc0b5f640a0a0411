"""HTTP header names shared by the gateway, the replicas and the vLLM stand-in.

Data only, like `labels`: one home for each name, read by every component that sends or reads it.
"""

from __future__ import annotations

# On every answer: the replica Pod that served it. The gateway sets it from its own routing
# decision (authoritative: a real vLLM sends no such header); the vLLM stand-in sets it to its
# POD_NAME so tests without a gateway can count too.
INSTANCE_HEADER = "x-modelfleet-instance"

# On refusals that retrying cannot fix (a model switched off by its spec): the OpenAI SDKs
# (Python, Node) honour it and skip their automatic retries of 5xx answers.
SHOULD_RETRY_HEADER = "x-should-retry"
