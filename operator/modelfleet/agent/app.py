"""The agent's composition root: backend, poll loop, pod watch, auth and server, wired once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field

from aiohttp import web

from modelfleet.agent.auth import Authenticator, TokenFileAuth, TokenReviewAuth
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.nvml import NvmlBackend
from modelfleet.agent.podresources import PodAttribution, PodResourcesClient
from modelfleet.agent.server import build_app, build_runner
from modelfleet.agent.simulated import (
    GpuFileError,
    SimulatedBackend,
    build_sim_gpus,
    load_gpu_file,
)
from modelfleet.agent.state import AgentState, Backend, run_poll_loop
from modelfleet.fakegpu.fakenvml import build_fake_pynvml
from modelfleet.gpuid import validate_node_name
from modelfleet.kube import (
    ClusterConfig,
    KubeClient,
    KubeConfigError,
    list_and_watch,
    load_incluster,
    load_kubeconfig,
    pods_path,
)
from modelfleet.settings import AgentSettings

log = logging.getLogger(__name__)


class AgentConfigError(ValueError):
    """A setting cannot be used; the message names it (flag and variable)."""


def resolve_node_name(configured: str, env: dict[str, str] | None = None) -> str:
    """--node, else NODE_NAME (downward API), else the host name; must be a node name."""
    env = dict(os.environ) if env is None else env
    name = configured or env.get("NODE_NAME", "") or socket.gethostname().lower()
    validate_node_name(name)
    return name


def load_cluster(settings: AgentSettings) -> ClusterConfig | None:
    """--kubeconfig if set (must work), else in-cluster config if present, else None."""
    if settings.kubeconfig:
        try:
            return load_kubeconfig(settings.kubeconfig)
        except (KubeConfigError, OSError, KeyError, ValueError) as exc:
            raise AgentConfigError(
                f"--kubeconfig / MODELFLEET_AGENT_KUBECONFIG={settings.kubeconfig!r}: {exc}"
            ) from None
    try:
        return load_incluster()
    except KubeConfigError:
        return None


def build_authenticator(
    settings: AgentSettings, cluster: ClusterConfig | None, client: KubeClient | None
) -> Authenticator | None:
    if settings.auth != "tokenreview" and (settings.allowed_subjects or settings.audiences):
        log.warning(
            "--allowed-subjects and --audiences apply to --auth tokenreview only; with --auth %s "
            "they are ignored",
            settings.auth,
        )
    if settings.auth == "none":
        return None
    if settings.auth == "token":
        if not settings.token_file:
            raise AgentConfigError(
                "--auth token needs --token-file (MODELFLEET_AGENT_TOKEN_FILE): the file holding "
                "the accepted bearer token"
            )
        try:
            return TokenFileAuth(settings.token_file)
        except (OSError, ValueError) as exc:
            raise AgentConfigError(
                f"--token-file / MODELFLEET_AGENT_TOKEN_FILE={settings.token_file!r}: {exc}"
            ) from None
    if client is None:
        raise AgentConfigError(
            "--auth tokenreview needs the Kubernetes API: run in a cluster or pass --kubeconfig"
        )
    if not settings.allowed_subjects:
        log.warning(
            "--auth tokenreview without --allowed-subjects (MODELFLEET_AGENT_ALLOWED_SUBJECTS): "
            "any identity the API server authenticates may read this agent; list the "
            "operator's service account, e.g. "
            "system:serviceaccount:modelfleet-system:modelfleet-operator"
        )
    return TokenReviewAuth(
        client,
        audiences=tuple(settings.audiences),
        allowed_subjects=frozenset(settings.allowed_subjects),
    )


@dataclass
class Agent:
    """Everything one running agent owns; `start` and `stop` bracket its life."""

    settings: AgentSettings
    node: str
    backend: Backend
    state: AgentState
    app: web.Application
    client: KubeClient | None = None
    attribution: PodAttribution | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        if isinstance(self.backend, NvmlBackend):
            await self.backend.start()
        self.tasks.append(asyncio.create_task(run_poll_loop(self.backend, self.state)))
        if isinstance(self.backend, SimulatedBackend) and self.client is not None:
            self.tasks.append(
                asyncio.create_task(watch_node_pods(self.client, self.backend, self.state))
            )
            self.tasks.append(
                asyncio.create_task(watch_own_node(self.client, self.backend, self.state))
            )
        self.runner = build_runner(self.app, shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.runner is not None:
            await self.runner.cleanup()
        if isinstance(self.backend, NvmlBackend):
            await self.backend.close()
        if self.attribution is not None:
            await asyncio.to_thread(self.attribution.close)
        if self.client is not None:
            await self.client.close()


async def watch_node_pods(client: KubeClient, backend: SimulatedBackend, state: AgentState) -> None:
    """Keep the simulated backend's cache of this node's pods (all of them: a foreign pod may
    hold a GPU too) level with the API; re-sample on every change."""
    async for kind, obj in list_and_watch(
        client, pods_path(), fieldSelector=f"spec.nodeName={backend.node}"
    ):
        backend.apply_pod_event(kind, obj)
        state.wake.set()


async def watch_own_node(client: KubeClient, backend: SimulatedBackend, state: AgentState) -> None:
    """Follow this node's annotations, the simulated backend's node fault knobs."""
    async for kind, obj in list_and_watch(
        client, "/api/v1/nodes", fieldSelector=f"metadata.name={backend.node}"
    ):
        items = obj.get("items", []) if kind == "SYNC" else [] if kind == "DELETED" else [obj]
        backend.apply_node(items[0] if items else {})
        state.wake.set()


def build_backend(
    settings: AgentSettings,
    node: str,
    metrics: AgentMetrics,
    attribution: PodAttribution | None = None,
) -> tuple[Backend, SimulatedBackend | None]:
    """The configured backend (and the simulated one again, for its fault knobs).

    Reads files once at start, before anything is served.
    """
    if settings.backend == "simulated":
        if settings.gpu_file:
            try:
                gpus = load_gpu_file(settings.gpu_file, node)
            except GpuFileError as exc:
                raise AgentConfigError(f"--gpu-file / MODELFLEET_AGENT_GPU_FILE: {exc}") from None
        else:
            gpus = build_sim_gpus(node, settings.gpus, settings.gpu_memory_mib, settings.product)
        sim = SimulatedBackend(
            node,
            gpus,
            pods_by_device=attribution.refresh_blocking if attribution is not None else None,
            pod_resources_socket=attribution.socket_path if attribution is not None else "",
        )
        return sim, sim
    pods_by_device = attribution.refresh_blocking if attribution is not None else None
    if settings.fake_gpu_dir:
        # The NVML code path of a GPU node, answered from the fake driver directory.
        backend = NvmlBackend(
            node,
            nvml=build_fake_pynvml(settings.fake_gpu_dir),
            on_gpu_error=metrics.gpu_errors.inc,
            on_field_error=metrics.count_field_error,
            on_reinit=metrics.count_reinit,
            pods_by_device=pods_by_device,
            name="fake-driver",
        )
        return backend, None
    backend = NvmlBackend(
        node,
        on_gpu_error=metrics.gpu_errors.inc,
        on_field_error=metrics.count_field_error,
        on_reinit=metrics.count_reinit,
        pods_by_device=pods_by_device,
    )
    return backend, None


def build_attribution(settings: AgentSettings, metrics: AgentMetrics) -> PodAttribution | None:
    """The kubelet pod-resources source; None when switched off (empty path).

    A configured socket that is absent is not an error: attribution stays off until it appears
    (the simulated backend then charges the GPUs the operator annotated).
    """
    if not settings.pod_resources_socket:
        return None
    return PodAttribution(
        PodResourcesClient(
            settings.pod_resources_socket, deadline_s=settings.pod_resources_timeout_s
        ),
        on_error=metrics.pod_resources_errors.inc,
    )


async def build_agent(settings: AgentSettings, node: str) -> Agent:
    """Wire the agent from settings; raises AgentConfigError naming a bad setting."""
    metrics = AgentMetrics()
    cluster = None
    client = None
    if settings.backend == "simulated" or settings.auth == "tokenreview":
        cluster = load_cluster(settings)
        if cluster is not None:
            client = KubeClient(cluster, timeout_s=10.0, user_agent="modelfleet-agent")
    try:
        auth = build_authenticator(settings, cluster, client)
        attribution = build_attribution(settings, metrics)
        backend, sim = build_backend(settings, node, metrics, attribution)
    except AgentConfigError:
        if client is not None:
            await client.close()
        raise
    state = AgentState(
        node=node,
        backend=backend.name,
        poll_interval_s=settings.poll_interval_s,
        metrics=metrics,
    )
    metrics.attach(lambda: state.latest)
    app = build_app(state, auth=auth, sim=sim)
    return Agent(
        settings=settings,
        node=node,
        backend=backend,
        state=state,
        app=app,
        client=client,
        attribution=attribution,
    )


async def serve(agent: Agent) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    log.info(
        "agent for node %s (%s backend) listening on %s:%d",
        agent.node,
        agent.backend.name,
        agent.settings.host,
        agent.port,
    )
    try:
        await stop.wait()
    finally:
        await agent.stop()
