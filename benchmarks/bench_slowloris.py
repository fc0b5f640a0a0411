"""Slow clients against the gateway: memory held, connections freed, a normal client's latency.

One vLLM stand-in and the gateway run on 127.0.0.1 as their own processes. Slow clients then
open connections that send all but the last byte of an 8 MiB body and go silent, and more that
send half a request head and go silent. While they are held, a normal client sends requests one
after another and its latencies are recorded. The run then waits for the gateway to close the
slow connections (its head and body timeouts, set short here) and reads the gateway's RSS
before, while held, and after; a second wave shows whether memory kept after the first is
reused. Every loop is bounded in count and time.

The gateway runs twice: with glibc's defaults and with the chart's MALLOC_MMAP_THRESHOLD_.
`--baseline-pythonpath DIR` runs the same against another source tree of the package (e.g.
`git archive <commit> operator | tar -x -C DIR`), with this environment's dependencies, for a
before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import BODY, MODEL, PATH, free_port, processes, spawn, wait_http

HEAD = f"POST {PATH} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n".encode()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def open_slow(
    port: int, bodies: int, heads: int, body_bytes: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns = []
    for i in range(bodies + heads):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if i < bodies:
            writer.write(HEAD + b"Content-Length: %d\r\n\r\n" % body_bytes)
            writer.write(b"{" + b" " * (body_bytes - 2))  # one byte short, then silence
        else:
            writer.write(HEAD[: 20 + i % 30])
        conns.append((reader, writer))
    async with asyncio.timeout(120):
        await asyncio.gather(*(w.drain() for _, w in conns))
    return conns


async def closed_by_server(
    reader: asyncio.StreamReader, deadline: float
) -> tuple[float | None, str]:
    """When the gateway closed the connection (monotonic; None: not by the deadline) and the
    status code it answered first ("" for none)."""
    first = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    first = first or chunk
            return time.monotonic(), first[9:12].decode()
    return None, first[9:12].decode()


async def normal_client(url: str, seconds: float, limit: int = 50000) -> list[float]:
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(latencies) < limit:
            began = time.perf_counter()
            async with http.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append(time.perf_counter() - began)
    return latencies


async def run_wave(
    name: str, wave: int, pid: int, port: int, url: str, args: argparse.Namespace
) -> tuple[dict[str, object], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    before = rss_mib(pid)
    began = time.monotonic()
    conns = await open_slow(port, args.bodies, args.heads, args.body_bytes)
    sent_s = time.monotonic() - began
    await asyncio.sleep(0.5)
    held = rss_mib(pid)
    # The normal client runs while every slow connection is still held.
    window = max(1.0, args.timeout - sent_s - 2.0)
    latencies = await normal_client(url, window)
    held_after_load = rss_mib(pid)
    deadline = began + args.timeout + args.grace
    closed_at = await asyncio.gather(*(closed_by_server(r, deadline) for r, _ in conns))
    closed = [t - began for t, _ in closed_at if t is not None]
    answers = collections.Counter(code or "none" for _, code in closed_at)
    await asyncio.sleep(1.0)
    after = rss_mib(pid)
    latencies.sort()
    return {
        "target": name,
        "wave": wave,
        "slow_connections": len(conns),
        "closed_by_gateway": len(closed),
        "answers": dict(sorted(answers.items())),
        "waited_s": round(args.timeout + args.grace, 1),
        "last_closed_s": round(max(closed), 2) if closed else None,
        "sending_took_s": round(sent_s, 2),
        "rss_before_mib": round(before, 1),
        "rss_held_mib": round(max(held, held_after_load), 1),
        "rss_after_mib": round(after, 1),
        "normal_requests": len(latencies),
        "normal_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "normal_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "normal_max_ms": round(latencies[-1] * 1000, 2),
    }, conns


async def run_one(
    name: str, command: list[str], env: dict[str, str], replica: str, args: argparse.Namespace
) -> list[dict[str, object]]:
    logdir = Path(tempfile.mkdtemp(prefix="bench-slowloris-"))
    results = []
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    async with processes() as procs:
        port = free_port()
        gateway = await spawn(
            [*command, "gateway", "--host", "127.0.0.1", "--port", str(port),
             "--static-upstreams", f"{MODEL}={replica}"],
            env=env,
            log=logdir / f"{name}.log",
        )  # fmt: skip
        procs.append(gateway)
        url = f"http://127.0.0.1:{port}{PATH}"
        await wait_http(url, 30, gateway)
        await normal_client(url, 1.0)  # warm up
        try:
            for wave in range(1, args.waves + 1):
                result, conns = await run_wave(name, wave, gateway.pid, port, url, args)
                results.append(result)
                held.extend(conns)
        finally:
            for _, writer in held:
                writer.close()
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bodies", type=int, default=60, help="connections stopping in a body")
    parser.add_argument("--heads", type=int, default=500, help="connections stopping in a head")
    parser.add_argument("--body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--timeout", type=float, default=10.0, help="head and body timeout, s")
    parser.add_argument("--waves", type=int, default=2, help="slow waves, one after another")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds allowed past it")
    parser.add_argument("--baseline-pythonpath", default="")
    args = parser.parse_args()
    if args.baseline_pythonpath:
        args.baseline_pythonpath = str(Path(args.baseline_pythonpath).resolve())
    return args


async def main(args: argparse.Namespace) -> int:

    limits = {
        "MODELFLEET_GATEWAY_CLIENT_HEADER_TIMEOUT_S": str(args.timeout),
        "MODELFLEET_GATEWAY_CLIENT_BODY_TIMEOUT_S": str(args.timeout),
    }
    python = sys.executable
    results = []
    async with processes() as procs:
        sim_port = free_port()
        sim = await spawn(
            [python, "-m", "modelfleet", "sim-vllm", "--model", "google/gemma-3-4b-it",
             "--served-model-name", MODEL, "--port", str(sim_port)],
            env={"MODELFLEET_SIM_TOKEN_LATENCY_S": "0"},
        )  # fmt: skip
        procs.append(sim)
        replica = f"http://127.0.0.1:{sim_port}"
        await wait_http(replica + PATH, 30, sim)
        if args.baseline_pythonpath:
            base_env = {"PYTHONPATH": args.baseline_pythonpath}
            cmd = [python, "-m", "modelfleet"]
            results.extend(await run_one("gateway-base", cmd, base_env, replica, args))
        cmd = [python, "-m", "modelfleet"]
        results.extend(await run_one("gateway", cmd, limits, replica, args))
        # As the chart runs it: glibc gives every allocation over 128 KiB its own mapping.
        chart_env = {**limits, "MALLOC_MMAP_THRESHOLD_": "131072"}
        results.extend(await run_one("gateway-chart-env", cmd, chart_env, replica, args))
    print(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
