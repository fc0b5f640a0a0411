"""One poll round of the GPU pool over many agent endpoints, over real HTTP on loopback.

A separate server process answers `GET /v1/gpus` on N ports (one simulated 8-GPU node per port,
each reply a valid GpuReport); this process runs `GpuPool.poll_once` with the default settings
(64 requests in flight, one shared session) and measures each round's wall time and this
process's CPU time. One warm-up round opens the keep-alive connections, as a running operator
has them open. Both processes share the machine's cores.

By default every reply is a new sample (its `sampledAt` is the time of the request), as when the
pool polls every 5 s and the agents sample every 5 s: nothing can be reused between rounds, the
worst case. `--sample-every S` renders new samples only every S seconds instead, as agents that
sample less often than the pool polls; the pool then skips parsing unchanged replies.

    make bench-pool            # or: python benchmarks/bench_pool.py --endpoints 1000 --rounds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CollectorRegistry

from modelfleet.api.gpustats import GpuReport, GpuStats
from modelfleet.gpus.client import create_session
from modelfleet.gpus.metrics import PoolMetrics
from modelfleet.gpus.pool import GpuPool
from modelfleet.settings import OperatorSettings


def render(node: str, gpus: int = 8, sampled_at: datetime | None = None) -> bytes:
    report = GpuReport(
        node=node,
        backend="simulated",
        sampled_at=sampled_at or datetime.now(UTC),
        poll_interval_s=5.0,
        gpus=[
            GpuStats(
                index=i,
                gpu_id=f"{node}:{i}",
                uuid=f"GPU-{node}-{i}",
                product="NVIDIA-H100-80GB-HBM3",
                memory_total_mib=81559,
                memory_used_mib=1000 * i,
                memory_free_mib=81559 - 1000 * i,
                utilization_percent=10.0 * i,
                temperature_c=40.0,
                power_w=120.0,
            )
            for i in range(gpus)
        ],
    )
    return report.model_dump_json(by_alias=True).encode()


_MARK = datetime(1970, 1, 2, tzinfo=UTC)


def split_template(body: bytes) -> tuple[bytes, bytes]:
    """A body rendered with `_MARK` as sampledAt, split around it: head + time + tail."""
    mark = json.dumps(_MARK.isoformat().replace("+00:00", "Z")).encode()
    head, found, tail = body.partition(mark)
    if not found:
        raise SystemExit(f"cannot find the sampledAt mark {mark!r} in the rendered report")
    return head, tail


async def serve(count: int, sample_every: float) -> None:
    """Listen on `count` ephemeral ports; print them as JSON; serve until stdin closes."""
    templates: dict[int, tuple[bytes, bytes]] = {}
    bodies: dict[int, bytes] = {}

    def stamp(port: int) -> bytes:
        head, tail = templates[port]
        return head + json.dumps(datetime.now(UTC).isoformat()).encode() + tail

    async def resample() -> None:
        while True:
            for port in templates:
                bodies[port] = stamp(port)
            await asyncio.sleep(sample_every)

    async def gpus(request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = sockname[1]
        body = bodies[port] if sample_every > 0 else stamp(port)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/gpus", gpus)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for i in range(count):
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=128)
        await site.start()
        port = runner.addresses[-1][1]
        templates[port] = split_template(render(f"bench-node-{i:04d}", sampled_at=_MARK))
        ports.append(port)
    resampler = asyncio.create_task(resample()) if sample_every > 0 else None
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    if resampler is not None:
        resampler.cancel()
    await runner.cleanup()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (Linux /proc), to report the server's share too."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def bench(ports: list[int], rounds: int) -> tuple[list[float], list[float], int]:
    settings = OperatorSettings(node_stats_endpoints=[f"http://127.0.0.1:{p}" for p in ports])
    async with create_session(settings.poll_concurrency) as session:
        pool = GpuPool(settings, session, metrics=PoolMetrics(CollectorRegistry()))
        snap = await pool.poll_once()  # warm-up: opens the connections
        walls, cpus = [], []
        for _ in range(rounds):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            snap = await pool.poll_once()
            walls.append(time.perf_counter() - wall0)
            cpus.append(time.process_time() - cpu0)
        if snap.totals.endpoints_usable != len(ports):
            bad = [e for e in snap.endpoints if not e.included][:3]
            raise SystemExit(f"only {snap.totals.endpoints_usable} endpoints usable: {bad}")
        return walls, cpus, snap.totals.figures.gpus_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--sample-every",
        type=float,
        default=0.0,
        metavar="S",
        help="agents take a new sample every S seconds (default 0: every reply is a new sample)",
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.sample_every))
        return
    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(args.endpoints),
            "--sample-every",
            str(args.sample_every),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ports = json.loads(server.stdout.readline())
        server_cpu0 = cpu_seconds(server.pid)
        walls, cpus, gpus = asyncio.run(bench(ports, args.rounds))
        server_cpu = (cpu_seconds(server.pid) - server_cpu0) / (args.rounds + 1)
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=30)
    p50, p99 = statistics.median(walls), percentile(walls, 0.99)
    print(
        f"rounds={len(walls)} gpus={gpus} cores={os.cpu_count()} "
        f"round_min_s={min(walls):.3f} round_max_s={max(walls):.3f} "
        f"server_cpu_s_per_round={server_cpu:.3f} load_avg_1m={os.getloadavg()[0]:.1f} "
        f"sample_every_s={args.sample_every:g}"
    )
    print(
        f"endpoints={len(ports)} round_p50_s={p50:.3f} round_p99_s={p99:.3f} "
        f"cpu_s_per_round={statistics.median(cpus):.3f}"
    )


if __name__ == "__main__":
    main()
