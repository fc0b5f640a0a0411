"""Gateway benchmark: direct, this gateway, LiteLLM's proxy and vllm-router, side by side.

All four front the same two vLLM stand-ins on 127.0.0.1, each set up to spread requests over
both (round-robin where the peer has it). For each concurrency the targets run one after another
within a round, and the figures are medians over rounds. The gateway's (and each peer's) own CPU
time per request comes from /proc/<pid>/stat over the measured window. Then 5,000 concurrent SSE
streams go through the gateway and every one must end with [DONE] and the right text.

Everything here shares the machine's cores: load generator, proxies and replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadResult, run_load

MODEL = "gemma3-4B"
BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8}
).encode()
PATH = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its waited-for children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live children (LiteLLM forks workers)."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids.append(int(child))
    for p in pids:
        with contextlib.suppress(OSError, ValueError):
            total += cpu_seconds(p)
    return total


@dataclass
class Target:
    name: str
    urls: list[str]
    pid: int | None = None
    results: dict[int, list[LoadResult]] = field(default_factory=dict)
    cpu_ms: dict[int, list[float]] = field(default_factory=dict)
    error: str = ""


async def spawn(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> asyncio.subprocess.Process:
    out = log.open("wb") if log else asyncio.subprocess.DEVNULL
    return await asyncio.create_subprocess_exec(
        *args,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=asyncio.subprocess.STDOUT,
    )


async def wait_http(url: str, timeout_s: float, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"exited with code {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.post(
                    url, data=BODY, headers={"Content-Type": "application/json"}
                ) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f}s")


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    procs: list[asyncio.subprocess.Process] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def start_litellm(
    peers: Path, replicas: list[str], procs: list[asyncio.subprocess.Process], logdir: Path
) -> Target:
    target = Target("litellm", [])
    exe = peers / "bin" / "litellm"
    if not exe.exists():
        target.error = f"{exe} not found (make bench-gateway installs it into {peers})"
        return target
    port = free_port()
    config = logdir / "litellm.yaml"
    entries = "".join(
        f"  - model_name: {MODEL}\n    litellm_params:\n      model: hosted_vllm/{MODEL}\n"
        f"      api_base: {url}/v1\n      api_key: none\n"
        for url in replicas
    )
    config.write_text(
        "model_list:\n" + entries + "router_settings:\n  routing_strategy: simple-shuffle\n"
        "litellm_settings:\n  telemetry: false\n  drop_params: true\n"
    )
    proc = await spawn(
        [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
        log=logdir / "litellm.log",
    )
    procs.append(proc)
    target.urls = [f"http://127.0.0.1:{port}{PATH}"]
    target.pid = proc.pid
    try:
        await wait_http(target.urls[0], 180, proc)
    except RuntimeError as exc:
        tail = (logdir / "litellm.log").read_text(errors="replace")[-600:]
        target.error = f"litellm proxy did not start: {exc}; log tail: {tail.strip()}"
    return target


async def start_vllm_router(
    peers: Path, replicas: list[str], procs: list[asyncio.subprocess.Process], logdir: Path
) -> Target:
    target = Target("vllm-router", [])
    exe = peers / "bin" / "vllm-router"
    if not exe.exists():
        target.error = f"{exe} not found (make bench-gateway installs it into {peers})"
        return target
    port = free_port()
    proc = await spawn(
        [
            str(exe),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            "round_robin",
            "--log-level",
            "warning",
            "--prometheus-port",
            str(free_port()),
            "--worker-urls",
            *replicas,
        ],
        log=logdir / "vllm-router.log",
    )
    procs.append(proc)
    target.urls = [f"http://127.0.0.1:{port}{PATH}"]
    target.pid = proc.pid
    try:
        await wait_http(target.urls[0], 60, proc)
    except RuntimeError as exc:
        tail = (logdir / "vllm-router.log").read_text(errors="replace")[-600:]
        target.error = f"vllm-router did not start: {exc}; log tail: {tail.strip()}"
    return target


async def measure(target: Target, concurrency: int, duration_s: float) -> None:
    window: dict[str, float] = {}

    def on_window(edge: str) -> None:
        if target.pid is not None:
            window[edge] = tree_cpu_seconds(target.pid)

    result = await run_load(
        target.urls, BODY, concurrency=concurrency, duration_s=duration_s, on_window=on_window
    )
    target.results.setdefault(concurrency, []).append(result)
    if "start" in window and "stop" in window and result.requests:
        cpu_ms = (window["stop"] - window["start"]) * 1000 / result.requests
        target.cpu_ms.setdefault(concurrency, []).append(cpu_ms)


async def streams(url: str, count: int, tokens: int) -> dict[str, float]:
    """`count` concurrent SSE streams; every one must end with [DONE] and the echoed text."""
    words = [f"w{i}" for i in range(tokens)]
    body = json.dumps(
        {"model": MODEL, "prompt": " ".join(words), "max_tokens": tokens, "stream": True}
    ).encode()
    expected = " ".join(words)
    open_now = 0
    peak = 0
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal open_now, peak
        try:
            async with http.post(
                url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                if resp.status != 200:
                    errors[f"status {resp.status}"] = errors.get(f"status {resp.status}", 0) + 1
                    return
                open_now += 1
                peak = max(peak, open_now)
                text = []
                done = False
                try:
                    async for line in resp.content:
                        data = line.strip()
                        if not data.startswith(b"data: "):
                            continue
                        if data == b"data: [DONE]":
                            done = True
                            continue
                        text.append(json.loads(data[6:])["choices"][0]["text"])
                finally:
                    open_now -= 1
                if not done or "".join(text) != expected:
                    errors["incomplete"] = errors.get("incomplete", 0) + 1
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(one(http) for _ in range(count)))
    return {
        "streams": count,
        "errors": sum(errors.values()),
        "error_kinds": errors,  # type: ignore[dict-item]
        "peak_open": peak,
        "seconds": round(time.perf_counter() - started, 2),
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers-venv", default="benchmarks/.peers-venv")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--stream-tokens", type=int, default=30)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument(
        "--baseline",
        default="",
        metavar="MODELFLEET",
        help="also measure the gateway of another modelfleet install (its `modelfleet` "
        "executable), as gateway-base: before and after side by side in one run",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    peers = Path(args.peers_venv)
    modelfleet = shutil.which("modelfleet", path=str(Path(sys.executable).parent)) or "modelfleet"
    logdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))

    async with processes() as procs:
        ports = [free_port(), free_port()]
        replicas = [f"http://127.0.0.1:{p}" for p in ports]
        for i, port in enumerate(ports):
            procs.append(
                await spawn(
                    [modelfleet, "sim-vllm", "--model", "google/gemma-3-4b-it",
                     "--served-model-name", MODEL, "--port", str(port)],
                    env={"POD_NAME": f"replica-{i + 1}", "MODELFLEET_SIM_TOKEN_LATENCY_S": "0.25"},
                    log=logdir / f"sim-{i + 1}.log",
                )
            )  # fmt: skip
        for url, proc in zip(replicas, procs, strict=True):
            await wait_http(url + PATH, 30, proc)

        gw_port = free_port()
        # The concurrency check opens --streams connections at once: above the default cap of
        # client connections, which would answer the excess 503 by design.
        gateway_env = {"MODELFLEET_GATEWAY_MAX_CLIENT_CONNECTIONS": str(args.streams + 256)}
        gateway_proc = await spawn(
            [modelfleet, "gateway", "--host", "127.0.0.1", "--port", str(gw_port),
             "--static-upstreams", f"{MODEL}={','.join(replicas)}"],
            env=gateway_env,
            log=logdir / "gateway.log",
        )  # fmt: skip
        procs.append(gateway_proc)
        gateway_url = f"http://127.0.0.1:{gw_port}"
        await wait_http(gateway_url + PATH, 30, gateway_proc)

        targets = [
            Target("direct", [u + PATH for u in replicas]),
            Target("gateway", [gateway_url + PATH], pid=gateway_proc.pid),
        ]
        if args.baseline:
            base_port = free_port()
            base_proc = await spawn(
                [args.baseline, "gateway", "--host", "127.0.0.1", "--port", str(base_port),
                 "--static-upstreams", f"{MODEL}={','.join(replicas)}"],
                env=gateway_env,
                log=logdir / "gateway-base.log",
            )  # fmt: skip
            procs.append(base_proc)
            base_url = f"http://127.0.0.1:{base_port}{PATH}"
            await wait_http(base_url, 30, base_proc)
            targets.append(Target("gateway-base", [base_url], pid=base_proc.pid))
        if not args.skip_peers:
            targets.append(await start_vllm_router(peers, replicas, procs, logdir))
            targets.append(await start_litellm(peers, replicas, procs, logdir))
        live = [t for t in targets if not t.error]

        for round_no in range(args.rounds):
            for concurrency in levels:
                for target in live:
                    # LiteLLM serves tens of requests per second: a shorter window is enough.
                    await measure(target, concurrency, args.duration)
            print(f"round {round_no + 1}/{args.rounds} done", flush=True)

        stream_result = await streams(gateway_url, args.streams, args.stream_tokens)
        async with aiohttp.ClientSession() as http, http.get(gateway_url + "/metrics") as resp:
            gateway_errors = [
                line
                for line in (await resp.text()).splitlines()
                if line.startswith(
                    (
                        "modelfleet_gateway_upstream_errors_total",
                        "modelfleet_gateway_ejections_total",
                    )
                )
            ]

    direct = targets[0]
    print()
    print(f"{'target':<12} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'+p50 ms':>8} {'+p99 ms':>8} {'cpu ms/req':>10} {'errors':>6}")  # fmt: skip
    summary: dict[str, dict[int, dict[str, float]]] = {}
    for target in targets:
        if target.error:
            print(f"{target.name:<12} not measured: {target.error}")
            continue
        for concurrency in levels:
            runs = target.results.get(concurrency, [])
            rps = median([r.rps for r in runs])
            p50 = median([r.p50_ms for r in runs])
            p99 = median([r.percentile_ms(99) for r in runs])
            d50 = median([r.p50_ms for r in direct.results.get(concurrency, [])])
            d99 = median([r.percentile_ms(99) for r in direct.results.get(concurrency, [])])
            cpu = median(target.cpu_ms.get(concurrency, []))
            errors = sum(r.errors for r in runs)
            summary.setdefault(target.name, {})[concurrency] = {
                "rps": rps, "p50": p50, "p99": p99, "add50": p50 - d50, "add99": p99 - d99,
                "cpu": cpu,
            }  # fmt: skip
            print(
                f"{target.name:<12} {concurrency:>4} {rps:>9.0f} {p50:>8.3f} {p99:>8.3f} "
                f"{p50 - d50:>8.3f} {p99 - d99:>8.3f} {cpu:>10.3f} {errors:>6}"
            )
    print()
    print(
        f"streams through the gateway: {stream_result['streams']} concurrent, "
        f"peak open {stream_result['peak_open']}, errors {stream_result['errors']} "
        f"{stream_result['error_kinds'] or ''}, {stream_result['seconds']} s"
    )
    for line in gateway_errors:
        print(f"gateway: {line}")
    print(f"logs: {logdir}")

    def fig(name: str, concurrency: int, key: str) -> str:
        value = summary.get(name, {}).get(concurrency, {}).get(key)
        return "nan" if value is None else f"{value:.3f}" if key != "rps" else f"{value:.0f}"

    c1, c16 = (1 if 1 in levels else levels[0]), (16 if 16 in levels else levels[-1])
    all_cpu = [summary["gateway"][c]["cpu"] for c in levels]
    if "gateway-base" in summary:
        base_cpu = [summary["gateway-base"][c]["cpu"] for c in levels]
        print(
            f"gateway-base: rps_c16={fig('gateway-base', c16, 'rps')} "
            f"overhead_p50_ms={fig('gateway-base', c1, 'add50')} "
            f"overhead_p99_ms={fig('gateway-base', c1, 'add99')} "
            f"cpu_ms_per_req={median(base_cpu):.3f}"
        )
    print(
        f"rps_c16={fig('gateway', c16, 'rps')} "
        f"overhead_p50_ms={fig('gateway', c1, 'add50')} "
        f"overhead_p99_ms={fig('gateway', c1, 'add99')} "
        f"cpu_ms_per_req={median(all_cpu):.3f} "
        f"litellm_rps_c16={fig('litellm', c16, 'rps')} "
        f"vllm_router_rps_c16={fig('vllm-router', c16, 'rps')}"
    )
    return 0 if stream_result["errors"] == 0 else 1


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main()))
