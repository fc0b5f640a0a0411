"""Stand-ins for programs that cannot run here (no GPU): the vLLM model server."""
