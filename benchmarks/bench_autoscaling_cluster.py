"""The built-in autoscaler end to end on the local control plane.

Real kube-apiserver (hack/cluster.sh, kwok nodes), the real `modelfleet operator` and `modelfleet
gateway` processes, and calibrated vLLM stand-ins (`MODELFLEET_SIM_COST_MODEL=a100-40gb-llama-
3.1-8b`: continuous batching, prefill and decode time, a paged KV cache) started by the pod
runner for each replica Pod on four private one-GPU nodes. Load is closed-loop users, each
streaming one chat completion after another through the gateway (bounded in count and time), all
on loopback. Two parts, side by side in one run:

1. **Ramp.** 1 -> 2 -> 4 -> 2 -> 1 replicas' worth of users (target 8 requests per replica),
   once with the autoscaler (minReplicas 1, maxReplicas 4, scale-down window 20 s) and once
   with a static deployment of 4 replicas. Figures: seconds from each load step up to enough
   Ready replicas; TTFT p50/p99 over the whole ramp; changes of spec.replicas after a level's
   count was reached (flaps under steady load, goal 0); GPU-seconds (replica Pods that hold a
   GPU, integrated over the ramp).
2. **Opposite waves.** Two autoscaled models of one priority (1..3 replicas each, floor 1) on
   the four GPUs, which cannot hold both at peak; the load moves from one to the other three
   times. Figures: evictions per wave and in which direction (towards the loaded model, or
   back), and the fewest Ready replicas either model had at any sample (floor 1).

Each replica's stand-in takes STARTUP_S to load (a real vLLM takes a minute or more: the time to
Ready here is the operator's and the autoscaler's part, not vLLM's). Everything runs on this
machine's few shared cores; the figures are for comparing the two deployments in one run.

    make bench-autoscaling-cluster
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from autoscale_kit import evictions, evictions_since  # noqa: E402
from clusterkit import CLUSTER_SH, KUBECONFIG, Cluster  # noqa: E402
from operator_kit import (  # noqa: E402
    Operators,
    agent_daemonset,
    create_test_nodes,
    delete_test_nodes,
    md,
    pod_ready,
    start_gateway,
    start_pod_runner,
)

from modelfleet.kube.client import ApiError, KubeClient, load_kubeconfig  # noqa: E402
from modelfleet.kube.paths import md_path, pods_path  # noqa: E402

COST_MODEL = "a100-40gb-llama-3.1-8b"
TARGET = 8  # requests per replica
STARTUP_S = 5.0
NODES = 4
MAX_TOKENS = 48
PROMPT_WORDS = 120
LEVELS = (1, 2, 4, 2, 1)  # replicas' worth of users per step


def engine_env() -> list[dict[str, str]]:
    return [
        {"name": "MODELFLEET_SIM_COST_MODEL", "value": COST_MODEL},
        {"name": "MODELFLEET_SIM_STARTUP_DELAY_S", "value": str(STARTUP_S)},
    ]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# --- what the cluster shows, sampled ------------------------------------------------------------


@dataclass
class Sample:
    at: float
    spec: dict[str, int]
    holding: dict[str, int]  # replica Pods that hold a GPU (starting, Ready or terminating)
    ready: dict[str, int]


@dataclass
class Sampler:
    kube: KubeClient
    namespace: str
    names: tuple[str, ...]
    samples: list[Sample] = field(default_factory=list)

    async def run(self, every_s: float = 0.5) -> None:
        while True:
            pods = (await self.kube.list(pods_path(self.namespace)))["items"]
            spec: dict[str, int] = {}
            for name in self.names:
                with contextlib.suppress(ApiError):
                    spec[name] = int(
                        (await self.kube.get(md_path(self.namespace, name)))["spec"]["replicas"]
                    )
            holding = dict.fromkeys(self.names, 0)
            ready = dict.fromkeys(self.names, 0)
            for pod in pods:
                dep = (pod["metadata"].get("labels") or {}).get("modelfleet.io/deployment")
                if dep not in holding or (pod.get("status") or {}).get("phase") in (
                    "Succeeded",
                    "Failed",
                ):
                    continue
                holding[dep] += 1
                if pod_ready(pod) and not pod["metadata"].get("deletionTimestamp"):
                    ready[dep] += 1
            self.samples.append(Sample(time.monotonic(), spec, holding, ready))
            await asyncio.sleep(every_s)

    def gpu_seconds(self, name: str, start: float, end: float) -> float:
        total = 0.0
        window = [s for s in self.samples if start <= s.at <= end]
        for a, b in itertools.pairwise(window):
            total += a.holding[name] * (b.at - a.at)
        return total

    def first_ready(self, name: str, count: int, start: float, end: float) -> float | None:
        for s in self.samples:
            if start <= s.at <= end and s.ready[name] >= count:
                return s.at - start
        return None

    def flaps(self, name: str, level: int, start: float, end: float) -> int:
        """Changes of spec.replicas in [start, end) after it first equals `level`."""
        window = [s.spec.get(name) for s in self.samples if start <= s.at < end]
        try:
            first = window.index(level)
        except ValueError:
            return 0
        rest = window[first:]
        return sum(1 for a, b in itertools.pairwise(rest) if a != b)


# --- load: closed-loop users through the gateway ------------------------------------------------


@dataclass
class Users:
    """Users that each send one streamed chat completion after another while they are wanted."""

    http: aiohttp.ClientSession
    url: str
    model: str
    deadline: float
    max_requests: int
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (when, seconds)
    failed: int = 0
    sent: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopped: list[asyncio.Task[None]] = field(default_factory=list)

    def set_count(self, count: int) -> None:
        while len(self.tasks) < count:
            self.tasks.append(asyncio.create_task(self._user(len(self.tasks))))
        while len(self.tasks) > count:
            task = self.tasks.pop()
            task.cancel()
            self.stopped.append(task)

    async def stop(self) -> None:
        self.set_count(0)
        await asyncio.gather(*self.stopped, return_exceptions=True)

    async def _user(self, index: int) -> None:
        rng = random.Random(f"{self.model}-{index}-{time.monotonic()}")
        while time.monotonic() < self.deadline and self.sent < self.max_requests:
            self.sent += 1
            prompt = " ".join(f"w{rng.randrange(1 << 30):x}" for _ in range(PROMPT_WORDS))
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": MAX_TOKENS,
                "stream": True,
            }
            started = time.perf_counter()
            first: float | None = None
            try:
                async with self.http.post(f"{self.url}/v1/chat/completions", json=body) as resp:
                    if resp.status != 200:
                        await resp.read()
                        self.failed += 1
                        await asyncio.sleep(0.5)
                        continue
                    async for _ in resp.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - started
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.failed += 1
                await asyncio.sleep(0.5)
                continue
            if first is not None:
                self.ttft.append((time.monotonic(), first))


# --- the setup, reusing the integration tier's kit ----------------------------------------------


@dataclass
class World:
    kube: KubeClient
    namespace: str
    gateway_url: str
    http: aiohttp.ClientSession


async def wait_for(check: Any, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"bench-autoscaling-cluster: timed out waiting for {what}")


async def ready(kube: KubeClient, namespace: str, name: str) -> int:
    pods = (
        await kube.list(pods_path(namespace), labelSelector=f"modelfleet.io/deployment={name}")
    )["items"]
    return sum(1 for p in pods if pod_ready(p) and not p["metadata"].get("deletionTimestamp"))


async def routed(world: World, *names: str) -> None:
    async def check() -> bool:
        async with world.http.get(f"{world.gateway_url}/gateway/status") as resp:
            active = (await resp.json())["active_models_by_id"]
        return all(active.get(n) for n in names)

    await wait_for(check, 60, f"the gateway routing to {', '.join(names)}")


async def remove(world: World, name: str) -> None:
    with contextlib.suppress(ApiError):
        await world.kube.delete(md_path(world.namespace, name))

    async def gone() -> bool:
        pods = await world.kube.list(
            pods_path(world.namespace), labelSelector=f"modelfleet.io/deployment={name}"
        )
        return not pods["items"]

    await wait_for(gone, 90, f"the replica Pods of {name} gone")


# --- part 1: the ramp ---------------------------------------------------------------------------


@dataclass
class RampResult:
    step_to_ready_s: list[float]
    ttft_p50_ms: float
    ttft_p99_ms: float
    flaps: int
    gpu_s: float
    duration_s: float
    requests: int
    failed: int


async def ramp(world: World, name: str, autoscaled: bool, step_s: float) -> RampResult:
    spec: dict[str, Any] = {
        "replicas": 1 if autoscaled else max(LEVELS),
        "engine": {"env": engine_env()},
    }
    if autoscaled:
        spec["autoscaling"] = {
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": max(LEVELS),
            "targetPerReplica": TARGET,
            "scaleDownWindow": "20s",
        }
    await world.kube.create(md_path(world.namespace), md(name, **spec))
    want = spec["replicas"]

    async def up() -> bool:
        return await ready(world.kube, world.namespace, name) == want

    await wait_for(up, 120, f"{name}: {want} Ready replicas")
    await routed(world, name)
    sampler = Sampler(world.kube, world.namespace, (name,))
    sampling = asyncio.create_task(sampler.run())
    total_s = step_s * len(LEVELS)
    users = Users(
        world.http,
        world.gateway_url,
        name,
        deadline=time.monotonic() + total_s + 5,
        max_requests=20_000,
    )
    starts: list[float] = []
    start = time.monotonic()
    for level in LEVELS:
        starts.append(time.monotonic())
        users.set_count(level * TARGET)
        await asyncio.sleep(step_s)
    end = time.monotonic()
    await users.stop()
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    steps: list[float] = []
    flaps = 0
    for i, level in enumerate(LEVELS):
        window_end = starts[i + 1] if i + 1 < len(LEVELS) else end
        if i > 0 and level > LEVELS[i - 1]:
            took = sampler.first_ready(name, level, starts[i], window_end)
            steps.append(took if took is not None else float("inf"))
        if autoscaled:
            flaps += sampler.flaps(name, level, starts[i], window_end)
    ttfts = [t for _, t in users.ttft]
    result = RampResult(
        step_to_ready_s=steps,
        ttft_p50_ms=percentile(ttfts, 50) * 1000,
        ttft_p99_ms=percentile(ttfts, 99) * 1000,
        flaps=flaps,
        gpu_s=sampler.gpu_seconds(name, start, end),
        duration_s=end - start,
        requests=len(ttfts),
        failed=users.failed,
    )
    await remove(world, name)
    return result


# --- part 2: opposite waves ---------------------------------------------------------------------


@dataclass
class WaveResult:
    loaded: str
    towards: int  # the idle model's replica Pods evicted for the loaded one
    back: int  # the loaded model's replica Pods evicted (goal 0)
    events: int  # eviction Events (a Pod evicted again while it terminates counts again)
    victims: tuple[str, ...]
    grew_s: float | None  # from the start of the wave to 3 Ready replicas of the loaded model


async def waves(world: World, count: int) -> tuple[list[WaveResult], dict[str, int]]:
    names = ("alpha", "beta")
    for name in names:
        await world.kube.create(
            md_path(world.namespace),
            md(
                name,
                replicas=1,
                minReplicas=1,
                engine={"env": engine_env()},
                autoscaling={
                    "enabled": True,
                    "minReplicas": 1,
                    "maxReplicas": 3,
                    "targetPerReplica": TARGET,
                    "scaleDownWindow": "10m",
                },
            ),
        )
    for name in names:

        async def one(name: str = name) -> bool:
            return await ready(world.kube, world.namespace, name) == 1

        await wait_for(one, 120, f"{name}: 1 Ready replica")
    await routed(world, *names)
    sampler = Sampler(world.kube, world.namespace, names)
    sampling = asyncio.create_task(sampler.run(0.3))
    results = []
    for i in range(count):
        loaded, idle = ("beta", "alpha") if i % 2 == 0 else ("alpha", "beta")
        before = await evictions(world.kube, world.namespace)
        started = time.monotonic()
        users = Users(
            world.http, world.gateway_url, loaded, deadline=started + 150, max_requests=20_000
        )
        users.set_count(3 * TARGET)
        grew: float | None = None
        while time.monotonic() - started < 120:
            if await ready(world.kube, world.namespace, loaded) >= 3:
                grew = time.monotonic() - started
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(10)  # load stays on: nothing may be taken back
        await users.stop()
        after = await evictions(world.kube, world.namespace)
        made = evictions_since(before, after)
        results.append(
            WaveResult(
                loaded,
                towards=len({pod for victim, pod, by, _ in made if (victim, by) == (idle, loaded)}),
                back=len({pod for victim, pod, _, _ in made if victim == loaded}),
                events=sum(n for *_, n in made),
                victims=tuple(sorted({f"{pod} (by {by})" for _, pod, by, _ in made})),
                grew_s=grew,
            )
        )
        # The loaded model's requests end before the next wave starts.
        await asyncio.sleep(MAX_TOKENS * 0.05)
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    lowest = {n: min(s.ready[n] for s in sampler.samples) for n in names}
    for name in names:
        await remove(world, name)
    return results, lowest


# --- main ---------------------------------------------------------------------------------------


def cluster_up() -> bool:
    """Start the local control plane (simulated nodes only) unless it is up; True if started."""
    if subprocess.run([str(CLUSTER_SH), "status"], capture_output=True).returncode == 0:
        return False
    print(
        "starting the local control plane (hack/cluster.sh up, simulated nodes only)...", flush=True
    )
    subprocess.run(
        [str(CLUSTER_SH), "up"], check=True, env={**os.environ, "REAL_NODES": "0"}, timeout=1500
    )
    return True


@contextlib.contextmanager
def runner(cluster: Cluster, tmp: Path) -> Iterator[None]:
    gen = start_pod_runner(cluster, tmp)
    next(gen)
    try:
        yield
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)


async def run(args: argparse.Namespace, tmp: Path) -> str:
    cluster = Cluster(kubeconfig=KUBECONFIG, bin_dir=ROOT)
    namespace = f"bench-autoscaling-{uuid.uuid4().hex[:8]}"
    async with KubeClient(load_kubeconfig(KUBECONFIG), timeout_s=30) as kube:
        await kube.create("/api/v1/namespaces", {"metadata": {"name": namespace}})

        async def account() -> bool:
            try:
                await kube.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
            except ApiError:
                return False
            return True

        await wait_for(account, 30, "the namespace's default service account")
        operators = Operators(cluster, namespace, tmp)
        gateway = None
        try:
            with runner(cluster, tmp):
                await create_test_nodes(kube, namespace, NODES, 1)
                await kube.create(
                    f"/apis/apps/v1/namespaces/{namespace}/daemonsets", agent_daemonset(namespace)
                )

                async def agents() -> bool:
                    pods = await kube.list(
                        pods_path(namespace), labelSelector="app.kubernetes.io/component=agent"
                    )
                    return sum(pod_ready(p) for p in pods["items"]) == NODES

                await wait_for(agents, 60, f"{NODES} agents Ready")
                operators.start()
                gateway = start_gateway(cluster, namespace, tmp)
                timeout = aiohttp.ClientTimeout(total=120)
                async with aiohttp.ClientSession(timeout=timeout) as http:

                    async def healthy() -> bool:
                        with contextlib.suppress(aiohttp.ClientError, OSError):
                            async with http.get(f"{gateway.url}/healthz") as resp:
                                return bool(resp.status == 200)
                        return False

                    await wait_for(healthy, 30, "the gateway")
                    world = World(kube, namespace, gateway.url, http)
                    print(f"ramp, autoscaled ({args.step_s:g} s per step)...", flush=True)
                    auto = await ramp(world, "ramp-auto", True, args.step_s)
                    print("ramp, static at maxReplicas...", flush=True)
                    static = await ramp(world, "ramp-static", False, args.step_s)
                    print(f"opposite waves ({args.waves})...", flush=True)
                    wave_results, lowest = await waves(world, args.waves)
        finally:
            if gateway is not None:
                gateway.stop()
            operators.stop_all()
            await delete_test_nodes(kube, namespace)
            with contextlib.suppress(ApiError):
                await kube.delete(f"/api/v1/namespaces/{namespace}", propagationPolicy="Background")
    return report(auto, static, wave_results, lowest)


def report(
    auto: RampResult, static: RampResult, wave_results: list[WaveResult], lowest: dict[str, int]
) -> str:
    print()
    print(f"ramp {'-'.join(map(str, LEVELS))} x {TARGET} users, {auto.duration_s:.0f} s")
    print(f"{'':22}{'autoscaled':>12}{'static':>12}")
    steps = ", ".join(f"{s:.1f}" for s in auto.step_to_ready_s)
    print(f"{'step to Ready (s)':22}{steps:>12}{'-':>12}")
    print(f"{'TTFT p50 (ms)':22}{auto.ttft_p50_ms:>12.0f}{static.ttft_p50_ms:>12.0f}")
    print(f"{'TTFT p99 (ms)':22}{auto.ttft_p99_ms:>12.0f}{static.ttft_p99_ms:>12.0f}")
    print(f"{'GPU-seconds':22}{auto.gpu_s:>12.0f}{static.gpu_s:>12.0f}")
    print(f"{'flaps (steady load)':22}{auto.flaps:>12}{'-':>12}")
    print(
        f"{'requests (failed)':22}{f'{auto.requests} ({auto.failed})':>12}"
        f"{f'{static.requests} ({static.failed})':>12}"
    )
    print()
    print("opposite waves (alpha and beta, 1..3 replicas each, 4 GPUs)")
    for i, w in enumerate(wave_results, 1):
        grew = f"{w.grew_s:.1f} s" if w.grew_s is not None else "not within 120 s"
        print(
            f"  wave {i}: {w.loaded} loaded: {w.towards} replicas evicted towards it, {w.back} "
            f"back ({w.events} eviction Events: {', '.join(w.victims) or 'none'}); 3 Ready after "
            f"{grew}"
        )
    print(f"  fewest Ready replicas seen: {lowest} (floor 1)")
    towards = [w.towards for w in wave_results[1:]]
    back = sum(w.back for w in wave_results)
    worst_step = max(auto.step_to_ready_s) if auto.step_to_ready_s else float("nan")
    return (
        f"step_to_ready_s_max={worst_step:.1f} "
        f"ttft_p99_ms_auto={auto.ttft_p99_ms:.0f} ttft_p99_ms_static={static.ttft_p99_ms:.0f} "
        f"gpu_s_auto={auto.gpu_s:.0f} gpu_s_static={static.gpu_s:.0f} flaps={auto.flaps} "
        f"evictions_per_wave={statistics.median(towards) if towards else 0:g} "
        f"evictions_back={back} min_ready={min(lowest.values())}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-s", type=float, default=30.0, help="seconds per load step")
    parser.add_argument("--waves", type=int, default=3, help="opposite load waves")
    parser.add_argument(
        "--log-dir", type=Path, help="keep the operator, gateway and stand-in logs here"
    )
    args = parser.parse_args()
    started = cluster_up()
    try:
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            line = asyncio.run(run(args, args.log_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="bench-autoscaling-") as tmp:
                line = asyncio.run(run(args, Path(tmp)))
    finally:
        if started:
            subprocess.run([str(CLUSTER_SH), "down"], check=False)
    print(line)


if __name__ == "__main__":
    main()
