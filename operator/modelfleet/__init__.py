"""modelfleet: runs LLM model replicas (vLLM servers) across NVIDIA GPU nodes on Kubernetes."""

__version__ = "0.1.0"
