"""The operator at scale on the local control plane: time from a ModelDeployment change to its
replica Pod bound, operator memory, and API requests per second in steady state.

Setup: the local control plane (hack/cluster.sh, real kube-apiserver, etcd and kwok) with its
simulated nodes replaced by N 8-GPU nodes (restored to hack/nodes.yaml at the end); a separate
process serves every node's agent reply (`GET /v1/gpus`, one port per node, idle GPUs: what a
replica holds is accounted from its Pod's annotations, as before vLLM starts); the real
`modelfleet operator` process with the static endpoint list. Then:

1. create M ModelDeployments (1 replica, 1 GPU) at a steady rate, and
2. scale a sample of them from 1 to 2 replicas,

timing each change from just before its API request to the moment a watch on Pods sees the
replica Pod with its node (Pods are bound at creation, so "exists" is "bound"). Steady state is
measured afterwards: the operator's RSS and its API request rate (its own request counter,
modelfleet_operator_api_requests_total; the API server's apiserver_request_total is printed too,
but on kwok it includes the endpoints controller retrying the Services' loopback endpoints).

    make bench-operator   # or: python benchmarks/bench_operator.py --nodes 200 --deployments 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from modelfleet.api.gpustats import GpuReport, GpuStats
from modelfleet.kube.client import ApiError, KubeClient, list_and_watch, load_kubeconfig
from modelfleet.kube.paths import md_path, pods_path

ROOT = Path(__file__).resolve().parents[1]
KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
NAMESPACE = "bench-operator"


# --- the agent farm (a separate process) -------------------------------------------------------


def render(node: str, gpus: int) -> bytes:
    report = GpuReport(
        node=node,
        backend="simulated",
        sampled_at=datetime.now(UTC),
        poll_interval_s=5.0,
        gpus=[
            GpuStats(
                index=i,
                gpu_id=f"{node}:{i}",
                uuid=f"GPU-{node}-{i}",
                product="NVIDIA-H100-80GB-HBM3",
                memory_total_mib=81559,
                memory_used_mib=0,
                memory_free_mib=81559,
            )
            for i in range(gpus)
        ],
    )
    return report.model_dump_json(by_alias=True).encode()


async def serve(nodes: list[str], gpus: int) -> None:
    """One port per node; the reply is re-rendered every second so sampledAt stays fresh."""
    bodies: dict[int, bytes] = {}
    names: dict[int, str] = {}

    async def handler(request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        return web.Response(body=bodies[sockname[1]], content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/gpus", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for node in nodes:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=128)
        await site.start()
        port = runner.addresses[-1][1]
        names[port] = node
        bodies[port] = render(node, gpus)
        ports.append(port)
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()

    async def refresh() -> None:
        while True:
            await asyncio.sleep(1)
            for port, node in names.items():
                bodies[port] = render(node, gpus)

    task = asyncio.create_task(refresh())
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    task.cancel()
    await runner.cleanup()


# --- helpers -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def kubectl_bin() -> str:
    out = subprocess.run(
        [str(ROOT / "hack" / "build-control-plane.sh"), "--cached-only"],
        capture_output=True,
        text=True,
        check=True,
    )
    return str(Path(out.stdout.strip().splitlines()[-1]) / "kubectl")


def api_requests_total(kubectl: str) -> float:
    """Sum of apiserver_request_total over every label set."""
    text = subprocess.run(
        [kubectl, "--kubeconfig", str(KUBECONFIG), "get", "--raw", "/metrics"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def operator_requests_total(port: int) -> float:
    """modelfleet_operator_api_requests_total of the operator, from its /metrics."""
    text = subprocess.run(
        ["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True
    ).stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("modelfleet_operator_api_requests_total{")
    )


def api_rps(kubectl: str, seconds: float, port: int | None = None) -> tuple[float, float]:
    """(API server requests/s from every client, the operator's own requests/s) over a window."""
    first = api_requests_total(kubectl)
    mine = operator_requests_total(port) if port else 0.0
    time.sleep(seconds)
    server = (api_requests_total(kubectl) - first) / seconds
    own = (operator_requests_total(port) - mine) / seconds if port else 0.0
    return server, own


def apply_nodes(nodes_file: Path, octet: int) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "hack" / "simnodes.py"),
            "--kubeconfig",
            str(KUBECONFIG),
            "--nodes",
            str(nodes_file),
            "--octet",
            str(octet),
            "--timeout",
            "180",
        ],
        check=True,
    )


async def cluster_octet(kube: KubeClient) -> int:
    nodes = await kube.list("/api/v1/nodes", labelSelector="modelfleet.io/simulated=true")
    for node in nodes.get("items", []):
        cidr = (node.get("spec") or {}).get("podCIDR", "")
        if cidr.startswith("127."):
            return int(cidr.split(".")[1])
    raise SystemExit("no simulated node with a loopback pod CIDR: run `make cluster-up` first")


def md(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": f"bench/{name}", "replicas": 1, "gpu": {"count": 1, "memory": "20Gi"}},
    }


def start_operator(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfleet",
                "operator",
                "--kubeconfig",
                str(KUBECONFIG),
                "--log-level",
                "WARNING",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


# --- the benchmark -----------------------------------------------------------------------------


class PodClock:
    """Watches the bench namespace's Pods; records when each Pod was first seen with a node."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.seen: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}

    def expect(self, name: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if name in self.seen:
            fut.set_result(self.seen[name])
        else:
            self.waiters[name] = fut
        return fut

    async def run(self) -> None:
        async for kind, obj in list_and_watch(self.kube, pods_path(NAMESPACE)):
            items = obj.get("items", []) if kind == "SYNC" else [obj]
            now = time.perf_counter()
            for pod in items:
                name = pod["metadata"]["name"]
                if kind == "DELETED" or not (pod.get("spec") or {}).get("nodeName"):
                    continue
                if name not in self.seen:
                    self.seen[name] = now
                    fut = self.waiters.pop(name, None)
                    if fut is not None and not fut.done():
                        fut.set_result(now)


async def timed_changes(
    clock: PodClock, changes: list[tuple[str, Any]], rate: float, deadline_s: float
) -> list[float]:
    """Run each (pod name to expect, coroutine factory) at `rate` per second; return latencies."""
    latencies: list[float] = []
    pending: list[asyncio.Task[None]] = []

    async def one(pod: str, start_change: Any) -> None:
        fut = clock.expect(pod)
        started = time.perf_counter()
        await start_change()
        seen = await asyncio.wait_for(fut, deadline_s)
        latencies.append(max(0.0, seen - started))

    for pod, start_change in changes:
        pending.append(asyncio.create_task(one(pod, start_change)))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*pending)
    return latencies


async def run_bench(args: argparse.Namespace, endpoints: list[str], kubectl: str) -> str:
    async with KubeClient(load_kubeconfig(KUBECONFIG), timeout_s=30) as kube:
        with contextlib.suppress(ApiError):
            await kube.delete(f"/api/v1/namespaces/{NAMESPACE}")
        while True:
            try:
                await kube.create("/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
                break
            except ApiError as exc:
                if not exc.conflict:
                    raise
                await asyncio.sleep(1)

        base_rps, _ = await asyncio.to_thread(api_rps, kubectl, args.window)
        port = free_port()
        log = Path(tempfile.gettempdir()) / f"bench-operator-{os.getpid()}.log"
        env = {
            **os.environ,
            "MODELFLEET_NODE_STATS_ENDPOINTS": ",".join(endpoints),
            "MODELFLEET_WATCH_NAMESPACE": NAMESPACE,
            "MODELFLEET_LEASE_NAMESPACE": NAMESPACE,
            "MODELFLEET_METRICS_HOST": "127.0.0.1",
            "MODELFLEET_METRICS_PORT": str(port),
            "MODELFLEET_SHARED_MODE": "true",
        }
        operator = await asyncio.to_thread(start_operator, env, log)
        try:
            clock = PodClock(kube)
            watcher = asyncio.create_task(clock.run())
            # Ready when the operator's pool sees every node.
            deadline = time.monotonic() + 120
            while True:
                try:
                    status = await asyncio.to_thread(
                        subprocess.run,
                        ["curl", "-sf", f"http://127.0.0.1:{port}/status?gpus=false"],
                        capture_output=True,
                        text=True,
                    )
                    doc = json.loads(status.stdout) if status.returncode == 0 else {}
                    usable = doc.get("totals", {}).get("endpointsUsable", 0)
                except json.JSONDecodeError:
                    usable = 0
                if usable == len(endpoints):
                    break
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise SystemExit(
                        f"operator pool not ready ({usable} usable):\n{log.read_text()}"
                    )
                await asyncio.sleep(0.5)

            names = [f"m{i:04d}" for i in range(args.deployments)]

            def creator(name: str) -> Any:
                return lambda: kube.create(md_path(NAMESPACE), md(name))

            create_lat = await timed_changes(
                clock, [(f"{n}-instance-1", creator(n)) for n in names], args.rate, 60
            )

            def scaler(name: str) -> Any:
                return lambda: kube.patch(md_path(NAMESPACE, name), {"spec": {"replicas": 2}})

            sample = names[:: max(1, len(names) // args.scales)][: args.scales]
            scale_lat = await timed_changes(
                clock, [(f"{n}-instance-2", scaler(n)) for n in sample], args.rate, 60
            )
            await asyncio.sleep(args.settle)
            rss = rss_mib(operator.pid)
            steady_rps, own_rps = await asyncio.to_thread(api_rps, kubectl, args.window, port)
            rss = max(rss, rss_mib(operator.pid))
            watcher.cancel()
            if operator.poll() is not None:
                raise SystemExit(f"the operator exited:\n{log.read_text()[-3000:]}")
        finally:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
            with contextlib.suppress(ApiError):
                await kube.delete(f"/api/v1/namespaces/{NAMESPACE}")

    every = create_lat + scale_lat
    print(
        f"create: n={len(create_lat)} p50={percentile(create_lat, 0.5):.3f}s "
        f"p99={percentile(create_lat, 0.99):.3f}s max={max(create_lat):.3f}s"
    )
    print(
        f"scale 1->2: n={len(scale_lat)} p50={percentile(scale_lat, 0.5):.3f}s "
        f"p99={percentile(scale_lat, 0.99):.3f}s max={max(scale_lat):.3f}s"
    )
    # The API server's total also counts the endpoints controller, which keeps retrying the
    # Services' endpoints because kwok pod IPs are loopback addresses (refused in Endpoints).
    print(
        f"api: operator {own_rps:.2f} req/s in steady state; API server total {steady_rps:.1f} "
        f"req/s (baseline without the operator {base_rps:.1f}); mean bind "
        f"{statistics.mean(every):.3f}s"
    )
    return (
        f"bind_p50_s={percentile(every, 0.5):.3f} bind_p99_s={percentile(every, 0.99):.3f} "
        f"rss_mib={rss:.0f} api_rps={own_rps:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--deployments", type=int, default=500)
    parser.add_argument("--scales", type=int, default=100, help="deployments scaled 1 -> 2")
    parser.add_argument("--rate", type=float, default=5.0, help="changes per second")
    parser.add_argument("--window", type=float, default=30.0, help="API rate window, seconds")
    parser.add_argument("--settle", type=float, default=35.0, help="wait before steady state")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(json.loads(args.serve), args.gpus))
        return
    if not KUBECONFIG.is_file():
        raise SystemExit("no local cluster: run `make cluster-up` first")
    kubectl = kubectl_bin()
    nodes = [f"gpu-bench-{i}" for i in range(args.nodes)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "bench",
                        "count": args.nodes,
                        "gpus": args.gpus,
                        "product": "NVIDIA-H100-80GB-HBM3",
                        "memoryMiB": 81559,
                    }
                ]
            },
            handle,
        )
        bench_nodes = Path(handle.name)

    async def octet() -> int:
        async with KubeClient(load_kubeconfig(KUBECONFIG), timeout_s=30) as kube:
            return await cluster_octet(kube)

    oct_ = asyncio.run(octet())
    farm = subprocess.Popen(
        [sys.executable, __file__, "--serve", json.dumps(nodes), "--gpus", str(args.gpus)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert farm.stdout is not None
        ports = json.loads(farm.stdout.readline())
        apply_nodes(bench_nodes, oct_)
        headline = asyncio.run(run_bench(args, [f"http://127.0.0.1:{p}" for p in ports], kubectl))
    finally:
        if farm.stdin:
            farm.stdin.close()
        farm.wait(timeout=30)
        apply_nodes(ROOT / "hack" / "nodes.yaml", oct_)
        bench_nodes.unlink(missing_ok=True)
    print(headline)


if __name__ == "__main__":
    main()
