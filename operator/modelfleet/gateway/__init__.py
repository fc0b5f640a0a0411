"""The OpenAI-compatible gateway: routes by model across ready replicas (docs/gateway.md)."""
