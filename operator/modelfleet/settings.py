"""Typed settings, read once at start from `MODELFLEET_*` environment variables.

Every field has a description and a default; docs/configuration.md is generated from these
classes (`make docs`), and a test fails when it is out of date. `load()` turns a validation
failure into one message that names the variable and what it accepts.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from modelfleet.api.gpustats import MAX_MEMORY_MIB, MAX_POLL_INTERVAL_S
from modelfleet.api.v1alpha1 import Balancing, PlacementStrategy, Quantity

log = logging.getLogger(__name__)

S = TypeVar("S", bound="_Settings")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True, frozen=True)
    #: Human title used in docs/configuration.md.
    doc_title: ClassVar[str] = ""

    @classmethod
    def env_name(cls, field: str) -> str:
        prefix = cls.model_config.get("env_prefix", "")
        return f"{prefix}{field}".upper()


def normalize_endpoint(url: str) -> str:
    """Validate one agent URL (http or https, a host, a port) and return it without a trailing /."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} has a port that is not a number from 1 to 65535") from None
    if port is None:
        raise ValueError(f"{text!r} has no port; agents listen on :9400 by default")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} must not carry a query or fragment")
    return text.rstrip("/")


def parse_endpoint_list(value: Any) -> list[str]:
    """Comma-separated (or list of) agent URLs; duplicates are dropped with a warning."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    seen: list[str] = []
    for raw in items:
        if not str(raw).strip():
            continue
        url = normalize_endpoint(str(raw))
        if url in seen:
            log.warning(
                "endpoint %s is listed twice in MODELFLEET_NODE_STATS_ENDPOINTS; using it once", url
            )
            continue
        seen.append(url)
    return seen


def parse_name_list(value: Any) -> list[str]:
    """Comma-separated (or list of) names, stripped, empty items and repeats dropped."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names: list[str] = []
    for raw in items:
        name = str(raw).strip()
        if name and name not in names:
            names.append(name)
    return names


class OperatorSettings(_Settings):
    """The operator and its GPU pool."""

    model_config = SettingsConfigDict(env_prefix="MODELFLEET_")
    doc_title: ClassVar[str] = "Operator and GPU pool (`modelfleet operator`, `modelfleet status`)"

    node_stats_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated node-stats agent URLs (http://host:port). One URL is the "
            "single-endpoint setup. Empty: find the agent pods in the cluster."
        ),
    )
    agent_namespace: str = Field(
        "", description="Namespace of the agent pods for discovery; empty: the operator's own."
    )
    agent_selector: str = Field(
        "app.kubernetes.io/component=agent,app.kubernetes.io/name=modelfleet",
        description="Label selector of the agent pods for discovery.",
    )
    agent_port: int = Field(9400, ge=1, le=65535, description="Port of discovered agents.")
    agent_missing_grace_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description=(
            "Replicas on a node whose agent pod has been gone from discovery this long are "
            "replaced (as EndpointsDown); never less than 3 poll intervals, so an agent rollout "
            "does not replace healthy replicas."
        ),
    )
    agent_token_file: str = Field(
        "", description="File with the bearer token sent to agents; empty: no token."
    )
    default_strategy: PlacementStrategy = Field(
        PlacementStrategy.AVAILABILITY,
        description=(
            "Placement strategy when a ModelDeployment names none: Availability, RoundRobin or "
            "Weighted. An unknown value logs a warning and falls back to Availability."
        ),
    )
    endpoint_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Timeout of one request to one agent, in seconds."
    )
    endpoint_retries: int = Field(
        1, ge=0, le=10, description="Retries of a failed agent request within one poll round."
    )
    poll_interval_s: float = Field(
        5.0, gt=0, le=300, description="Seconds between poll rounds over all agents."
    )
    poll_concurrency: int = Field(
        64, ge=1, le=4096, description="Agents polled at the same time, at most."
    )
    breaker_failure_threshold: int = Field(
        3, ge=1, le=100, description="Consecutive failures that open an endpoint's breaker."
    )
    backoff_base_s: float = Field(
        1.0, gt=0, le=600, description="First backoff of an open breaker, in seconds."
    )
    backoff_cap_s: float = Field(
        60.0, gt=0, le=3600, description="Longest backoff of an open breaker, in seconds."
    )
    watch_namespace: str = Field(
        "", description="Only reconcile ModelDeployments in this namespace; empty: all."
    )
    default_image: str = Field(
        "vllm/vllm-openai:v0.11.0", description="vLLM image when a ModelDeployment names none."
    )
    watch_node_pods: bool = Field(
        True,
        description=(
            "Watch every pod bound to a node (all namespaces, read only), so that placement "
            "counts their CPU, memory and GPU requests against each node's allocatable, as the "
            "kubelet does at admission. Off: only the replicas' own requests are counted, and "
            "a replica the kubelet refuses backs off from that node."
        ),
    )
    memory_margin_mib: int = Field(
        1024, ge=0, description="GPU memory kept free on every GPU in Shared mode, in MiB."
    )
    shared_mode: bool = Field(
        False,
        description=(
            "Allow ModelDeployments with spec.gpu.sharing Shared. Their replicas ask the kubelet "
            "for no GPU and are pinned to GPUs through NVIDIA_VISIBLE_DEVICES, which only works "
            "where the container runtime honours it for unprivileged pods (not by default on GPU "
            "Operator 25.10 and later, GKE or Bottlerocket); the device plugin and GPU quotas do "
            "not see them. Turn on for dedicated, tainted GPU node pools only (docs/operator.md)."
        ),
    )
    shared_runtime_class_name: str = Field(
        "",
        description=(
            "RuntimeClass of Shared replicas whose spec.engine names none: the runtime that "
            "honours NVIDIA_VISIBLE_DEVICES (the GPU Operator's `nvidia`; the chart sets it). "
            "Empty: none, for nodes whose default runtime is NVIDIA's."
        ),
    )
    replica_run_as_user: int | None = Field(
        1000,
        ge=1,
        description=(
            "uid (and gid, fsGroup) of the vLLM container. Empty: the Pod names none and the "
            "platform assigns one (OpenShift's restricted SCC refuses a fixed uid)."
        ),
    )
    replica_cpu_request: Quantity | None = Field(
        "1",
        description=(
            "CPU each replica requests when spec.engine.resources names none, so a replica is "
            "not BestEffort (first evicted under node pressure). Empty: none."
        ),
    )
    replica_memory_request: Quantity | None = Field(
        "4Gi",
        description=(
            "Memory each replica requests when spec.engine.resources names none (vLLM's own "
            "process, tokenizer and pinned buffers live in host memory). Empty: none."
        ),
    )
    metrics_port: int = Field(
        8080, ge=1, le=65535, description="Port of /metrics, /healthz and /status."
    )
    metrics_host: str = Field("0.0.0.0", description="Address /metrics and /status bind to.")
    recheck_interval_s: float = Field(
        30.0, gt=0, le=60, description="Every ModelDeployment is re-checked at least this often."
    )
    leader_election: bool = Field(
        True,
        description=(
            "Elect one acting operator through a coordination.k8s.io Lease; the others stand "
            "by. Turn off only when exactly one operator runs."
        ),
    )
    lease_name: str = Field("modelfleet-operator", description="Name of the leader Lease.")
    lease_namespace: str = Field(
        "", description="Namespace of the leader Lease; empty: the operator's own namespace."
    )
    lease_duration_s: float = Field(
        15.0,
        ge=2,
        le=300,
        description=(
            "Seconds a standby waits for the leader's renewal before taking over; also how long "
            "a leader that cannot renew keeps acting before it exits."
        ),
    )
    lease_renew_interval_s: float = Field(
        5.0, gt=0, le=100, description="Seconds between two renewals of the leader Lease."
    )

    @field_validator("node_stats_endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: Any) -> list[str]:
        return parse_endpoint_list(value)

    @field_validator(
        "replica_run_as_user", "replica_cpu_request", "replica_memory_request", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("default_strategy", mode="before")
    @classmethod
    def _fallback_strategy(cls, value: Any) -> Any:
        known = [s.value for s in PlacementStrategy]
        if value in known or isinstance(value, PlacementStrategy):
            return value
        log.warning(
            "MODELFLEET_DEFAULT_STRATEGY=%r is not one of %s; using Availability",
            value,
            ", ".join(known),
        )
        return PlacementStrategy.AVAILABILITY


class AgentSettings(_Settings):
    """The node-stats agent."""

    model_config = SettingsConfigDict(env_prefix="MODELFLEET_AGENT_")
    doc_title: ClassVar[str] = "Node-stats agent (`modelfleet agent`)"

    backend: Literal["nvml", "simulated"] = Field(
        "nvml", description="Where GPU stats come from: nvml (real GPUs) or simulated."
    )
    node: str = Field(
        "", description="Node name; empty: NODE_NAME from the downward API, else the host name."
    )
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(9400, ge=1, le=65535, description="Port to listen on.")
    poll_interval_s: float = Field(
        5.0,
        gt=0,
        le=MAX_POLL_INTERVAL_S,
        description="Seconds between two samples of the GPUs.",
    )
    gpus: int = Field(8, ge=0, le=64, description="Simulated backend: number of GPUs.")
    gpu_memory_mib: int = Field(
        81559, ge=1, le=MAX_MEMORY_MIB, description="Simulated backend: memory per GPU, in MiB."
    )
    product: str = Field(
        "NVIDIA-H100-80GB-HBM3", description="Simulated backend: GPU product name."
    )
    gpu_file: str = Field(
        "", description="Simulated backend: a YAML or JSON file describing the GPUs."
    )
    fake_gpu_dir: str = Field(
        "",
        description=(
            "nvml backend: answer NVML from this fake GPU driver directory instead of the NVIDIA "
            "driver (the test cluster's real nodes, whose fake NVIDIA runtime sets it); empty: "
            "the real driver."
        ),
    )
    kubeconfig: str = Field(
        "",
        description=(
            "Simulated backend: kubeconfig to read replica pods from, so reported memory "
            "follows placements; empty: in-cluster config if present, else none."
        ),
    )
    auth: Literal["none", "token", "tokenreview"] = Field(
        "none",
        description=(
            "Who may read the agent: none, token (a bearer token equal to the token file's "
            "content) or tokenreview (Kubernetes TokenReview)."
        ),
    )
    token_file: str = Field("", description="File holding the accepted bearer token (auth=token).")
    allowed_subjects: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "auth=tokenreview: comma-separated usernames that may read the agent, e.g. "
            "system:serviceaccount:modelfleet-system:modelfleet-operator; others get 403; "
            "empty: any authenticated identity (warned at start)."
        ),
    )
    audiences: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "auth=tokenreview: comma-separated audiences the token must be meant for, sent in "
            "the TokenReview; empty: the API server's own audience."
        ),
    )
    pod_resources_socket: str = Field(
        "/var/lib/kubelet/pod-resources/kubelet.sock",
        description=(
            "Kubelet pod-resources socket for pod attribution (nvml backend; simulated backend: "
            "the simulated node's, which the test cluster's pod runner serves); off while the "
            "socket is absent; empty: off."
        ),
    )
    pod_resources_timeout_s: float = Field(
        1.0, gt=0, le=30, description="Deadline of one kubelet pod-resources call, in seconds."
    )

    @field_validator("allowed_subjects", "audiences", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> list[str]:
        return parse_name_list(value)


class GatewaySettings(_Settings):
    """The OpenAI-compatible gateway."""

    model_config = SettingsConfigDict(env_prefix="MODELFLEET_GATEWAY_")
    doc_title: ClassVar[str] = "Gateway (`modelfleet gateway`)"

    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8080, ge=1, le=65535, description="Port to listen on.")
    namespace: str = Field("", description="Only route to ModelDeployments here; empty: all.")
    balancing: Balancing = Field(
        Balancing.ROUND_ROBIN,
        description=(
            "Default routing policy across a model's replicas: RoundRobin, LeastOutstanding, "
            "PrefixHash, LoadAware or SessionAffinity (docs/gateway.md); a ModelDeployment "
            "overrides it with spec.routing.policy (or the annotation modelfleet.io/balancing)."
        ),
    )
    prefix_chars: int = Field(
        256,
        ge=16,
        le=65536,
        description=(
            "PrefixHash: characters of the normalized prompt that choose the replica, unless "
            "spec.routing.prefixChars says otherwise."
        ),
    )
    load_factor: float = Field(
        1.25,
        ge=1.0,
        le=10.0,
        description=(
            "PrefixHash and SessionAffinity: the bound on a replica's load, as a factor of the "
            "average, beyond which a request goes to the next replica on the ring."
        ),
    )
    engine_load: bool = Field(
        False,
        description=(
            "PrefixHash and SessionAffinity: count the engine queue scraped from each "
            "replica's /metrics in its load, unless spec.routing.engineLoad says otherwise."
        ),
    )
    engine_metrics_interval_s: float = Field(
        0.5,
        ge=0.05,
        le=60,
        description=(
            "How often the replicas of models that route by engine load are scraped "
            "(GET /metrics, one at a time per replica, each bounded by this interval); figures "
            "older than three intervals are ignored."
        ),
    )
    queue_size: int = Field(
        100, ge=0, le=100000, description="Requests held per model while it scales up from zero."
    )
    cold_start_timeout_s: float = Field(
        600.0, gt=0, description="How long a held request waits for a ready replica, in seconds."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes."
    )
    max_buffered_body_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description=(
            "Most request-body bytes all requests in flight may hold together, each counted at "
            "its Content-Length (max_body_bytes without one) until it ends; a body over 64 KiB "
            "that does not fit gets 503 with Retry-After (smaller ones always fit)."
        ),
    )
    upstream_connect_timeout_s: float = Field(
        5.0, gt=0, description="Timeout to connect to a replica, in seconds."
    )
    upstream_read_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait between two bytes from a replica, in seconds."
    )
    retries: int = Field(
        2,
        ge=0,
        le=2,
        description="Retries before the first byte (connect error, bodiless 502/503).",
    )
    eject_after_failures: int = Field(
        3, ge=1, description="Consecutive failures after which a replica is skipped for a while."
    )
    last_use_interval_s: float = Field(
        30.0, gt=0, description="Shortest time between two last-use annotation writes per model."
    )
    retry_backoff_s: float = Field(
        0.025,
        ge=0,
        le=10,
        description="Pause before a retry: random up to this times 2^attempt, in seconds.",
    )
    eject_base_s: float = Field(
        2.0, gt=0, description="First time a failing replica is skipped; doubles each time."
    )
    eject_max_s: float = Field(60.0, gt=0, description="Longest time a replica is skipped.")
    retry_after_s: int = Field(
        10,
        ge=1,
        le=3600,
        description=(
            "Retry-After of a 503 while a model starts or when the connections are full, in "
            "seconds."
        ),
    )
    max_header_bytes: int = Field(
        8190, ge=1024, le=65536, description="Longest request line and header field, in bytes."
    )
    max_headers: int = Field(64, ge=8, le=1024, description="Most request headers accepted.")
    client_header_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description=(
            "Time a client has to send a whole request head, from connecting or from its first "
            "byte after an idle pause, in seconds; then 408 and the connection is closed."
        ),
    )
    client_body_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description=(
            "Time a client has to send a whole request body (all of it, not between two reads), "
            "from the end of its head, in seconds; then 408 and the connection is closed."
        ),
    )
    client_idle_timeout_s: float = Field(
        75.0,
        gt=0,
        le=86400,
        description="How long a kept-alive client connection may sit between requests, in seconds.",
    )
    max_client_connections: int = Field(
        4096,
        ge=1,
        le=1000000,
        description=(
            "Most client connections open at once; a connection over it gets 503 with "
            "Retry-After and is closed."
        ),
    )
    static_upstreams: str = Field(
        "",
        description=(
            "Fixed upstreams instead of watching the API: MODEL=http://HOST:PORT[,...] with "
            "models separated by ';' (development and benchmarks)."
        ),
    )
    kubeconfig: str = Field(
        "", description="kubeconfig file; empty: in-cluster config, else $KUBECONFIG."
    )

    @field_validator("max_buffered_body_bytes")
    @classmethod
    def _holds_one_whole_body(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("max_body_bytes")
        if largest is not None and value < largest:
            raise ValueError(
                f"must be at least max_body_bytes ({largest}): a body that big would never fit"
            )
        return value


class SimSettings(_Settings):
    """The vLLM stand-in used where no real vLLM can run (tests, `make dev`)."""

    model_config = SettingsConfigDict(env_prefix="MODELFLEET_SIM_")
    doc_title: ClassVar[str] = "vLLM stand-in (`modelfleet sim-vllm`)"

    startup_delay_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Seconds before /health answers 200 (503 until then: vLLM loading weights).",
    )
    health_fail_after_s: float = Field(
        0.0,
        ge=0,
        le=86400,
        description=(
            "Seconds after start when /health turns to 503 for good, as a hung engine does "
            "(liveness probes restart it); 0: never."
        ),
    )
    token_latency_s: float = Field(
        0.002, ge=0, le=10, description="Delay between two streamed tokens, in seconds."
    )
    request_latency_s: float = Field(
        0.0, ge=0, le=600, description="Delay before a non-streaming answer, in seconds."
    )
    fail_rate: float = Field(
        0.0, ge=0, le=1, description="Fraction of inference requests answered with fail_status."
    )
    fail_status: int = Field(503, ge=400, le=599, description="HTTP status of a simulated failure.")
    fail_body: bool = Field(
        False,
        description=(
            "Whether a simulated failure carries an OpenAI error body; without one it looks "
            "like an overloaded server (a gateway may retry it)."
        ),
    )
    embedding_dim: int = Field(
        32, ge=1, le=8192, description="Length of the vectors /v1/embeddings returns."
    )
    cost_model: Literal["", "a100-40gb-llama-3.1-8b"] = Field(
        "",
        description=(
            "Engine cost model: a100-40gb-llama-3.1-8b answers like vLLM serving "
            "Llama-3.1-8B-Instruct on one A100 40GB (continuous batching, prefill and decode "
            "time, a paged KV cache with prefix caching and preemption; docs/gateway.md). "
            "Empty: answers after the fixed delays token_latency_s and request_latency_s."
        ),
    )
    kv_cache_blocks: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description=(
            "KV-cache size of the cost model in 16-token blocks; 0: what "
            "--gpu-memory-utilization leaves on the modelled GPU after weights and activations."
        ),
    )
    gated_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated model id prefixes that are gated on the Hub (e.g. "
            "google/gemma-,meta-llama/): without HF_TOKEN the stand-in exits 1 at start with "
            "the Hub's 401, as vLLM does. Empty: no model is gated."
        ),
    )

    @field_validator("gated_models", mode="before")
    @classmethod
    def _split_gated(cls, value: Any) -> list[str]:
        return parse_name_list(value)


ALL_SETTINGS: tuple[type[_Settings], ...] = (
    OperatorSettings,
    AgentSettings,
    GatewaySettings,
    SimSettings,
)


def load(cls: type[S], **overrides: Any) -> S:
    """Read `cls` from the environment (plus overrides); raise SettingsError naming the variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            info = cls.model_fields.get(field)
            accepted = f" ({info.description})" if info and info.description else ""
            lines.append(f"{cls.env_name(field)}={err.get('input')!r}: {err['msg']}{accepted}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


def render_configuration_doc() -> str:
    """docs/configuration.md, generated from the settings classes."""
    out = [
        "# Configuration",
        "",
        "<!-- Generated by `make docs` from operator/modelfleet/settings.py. Do not edit. -->",
        "",
        "Every setting is an environment variable, read and validated once at start. A bad value",
        "stops the program with a message that names the variable and what it accepts.",
        "",
    ]
    for cls in ALL_SETTINGS:
        out += [f"## {cls.doc_title}", "", "| Variable | Default | Description |", "|---|---|---|"]
        for name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = ",".join(default)
            shown = f"`{default}`" if default not in ("", None) else "(empty)"
            out.append(f"| `{cls.env_name(name)}` | {shown} | {info.description} |")
        out.append("")
    return "\n".join(out)
