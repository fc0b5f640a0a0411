"""Dev pod runner: the kubelet's part for modelfleet pods on simulated (kwok) nodes.

On simulated nodes no container runs. This runner watches the Pods bound to them and, for each pod
that has a pod IP, starts the real program the pod stands for, bound to that IP (kwok hands out
loopback pod IPs, so they can be bound on this machine):

- agent pods (app.kubernetes.io/component=agent) run `modelfleet agent --backend simulated` with
  the node's GPUs taken from its GPU Feature Discovery labels;
- replica pods (app.kubernetes.io/component=replica) run `modelfleet sim-vllm` with the
  container's vLLM arguments.

Like a kubelet it restarts a program that exits (with backoff, counted in restartCount), kills it
when the pod goes away, and reports readiness from the pod's readinessProbe: kwok leaves replica
pods Ready=False (hack/kwok-stages.yaml) and this runner sets Ready=True only when the program
answers the probe's HTTP path, and back to False when it stops answering or dies.

It is also the nodes' device manager and device plugin (hack/simkubelet.py): it admits or refuses
every pod that asks for nvidia.com/gpu on a simulated node (kwok starts such a pod only once it is
admitted), gives it devices by the plugin's rule, and serves each node's pod-resources API on a
unix socket that the node's agent is started with (--pod-resources-socket).

    .venv/bin/python hack/pod_runner.py --kubeconfig .cluster/kubeconfig
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp

import simkubelet
from modelfleet.api.times import format_time
from modelfleet.controller.nodeusage import compute_pod_requests, parse_allocatable
from modelfleet.kube.client import ApiError, KubeClient, list_and_watch, load_kubeconfig

log = logging.getLogger("pod-runner")

LABEL_COMPONENT = "app.kubernetes.io/component"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
AGENT_DEFAULT_PORT = 9400
AGENT = "agent"
REPLICA = "replica"


class NotRunnable(ValueError):
    """The pod asks for a program but lacks what the command needs; the message says what."""


@dataclass(frozen=True)
class Probe:
    """An httpGet readiness probe, resolved to a port number."""

    path: str
    port: int
    period_s: float = 10.0
    failure_threshold: int = 3


@dataclass(frozen=True)
class Launch:
    """What to run for one pod: `<modelfleet> <argv...>` with `env`, bound to `host`."""

    uid: str
    namespace: str
    name: str
    container: str
    image: str
    kind: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    host: str
    probe: Probe | None
    grace_s: float = 5.0

    @property
    def pod_ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def _first_port(container: Mapping[str, Any], default: int | None) -> int | None:
    for port in container.get("ports") or []:
        if "containerPort" in port:
            return int(port["containerPort"])
    return default


def build_probe(container: Mapping[str, Any]) -> Probe | None:
    """The container's httpGet readiness probe with a named port resolved, or None."""
    probe = container.get("readinessProbe") or {}
    http = probe.get("httpGet")
    if not http:
        return None
    port = http.get("port")
    if isinstance(port, str) and not port.isdigit():
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        if port not in named:
            raise NotRunnable(f"readinessProbe.httpGet.port {port!r} names no container port")
        port = named[port]
    return Probe(
        path=str(http.get("path") or "/"),
        port=int(port),
        period_s=float(probe.get("periodSeconds", 10)),
        failure_threshold=int(probe.get("failureThreshold", 3)),
    )


def build_launch(
    pod: Mapping[str, Any],
    node: Mapping[str, Any],
    kubeconfig: str,
    pod_resources_dir: str | None = None,
) -> Launch:
    """The program for a pod on a simulated node: a pure mapping, raising NotRunnable if none.

    `pod_resources_dir`: where the nodes' pod-resources sockets are (the agent reads its node's).
    """
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    kind = (meta.get("labels") or {}).get(LABEL_COMPONENT)
    containers = spec.get("containers") or []
    if not containers:
        raise NotRunnable("the pod has no containers")
    container = containers[0]
    host = pod.get("status", {}).get("podIP")
    if not host:
        raise NotRunnable("the pod has no IP yet")
    env = tuple(
        (e["name"], str(e["value"]))
        for e in container.get("env") or []
        if "name" in e and e.get("value") is not None
    )
    if kind == AGENT:
        labels = node.get("metadata", {}).get("labels") or {}
        missing = [
            key
            for key in ("nvidia.com/gpu.count", "nvidia.com/gpu.memory", "nvidia.com/gpu.product")
            if key not in labels
        ]
        if missing:
            raise NotRunnable(f"node {spec.get('nodeName')} lacks the GPU labels {missing}")
        argv: tuple[str, ...] = (
            "agent",
            "--backend",
            "simulated",
            "--node",
            str(spec.get("nodeName")),
            "--host",
            host,
            "--port",
            str(_first_port(container, AGENT_DEFAULT_PORT)),
            "--gpus",
            labels["nvidia.com/gpu.count"],
            "--gpu-memory-mib",
            labels["nvidia.com/gpu.memory"],
            "--product",
            labels["nvidia.com/gpu.product"],
            "--kubeconfig",
            kubeconfig,
        )
        if pod_resources_dir is not None:
            argv += (
                "--pod-resources-socket",
                simkubelet.pod_resources_socket(pod_resources_dir, str(spec.get("nodeName"))),
            )
    elif kind == REPLICA:
        argv = ("sim-vllm", *(str(a) for a in container.get("args") or []), "--host", host)
    else:
        raise NotRunnable(f"label {LABEL_COMPONENT}={kind!r} maps to no program")
    return Launch(
        uid=str(meta.get("uid")),
        namespace=str(meta.get("namespace")),
        name=str(meta.get("name")),
        container=str(container.get("name", "")),
        image=str(container.get("image", "")),
        kind=kind,
        argv=argv,
        env=env,
        host=host,
        probe=build_probe(container),
        grace_s=float(min(spec.get("terminationGracePeriodSeconds", 5), 5)),
    )


def is_simulated(node: Mapping[str, Any]) -> bool:
    return (node.get("metadata", {}).get("annotations") or {}).get(KWOK_NODE_ANNOTATION) == "fake"


def desired_launches(
    pods: Mapping[str, Mapping[str, Any]],
    nodes: Mapping[str, Mapping[str, Any]],
    kubeconfig: str,
    pod_resources_dir: str | None = None,
) -> tuple[dict[str, Launch], dict[str, str]]:
    """Programs that should run now, by pod UID, and why other labelled pods run nothing."""
    launches: dict[str, Launch] = {}
    skipped: dict[str, str] = {}
    for uid, pod in pods.items():
        meta = pod.get("metadata", {})
        if (meta.get("labels") or {}).get(LABEL_COMPONENT) not in (AGENT, REPLICA):
            continue
        if meta.get("deletionTimestamp") or pod.get("status", {}).get("phase") != "Running":
            continue
        node = nodes.get(pod.get("spec", {}).get("nodeName", ""))
        if node is None or not is_simulated(node):
            continue
        try:
            launches[uid] = build_launch(pod, node, kubeconfig, pod_resources_dir)
        except NotRunnable as exc:
            skipped[uid] = f"{meta.get('namespace')}/{meta.get('name')}: {exc}"
    return launches, skipped


def restart_count(pod: Mapping[str, Any]) -> int:
    """The pod's current restartCount of its first container (0 if none yet)."""
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return int(statuses[0].get("restartCount", 0))


def _now() -> str:
    return format_time(datetime.now(UTC))


@dataclass(frozen=True)
class ContainerState:
    """What the runner knows about the one container of a pod."""

    ready: bool
    running: bool
    restarts: int
    started_at: str | None = None
    last_exit_code: int | None = None


def build_status_patch(launch: Launch, state: ContainerState, now: str) -> dict[str, Any]:
    """A strategic-merge patch of the pod status for this container state."""
    flag = "True" if state.ready else "False"
    reason = None if state.ready else "ContainersNotReady"
    conditions = [
        {"type": t, "status": flag, "lastTransitionTime": now}
        | ({"reason": reason} if reason else {})
        for t in ("Ready", "ContainersReady")
    ]
    status: dict[str, Any] = {
        "name": launch.container,
        "image": launch.image,
        "ready": state.ready,
        "started": state.running,
        "restartCount": state.restarts,
    }
    if state.running:
        status["state"] = {"running": {"startedAt": state.started_at or now}}
    else:
        status["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
    if state.last_exit_code is not None:
        status["lastState"] = {
            "terminated": {
                "exitCode": state.last_exit_code,
                "reason": "Completed" if state.last_exit_code == 0 else "Error",
                "finishedAt": now,
            }
        }
    return {"status": {"conditions": conditions, "containerStatuses": [status]}}


@dataclass
class RunnerOptions:
    kubeconfig: str
    command: Sequence[str]  # how to run `modelfleet`
    log_dir: Path
    max_probe_period_s: float = 1.0  # probes run at most this far apart, whatever the pod says
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    extra_env: Mapping[str, str] = field(default_factory=dict)


# The replica's volumes that its environment points into (HF_HOME=/cache/huggingface, ...): a
# program run here has no mounts, so each pod gets a directory of its own in their place, as an
# emptyDir would be.
POD_VOLUME_PATHS = ("/cache",)


def map_volume_paths(env: Mapping[str, str], root: Path) -> dict[str, str]:
    """`env` with values under the pod's volume paths moved under `root` (never the host's)."""
    out = {}
    for name, value in env.items():
        for mount in POD_VOLUME_PATHS:
            if value == mount or value.startswith(mount + "/"):
                value = str(root / mount.lstrip("/")) + value[len(mount) :]
                break
        out[name] = value
    return out


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab")


async def _probe_once(http: aiohttp.ClientSession, launch: Launch) -> bool:
    assert launch.probe is not None
    url = f"http://{launch.host}:{launch.probe.port}{launch.probe.path}"
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
            return 200 <= resp.status < 400
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def _stop_process(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM to the process group, SIGKILL after the grace period; waits for the exit."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    except asyncio.CancelledError:
        # Stopped again while stopping (the runner itself is told to stop): no grace left, and
        # a program that ignored SIGTERM must not outlive the runner.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise


class Supervisor:
    """Runs one pod's program: start, probe, report, restart with backoff, stop."""

    def __init__(
        self,
        launch: Launch,
        client: KubeClient,
        http: aiohttp.ClientSession,
        options: RunnerOptions,
        restarts: int = 0,
    ) -> None:
        self.launch = launch
        self.client = client
        self.http = http
        self.options = options
        self.restarts = restarts  # continues the pod's count when the runner itself restarts
        self._reported: ContainerState | None = None

    async def report(self, state: ContainerState) -> None:
        if state == self._reported:
            return
        path = f"/api/v1/namespaces/{self.launch.namespace}/pods/{self.launch.name}/status"
        try:
            await self.client.patch(
                path, build_status_patch(self.launch, state, _now()), kind="strategic"
            )
            self._reported = state
        except ApiError as exc:
            if not exc.not_found:  # a deleted pod needs no status
                log.warning("%s: status patch failed: %s", self.launch.pod_ref, exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The API server is away (restarting?): the next change of state reports again.
            log.warning("%s: status patch failed: %r", self.launch.pod_ref, exc)

    async def run(self) -> None:
        backoff = self.options.backoff_initial_s
        last_exit: int | None = None
        while True:
            try:
                proc, started_at = await self._start()
            except OSError as exc:
                # A command that cannot start at all (bad --modelfleet) is retried like a crash.
                log.error("%s: cannot start %s: %s", self.launch.pod_ref, self.launch.kind, exc)
                became_ready, last_exit = False, 127
            else:
                try:
                    became_ready = await self._watch(proc, started_at, last_exit)
                finally:
                    await _stop_process(proc, self.launch.grace_s)
                last_exit = proc.returncode
            self.restarts += 1
            log.warning(
                "%s: %s exited with %s; restart %d in %.1fs",
                self.launch.pod_ref,
                self.launch.kind,
                last_exit,
                self.restarts,
                backoff,
            )
            await self.report(
                ContainerState(
                    ready=False, running=False, restarts=self.restarts, last_exit_code=last_exit
                )
            )
            await asyncio.sleep(backoff)
            backoff = (
                self.options.backoff_initial_s
                if became_ready
                else min(backoff * 2, self.options.backoff_max_s)
            )

    async def _start(self) -> tuple[asyncio.subprocess.Process, str]:
        launch = self.launch
        logfile = _open_log(self.options.log_dir / f"{launch.namespace}_{launch.name}.log")
        volumes = self.options.log_dir / "volumes" / f"{launch.namespace}_{launch.name}"
        try:
            pod_env = map_volume_paths(dict(launch.env), volumes)
            env = {**os.environ, **self.options.extra_env, **pod_env}
            argv = [*self.options.command, *launch.argv]
            log.info("%s: starting %s", launch.pod_ref, shlex.join(argv))
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stopping it stops its children
            )
        finally:
            logfile.close()
        return proc, _now()

    async def _watch(
        self, proc: asyncio.subprocess.Process, started_at: str, last_exit: int | None
    ) -> bool:
        """Probe while the process runs; returns whether it was ever ready."""
        probe = self.launch.probe
        ever_ready = False
        failures = 0
        state = ContainerState(
            ready=probe is None,
            running=True,
            restarts=self.restarts,
            started_at=started_at,
            last_exit_code=last_exit,
        )
        await self.report(state)
        ever_ready = state.ready
        exited = asyncio.ensure_future(proc.wait())
        try:
            while not exited.done():
                if probe is not None:
                    ok = await _probe_once(self.http, self.launch)
                    if exited.done():
                        break
                    failures = 0 if ok else failures + 1
                    ready = ok or (state.ready and failures < probe.failure_threshold)
                    if ready != state.ready:
                        state = ContainerState(
                            ready=ready,
                            running=True,
                            restarts=self.restarts,
                            started_at=started_at,
                            last_exit_code=last_exit,
                        )
                        log.info("%s: ready=%s", self.launch.pod_ref, ready)
                        await self.report(state)
                    ever_ready = ever_ready or ready
                    # Poll fast until ready (a replica's start is what tests wait for), then at the
                    # pod's period, capped so a dead endpoint is noticed quickly.
                    period = min(probe.period_s, self.options.max_probe_period_s)
                    delay = period if state.ready else min(0.2, period)
                else:
                    delay = 3600.0
                await asyncio.wait({exited}, timeout=delay)
        finally:
            if not exited.done():
                exited.cancel()
        return ever_ready


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s: supervisor failed", task.get_name(), exc_info=task.exception())


class Runner:
    """Keeps one Supervisor per pod that should run, from the watched pods and nodes."""

    def __init__(self, client: KubeClient, http: aiohttp.ClientSession, options: RunnerOptions):
        self.client = client
        self.http = http
        self.options = options
        self.pods: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, tuple[Launch, asyncio.Task[None]]] = {}
        self.pod_resources = simkubelet.PodResourcesServers()
        self._skipped: dict[str, str] = {}
        self._changed = asyncio.Event()

    async def _watch_nodes(self) -> None:
        async for kind, obj in list_and_watch(self.client, "/api/v1/nodes"):
            if kind == "SYNC":
                self.nodes = {i["metadata"]["name"]: i for i in obj.get("items", [])}
            elif kind == "DELETED":
                self.nodes.pop(obj["metadata"]["name"], None)
            else:
                self.nodes[obj["metadata"]["name"]] = obj
            self._changed.set()

    async def _watch_pods(self) -> None:
        async for kind, obj in list_and_watch(
            self.client, "/api/v1/pods", fieldSelector="spec.nodeName!="
        ):
            if kind == "SYNC":
                self.pods = {i["metadata"]["uid"]: i for i in obj.get("items", [])}
            elif kind == "DELETED":
                self.pods.pop(obj["metadata"]["uid"], None)
            else:
                self.pods[obj["metadata"]["uid"]] = obj
            self._changed.set()

    def _simulated_nodes(self) -> dict[str, dict[str, Any]]:
        return {name: node for name, node in self.nodes.items() if is_simulated(node)}

    def _pods_on(self, node: str) -> list[dict[str, Any]]:
        return [p for p in self.pods.values() if p.get("spec", {}).get("nodeName") == node]

    async def admit(self) -> None:
        """Admit or refuse every GPU pod waiting on a simulated node, oldest first per node.

        The next pod's decision counts the devices this one took at once, without waiting for
        the watch to bring the annotation.
        """
        for name, node in self._simulated_nodes().items():
            pods = self._pods_on(name)
            waiting = simkubelet.admission_order(pods)
            if not waiting:
                continue
            devices = simkubelet.node_devices(node)
            in_use = simkubelet.compute_in_use(pods)
            allocatable = parse_allocatable(node)
            used = simkubelet.compute_used(pods)
            for pod in waiting:
                decision = simkubelet.compute_admission(pod, devices, in_use, allocatable, used)
                updated = await self._apply_admission(pod, decision)
                if updated is None:
                    continue
                uid = updated["metadata"]["uid"]
                # Unless the watch already brought this change or a later one (kwok may have
                # started the pod while the patch was answered): never step back to older state.
                if self.pods.get(uid) is pod:
                    self.pods[uid] = updated
                if isinstance(decision, simkubelet.Admitted):
                    for ids in decision.assignment.values():
                        in_use.update(ids)
                    used = used + compute_pod_requests(pod.get("spec") or {})

    async def _apply_admission(
        self, pod: Mapping[str, Any], decision: simkubelet.Admitted | simkubelet.Rejected
    ) -> dict[str, Any] | None:
        meta = pod["metadata"]
        ref = f"{meta['namespace']}/{meta['name']}"
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        try:
            if isinstance(decision, simkubelet.Admitted):
                updated = await self.client.patch(
                    path, simkubelet.build_admit_patch(pod, decision.assignment)
                )
                log.info("%s: admitted on %s with %s", ref, pod["spec"]["nodeName"],
                         simkubelet.format_assignment(decision.assignment))  # fmt: skip
                return dict(updated)
            updated = await self.client.patch(
                path + "/status", simkubelet.build_reject_patch(decision)
            )
            log.warning("%s: rejected: %s", ref, decision.message)
            with contextlib.suppress(ApiError, aiohttp.ClientError, TimeoutError):
                await self.client.create(
                    f"/api/v1/namespaces/{meta['namespace']}/events",
                    simkubelet.build_reject_event(pod, decision, _now()),
                )
            return dict(updated)
        except ApiError as exc:
            # Gone, or changed since we saw it (409): the watch brings its new state, decided then.
            if not (exc.not_found or exc.status == 409):
                log.warning("%s: admission patch failed: %s", ref, exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s: admission patch failed: %r", ref, exc)
        return None

    async def sync_nodes(self) -> None:
        """Serve each simulated node's pod-resources and keep its nvidia.com/gpu capacity and
        allocatable at what its device plugin advertises, as the kubelet does."""
        simulated = self._simulated_nodes()
        for name in self.pod_resources.nodes:
            if name not in simulated:
                await asyncio.to_thread(self.pod_resources.drop, name)
        for name, node in simulated.items():
            self.pod_resources.ensure(name)
            self.pod_resources.entries[name] = simkubelet.build_pod_resources(self._pods_on(name))
            if simkubelet.node_gpu_count(node) is None:
                continue
            count = str(len(simkubelet.advertised_indexes(node)))
            status = node.get("status") or {}
            current = (
                (status.get("capacity") or {}).get(simkubelet.GPU_RESOURCE),
                (status.get("allocatable") or {}).get(simkubelet.GPU_RESOURCE),
            )
            if current == (count, count):
                continue
            gpus = {simkubelet.GPU_RESOURCE: count}
            try:
                updated = await self.client.patch(
                    f"/api/v1/nodes/{name}/status",
                    {"status": {"capacity": gpus, "allocatable": gpus}},
                )
                if self.nodes.get(name) is node:  # never step back to older state
                    self.nodes[name] = dict(updated)
                log.info("node %s: the device plugin advertises %s GPU(s)", name, count)
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("node %s: status patch failed: %s", name, exc)

    async def reconcile(self) -> None:
        await self.admit()
        await self.sync_nodes()
        desired, skipped = desired_launches(
            self.pods, self.nodes, self.options.kubeconfig, self.pod_resources.directory
        )
        for uid, reason in skipped.items():
            if self._skipped.get(uid) != reason:
                log.warning("not running %s", reason)
        self._skipped = skipped
        stale = [uid for uid, (launch, _) in self.tasks.items() if desired.get(uid) != launch]
        await self.stop(stale)
        for uid, launch in desired.items():
            if uid not in self.tasks:
                supervisor = Supervisor(
                    launch, self.client, self.http, self.options, restart_count(self.pods[uid])
                )
                task = asyncio.create_task(supervisor.run(), name=launch.pod_ref)
                task.add_done_callback(_log_crash)
                self.tasks[uid] = (launch, task)

    async def stop(self, uids: Sequence[str]) -> None:
        tasks = []
        for uid in uids:
            launch, task = self.tasks.pop(uid)
            log.info("%s: pod gone, stopping %s", launch.pod_ref, launch.kind)
            task.cancel()
            tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self) -> None:
        watchers = [
            asyncio.create_task(self._watch_nodes()),
            asyncio.create_task(self._watch_pods()),
        ]
        try:
            while True:
                changed = asyncio.ensure_future(self._changed.wait())
                done, _ = await asyncio.wait(
                    {changed, *watchers}, return_when=asyncio.FIRST_COMPLETED
                )
                for watcher in watchers:
                    if watcher in done:  # list_and_watch never ends: this is a bug, say so
                        changed.cancel()
                        watcher.result()
                        raise RuntimeError("a watch ended unexpectedly")
                self._changed.clear()
                await self.reconcile()
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await self.stop(list(self.tasks))
            await asyncio.to_thread(self.pod_resources.close)


async def run_runner(options: RunnerOptions) -> None:
    """Run until cancelled or signalled; every started program is stopped before returning."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    config = load_kubeconfig(options.kubeconfig)
    async with (
        KubeClient(config, timeout_s=15, user_agent="modelfleet-pod-runner") as client,
        aiohttp.ClientSession() as http,
    ):
        log.info("watching pods on simulated nodes (kubeconfig %s)", options.kubeconfig)
        with contextlib.suppress(asyncio.CancelledError):
            await Runner(client, http, options).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kubeconfig", default=".cluster/kubeconfig", help="default: .cluster/kubeconfig"
    )
    parser.add_argument(
        "--modelfleet",
        default=shlex.join([sys.executable, "-m", "modelfleet"]),
        help="command that runs the modelfleet CLI (default: this Python with -m modelfleet)",
    )
    parser.add_argument(
        "--log-dir", default=".cluster/pod-logs", help="one log file per pod (default: %(default)s)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s pod-runner %(levelname)s %(message)s",
    )
    kubeconfig = str(Path(args.kubeconfig).resolve())
    if not Path(kubeconfig).is_file():
        parser.error(f"kubeconfig {kubeconfig} does not exist: run `make cluster-up` first")
    options = RunnerOptions(
        kubeconfig=kubeconfig,
        command=shlex.split(args.modelfleet),
        log_dir=Path(args.log_dir).resolve(),
    )
    asyncio.run(run_runner(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
